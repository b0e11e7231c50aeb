"""The resume policy: where a run starts, what it restores, and how the log explains it.

The rule: rerunning the command of an interrupted run continues that run. A run is its output_dir plus its
starting point (--resume or --pretrain_model_path, --finetune_ignore, --start_epoch), which every checkpoint
records as 'origin'. When output_dir holds a checkpoint written from the same starting point, it wins over
the explicit source; a different starting point, or --no_auto_resume, starts over.
"""
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from util import distributed as dist_utils
from util import environment, faults, run_dir
from util.checkpoint import (LATEST, BackgroundWriter, CheckpointError, CheckpointWriteError, ema_weights_state,
                             load_checkpoint, numbered_checkpoints, prune_numbered, read_record, seal, snapshot,
                             training_state, write_bytes)
from util.misc import atomic_write
from util.rng import capture_rng_state, restore_rng_state
from util.weights import load_model_weights

logger = logging.getLogger("dino.resume")

# Changing one of these makes the checkpoint's weights, or its optimizer state, meaningless for the new model.
ARCHITECTURE_KEYS = ('modelname', 'backbone', 'backbone_norm', 'return_interm_indices', 'dilation', 'hidden_dim',
                     'nheads', 'num_queries', 'enc_layers', 'dec_layers', 'dim_feedforward',
                     'transformer_activation', 'num_feature_levels', 'enc_n_points', 'dec_n_points', 'num_classes',
                     'dn_labelbook_size', 'backbone_freeze_at', 'lr_backbone_names')
# Changing one of these is allowed on resume but worth a line in the log.
HYPERPARAMETER_KEYS = ('lr', 'lr_backbone', 'weight_decay', 'batch_size', 'lr_scheduler', 'lr_drop', 'lr_drop_list',
                       'lr_warmup_iters', 'clip_max_norm', 'epochs', 'use_ema', 'ema_decay', 'ema_warmup_iters', 'amp',
                       'amp_dtype', 'deterministic', 'accumulate_steps', 'seed', 'dataset_file', 'coco_path', 'early_stop_patience')


def architecture_differences(saved: dict, current: dict) -> List[str]:
    return [f"{k}: checkpoint {saved[k]!r} vs now {current.get(k)!r}" for k in ARCHITECTURE_KEYS
            if k in saved and saved[k] != current.get(k)]


def hyperparameter_changes(saved: dict, current: dict) -> List[str]:
    return [f"{k}: {saved[k]!r} -> {current.get(k)!r}" for k in HYPERPARAMETER_KEYS
            if k in saved and saved[k] != current.get(k)]


# ---------------------------------------------------------------------------------------------
# Deciding where to start

def run_origin(args) -> dict:
    """The starting point of this command: what a checkpoint records so that a rerun recognises its run. Paths
    are resolved (a symlink, a relative spelling from another directory name the same file) and the source's
    content is identified by its integrity record, so a file replaced at the same path is another start."""
    def resolved(path):
        return os.path.realpath(path) if path else ""
    source = args.resume or args.pretrain_model_path
    return {"resume": resolved(args.resume), "pretrain_model_path": resolved(args.pretrain_model_path),
            "finetune_ignore": sorted(args.finetune_ignore or []), "start_epoch": args.start_epoch,
            "source": source_identity(source, args.output_dir) if source else None}


SCRATCH = {"resume": "", "pretrain_model_path": "", "finetune_ignore": [], "start_epoch": None, "source": None}


def same_origin(saved: dict, now: dict) -> bool:
    """One starting point: the same options, the same source file by resolved path and, where both recorded
    it, by content. Checkpoints of earlier versions recorded absolute paths and no content."""
    saved = {**SCRATCH, **saved}
    if (saved["finetune_ignore"], saved["start_epoch"]) != (now["finetune_ignore"], now["start_epoch"]):
        return False
    for key in ("resume", "pretrain_model_path"):
        if (os.path.realpath(saved[key]) if saved[key] else "") != now[key]:
            return False
    return not (saved["source"] and now["source"]) or saved["source"] == now["source"]


