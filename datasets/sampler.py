"""A distributed sampler that yields (epoch, index) keys and can start mid-epoch.

The dataset seeds each sample's augmentation from its key, and resuming at iteration i skips the first
i * batch_size keys without loading them, so a resumed epoch sees exactly the samples and augmentations
the interrupted one would have.
"""
import math

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler):
    """DistributedSampler's split (padded by repetition, rank::num_replicas), permuted with seed + epoch."""

    def __init__(self, num_samples: int, shuffle: bool, seed: int, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.total_size = math.ceil(num_samples / num_replicas) * num_replicas
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, skip: int) -> None:
        """The next iteration begins after the first `skip` samples of this rank; later ones start at 0."""
        self.start = skip

    def _indices(self):
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        if order:
            padding = self.total_size - len(order)
            order += (order * math.ceil(padding / len(order)))[:padding]
        return order[self.rank:self.total_size:self.num_replicas]

    def __iter__(self):
        keys = [(self.epoch, i) for i in self._indices()[self.start:]]
        self.start = 0
        return iter(keys)

    def __len__(self) -> int:
        return self.total_size // self.num_replicas
