"""One training epoch and one evaluation pass: the iteration over batches. Resumable: an epoch can start at any
iteration. What one optimizer step does is training/step.py's."""
import logging
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional

import torch
from tqdm import tqdm

from datasets.coco_eval import CocoEvaluator
from training.step import TrainStep, next_window, windows
from util import distributed as dist_utils
from util import faults

logger = logging.getLogger("dino.engine")


class NonFiniteOutputError(FloatingPointError):
    """Evaluation met NaN/inf predictions or losses: a diverged model gets no AP (pycocotools would score it)."""


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


@dataclass
class EpochPlan:
    """The part of an epoch to train: from iteration `start_iter` (the loader already skips the done batches),
    `steps` windows (None: the rest of the epoch), of which the last holds fewer images than the others,
    unevenly spread over the processes, when `short_last_step` (an epoch continued on another layout,
    datasets/sampler.py); at most `max_iters` iterations (--debug)."""
    start_iter: int = 0
    steps: Optional[int] = None
    short_last_step: bool = False
    max_iters: Optional[int] = None


def train_one_epoch(step: TrainStep, data_loader, epoch: int, plan: EpochPlan = EpochPlan(),
                    meters: Optional[Meters] = None, after_iteration: Optional[Callable[[int, Meters, list], None]] = None,
                    lr_factor: Optional[Callable[[int], float]] = None, log_progress: bool = False) -> Dict[str, float]:
    """Trains the plan's part of the epoch. An iteration is one optimizer step (training/step.py) over a window
    of `step.accumulate_steps` batches of the loader; an epoch's last incomplete window is skipped.
    `after_iteration(iterations_done, meters, targets)` runs after every optimizer step: the checkpoint hooks
    live there, so a window is never saved half done (a resumed run replays it). `lr_factor(it)` scales the
    scheduled lr of iteration `it`'s step (the warm-up, training.step.linear_warmup). `log_progress`: plain
    progress lines even on a terminal."""
    step.model.train()
    step.criterion.train()
    step.start_epoch()
    meters = meters or Meters()
    start_iter, steps = plan.start_iter, plan.steps
    total = start_iter + steps if steps is not None else len(data_loader) // step.accumulate_steps
    total = total if plan.max_iters is None else min(plan.max_iters, total)
    desc = f"Epoch {epoch}"
    started, log_every = time.time(), max(1, total // 10)
    bar = progress(None, total, start_iter, desc)
    batches = windows(data_loader, step.accumulate_steps)
    it = start_iter
    while it < total:
        window = next_window(batches, step.device)
        if window is None:
            break
        uneven = plan.short_last_step and steps is not None and it == start_iter + steps - 1
        loss_value, weighted, lr = step(window, epoch, it, lr_factor(it) if lr_factor is not None else 1.0, uneven)
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
             after_batch: Optional[Callable[[], None]] = None, backend: str = "pycocotools"):
    """COCO bbox evaluation over the whole (possibly sharded) loader, scored by `backend` (coco_eval_backend);
    returns (stats dict, evaluator). The stats hold the 12 COCO numbers and per_class_ap, {name: AP or None},
    rounded to 4 digits to keep log.txt's line short.

    `after_batch()` runs after every batch: a stop signal is acted on there, not after a long evaluation."""
    model.eval()
    criterion.eval()
    meters = Meters()
    evaluator = CocoEvaluator(base_ds, label_to_category_id, backend)
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
    stats["per_class_ap"] = {name: None if ap is None else round(ap, 4) for name, ap in evaluator.per_class_ap.items()}
    return stats, evaluator
