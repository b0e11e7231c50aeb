"""One training epoch and one evaluation pass. Resumable: an epoch can start at any iteration.

Training steps may accumulate gradients over several batches, run under autocast (float16 or bfloat16) and
survive running out of memory by splitting their batches into micro-batches."""
import contextlib
import logging
import math
import sys
import time
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import Tensor
from tqdm import tqdm

from datasets.coco_eval import CocoEvaluator
from util import distributed as dist_utils
from util import faults
from util.misc import NestedTensor
from util.rng import capture_rng_state, restore_rng_state

logger = logging.getLogger("dino.engine")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; the message names the terms."""


class NonFiniteOutputError(FloatingPointError):
    """Evaluation met NaN/inf predictions or losses: a diverged model gets no AP (pycocotools would score it)."""


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


class Meters:
    """Running sums of logged scalars; plain floats so they go into a checkpoint and resume exactly."""

    def __init__(self, state: Optional[Dict[str, list]] = None):
        self.totals = {k: list(v) for k, v in (state or {}).items()}
        self.last: Dict[str, float] = {}

    def update(self, **values: float) -> None:
        self.last = {k: float(v) for k, v in values.items()}
        for k, v in values.items():
            total = self.totals.setdefault(k, [0.0, 0])
            total[0] += float(v)
            total[1] += 1

    def averages(self) -> Dict[str, float]:
        return {k: s / n for k, (s, n) in self.totals.items() if n}

    def state(self) -> Dict[str, list]:
        return {k: list(v) for k, v in self.totals.items()}


def progress(iterable: Iterable, total: int, initial: int, desc: str):
    """A tqdm bar on a terminal; on a pipe or a log file, a plain line every ~10% instead."""
    interactive = sys.stderr.isatty() and dist_utils.is_main_process()
    return tqdm(iterable, total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=not interactive,
                leave=False)


def _log_line(desc: str, it: int, total: int, started: float, done: int, meters: Meters, lr: float) -> None:
    elapsed = time.time() - started
    eta = elapsed / max(done, 1) * (total - it)
    avg = meters.averages()
    logger.info("%s [%d/%d] loss %.4f lr %.2e eta %s", desc, it, total, avg.get("loss", float("nan")), lr,
                time.strftime("%H:%M:%S", time.gmtime(eta)))


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch: int, *, max_norm: float = 0.0,
                    scaler: Optional[torch.amp.GradScaler] = None, amp_dtype: Optional[torch.dtype] = None, ema=None,
                    iteration_scheduler=None, start_iter: int = 0, steps: Optional[int] = None,
                    meters: Optional[Meters] = None, after_iteration: Optional[Callable[[int, Meters, list], None]] = None,
                    max_iters: Optional[int] = None, log_progress: bool = False,
                    accumulate_steps: int = 1, short_last_step: bool = False,
                    lr_factor: Optional[Callable[[int], float]] = None,
                    stop_requested: Optional[Callable[[], bool]] = None) -> Dict[str, float]:
    """Trains from iteration `start_iter` (the loader must already skip the done batches) to the epoch's end.

    An iteration is one optimizer step over a window of `accumulate_steps` batches of the loader; an epoch's
    last incomplete window is skipped. `steps`: how many windows the loader yields (default: the rest of the
    epoch). `short_last_step`: the last of them holds fewer images than the others, unevenly spread over the
    processes (an epoch continued on another layout, datasets/sampler.py). `after_iteration(iterations_done,
    meters, targets)` runs after every optimizer step: the checkpoint hooks live there, so a window is never
    saved half done (a resumed run replays it). `lr_factor(it)` scales the scheduled lr of iteration `it`'s
    step (the warm-up, `linear_warmup`). `stop_requested()` is asked between a step's micro-batches (a long
    accumulation window can outlast a scheduler's grace period): when it says so, the step's start is restored
    and StopInsideStep raised, so the caller saves the state after the last completed step.
    """
    model.train()
    criterion.train()
    meters = meters or Meters()
    device = torch.device(device)
    total = start_iter + steps if steps is not None else len(data_loader) // accumulate_steps
    total = total if max_iters is None else min(max_iters, total)
    desc = f"Epoch {epoch}"
    started, log_every = time.time(), max(1, total // 10)
    bar = progress(None, total, start_iter, desc)
    windows = _windows(data_loader, accumulate_steps)
    if scaler is not None:  # a process whose share of a step is empty never scales a loss, yet unscales
        scaler.scale(torch.zeros((), device=device))
    it, pieces = start_iter, 1  # pieces: each batch is split in that many micro-batches (after running out of memory)
    while it < total:
        window = _next_window(windows, device)
        if window is None:
            break
        uneven = short_last_step and steps is not None and it == start_iter + steps - 1
        before = _StepStart(model)
        while True:
            optimizer.zero_grad(set_to_none=True)  # a failed attempt's partial gradients must not reach the step
            dist_utils.broadcast_state(model.buffers())  # rank 0's, as DDP before a step's first forward
            losses = before.attempt(_accumulate_gradients, model, criterion, window, pieces, device, amp_dtype,
                                    scaler, stop_requested)
            if losses is not None:
                break
            if device.type == "cuda":
                torch.cuda.empty_cache()
            batch = max(dist_utils.all_gather_object(len(window[0][1])))  # the same split on every process
            pieces = _fewer_images_per_micro_batch(pieces, batch, len(window), epoch, it)
        dist_utils.average_gradients(model.parameters())
        loss_value, weighted = _reduced_weighted_losses(criterion, losses, epoch, it, device, uneven)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        with _scaled_lr(optimizer, lr_factor(it) if lr_factor is not None else 1.0) as lr:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        if iteration_scheduler is not None and not uneven:  # a short step is part of a step: the schedule's
            iteration_scheduler.step()                        # length stays the run's iterations per epoch
        if ema is not None:
            ema.update_parameters(model)

        meters.update(loss=loss_value, lr=lr, **weighted)
        it += 1
        bar.update(1)
        if (bar.disable or log_progress) and (it % log_every == 0 or it == total) and dist_utils.is_main_process():
            _log_line(desc, it, total, started, it - start_iter, meters, lr)
        else:
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}")
        if after_iteration is not None:
            after_iteration(it, meters, [t for _, targets in window for t in targets])
    bar.close()
    return meters.averages()


def linear_warmup(warmup_iters: int, iterations_before: int) -> Optional[Callable[[int], float]]:
    """The lr factor of an epoch's iterations under a linear warm-up over the run's first warmup_iters optimizer
    steps (iterations_before: the steps of the earlier epochs); None without warm-up. A function of the step's
    number alone, so a resumed run continues it exactly."""
    if warmup_iters <= 0 or iterations_before >= warmup_iters:
        return None
    return lambda it: min(1.0, (iterations_before + it + 1) / warmup_iters)


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


def _windows(data_loader, size: int):
    """The loader's batches in consecutive groups of `size`; an incomplete last group is dropped."""
    window = []
    for batch in data_loader:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []


def _next_window(windows, device):
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


def _accumulate_gradients(model, criterion, window, pieces: int, device, amp_dtype, scaler,
                          stop_requested=None) -> Optional[Dict[str, Tensor]]:
    """Forward and backward of every batch of the window, each in `pieces` micro-batches, normalised by the
    window's box count, so the gradients sum to those of one batch of all its images. Returns the summed
    (unreduced) loss terms, or None when any process ran out of memory: the processes agree after each
    micro-batch, so all retry together, and any other failure stops them all. No collective runs inside a
    forward or backward (gradients are averaged after the window), so a process that fails half-way leaves
    none of the others waiting. A process without images (an epoch's short last step) computes nothing."""
    num_boxes = criterion.average_num_boxes([t for _, targets in window for t in targets], device)
    micro_batches = [part for samples, targets in window for part in _micro_batches(samples, targets, pieces)]
    totals = {}
    for i, (samples, targets) in enumerate(micro_batches):
        if i and stop_requested is not None and stop_requested():
            raise StopInsideStep()
        error, loss_dict = None, {}
        try:
            if targets:
                faults.check("forward")
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    outputs = model(samples, targets)
                    loss_dict = criterion(outputs, targets, num_boxes=num_boxes)
                    if faults.check("loss") == "nan":
                        loss_dict = {k: v * float("nan") for k, v in loss_dict.items()}
                    loss = criterion.total_loss(loss_dict)
                faults.arm_backward(loss)
                (loss if scaler is None else scaler.scale(loss)).backward()
                del outputs, loss
        except Exception as e:
            error = e
        if dist_utils.check_together(error, retryable=is_out_of_memory):
            return None
        for k, v in loss_dict.items():
            totals[k] = totals[k] + v.detach() if k in totals else v.detach()
    return totals


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


