"""Samplers that yield (epoch, index) keys: the dataset seeds each sample's augmentation from its key.

Training batches are cut from one global order per epoch, and the position in an epoch is a count of global
samples, so a run stopped on W processes continues on W' (or with another batch size) in the middle of the
epoch with no sample seen twice and none skipped. Resuming skips the samples already done without loading them.
"""
import math

import torch
from torch.utils.data import Sampler


def epoch_order(num_samples: int, seed: int, epoch: int) -> list:
    """The epoch's permutation of sample indices: a pure function of (seed, epoch)."""
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


class GlobalBatchSampler(Sampler):
    """Step s of an epoch trains the global samples [start + s*G, start + (s+1)*G) of the epoch's order, with
    G = batch_size * num_replicas; rank r takes the r-th batch_size of them. An epoch ends before a global
    batch that would be incomplete (as drop_last), so every process always gets a full batch."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.global_batch = batch_size * num_replicas
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, samples_done: int) -> None:
        """The next pass begins after the epoch's first `samples_done` global samples; later passes start at 0."""
        self.start = samples_done

    def steps_left(self) -> int:
        return (self.num_samples - self.start) // self.global_batch

    def __iter__(self):
        order, start = epoch_order(self.num_samples, self.seed, self.epoch), self.start
        self.start = 0
        for step in range((self.num_samples - start) // self.global_batch):
            first = start + step * self.global_batch + self.rank * self.batch_size
            yield [(self.epoch, i) for i in order[first:first + self.batch_size]]

    def __len__(self) -> int:
        """Steps in a whole epoch."""
        return self.num_samples // self.global_batch


class ShardedSampler(Sampler):
    """Evaluation: every sample once, in order, split rank::num_replicas (padded by repetition to equal shards,
    as DistributedSampler; a repeated image's results are merged by id)."""

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.num_samples, self.num_replicas, self.rank = num_samples, num_replicas, rank
        self.total_size = math.ceil(num_samples / num_replicas) * num_replicas

    def __iter__(self):
        order = list(range(self.num_samples))
        if order:
            padding = self.total_size - len(order)
            order += (order * math.ceil(padding / len(order)))[:padding]
        return iter([(0, i) for i in order[self.rank:self.total_size:self.num_replicas]])

    def __len__(self) -> int:
        return self.total_size // self.num_replicas
