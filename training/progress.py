"""Where training stands: one record, passed between the loop, saving and restoring.

A checkpoint stores it in DINO's convention ('epoch' is the last completed epoch, 'iteration' the steps done in
the next one); only to_state() and from_state() know that convention."""
from dataclasses import dataclass, field
from typing import Optional

# 2: 'origin', 'environment', 'datasets', 'eval_pending', 'epoch_time', global 'samples_done'
FORMAT_VERSION = 2


@dataclass(frozen=True)
class Layout:
    """How an epoch's samples are split into steps: processes x batch_size x accumulate_steps images per step.
    `requested_accumulate_steps` is the command's; a resume may change accumulate_steps to keep the run's
    global batch (checkpoint/resume.py's layout_for)."""
    world_size: int
    batch_size: int
    accumulate_steps: int
    requested_accumulate_steps: int
    seed: int
    num_samples: int

    @property
    def step_samples(self) -> int:
        return self.world_size * self.batch_size * self.accumulate_steps

    @property
    def sizes(self) -> tuple:
        return self.world_size, self.batch_size, self.accumulate_steps


@dataclass
class Progress:
    """`epoch`: the epoch being trained, or trained next. `samples_done`: the global samples of its order already
    trained on, of the `epoch_samples` it trains (None: the whole steps of the current layout); `iteration`: the
    steps they took in the current layout. `best`: per kind ('regular', 'ema') the best {'ap', 'epoch'}.
    `meters`: the loss sums of `epoch` so far. `recent_losses`: the last training losses (compared with the
    first ones after a resume). `rng`: this process's random state after the last completed step (None: take
    it when saving). `pending`: an epoch trained but not yet evaluated, {'epoch', 'train_meters',
    'train_time'}, evaluated before training goes on. `scheduler_steps`: how often the lr schedule stepped."""
    epoch: int = 0
    iteration: int = 0
    samples_done: int = 0
    epoch_samples: Optional[int] = None
    best: dict = field(default_factory=dict)
    meters: dict = field(default_factory=dict)
    recent_losses: list = field(default_factory=list)
    rng: Optional[dict] = None
    pending: Optional[dict] = None
    scheduler_steps: int = 0

    def to_state(self, layout: Layout, rng_states: list) -> dict:
        """The checkpoint's record of where training stands (`rng_states`: every process's, by rank)."""
        pending = self.pending or {}
        return {
            'epoch': self.epoch - 1,
            'iteration': self.iteration,
            # The data order is a pure function of the seed and the epoch (datasets/sampler.py): samples_done says
            # exactly which samples of it were trained on, whatever the number of processes that continues.
            'data_order': {'scheme': 'global-batch', 'seed': layout.seed, 'world_size': layout.world_size,
                           'batch_size': layout.batch_size, 'accumulate_steps': layout.accumulate_steps,
                           'samples_done': self.samples_done, 'num_samples': layout.num_samples,
                           'epoch_samples': self.epoch_samples,
                           'requested_accumulate_steps': layout.requested_accumulate_steps},
            'best': dict(self.best),
            'meters': pending.get('train_meters', self.meters),
            'recent_losses': list(self.recent_losses),
            'eval_pending': bool(pending),
            'epoch_time': pending.get('train_time', 0.0),
            'rng': rng_states,
            'format_version': FORMAT_VERSION,
        }

    @classmethod
    def from_state(cls, checkpoint: dict, num_samples: int) -> "Progress":
        """The record as saved (`num_samples`: the training set's size); resuming on another layout then moves it
        (checkpoint/resume.py)."""
        progress = cls(epoch=checkpoint['epoch'] + 1, iteration=checkpoint.get('iteration', 0),
                       best=checkpoint.get('best') or {}, meters=checkpoint.get('meters') or {},
                       recent_losses=checkpoint.get('recent_losses') or [],
                       scheduler_steps=checkpoint['lr_scheduler']['last_epoch'])
        order = checkpoint.get('data_order') or {}
        if order.get('scheme') == 'global-batch':
            progress.samples_done = order['samples_done']
            if progress.samples_done:  # the epoch trains what its first layout's whole steps hold
                step = order.get('world_size', 1) * order['batch_size'] * order.get('accumulate_steps', 1)
                progress.epoch_samples = order.get('epoch_samples') or num_samples // step * step
        if checkpoint.get('eval_pending'):
            progress.pending = {'epoch': checkpoint['epoch'], 'train_meters': progress.meters,
                                'train_time': checkpoint.get('epoch_time', 0.0)}
            progress.meters = {}
        return progress

    def completed_step(self, iteration: int, samples_done: int, meters: dict, rng: dict) -> None:
        """After an optimizer step: what a save now records."""
        self.iteration, self.samples_done, self.meters, self.rng = iteration, samples_done, meters, rng

    def next_epoch(self, train_meters: dict, train_time: float) -> None:
        """The epoch's training is done: it waits for its evaluation, the next epoch starts at its beginning."""
        self.pending = {'epoch': self.epoch, 'train_meters': train_meters, 'train_time': train_time}
        self.epoch += 1
        self.iteration, self.samples_done, self.epoch_samples, self.meters, self.rng = 0, 0, None, {}, None