def source_identity(path: str, output_dir: str) -> Optional[str]:
    """A hash of the source's integrity record (every record's CRC-32), or of its size for files without one;
    None for a source inside output_dir, which the run itself may rewrite (a best file fine-tuned in place)."""
    if not os.path.exists(path) or (output_dir and _inside(path, output_dir)):
        return None
    record = read_record(path)
    text = json.dumps(record["members"]) if record else f"size {os.path.getsize(path)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _inside(path: str, folder: str) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)


def describe_origin(origin: dict) -> str:
    source = origin["resume"] or origin["pretrain_model_path"]
    if source:
        relative = os.path.relpath(source)
        words = [f"from {source if relative.startswith('..') else relative}"]
    else:
        words = ["from scratch"]
    if origin["finetune_ignore"]:
        words.append("with --finetune_ignore " + " ".join(origin["finetune_ignore"]))
    if origin["start_epoch"] is not None:
        words.append(f"--start_epoch {origin['start_epoch']}")
    return "started " + " ".join(words)


@dataclass
class Start:
    """Where training starts: 'continue' (this run's own checkpoint), 'resume' (another run's full state),
    'weights' (model weights only) or 'scratch'."""
    kind: str
    path: str = ""
    checkpoint: dict = field(default_factory=dict)
    run_id: str = ""  # the run's: the checkpoint's when continuing, a new one otherwise


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def choose_start(args) -> Start:
    """Rank 0 applies the rule above and logs the decision; every other process then reads the same file and
    checks that it is the same (nodes that do not share output_dir would otherwise start from different
    states and diverge). A damaged explicit source is an error."""
    start, error = None, None
    if dist_utils.is_main_process():
        try:
            start, why = decide_start(args)
            if start.kind != "continue" and args.output_dir:
                _set_aside_previous_run(args, why)
        except Exception as e:
            error = e
    dist_utils.check_together(error)
    kind, path, record, run_id = dist_utils.broadcast_object(
        (start.kind, os.path.relpath(start.path, args.output_dir) if start.kind == "continue" else start.path,
         _identity(start), start.run_id) if start else None)
    if start is None:
        try:
            start = _same_start(args, kind, path, record)
            start.run_id = run_id
        except CheckpointError as e:
            error = e
    dist_utils.check_together(error)
    if dist_utils.is_main_process() and args.output_dir:
        run_dir.write_run_id(args.output_dir, start.run_id)
    return start


def _identity(start: Start):
    """What tells two copies of the start's file apart: its size and integrity record (every record's CRC-32)."""
    if start.kind == "scratch":
        return None
    return os.path.getsize(start.path), (start.checkpoint.get("integrity") or {}).get("members")


def _same_start(args, kind: str, path: str, record) -> Start:
    """This process's copy of rank 0's starting file (path relative to output_dir for 'continue')."""
    if kind == "scratch":
        return Start("scratch")
    local = os.path.join(args.output_dir, path) if kind == "continue" else path
    where = f"node {platform.node()}"
    try:
        start = Start(kind, local, load_checkpoint(local))
    except CheckpointError as e:
        raise CheckpointError(f"{where} cannot read {local}, which process 0 starts from ({e}): output_dir must be "
                              "shared between the nodes, or the checkpoint given to every node") from None
    if _identity(start) != record:
        raise CheckpointError(f"{where} reads another file at {local} than process 0 does: output_dir must be shared "
                              "between the nodes, or the same checkpoint given to every node")
    return start


def decide_start(args):
    """(where this command starts, why it does not continue output_dir's run) by the rule above, touching no
    file: what tools/chaos.py predicts with."""
    origin = run_origin(args)
    own = _newest_intact_checkpoint(args.output_dir) if args.output_dir else None
    if own and not args.no_auto_resume:
        path, checkpoint = own
        saved = checkpoint.get("origin", SCRATCH)  # files of format 1 record none: they came from plain runs
        if same_origin(saved, origin):
            return Start("continue", path, checkpoint, checkpoint.get("run_id") or new_run_id()), ""
        why = (f"Starting over: the run in {args.output_dir} {describe_origin(saved)}, but this command "
               f"{describe_origin(origin).replace('started', 'starts', 1)}")
    elif own:
        why = f"--no_auto_resume: starting over in {args.output_dir}"
    else:
        why = f"A new run in {args.output_dir}"
    if args.resume:
        checkpoint = load_checkpoint(args.resume)
        full = "optimizer" in checkpoint and not args.finetune_ignore
        return Start("resume" if full else "weights", args.resume, checkpoint, new_run_id()), why
    if args.pretrain_model_path:
        return Start("weights", args.pretrain_model_path, load_checkpoint(args.pretrain_model_path), new_run_id()), why
    return Start("scratch", run_id=new_run_id()), why


