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
import time
import uuid
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from checkpoint import finetune
from checkpoint.format import CheckpointError, load_checkpoint, read_record
from checkpoint.remote import Mirror, is_url, local_copy, redact
from checkpoint.store import CheckpointStore
from training.optim import scheduler_steps_before
from training.progress import Layout, Progress
from util import distributed as dist_utils
from util import environment, run_dir
from util.rng import restore_rng_state
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
        return "" if not path else path if is_url(path) else os.path.realpath(path)
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
        if (saved[key] if not saved[key] or is_url(saved[key]) else os.path.realpath(saved[key])) != now[key]:
            return False
    return not (saved["source"] and now["source"]) or saved["source"] == now["source"]


def source_identity(path: str, output_dir: str) -> Optional[str]:
    """A hash of the source's integrity record (every record's CRC-32), or of its size for files without one;
    None for a source inside output_dir, which the run itself may rewrite (a best file fine-tuned in place)."""
    if is_url(path):
        path = local_copy(path)
    if not os.path.exists(path) or (output_dir and _inside(path, output_dir)):
        return None
    record = read_record(path)
    text = json.dumps(record["members"]) if record else f"size {os.path.getsize(path)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _inside(path: str, folder: str) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)


def describe_origin(origin: dict) -> str:
    source = origin["resume"] or origin["pretrain_model_path"]
    if is_url(source):
        words = [f"from {redact(source)}"]
    elif source:
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
    why: str = ""  # why it does not continue output_dir's run (rank 0's)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def choose_start(args, store: CheckpointStore) -> Start:
    """Rank 0 applies the rule above and logs the decision; every other process then reads the same file and
    checks that it is the same (nodes that do not share output_dir would otherwise start from different
    states and diverge). A damaged explicit source is an error."""
    start, error = None, None
    if dist_utils.is_main_process():
        try:
            start, start.why = decide_start(args, store)
            if start.kind != "continue" and args.output_dir:
                _set_aside_previous_run(args, store, start.why)
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
    store.run_id = start.run_id
    if dist_utils.is_main_process() and args.output_dir:
        store.write_run_id(start.run_id)
    return start


def _identity(start: Start):
    """What tells two copies of the start's file apart: its size and integrity record (every record's CRC-32)."""
    if start.kind == "scratch":
        return None
    path = local_copy(start.path) if is_url(start.path) else start.path
    return os.path.getsize(path), (start.checkpoint.get("integrity") or {}).get("members")


def _same_start(args, kind: str, path: str, record) -> Start:
    """This process's copy of rank 0's starting file (path relative to output_dir for 'continue')."""
    if kind == "scratch":
        return Start("scratch")
    local = os.path.join(args.output_dir, path) if kind == "continue" else path
    where = f"node {platform.node()}"
    try:
        if kind == "continue" and args.output_url and not os.path.exists(local):  # another node's staging
            Mirror(args.output_url, args.output_dir).fetch(path)
        start = Start(kind, local, load_checkpoint(local))
    except CheckpointError as e:
        raise CheckpointError(f"{where} cannot read {local}, which process 0 starts from ({e}): output_dir must be "
                              "shared between the nodes, or the checkpoint given to every node") from None
    if _identity(start) != record:
        raise CheckpointError(f"{where} reads another file at {local} than process 0 does: output_dir must be shared "
                              "between the nodes, or the same checkpoint given to every node")
    return start


def decide_start(args, store: CheckpointStore):
    """(where this command starts, why it does not continue output_dir's run) by the rule above, touching no
    file: what tools/chaos predicts with."""
    origin = run_origin(args)
    own = store.newest_intact() if args.output_dir else None
    if own and not args.no_auto_resume:
        path, checkpoint = own
        saved = checkpoint.get("origin", SCRATCH)  # files of format 1 record none: they came from plain runs
        if same_origin(saved, origin):
            return Start("continue", path, checkpoint, checkpoint.get("run_id") or new_run_id()), ""
        why = (f"Starting over: the run in {store.display()} {describe_origin(saved)}, but this command "
               f"{describe_origin(origin).replace('started', 'starts', 1)}")
    elif own:
        why = f"--no_auto_resume: starting over in {store.display()}"
    else:
        why = f"A new run in {store.display()}"
    if args.resume:
        checkpoint = load_checkpoint(args.resume)
        full = "optimizer" in checkpoint and not args.finetune_ignore
        return Start("resume" if full else "weights", args.resume, checkpoint, new_run_id()), why
    if args.pretrain_model_path:
        return Start("weights", args.pretrain_model_path, load_checkpoint(args.pretrain_model_path), new_run_id()), why
    return Start("scratch", run_id=new_run_id()), why


