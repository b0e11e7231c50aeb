"""One optimizer step: a window of batches whose gradients accumulate, run under autocast (float16 or bfloat16)
with its loss scaler, split into micro-batches after running out of memory, clipped, warmed up.

No collective runs inside a forward or backward: the processes agree after each micro-batch
(util.distributed.check_together) and average the gradients after the window, so a process that fails half-way
leaves none of the others waiting."""
import contextlib
import logging
import math
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from util import distributed as dist_utils
from util import faults
from util.misc import NestedTensor
from util.rng import capture_rng_state, restore_rng_state

logger = logging.getLogger("dino.step")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; the message names the terms."""


class StopInsideStep(Exception):
    """A stop was requested between two micro-batches of a step: the step is abandoned, its start restored."""


class OutOfMemoryStop(RuntimeError):
    """A training step ran out of memory even with one image per micro-batch; parameters are untouched."""


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; the CPU allocator a RuntimeError that says so."""
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


def optimizer_steps_per_epoch(num_batches: int, accumulate_steps: int) -> int:
    """Iterations per epoch: each optimizer step takes `accumulate_steps` batches; the rest are skipped."""
    if accumulate_steps < 1 or num_batches < accumulate_steps:
        raise ValueError(f"accumulate_steps={accumulate_steps} needs between 1 and {num_batches} (the training "
                         "batches per epoch and process): change accumulate_steps or batch_size")
    steps, left = divmod(num_batches, accumulate_steps)
    if left:
        logger.info("accumulate_steps=%d: %d batches per epoch make %d optimizer steps; the last %d batch(es) of "
                    "every epoch fill no window and are skipped", accumulate_steps, num_batches, steps, left)
    return steps


def linear_warmup(warmup_iters: int, iterations_before: int) -> Optional[Callable[[int], float]]:
    """The lr factor of an epoch's iterations under a linear warm-up over the run's first warmup_iters optimizer
    steps (iterations_before: the steps of the earlier epochs); None without warm-up. A function of the step's
    number alone, so a resumed run continues it exactly."""
    if warmup_iters <= 0 or iterations_before >= warmup_iters:
        return None
    return lambda it: min(1.0, (iterations_before + it + 1) / warmup_iters)


class TrainStep:
    """The optimizer step of a window of `accumulate_steps` batches, with what it needs: the model, loss and
    optimizer; `amp_dtype` and `scaler` (float16's); `max_norm` (clipping; 0: none); `ema`, updated after each
    step; `scheduler`, stepped after each step (a per-iteration schedule; None: the caller steps per epoch);
    `stop_requested()`, asked between micro-batches (a long window can outlast a scheduler's grace period):
    when it says so, the step's start is restored and StopInsideStep raised."""

    def __init__(self, model, criterion, optimizer, device, *, amp_dtype=None, scaler=None, max_norm: float = 0.0,
                 ema=None, scheduler=None, accumulate_steps: int = 1, stop_requested=None):
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.device = torch.device(device)
        self.amp_dtype, self.scaler, self.max_norm, self.ema = amp_dtype, scaler, max_norm, ema
        self.scheduler, self.accumulate_steps, self.stop_requested = scheduler, accumulate_steps, stop_requested
        self.pieces = 1  # each batch is split in that many micro-batches (after running out of memory)

    def start_epoch(self) -> None:
        """A new epoch starts whole batches again; a process whose share of a step is empty never scales a
        loss, yet unscales, so the scaler is initialised here."""
        self.pieces = 1
        if self.scaler is not None:
            self.scaler.scale(torch.zeros((), device=self.device))

    def __call__(self, window: list, epoch: int, it: int, lr_factor: float = 1.0, uneven: bool = False):
        """Train on the window; returns (loss, weighted loss terms, lr). `uneven`: an epoch's short last step,
        unevenly spread over the processes (datasets/sampler.py), which the schedule does not count."""
        before = _StepStart(self.model)
        while True:
            self.optimizer.zero_grad(set_to_none=True)  # a failed attempt's partial gradients must not reach the step
            dist_utils.broadcast_state(self.model.buffers())  # rank 0's, as DDP before a step's first forward
            losses = before.attempt(self._accumulate_gradients, window)
            if losses is not None:
                break
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            batch = max(dist_utils.all_gather_object(len(window[0][1])))  # the same split on every process
            self.pieces = _fewer_images_per_micro_batch(self.pieces, batch, len(window), epoch, it)
        dist_utils.average_gradients(self.model.parameters())
        loss_value, weighted = self._reduced_weighted_losses(losses, epoch, it, uneven)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.max_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        with _scaled_lr(self.optimizer, lr_factor) as lr:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        if self.scheduler is not None and not uneven:  # a short step is part of a step: the schedule's
            self.scheduler.step()                        # length stays the run's iterations per epoch
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return loss_value, weighted, lr

    def _accumulate_gradients(self, window) -> Optional[Dict[str, Tensor]]:
        """Forward and backward of every batch of the window, each in `pieces` micro-batches, normalised by the
        window's box count, so the gradients sum to those of one batch of all its images. Returns the summed
        (unreduced) loss terms, or None when any process ran out of memory: all retry together, and any other
        failure stops them all. A process without images (an epoch's short last step) computes nothing."""
        criterion, device = self.criterion, self.device
        num_boxes = criterion.average_num_boxes([t for _, targets in window for t in targets], device)
        micro_batches = [part for samples, targets in window for part in _micro_batches(samples, targets, self.pieces)]
        totals = {}
        for i, (samples, targets) in enumerate(micro_batches):
            if i and self.stop_requested is not None and self.stop_requested():
                raise StopInsideStep()
            error, loss_dict = None, {}
            try:
                if targets:
                    faults.check("forward")
                    with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                        outputs = self.model(samples, targets)
                        loss_dict = criterion(outputs, targets, num_boxes=num_boxes)
                        if faults.check("loss") == "nan":
                            loss_dict = {k: v * float("nan") for k, v in loss_dict.items()}
                        loss = criterion.total_loss(loss_dict)
                    faults.arm_backward(loss)
                    (loss if self.scaler is None else self.scaler.scale(loss)).backward()
                    del outputs, loss
            except Exception as e:
                error = e
            if dist_utils.check_together(error, retryable=is_out_of_memory):
                return None
            for k, v in loss_dict.items():
                totals[k] = totals[k] + v.detach() if k in totals else v.detach()
        return totals

    def _reduced_weighted_losses(self, losses: Dict[str, Tensor], epoch: int, it: int, uneven: bool):
        """(total, weighted terms) of the window, averaged over processes; a non-finite total stops training on
        every process before the optimizer step. `uneven`: a process without images has no terms; it adds zeros."""
        if uneven:
            names = sorted(set().union(*dist_utils.all_gather_object(sorted(losses))))
            losses = {k: losses.get(k, torch.zeros((), device=self.device)) for k in names}
        reduced = dist_utils.reduce_dict(losses)
        weights = self.criterion.weight_dict
        weighted = {k: v * weights[k] for k, v in reduced.items() if k in weights}
        loss_value = float(sum(weighted.values()))
        if not math.isfinite(loss_value):
            bad = sorted(k for k, v in reduced.items() if not torch.isfinite(v))
            raise NonFiniteLossError(f"loss is {loss_value} at epoch {epoch} iteration {it}; non-finite terms: "
                                     f"{', '.join(bad) or 'none individually (their sum overflowed)'}")
        return loss_value, {k: float(v) for k, v in weighted.items()}