def _set_aside_previous_run(args, why: str) -> None:
    """A new run never mixes with the files of the one before it in output_dir: they move to previous/."""
    folder, moved = run_dir.set_aside(args.output_dir, keep=args.resume or args.pretrain_model_path)
    if moved:
        logger.warning("%s; moved the files of the run that was there to %s: %s", why, folder, ", ".join(moved))


def keep_global_batch(start: Start, args) -> None:
    """Continuing on another number of processes keeps the checkpoint's global batch (processes x batch_size x
    accumulate_steps) by changing accumulate_steps, when it divides evenly and the command asks for the
    accumulation the run was started with (`requested_accumulate_steps`); batch_size, which sets the memory
    a process needs, stays as configured. Call before the loaders are built."""
    order = start.checkpoint.get("data_order") or {}
    if start.kind not in ("continue", "resume") or not args.keep_global_batch or "world_size" not in order:
        return
    saved_steps = order.get("accumulate_steps", 1)
    if args.accumulate_steps != order.get("requested_accumulate_steps", saved_steps):
        return  # the command asks for another accumulation: that is its choice
    saved = order["world_size"] * order["batch_size"] * saved_steps
    per_window = dist_utils.get_world_size() * args.batch_size
    if saved % per_window == 0 and saved // per_window != args.accumulate_steps:
        args.accumulate_steps = saved // per_window


def _newest_intact_checkpoint(output_dir: str):
    """(path, checkpoint) of output_dir/checkpoint.pth, or of the newest intact numbered checkpoint if that one
    is damaged (with a warning); None when there is none at all."""
    if not os.path.isdir(output_dir):
        return None
    latest = os.path.join(output_dir, LATEST)
    # Fall back only to files of checkpoint.pth's run, named in it or, where it is unreadable, beside it.
    run_id = (read_record(latest) or {}).get("run_id") or run_dir.read_run_id(output_dir)
    names = ([LATEST] if os.path.exists(latest) else []) + numbered_checkpoints(output_dir, run_id)[::-1]
    for name in names:
        path = os.path.join(output_dir, name)
        try:
            checkpoint = load_checkpoint(path)
        except CheckpointError as e:
            logger.warning("auto-resume: %s", e)
            continue
        if name != names[0]:
            logger.warning("auto-resume fell back to %s, the newest intact checkpoint in %s", name, output_dir)
        return path, checkpoint
    if names:
        raise CheckpointError(f"every checkpoint in {output_dir} is damaged; move them away to start from "
                              "scratch, or pass --no_auto_resume")
    return None


# ---------------------------------------------------------------------------------------------
# Restoring

@dataclass
class Position:
    """Where the training loop starts. `pending`: an epoch that was trained but not evaluated
    ({'epoch', 'train_meters', 'train_time'}), to evaluate before training goes on."""
    epoch: int = 0
    iteration: int = 0
    samples_done: int = 0
    epoch_samples: Optional[int] = None  # the samples that epoch trains (None: the whole steps of this layout)
    best: dict = field(default_factory=dict)
    meters: dict = field(default_factory=dict)
    scheduler_steps: int = 0
    recent_losses: list = field(default_factory=list)
    pending: Optional[dict] = None


def restore(start: Start, state: "TrainState") -> Position:
    if start.kind in ("continue", "resume"):
        return _restore_full(start, state)
    args = state.args
    position = Position(epoch=args.start_epoch or 0)
    position.scheduler_steps = position.epoch * (state.iterations if args.lr_scheduler == "onecycle" else 1)
    if start.kind == "weights":
        report = load_weights(state.model, start.path, start.checkpoint, args.finetune_ignore)
        _refuse_another_architecture(report, start.path, args)
        why = "--finetune_ignore" if args.finetune_ignore else "the checkpoint holds no optimizer state" \
            if args.resume else "--pretrain_model_path"
        logger.info("Loaded model weights only from %s (%s); optimizer and schedule start fresh at epoch %d:\n%s",
                    start.path, why, position.epoch, report.format())
    else:
        logger.info("Training from scratch, epoch %d", position.epoch)
    return position