def _set_aside_previous_run(args, store: CheckpointStore, why: str) -> None:
    """A new run never mixes with the files of the one before it in output_dir: they move to previous/."""
    if not os.path.isdir(args.output_dir):
        return
    run_id = store.previous_run_id()
    folder, moved = run_dir.set_aside(args.output_dir, run_id, keep=args.resume or args.pretrain_model_path)
    if store.mirror is not None:  # the remote holds every file of the run; the staging folder, some
        name = os.path.basename(folder) if folder else run_id or time.strftime("unknown-%Y%m%d-%H%M%S")
        moved = store.mirror.set_aside(name)
        folder = store.mirror.display(f"previous/{name}")
    if moved:
        logger.warning("%s; moved the files of the run that was there to %s: %s", why, folder, ", ".join(moved))


def layout_for(start: Start, args, num_samples: int) -> Layout:
    """How this run splits its steps. Continuing on another number of processes keeps the checkpoint's global
    batch (processes x batch_size x accumulate_steps) by changing accumulate_steps, when it divides evenly and
    the command asks for the accumulation the run was started with; batch_size, which sets the memory a
    process needs, stays as configured."""
    world_size, steps = dist_utils.get_world_size(), args.accumulate_steps
    order = start.checkpoint.get("data_order") or {}
    if start.kind in ("continue", "resume") and args.keep_global_batch and "world_size" in order:
        saved_steps = order.get("accumulate_steps", 1)
        if args.accumulate_steps == order.get("requested_accumulate_steps", saved_steps):
            saved = order["world_size"] * order["batch_size"] * saved_steps
            per_window = world_size * args.batch_size
            if saved % per_window == 0:
                steps = saved // per_window
    return Layout(world_size, args.batch_size, steps, args.accumulate_steps, args.seed, num_samples)


# ---------------------------------------------------------------------------------------------
# Restoring

def restore(start: Start, trainer) -> Progress:
    """Put the trainer's model, optimizer, scaler, EMA and random state where `start` says, and return where
    training stands. `trainer` (training/trainer.py) has model, optimizer, scaler, ema, args, iterations (per
    epoch), layout and facts."""
    if start.kind in ("continue", "resume"):
        return _restore_full(start, trainer)
    args = trainer.args
    progress = Progress(epoch=args.start_epoch or 0)
    progress.scheduler_steps = scheduler_steps_before(progress.epoch, trainer.iterations, args)
    if start.kind == "weights":
        report, classes = load_weights(trainer.model, start.path, start.checkpoint, args, trainer.label_names)
        _refuse_another_architecture(report, start.path, args)
        why = "--finetune_ignore" if args.finetune_ignore else "the checkpoint holds no optimizer state" \
            if args.resume else "--pretrain_model_path"
        logger.info("Loaded model weights only from %s (%s); optimizer and schedule start fresh at epoch %d:\n%s",
                    start.path, why, progress.epoch, report.format())
        if classes:
            logger.info("%s", classes.format())
        finetune.check_shapes(report, start.path, architecture_differences(start.checkpoint.get("args") or {},
                                                                           vars(args)))
    else:
        logger.info("Training from scratch, epoch %d", progress.epoch)
    return progress


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


def load_weights(model, path: str, checkpoint: dict, args, names):
    """Fine-tuning's load: what fits, class rows by name unless map_classes_by_name is off (finetune.py)."""
    names = names if args.map_classes_by_name else None
    return finetune.load_weights(model, path, checkpoint, args.finetune_ignore, names)


