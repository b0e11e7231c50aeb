"""One training epoch and one evaluation pass. Resumable: an epoch can start at any iteration."""
import logging
import math
import sys
import time
from typing import Callable, Dict, Iterable, Optional

import torch
from tqdm import tqdm

from datasets.coco_eval import CocoEvaluator
from util import distributed as dist_utils

logger = logging.getLogger("dino.engine")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; the message names the terms."""


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


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch: int, *, max_norm: float = 0.0,
                    scaler: Optional[torch.amp.GradScaler] = None, amp: bool = False, ema=None,
                    iteration_scheduler=None, start_iter: int = 0, steps: Optional[int] = None,
                    meters: Optional[Meters] = None, after_iteration: Optional[Callable[[int, Meters, tuple], None]] = None,
                    max_iters: Optional[int] = None, log_progress: bool = False) -> Dict[str, float]:
    """Trains from iteration `start_iter` (the loader must already skip the done batches) to the epoch's end.

    `steps`: how many steps the loader yields (default: the rest of the epoch). `after_iteration(iterations_done,
    meters, targets)` runs after every optimizer step: the checkpoint hooks live there.
    """
    model.train()
    criterion.train()
    meters = meters or Meters()
    total = start_iter + steps if steps is not None else len(data_loader)
    total = total if max_iters is None else min(max_iters, total)
    desc = f"Epoch {epoch}"
    started, log_every = time.time(), max(1, total // 10)
    bar = progress(data_loader, total, start_iter, desc)
    it = start_iter
    for samples, targets in bar:
        if it >= total:
            break
        samples = samples.to(device, non_blocking=True)
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        with torch.autocast(device_type=torch.device(device).type, enabled=amp):
            outputs = model(samples, targets)
            loss_dict = criterion(outputs, targets)
            loss = criterion.total_loss(loss_dict)
        reduced = dist_utils.reduce_dict({k: v.detach() for k, v in loss_dict.items()})
        weighted = {k: v * criterion.weight_dict[k] for k, v in reduced.items() if k in criterion.weight_dict}
        loss_value = float(sum(weighted.values()))
        if not math.isfinite(loss_value):
            bad = sorted(k for k, v in reduced.items() if not torch.isfinite(v))
            raise NonFiniteLossError(f"loss is {loss_value} at epoch {epoch} iteration {it}; non-finite terms: "
                                     f"{', '.join(bad) or 'none individually (their sum overflowed)'}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if iteration_scheduler is not None:
            iteration_scheduler.step()
        if ema is not None:
            ema.update_parameters(model)

        lr = optimizer.param_groups[0]["lr"]
        meters.update(loss=loss_value, lr=lr, **{k: float(v) for k, v in weighted.items()})
        it += 1
        if (bar.disable or log_progress) and (it % log_every == 0 or it == total) and dist_utils.is_main_process():
            _log_line(desc, it, total, started, it - start_iter, meters, lr)
        else:
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}")
        if after_iteration is not None:
            after_iteration(it, meters, targets)
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
def evaluate(model, criterion, postprocessors, data_loader, base_ds, device, *, amp: bool = False,
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
    for i, (samples, targets) in enumerate(progress(data_loader, total, 0, "Eval")):
        if i >= total:
            break
        samples = samples.to(device)
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        with torch.autocast(device_type=torch.device(device).type, enabled=amp):
            outputs = model(samples)
            loss_dict = criterion(outputs, targets)
        _check_finite(outputs, loss_dict, targets)
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