@contextlib.contextmanager
def _scaled_lr(optimizer, factor: float):
    """Every group's lr times factor during the step (yields the first group's), then the scheduled lr again."""
    if factor == 1.0:  # no warm-up: the optimizer is left as the scheduler set it
        yield optimizer.param_groups[0]["lr"]
        return
    scheduled = [group["lr"] for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, scheduled):
        group["lr"] = lr * factor
    try:
        yield optimizer.param_groups[0]["lr"]
    finally:
        for group, lr in zip(optimizer.param_groups, scheduled):
            group["lr"] = lr


class _StepStart:
    """What a step's forwards change before the optimizer step (batch-norm statistics, the random state),
    as it was when the step began: an attempt that fails puts it back, so a retry draws and normalises as the
    first attempt did, and a save after a failure holds the state of the last completed step."""

    def __init__(self, model):
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.rng = capture_rng_state()

    def attempt(self, step, *args):
        try:
            result = step(*args)
        except BaseException:
            self.restore()
            raise
        if result is None:
            self.restore()
        return result

    def restore(self) -> None:
        for buffer, value in self.buffers:
            buffer.data.copy_(value)
        restore_rng_state(self.rng)


def windows(data_loader, size: int):
    """The loader's batches in consecutive groups of `size`; an incomplete last group is dropped."""
    window = []
    for batch in data_loader:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []


def next_window(windows, device):
    """The next window, on the device; None at the epoch's end. A process that fails to load its share
    (a broken file) stops every process (util.distributed.check_together)."""
    window, error = None, None
    try:
        window = next(windows, None)
        if window is not None:
            window = [(samples.to(device, non_blocking=True),
                       [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets])
                      for samples, targets in window]
    except Exception as e:
        error = e
    dist_utils.check_together(error)
    return window


def _micro_batches(samples: NestedTensor, targets: list, pieces: int):
    """A batch in `pieces` consecutive parts. Each keeps the batch's padding, so every image is computed
    exactly as in the whole batch."""
    edges = [len(targets) * i // pieces for i in range(pieces + 1)]
    return [(NestedTensor(samples.tensors[a:b], samples.mask[a:b]), targets[a:b]) for a, b in zip(edges, edges[1:])]


def _fewer_images_per_micro_batch(pieces: int, batch: int, accumulated: int, epoch: int, it: int) -> int:
    """After running out of memory: twice as many micro-batches per batch, up to one image each."""
    where = f"epoch {epoch} iteration {it} with batch {batch}"
    if accumulated > 1:
        where += f" (x{accumulated} accumulated)"
    if pieces >= batch:
        raise OutOfMemoryStop(f"out of memory at {where}, even with one image per micro-batch: lower the image "
                              "sizes (data_aug_scales, data_aug_max_size) or use a device with more memory")
    pieces = min(2 * pieces, batch)
    size = f"{batch // pieces}" if batch % pieces == 0 else f"up to {-(-batch // pieces)}"
    logger.warning("out of memory at %s: retrying as %d micro-batches of %s image(s) (same effective batch), and "
                   "so for the rest of this epoch", where, pieces, size)
    return pieces