def _reduced_weighted_losses(criterion, losses: Dict[str, Tensor], epoch: int, it: int, device, uneven: bool = False):
    """(total, weighted terms) of the window, averaged over processes; a non-finite total stops training on
    every process before the optimizer step. `uneven`: a process without images has no terms; it adds zeros."""
    if uneven:
        names = sorted(set().union(*dist_utils.all_gather_object(sorted(losses))))
        losses = {k: losses.get(k, torch.zeros((), device=device)) for k in names}
    reduced = dist_utils.reduce_dict(losses)
    weighted = {k: v * criterion.weight_dict[k] for k, v in reduced.items() if k in criterion.weight_dict}
    loss_value = float(sum(weighted.values()))
    if not math.isfinite(loss_value):
        bad = sorted(k for k, v in reduced.items() if not torch.isfinite(v))
        raise NonFiniteLossError(f"loss is {loss_value} at epoch {epoch} iteration {it}; non-finite terms: "
                                 f"{', '.join(bad) or 'none individually (their sum overflowed)'}")
    return loss_value, {k: float(v) for k, v in weighted.items()}


def _check_finite(outputs: dict, loss_dict: dict, targets) -> None:
    predictions = torch.cat([outputs["pred_logits"].flatten(1), outputs["pred_boxes"].flatten(1)], 1)
    bad_images = [int(t["image_id"]) for t, row in zip(targets, torch.isfinite(predictions).all(1)) if not row]
    bad_losses = sorted(k for k, v in loss_dict.items() if not torch.isfinite(v).all())
    if bad_images or bad_losses:
        found = (f"non-finite scores or boxes for image id {', '.join(map(str, bad_images))}" if bad_images
                 else f"non-finite losses ({', '.join(bad_losses)})")
        raise NonFiniteOutputError(f"the evaluated model gives {found}: it has diverged, so no AP and no best "
                                   "checkpoint are recorded")


@torch.no_grad()
def evaluate(model, criterion, postprocessors, data_loader, base_ds, device, *, amp_dtype: Optional[torch.dtype] = None,
             label_to_category_id=None, results_file: Optional[str] = None, max_iters: Optional[int] = None,
             after_batch: Optional[Callable[[], None]] = None):
    """COCO bbox evaluation over the whole (possibly sharded) loader; returns (stats dict, evaluator).

    `after_batch()` runs after every batch: a stop signal is acted on there, not after a long evaluation."""
    model.eval()
    criterion.eval()
    meters = Meters()
    evaluator = CocoEvaluator(base_ds, label_to_category_id)
    total = len(data_loader) if max_iters is None else min(max_iters, len(data_loader))
    started = time.time()
    batches = iter(data_loader)
    for _ in progress(range(total), total, 0, "Eval"):
        error = None
        try:  # a process that fails alone (a broken file, a diverged prediction) stops every process
            samples, targets = next(batches)
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            with torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = model(samples.to(device))
                loss_dict = criterion(outputs, targets)
            if faults.check("eval_batch") == "nan":
                outputs["pred_boxes"] = outputs["pred_boxes"] * float("nan")
            _check_finite(outputs, loss_dict, targets)
        except Exception as e:
            error = e
        dist_utils.check_together(error)
        reduced = dist_utils.reduce_dict(loss_dict)
        weighted = {k: v * criterion.weight_dict[k] for k, v in reduced.items() if k in criterion.weight_dict}
        meters.update(loss=float(sum(weighted.values())), **{k: float(v) for k, v in weighted.items()})
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        results = postprocessors["bbox"](outputs, orig_sizes)
        evaluator.update({int(t["image_id"]): r for t, r in zip(targets, results)})
        if after_batch is not None:
            after_batch()
    evaluator.synchronize_between_processes()
    logger.info("Evaluated %d batches in %.1f s", total, time.time() - started)
    if results_file and dist_utils.is_main_process():
        evaluator.write_results(results_file)
    evaluator.accumulate()
    evaluator.summarize()
    stats = meters.averages()
    stats["coco_eval_bbox"] = list(evaluator.stats)
    return stats, evaluator