def _refuse_another_architecture(report, path: str, args) -> None:
    """--resume means "continue this model": a file of which most of the model does not fit (other names or
    shapes) holds another architecture, and training on with the few tensors that fit is refused. A deliberate
    partial load says so with --pretrain_model_path or --finetune_ignore."""
    if not args.resume or args.finetune_ignore:
        return
    model_tensors = len(report.loaded) + len(report.missing) + len(report.shape_mismatch)
    if 2 * len(report.loaded) < model_tensors:
        raise CheckpointError(f"--resume {path}: only {len(report.loaded)} of this model's {model_tensors} tensors are "
                              "in it with the same name and shape, so it holds another architecture: check that -c "
                              "and --options describe it, or start from what fits with --pretrain_model_path "
                              f"{path} (or --resume with --finetune_ignore)")


def load_weights(model, path: str, checkpoint: dict, ignore=None):
    """Load what fits of the checkpoint's model weights; a checkpoint of which nothing fits is an error."""
    report = load_model_weights(model, checkpoint["model"], ignore or ())
    if not report.loaded:
        raise CheckpointError(f"none of the {len(checkpoint['model'])} model tensors in {path} fit this model (other "
                              "names or shapes): check that -c and --options describe the checkpoint's architecture")
    return report


def _restore_full(start: Start, state: "TrainState") -> Position:
    """Continue a run exactly where its checkpoint stopped."""
    checkpoint, path, args = start.checkpoint, start.path, state.args
    missing = [k for k in ("epoch", "lr_scheduler") if k not in checkpoint]
    if missing or "last_epoch" not in checkpoint.get("lr_scheduler", {}):
        what = " or ".join(missing) or "lr_scheduler position"
        raise CheckpointError(f"{path} holds an optimizer state but no {what} "
                              f"(its keys: {', '.join(sorted(checkpoint))}), so training cannot continue from it: "
                              "use --pretrain_model_path to start from its weights")
    saved_args = checkpoint.get("args") or {}
    diffs = architecture_differences(saved_args, vars(args))
    if diffs:
        raise CheckpointError(f"{path} was trained with a different architecture ({'; '.join(diffs)}): use "
                              "--pretrain_model_path (or --resume with --finetune_ignore) to fine-tune from it")
    report = load_model_weights(state.model, checkpoint["model"])
    misfits = report.missing + report.unexpected + [key for key, _, _ in report.shape_mismatch]
    if misfits:
        raise CheckpointError(f"{path} does not fit the model built from the config ({len(report.missing)} missing, "
                              f"{len(report.unexpected)} unexpected, {len(report.shape_mismatch)} mismatched keys, "
                              f"e.g. {misfits[0]}): "
                              "check that -c and --options describe the checkpoint's architecture")
    position = Position(epoch=checkpoint["epoch"] + 1, iteration=checkpoint.get("iteration", 0),
                        best=checkpoint.get("best") or {}, meters=checkpoint.get("meters") or {},
                        scheduler_steps=checkpoint["lr_scheduler"]["last_epoch"],
                        recent_losses=checkpoint.get("recent_losses") or [])
    _restore_optimizer(state.optimizer, checkpoint, path)
    _apply_configured_lrs(state.optimizer, args)
    if state.scaler is not None and "scaler" in checkpoint:
        state.scaler.load_state_dict(checkpoint["scaler"])
    if state.ema is not None:
        if "ema_model" in checkpoint:
            state.ema.load_state_dict(checkpoint["ema_model"])
        else:
            logger.warning("the checkpoint has no EMA weights: the EMA restarts from the current model")
    layout_note = _restore_data_position(checkpoint, position, state)
    if start.kind == "continue":
        origin = describe_origin(checkpoint.get("origin", SCRATCH))
        how = f"Continuing the interrupted run in {args.output_dir} ({origin})"
    else:
        how = f"Resuming training from {path}"
    logger.info("%s: epoch %d, iteration %d of %d, to %d total epochs", how, position.epoch, position.iteration,
                state.iterations, args.epochs)
    for change in hyperparameter_changes(saved_args, vars(args)):
        logger.info("  changed since the checkpoint: %s", change)
    for change in environment.differences(checkpoint.get("environment") or {}, state.facts["environment"]):
        logger.warning("  the environment changed since the checkpoint: %s", change)
    _check_data(checkpoint, path, state)
    if layout_note:
        logger.warning("  %s", layout_note)
    _restore_rng(checkpoint)
    if checkpoint.get("eval_pending"):
        position.pending = {"epoch": checkpoint["epoch"], "train_meters": position.meters,
                            "train_time": checkpoint.get("epoch_time", 0.0)}
        position.meters = {}
    if start.kind == "resume" and args.start_epoch is not None and args.start_epoch != position.epoch:
        logger.info("  --start_epoch %d overrides the checkpoint's epoch %d", args.start_epoch, position.epoch)
        position.epoch, position.iteration, position.meters, position.pending = args.start_epoch, 0, {}, None
        position.samples_done = 0
        position.scheduler_steps = position.epoch * (state.iterations if args.lr_scheduler == "onecycle" else 1)
    return position


