"""Samplers that yield (epoch, index) keys: the dataset seeds each sample's augmentation from its key.

Training batches are cut from one global order per epoch, and the position in an epoch is a count of global
samples, so a run stopped on W processes continues on W' (or with another batch size) in the middle of the
epoch with no sample seen twice and none skipped. Resuming skips the samples already done without loading them.
"""
import math
from typing import Optional

import torch
from torch.utils.data import Sampler


def epoch_order(num_samples: int, seed: int, epoch: int) -> list:
    """The epoch's permutation of sample indices: a pure function of (seed, epoch)."""
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


class GlobalBatchSampler(Sampler):
    """Optimizer step s of an epoch trains the global samples [start + s*S, start + (s+1)*S) of the epoch's
    order, with S = batch_size * num_replicas * accumulate_steps; rank r takes batch_size of them for each of
    its accumulate_steps batches. An epoch trains the first `epoch_samples` of its order: as many whole steps
    as fit when it begins (as drop_last). When an epoch continues on another layout, its rest may not fill the
    last step: that step is cut shorter, its samples dealt evenly among the ranks (a rank's batch may even be
    empty), so the epoch trains exactly the samples it began with, each once."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0,
                 accumulate_steps: int = 1):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.num_replicas, self.rank, self.accumulate_steps = num_replicas, rank, accumulate_steps
        self.global_batch = batch_size * num_replicas
        self.step_samples = self.global_batch * accumulate_steps
        self.epoch, self.start, self.epoch_samples = 0, 0, self.whole_steps_samples()

    def whole_steps_samples(self) -> int:
        """The samples an epoch begun with this layout trains."""
        return self.num_samples // self.step_samples * self.step_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, samples_done: int, epoch_samples: Optional[int] = None) -> None:
        """The next pass begins after the epoch's first `samples_done` global samples and ends after its first
        `epoch_samples` (default: the whole steps of this layout); later passes are whole epochs."""
        self.start = samples_done
        self.epoch_samples = self.whole_steps_samples() if epoch_samples is None else epoch_samples

    def steps_left(self) -> int:
        """Optimizer steps of the next pass, the shorter last one included."""
        return -(-(self.epoch_samples - self.start) // self.step_samples)

    def ends_short(self) -> bool:
        """Whether the next pass ends with a step of fewer than step_samples samples."""
        return (self.epoch_samples - self.start) % self.step_samples != 0

    def __iter__(self):
        order, start, end = epoch_order(self.num_samples, self.seed, self.epoch), self.start, self.epoch_samples
        self.start, self.epoch_samples = 0, self.whole_steps_samples()
        batches = (end - start) // self.global_batch // self.accumulate_steps * self.accumulate_steps
        for step in range(batches):
            first = start + step * self.global_batch + self.rank * self.batch_size
            yield [(self.epoch, i) for i in order[first:first + self.batch_size]]
        yield from self._short_step(order, start + batches * self.global_batch, end)

    def _short_step(self, order: list, first: int, end: int):
        """The rest [first, end), fewer than a step's samples: rank r takes the r-th of num_replicas nearly
        equal shares, as batches of up to batch_size, then empty batches to fill its accumulate_steps."""
        left = end - first
        if not left:
            return
        share, extra = divmod(left, self.num_replicas)
        first += self.rank * share + min(self.rank, extra)
        mine = order[first:first + share + (self.rank < extra)]
        for b in range(self.accumulate_steps):
            yield [(self.epoch, i) for i in mine[b * self.batch_size:(b + 1) * self.batch_size]]

    def __len__(self) -> int:
        """Batches in a whole epoch."""
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