def _restore_full(start: Start, trainer) -> Progress:
    """Continue a run exactly where its checkpoint stopped."""
    checkpoint, path, args = start.checkpoint, start.path, trainer.args
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
    report = load_model_weights(trainer.model, checkpoint["model"])
    misfits = report.missing + report.unexpected + [key for key, _, _ in report.shape_mismatch]
    if misfits:
        raise CheckpointError(f"{path} does not fit the model built from the config ({len(report.missing)} missing, "
                              f"{len(report.unexpected)} unexpected, {len(report.shape_mismatch)} mismatched keys, "
                              f"e.g. {misfits[0]}): "
                              "check that -c and --options describe the checkpoint's architecture")
    progress = Progress.from_state(checkpoint, trainer.layout.num_samples)
    _restore_optimizer(trainer.optimizer, checkpoint, path)
    _apply_configured_lrs(trainer.optimizer, args)
    if trainer.scaler is not None and "scaler" in checkpoint:
        trainer.scaler.load_state_dict(checkpoint["scaler"])
    if trainer.ema is not None:
        if "ema_model" in checkpoint:
            trainer.ema.load_state_dict(checkpoint["ema_model"])
        else:
            logger.warning("the checkpoint has no EMA weights: the EMA restarts from the current model")
    layout_note = _move_to_layout(checkpoint, progress, trainer.layout)
    where, origin = args.output_url or args.output_dir, describe_origin(checkpoint.get("origin", SCRATCH))
    how = f"Continuing the interrupted run in {where} ({origin})" if start.kind == "continue" else \
        f"Resuming training from {path}"
    if start.kind == "continue" and progress.epoch >= args.epochs and not progress.pending:
        logger.info("The run in %s (%s) has trained all %d epochs: nothing is left to do (--options epochs=N "
                    "trains it further)", where, origin, args.epochs)
    else:
        logger.info("%s: epoch %d, iteration %d of %d, to %d total epochs", how, progress.epoch, progress.iteration,
                    trainer.iterations, args.epochs)
    for change in hyperparameter_changes(saved_args, vars(args)):
        logger.info("  changed since the checkpoint: %s", change)
    for change in environment.differences(checkpoint.get("environment") or {}, trainer.facts["environment"]):
        logger.warning("  the environment changed since the checkpoint: %s", change)
    _check_data(checkpoint, path, trainer.facts["datasets"], args.allow_data_change)
    if layout_note:
        logger.warning("  %s", layout_note)
    _restore_rng(checkpoint)
    if start.kind == "resume" and args.start_epoch is not None and args.start_epoch != progress.epoch:
        logger.info("  --start_epoch %d overrides the checkpoint's epoch %d", args.start_epoch, progress.epoch)
        progress = Progress(epoch=args.start_epoch, best=progress.best, recent_losses=progress.recent_losses,
                            scheduler_steps=scheduler_steps_before(args.start_epoch, trainer.iterations, args))
    return progress


def _check_data(checkpoint: dict, path: str, current: dict, allowed: bool) -> None:
    """Continuing on other data than the checkpoint's is refused unless --allow_data_change says it is meant."""
    saved = checkpoint.get("datasets") or {}
    changes = []
    for split in sorted(set(saved) & set(current)):
        before, now = saved[split], current[split]
        changes += [f"{split} {key}: {before[key]} -> {now[key]}" for key in ("images", "boxes", "categories")
                    if before[key] != now[key]]
        if before["sha256"] != now["sha256"] and not any(c.startswith(split) for c in changes):
            changes.append(f"{split} annotation file {now['annotation_file']}: its content changed")
    if not changes:
        return
    if not allowed:
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


def _move_to_layout(checkpoint: dict, progress: Progress, layout: Layout) -> Optional[str]:
    """Where the epoch stands in this layout. Another number of processes or batch size continues the same
    epoch order from the same sample; only a checkpoint of the older per-process order restarts the epoch.
    Returns what changed, for the log."""
    order = checkpoint.get("data_order") or {}
    note = None
    saved = (order.get("world_size", 1), order.get("batch_size", layout.batch_size), order.get("accumulate_steps", 1))
    if order.get("scheme") != "global-batch" and progress.iteration:
        note = f"the checkpoint stopped mid-epoch in an older data order: epoch {progress.epoch} restarts"
        progress.meters = {}
    if saved != layout.sizes:
        kept = layout.requested_accumulate_steps != layout.accumulate_steps  # by layout_for
        where = (f"epoch {progress.epoch} continues from sample {progress.samples_done} of its order, split among "
                 "the processes now running; " if progress.samples_done else "")
        note = (f"the checkpoint was written by {saved[0]} process(es) x batch {saved[1]} x accumulate_steps "
                f"{saved[2]}, now {layout.world_size} x {layout.batch_size} x {layout.accumulate_steps}: {where}"
                f"{_global_batch_change(saved, layout.sizes, kept)}")
        rest = (progress.epoch_samples or 0) - progress.samples_done
        if rest % layout.step_samples:
            note += (f"; the epoch's last step trains its last {rest % layout.step_samples} image(s), fewer than "
                     "a global batch, so that every image of the epoch is trained once")
    progress.iteration = progress.samples_done // layout.step_samples
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