def _check_data(checkpoint: dict, path: str, state: "TrainState") -> None:
    """Continuing on other data than the checkpoint's is refused unless --allow_data_change says it is meant."""
    saved, current = checkpoint.get("datasets") or {}, state.facts["datasets"]
    changes = []
    for split in sorted(set(saved) & set(current)):
        before, now = saved[split], current[split]
        changes += [f"{split} {key}: {before[key]} -> {now[key]}" for key in ("images", "boxes", "categories")
                    if before[key] != now[key]]
        if before["sha256"] != now["sha256"] and not any(c.startswith(split) for c in changes):
            changes.append(f"{split} annotation file {now['annotation_file']}: its content changed")
    if not changes:
        return
    if not state.args.allow_data_change:
        raise CheckpointError(f"the data changed since {path} was written ({'; '.join(changes)}): pass "
                              "--allow_data_change to continue on the new data, or point to the old data")
    for change in changes:
        logger.warning("  the data changed since the checkpoint (--allow_data_change): %s", change)


def _restore_optimizer(optimizer, checkpoint: dict, path: str) -> None:
    """The optimizer state is positional: load it only when every saved tensor has its parameter's shape."""
    saved = checkpoint["optimizer"]
    if _optimizer_fits(optimizer, saved):
        optimizer.load_state_dict(saved)
        return
    if "format_version" in checkpoint:
        raise CheckpointError(f"the optimizer state in {path} does not fit this model's parameters: check that -c "
                              "and --options describe the checkpoint's model")
    logger.warning("the optimizer state in %s (written by another trainer) does not fit this model's parameter "
                   "order: the optimizer starts fresh; weights, epoch and schedule are restored", path)


def _optimizer_fits(optimizer, saved: dict) -> bool:
    groups = saved.get("param_groups", [])
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        return False
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in groups for i in g["params"]]
    for param, index in zip(params, ids):
        for value in saved.get("state", {}).get(index, {}).values():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                return False
    return True


def _apply_configured_lrs(optimizer, args) -> None:
    """A loaded optimizer carries the old run's lr and weight decay; the current config's win (and are
    logged as changed), so changing lr on resume is never silently ignored."""
    for group, lr in zip(optimizer.param_groups, (args.lr, args.lr_backbone)):
        group["lr"] = group["initial_lr"] = lr
        group["weight_decay"] = args.weight_decay


def _restore_data_position(checkpoint: dict, position: Position, state: "TrainState") -> Optional[str]:
    """Where the epoch stands, in global samples. Another number of processes or batch size continues the same
    epoch order from the same sample; only a checkpoint of the older per-process order restarts the epoch.
    Returns what changed, for the log."""
    args, order = state.args, checkpoint.get("data_order") or {}
    world_size = dist_utils.get_world_size()
    note = None
    saved = (order.get("world_size", 1), order.get("batch_size", args.batch_size), order.get("accumulate_steps", 1))
    if order.get("scheme") == "global-batch":
        position.samples_done = order["samples_done"]
        if position.samples_done:  # the epoch trains what its first layout's whole steps hold
            step = math.prod(saved)
            position.epoch_samples = order.get("epoch_samples") or state.num_samples // step * step
    elif position.iteration:
        note = f"the checkpoint stopped mid-epoch in an older data order: epoch {position.epoch} restarts"
        position.meters = {}
    layout = (world_size, args.batch_size, args.accumulate_steps)
    if saved != layout:
        kept = state.requested_accumulate_steps not in (None, args.accumulate_steps)  # by keep_global_batch
        where = (f"epoch {position.epoch} continues from sample {position.samples_done} of its order, split among "
                 "the processes now running; " if position.samples_done else "")
        note = (f"the checkpoint was written by {saved[0]} process(es) x batch {saved[1]} x accumulate_steps "
                f"{saved[2]}, now {layout[0]} x {layout[1]} x {layout[2]}: {where}"
                f"{_global_batch_change(saved, layout, kept)}")
        rest = (position.epoch_samples or 0) - position.samples_done
        if rest % math.prod(layout):
            note += (f"; the epoch's last step trains its last {rest % math.prod(layout)} image(s), fewer than "
                     "a global batch, so that every image of the epoch is trained once")
    position.iteration = position.samples_done // math.prod(layout)
    return note


def _global_batch_change(saved: tuple, layout: tuple, kept: bool) -> str:
    before, now = math.prod(saved), math.prod(layout)
    if before != now:
        return f"the global batch changed from {before} to {now} (set batch_size or accumulate_steps to keep it)"
    return f"the global batch {now} is kept" + (f" by accumulate_steps {layout[2]} (keep_global_batch)" if kept else "")


def _restore_rng(checkpoint: dict) -> None:
    world_size = dist_utils.get_world_size()
    rng = checkpoint.get("rng") or []
    if len(rng) == world_size:
        restore_rng_state(rng[dist_utils.get_rank()])
    elif rng:
        logger.warning("  RNG states were saved for %d process(es), now %d: random draws will differ from an "
                       "uninterrupted run", len(rng), world_size)


def position_scheduler(scheduler, steps: int) -> None:
    """Put a fresh schedule where an uninterrupted run would be after `steps` steps: the same float
    operations in the same order, so the lr is bit-identical."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "scheduler.step() before optimizer.step()": intended
        for _ in range(steps):
            scheduler.step()


# ---------------------------------------------------------------------------------------------
# Saving

@dataclass
class TrainState:
    """What a training checkpoint captures, and the facts of the run it records beside it. Saves are
    asynchronous: the state is copied to host memory (the only stall), then written by a background thread
    while training goes on; the next save, or finish(), waits for it."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    ema: Optional[torch.nn.Module]
    args: object
    iterations: int
    num_samples: int
    facts: dict  # origin, categories, environment, datasets: see util.checkpoint.training_state
    scheduler: object = None
    requested_accumulate_steps: Optional[int] = None  # the command's, before keep_global_batch
    best_written: dict = field(default_factory=dict)  # per kind, the best whose file is on disk
    writer: BackgroundWriter = field(default_factory=BackgroundWriter)

    def save(self, names, *, epoch: int, iteration: int, samples_done: int, best: dict, meters: dict,
             recent_losses: list = (), eval_pending: bool = False, epoch_time: float = 0.0, wait: bool = False,
             rng_state: Optional[dict] = None, epoch_samples: Optional[int] = None) -> None:
        """Every rank contributes its RNG state (now's, or rng_state, captured at the step being saved); rank 0
        writes. A failed write (this one with wait=True, else the previous one) makes every rank raise together,
        so none waits for a partner that stopped."""
        rng = dist_utils.all_gather_object(rng_state or capture_rng_state())
        error = None
        if dist_utils.is_main_process() and self.args.output_dir:
            try:
                self.writer.wait()
                state = snapshot(training_state(
                    self.model, self.optimizer, self.scheduler, self.scaler, self.ema, epoch=epoch,
                    iteration=iteration, samples_done=samples_done, epoch_samples=epoch_samples,
                    requested_accumulate_steps=self.requested_accumulate_steps,
                    num_samples=self.num_samples,
                    iterations=self.iterations, args=self.args, best=best, meters=meters, rng_states=rng,
                    facts=self.facts, eval_pending=eval_pending, epoch_time=epoch_time,
                    recent_losses=recent_losses))
                files = self._room_for(names, state, best)
                self.writer.start(lambda: _write(state, files, self.args.output_dir, self.args.keep_checkpoints))
                if wait:
                    self.writer.wait()
            except CheckpointWriteError as e:
                error = e
        if dist_utils.any_rank(error is not None):
            raise error or CheckpointWriteError("rank 0 could not write a checkpoint (its log says why)")
        if any(name.startswith("checkpoint_best_") for name in names):  # rank 0 may have kept the previous best
            written = dist_utils.broadcast_object(dict(best))
            best.clear()
            best.update(written)

    def _room_for(self, names: List[str], state: dict, best: dict) -> List[str]:
        """The files this save writes, in order: checkpoint.pth always and last (the commit point: it never
        names a best file that is not on disk), each other file (best, numbered) when the disk keeps room for
        it and the next checkpoint.pth. A best file skipped for room leaves the previous best in `best` and
        in the state, so the best recorded is always the best whose weights are kept."""
        free = shutil.disk_usage(self.args.output_dir).free
        size = _tensor_bytes(state)
        kept, skipped = [], []
        for name in (n for n in names if n != LATEST):
            need = _tensor_bytes(state["ema_model"]) if name == BEST_EMA else size
            if free < need + size:
                skipped.append(name)
                continue
            kept.append(name)
            free -= need
        for kind in list(best):
            name = f"checkpoint_best_{kind}.pth"
            if name in kept:
                self.best_written[kind] = dict(best[kind])
            elif name in skipped and kind in self.best_written:
                best[kind] = dict(self.best_written[kind])
            elif name in skipped:
                del best[kind]
        state["best"] = dict(best)
        if skipped:
            logger.warning("the disk has %.0f MB free, too little for %s (%.0f MB each): skipped them, kept %s",
                           free / 2**20, ", ".join(skipped), size / 2**20, LATEST)
        return kept + [LATEST]

    def back_to_last_good(self, epoch: int) -> str:
        """After the evaluation of `epoch` found it diverged: checkpoint.pth (which holds that epoch's training)
        goes back to the newest evaluated state of this run, its newest numbered checkpoint before `epoch`, so
        that a rerun continues from a good state; the diverged one is kept as checkpoint_diverged.pth. Call on
        every process. Returns what a rerun does, for the error line."""
        self.finish()
        message = None
        if dist_utils.is_main_process() and self.args.output_dir:
            out = self.args.output_dir
            earlier = [n for n in numbered_checkpoints(out, self.facts.get("run_id")) if int(n[10:14]) < epoch]
            if earlier:
                os.replace(os.path.join(out, LATEST), os.path.join(out, DIVERGED))
                with open(os.path.join(out, earlier[-1]), "rb") as source:
                    atomic_write(os.path.join(out, LATEST), lambda f: shutil.copyfileobj(source, f))
                message = (f"{LATEST} is back at {earlier[-1]}, the last evaluated state, which a rerun continues "
                           f"(the same settings diverge the same way: lower lr); the diverged epoch is in {DIVERGED}")
            else:
                message = (f"{LATEST} holds that diverged epoch and no earlier evaluated checkpoint is kept: rerun "
                           "with a lower lr and --no_auto_resume")
        return dist_utils.broadcast_object(message) or "nothing was saved (no --output_dir)"

    def finish(self) -> None:
        """Wait for the last write; its failure is every rank's."""
        error = None
        if dist_utils.is_main_process():
            try:
                self.writer.wait()
            except CheckpointWriteError as e:
                error = e
        if dist_utils.any_rank(error is not None):
            raise error or CheckpointWriteError("rank 0 could not write a checkpoint (its log says why)")


BEST_EMA = "checkpoint_best_ema.pth"
DIVERGED = "checkpoint_diverged.pth"


def _tensor_bytes(obj) -> int:
    """The bytes of the tensors in obj: a checkpoint file's size, but for a few kB of structure."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _write(state: dict, names: List[str], output_dir: str, keep: int) -> None:
    """Write the files in the order given (TrainState._room_for: checkpoint.pth last). A kill between them
    leaves the previous checkpoint.pth, from which the rerun writes them again."""
    blob = seal(state)
    for name in names:
        if name == LATEST and len(names) > 1:
            faults.check("checkpoint_commit")
        write_bytes(seal(ema_weights_state(state)) if name == BEST_EMA else blob, os.path.join(output_dir, name))
        if name.startswith("checkpoint0"):
            prune_numbered(output_dir, keep, state.get("run_id"))
