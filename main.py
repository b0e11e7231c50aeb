"""Train and evaluate DINO: `python main.py -c config/DINO/DINO_4scale.py --coco_path DIR --output_dir DIR`."""
import argparse
import datetime
import json
import logging
import os
import random
import sys
import time
import traceback

import numpy as np
import torch
from torch.utils.data import BatchSampler

import util.checkpoint as ckpt
from datasets import build_dataset, get_coco_api_from_dataset
from datasets.sampler import GlobalBatchSampler, ShardedSampler
from engine import (Meters, NonFiniteLossError, NonFiniteOutputError, OutOfMemoryStop, StopInsideStep, evaluate,
                    linear_warmup, optimizer_steps_per_epoch, train_one_epoch)
from models import build_model, load_pretrained_backbone
from util import distributed as dist_utils
from util import determinism, environment, interrupt, options, precision, resume, run_dir
from util.config import DictAction, dump_config, load_config, merge_config
from util.ema import build_ema
from util.logger import setup_logging
from util.misc import collate_fn
from util.rng import capture_rng_state

logger = logging.getLogger("dino.main")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("DINO training and evaluation", add_help=add_help, epilog=options.help_text(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_file", "-c", required=True, help="python config file, e.g. config/DINO/DINO_4scale.py")
    p.add_argument("--options", nargs="+", action=DictAction,
                   help="override config keys: --options lr=2e-4 epochs=24 data_aug_scales=[128]")
    p.add_argument("--dataset_file", default="coco", choices=["coco", "synthetic"],
                   help="coco: a COCO-layout folder; synthetic: generate the shapes dataset into --coco_path")
    p.add_argument("--coco_path", default=None, help="dataset root (default data/synthetic for --dataset_file synthetic)")
    p.add_argument("--output_dir", default="", help="where checkpoints and logs go; empty = save nothing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--seed", default=42, type=int, help="random seed (each rank adds its rank)")
    p.add_argument("--resume", default="", help="checkpoint to continue training from (wins over auto-resume)")
    p.add_argument("--allow_data_change", action="store_true",
                   help="continue a checkpoint on data that changed since it was written (logged, not refused)")
    p.add_argument("--no_auto_resume", action="store_true",
                   help="do not resume from output_dir/checkpoint.pth when it exists")
    p.add_argument("--pretrain_model_path", default=None, help="load model weights only (fine-tuning)")
    p.add_argument("--finetune_ignore", nargs="+", default=None,
                   help="drop checkpoint keys containing any of these substrings, e.g. label_enc.weight class_embed")
    p.add_argument("--start_epoch", default=None, type=int,
                   help="epoch to start at; overrides the checkpoint's epoch when given")
    p.add_argument("--eval", action="store_true", help="only evaluate the given weights")
    p.add_argument("--num_workers", default=2, type=int, help="data loading worker processes per rank")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="mixed precision in config key amp_dtype: auto (bfloat16 where the device runs it fast, "
                   "else float16 with a loss scaler on CUDA and float32 on CPU), bfloat16 or float16 (CUDA); "
                   "--no-amp turns off a config's cli_defaults amp")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                   help="deterministic kernels (default), so that a resumed run is bit-identical to an uninterrupted "
                   "one on CUDA too; --no-deterministic lets CUDA pick faster, non-deterministic kernels")
    p.add_argument("--find_unused_params", action="store_true",
                   help="accepted for the official command line; gradients of unused parameters count as zeros anyway")
    p.add_argument("--save_log", action="store_true", help="log plain progress lines (every 10%% of an epoch) even on a terminal")
    p.add_argument("--save_results", action="store_true", help="write COCO-format detections to output_dir/eval/")
    p.add_argument("--debug", action="store_true", help="a few iterations per epoch and debug logs: a smoke test")
    p.add_argument("--world_size", default=1, type=int, help="number of processes (set by the launcher)")
    p.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    p.add_argument("--rank", default=0, type=int, help="process rank (set by the launcher)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by torch.distributed.launch")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Command line, then the config file, then --options; clashes and unknown keys are errors."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    cfg = load_config(args.config_file)
    cli_defaults = cfg.pop("cli_defaults", {})
    unknown = sorted(set(cli_defaults) - {a.dest for a in parser._actions})
    if unknown:
        raise ValueError(f"cli_defaults in {args.config_file} names unknown command-line arguments: {unknown}")
    if cli_defaults:  # the config's recommended defaults; anything on the command line still wins
        parser.set_defaults(**cli_defaults)
        args = parser.parse_args(argv)
    merge_config(args, cfg, args.options, {a.dest for a in parser._actions})
    for key, value in precision.float32_overrides(args).items():  # before anything reads them
        setattr(args, key, value)
    options.check(args)
    args.config = {k: getattr(args, k) for k in cfg}
    if args.coco_path is None:
        args.coco_path = "data/synthetic" if args.dataset_file == "synthetic" else "data/coco"
    _check_command_line(args)
    return args


def _check_command_line(args) -> None:
    """Mistakes that would otherwise fail late, obscurely, or not at all."""
    if args.output_dir and os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(f"--output_dir {args.output_dir} is a file, not a directory: choose another path")
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available on this machine; use --device cpu")
    if args.finetune_ignore and not (args.resume or args.pretrain_model_path):
        raise ValueError("--finetune_ignore needs a checkpoint to fine-tune from: add --resume CHECKPOINT or "
                         "--pretrain_model_path CHECKPOINT")
    if args.start_epoch is not None and not args.eval and not 0 <= args.start_epoch < args.epochs:
        raise ValueError(f"--start_epoch {args.start_epoch} is not in [0, epochs={args.epochs}): nothing would be "
                         "trained; lower --start_epoch or raise epochs (--options epochs=N)")


def build_model_main(args):
    return build_model(args)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _optimizer(model, args):
    def is_backbone(name):
        return any(k in name for k in args.lr_backbone_names)
    params = [{"params": [p for n, p in model.named_parameters() if not is_backbone(n) and p.requires_grad]},
              {"params": [p for n, p in model.named_parameters() if is_backbone(n) and p.requires_grad],
               "lr": args.lr_backbone}]
    # fused: one kernel for all parameters instead of a dozen small ops per tensor (15% of a CPU demo step)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=True)


def _scheduler(optimizer, args, iterations_per_epoch: int):
    """Stepped once per epoch, except onecycle: once per iteration."""
    if args.lr_scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    if args.lr_scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_drop_list)
    if args.lr_scheduler == "onecycle":
        max_lr = [args.lr, args.lr_backbone]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, epochs=args.epochs,
                                                   steps_per_epoch=iterations_per_epoch, pct_start=0.2)
    raise ValueError(f"lr_scheduler must be step, multistep or onecycle; got {args.lr_scheduler!r}")


def _loader(dataset, args, train: bool):
    """(batch sampler, loader). Loaders get their own generator: creating an iterator must not draw from the
    global RNG that training uses, or a resumed run would diverge. Augmentation is seeded per (epoch, index)."""
    world_size, rank = dist_utils.get_world_size(), dist_utils.get_rank()
    if train:
        sampler = GlobalBatchSampler(len(dataset), args.batch_size, args.seed, world_size, rank, args.accumulate_steps)
    else:
        sampler = BatchSampler(ShardedSampler(len(dataset), world_size, rank), args.batch_size, drop_last=False)
    loader = interrupt.StopSafeDataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                                          num_workers=args.num_workers, generator=torch.Generator())
    if len(loader) == 0:
        raise ValueError(f"the {'training' if train else 'validation'} set has {len(dataset)} images, fewer than "
                         f"one batch of {args.batch_size} per process: lower batch_size")
    return sampler, loader


def _write_header(args, run_record: dict, chosen: precision.Precision, determinism_note: str) -> None:
    logger.info("command: %s", " ".join([sys.executable] + sys.argv))
    logger.info("git: %s%s | world size: %d | device: %s | precision: %s", run_record["git_commit"],
                " (with uncommitted changes)" if run_record["git_dirty"] else "", run_record["world_size"], args.device,
                chosen.reason)
    if chosen.warning:
        logger.warning(chosen.warning)
    overrides = precision.float32_overrides(args)
    if overrides:
        logger.info("float32: the config's float32_recipe sets %s",
                    ", ".join(f"{key}={value}" for key, value in overrides.items()))
    logger.info(determinism_note)
    logger.info("environment: %s", json.dumps(run_record))
    logger.info("args: %s", json.dumps(ckpt.plain_args(args), sort_keys=True, default=str))
    if args.output_dir:
        dump_config(args.config, os.path.join(args.output_dir, "config_cfg.py"))
        with open(os.path.join(args.output_dir, "config_args_all.json"), "w") as f:
            json.dump(ckpt.plain_args(args), f, indent=2, sort_keys=True, default=str)


def _evaluate_only(args, model, criterion, postprocessors, val_loader, base_ds, label_map, device,
                   amp_dtype) -> int:
    """--eval: the weights of --resume or --pretrain_model_path, never an auto-resumed checkpoint."""
    source = args.resume or args.pretrain_model_path
    if not source:
        raise ValueError("--eval needs weights: pass --resume CHECKPOINT or --pretrain_model_path CHECKPOINT")
    checkpoint = ckpt.load_checkpoint(source)
    report = resume.load_weights(model, source, checkpoint, args.finetune_ignore)
    logger.info("Evaluating the %s weights of %s:\n%s", "EMA" if checkpoint.get("model_is_ema") else "model",
                source, report.format())
    results = os.path.join(args.output_dir, "eval", "results.json") if args.save_results and args.output_dir else None
    stats, _ = evaluate(model, criterion, postprocessors, val_loader, base_ds, device, results_file=results,
                        amp_dtype=amp_dtype, label_to_category_id=label_map, max_iters=10 if args.debug else None)
    if args.output_dir and dist_utils.is_main_process():
        with open(os.path.join(args.output_dir, "eval", "eval_stats.json"), "w") as f:
            json.dump({f"test_{k}": v for k, v in stats.items()}, f)
    logger.info("bbox AP %.4f  AP50 %.4f", stats["coco_eval_bbox"][0], stats["coco_eval_bbox"][1])
    return 0


def _claim_output_dir(args):
    """Rank 0 creates output_dir, locks it for this run and removes temporary files of saves a kill cut short.
    Every rank fails together if the directory is busy. Returns the lock (held until the process ends) and the
    names of the removed files."""
    held, stale, error = None, [], None
    if args.output_dir and dist_utils.is_main_process():
        try:
            os.makedirs(os.path.join(args.output_dir, "eval"), exist_ok=True)
            held = run_dir.lock(args.output_dir)
            stale = ckpt.remove_stale_temporary_files(args.output_dir)
        except run_dir.OutputDirError as e:
            error = e
        except OSError as e:
            error = run_dir.OutputDirError(f"cannot write to --output_dir {args.output_dir} ({e.strerror or e}): "
                                          "free some space or choose another directory")
    if dist_utils.any_rank(error is not None):
        raise error or run_dir.OutputDirError(f"--output_dir {args.output_dir} cannot be used (rank 0 says why)")
    return held, stale


def _initial_backbone(model, args) -> None:
    """Training from scratch starts from backbone_weights (ImageNet, as the official recipe, or a local file).
    Frozen stages with random weights would never learn, so they are refused."""
    loaded = load_pretrained_backbone(model, args.backbone_weights)
    if loaded:
        logger.info(loaded)
        return
    frozen = [n for n, p in model.backbone.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(f"backbone_freeze_at={args.backbone_freeze_at} freezes backbone stages whose weights are "
                         f"random ({len(frozen)} tensors, e.g. {frozen[0]}), since neither backbone_weights nor a "
                         "checkpoint gives them: set backbone_weights=imagenet (or a local file), or "
                         "backbone_freeze_at=0 to train the whole backbone")


def _save_before_failure(args, state, epoch: int, last: dict, best: dict, losses) -> None:
    """A training step raised (a data error, a CUDA error, a bug): save the last completed step, so the rerun
    continues from there. Parameters change only in the optimizer step, after which the step counts as done,
    so this state is never half-updated. Several processes save together when they learned of the failure
    together (util.distributed.check_together): each then stands after the same step."""
    if not args.output_dir or last["rng_state"] is None:
        return
    try:
        state.save([ckpt.LATEST], epoch=epoch - 1, best=best, recent_losses=losses.recent, wait=True, **last)
    except ckpt.CheckpointWriteError as e:
        logger.error("could not save the state before the failure: %s", e)
        return
    logger.warning("a training step failed after epoch %d iteration %d: saved %s with that iteration's state; "
                   "rerun the same command to continue once the cause is fixed", epoch, last["iteration"],
                   os.path.join(args.output_dir, ckpt.LATEST))


class LossWatch:
    """The last training losses, kept in checkpoints, so that the first losses after a resume can be set beside
    the last ones before the interruption: a resume that went wrong shows as a jump beyond the usual noise."""

    KEEP, COMPARE = 50, 10
    ENOUGH = 5  # fewer losses before the resume show no noise to judge a jump by

    def __init__(self, before: list):
        self.before, self.recent, self.after = list(before), list(before), []

    def add(self, loss: float) -> None:
        self.recent = (self.recent + [loss])[-self.KEEP:]
        if len(self.before) >= self.ENOUGH and len(self.after) < self.COMPARE:
            self.after.append(loss)
            if len(self.after) == min(self.COMPARE, len(self.before)):
                self._report()

    def _report(self) -> None:
        mean_before = sum(self.before) / len(self.before)
        spread = (sum((x - mean_before) ** 2 for x in self.before) / max(len(self.before) - 1, 1)) ** 0.5
        mean_after = sum(self.after) / len(self.after)
        line = (f"after the resume, the first {len(self.after)} losses average {mean_after:.4f}; the last "
                f"{len(self.before)} before it averaged {mean_before:.4f} (standard deviation {spread:.4f})")
        if abs(mean_after - mean_before) > 3 * spread / len(self.after) ** 0.5 + 1e-6 * abs(mean_before):
            logger.warning("%s: a jump beyond the loss noise; check that the resume restored what you expect", line)
        else:
            logger.info(line)


def _early_stop(args, best: dict, last_epoch: int) -> bool:
    """early_stop_patience=N ends training after N evaluated epochs without a better bbox AP. It is derived from
    the best AP's epoch, which every checkpoint holds, so a resumed run stops where an uninterrupted one would."""
    best_epoch = best.get("regular", {}).get("epoch")
    if args.early_stop_patience <= 0 or best_epoch is None or last_epoch - best_epoch < args.early_stop_patience:
        return False
    logger.info("Early stop: bbox AP has not improved for %d epochs (best %.4f at epoch %d); training ends after "
                "epoch %d of %d", last_epoch - best_epoch, best["regular"]["ap"], best_epoch, last_epoch, args.epochs)
    return True


def _sample_record(args):
    """record_sample_ids=True: every process appends each step's image ids to output_dir/sample_ids/rank{R}.txt,
    a record that checks which images each epoch trained on, across interruptions and process counts."""
    if not (args.record_sample_ids and args.output_dir):
        return None
    os.makedirs(os.path.join(args.output_dir, "sample_ids"), exist_ok=True)
    return open(os.path.join(args.output_dir, "sample_ids", f"rank{dist_utils.get_rank()}.txt"), "a")


def _stop(args, where: str, saved: str) -> None:
    """Log what a stop signal did, truthfully, then end the run with exit code 3."""
    signal_name = interrupt.received() or "a stop signal on another process"
    if args.output_dir:
        logger.warning("%s received during %s: %s; rerun the same command to continue", signal_name, where, saved)
    else:
        logger.warning("%s received during %s: nothing was saved (no --output_dir)", signal_name, where)
    raise interrupt.TrainingInterrupted()


def main(args) -> int:
    determinism_note = determinism.configure(args.deterministic)
    dist_utils.init_distributed_mode(args)
    output_lock, stale = _claim_output_dir(args)  # noqa: F841 (the lock is held until the process ends)
    setup_logging(args.output_dir, dist_utils.get_rank(), args.debug)
    if stale:
        logger.info("Removed %d temporary file(s) of interrupted saves: %s", len(stale), ", ".join(stale))
    device = torch.device(args.device)
    chosen = precision.choose(args.amp, args.amp_dtype, device.type)
    amp_dtype = chosen.dtype
    _seed_everything(args.seed + dist_utils.get_rank())
    run_record = {**environment.run_record(dist_utils.get_world_size()), "precision": chosen.name}
    if dist_utils.is_main_process():
        _write_header(args, run_record, chosen, determinism_note)
    dataset_val = build_dataset("val", args)  # both splits are checked before anything else takes time
    dataset_train = None if args.eval else build_dataset("train", args)
    base_ds = get_coco_api_from_dataset(dataset_val)
    label_map = getattr(dataset_val, "label_to_category_id", None)
    _, val_loader = _loader(dataset_val, args, train=False)

    model, criterion, postprocessors = build_model_main(args)
    model.to(device)
    dist_utils.broadcast_state([*model.parameters(), *model.buffers()])  # every process starts from rank 0's
    args.n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("number of trainable parameters: %d (total %d)", args.n_parameters,
                sum(p.numel() for p in model.parameters()))
    if args.eval:
        return _evaluate_only(args, model, criterion, postprocessors, val_loader, base_ds, label_map, device,
                              amp_dtype)
    start = resume.choose_start(args)
    requested_accumulate_steps = args.accumulate_steps
    resume.keep_global_batch(start, args)  # before the loader, whose batches it may group differently
    train_sampler, train_loader = _loader(dataset_train, args, train=True)
    iterations = optimizer_steps_per_epoch(len(train_loader), args.accumulate_steps)  # counts optimizer steps
    max_iters = 10 if args.debug else None
    optimizer = _optimizer(model, args)
    scaler = torch.amp.GradScaler("cuda") if chosen.needs_scaler else None
    ema = None
    if args.use_ema:
        ema = build_ema(model, args.ema_decay, args.ema_warmup_iters)

    facts = {"origin": resume.run_origin(args), "run_id": start.run_id, "categories": dataset_train.categories(),
             "environment": run_record,
             "datasets": {"train": dataset_train.fingerprint(), "val": dataset_val.fingerprint()}}
    state = resume.TrainState(model, optimizer, scaler, ema, args, iterations, len(dataset_train), facts,
                              requested_accumulate_steps=requested_accumulate_steps)
    if start.kind == "scratch":
        _initial_backbone(model, args)
    position = resume.restore(start, state)
    state.best_written = {kind: dict(value) for kind, value in position.best.items()}
    del start
    state.scheduler = _scheduler(optimizer, args, iterations)  # built now, so the current config's schedule wins
    resume.position_scheduler(state.scheduler, position.scheduler_steps)
    per_iteration = args.lr_scheduler == "onecycle"

    if args.output_dir and dist_utils.is_main_process():
        run_dir.truncate_log(args.output_dir, position.pending["epoch"] if position.pending else position.epoch)
    interrupt.install()
    best = position.best
    tensorboard = None
    if args.use_tensorboard and args.output_dir and dist_utils.is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        tensorboard = SummaryWriter(os.path.join(args.output_dir, "tb"), purge_step=position.epoch)

    def evaluate_and_record(epoch: int, train_meters: dict, train_time: float) -> None:
        """Evaluate a trained epoch (saved already), log it, keep the best, save again."""
        logger.info("Evaluating epoch %d", epoch)
        eval_started = time.time()

        def after_batch():
            if interrupt.stop_requested():
                state.finish()  # the save before this evaluation is complete
                _stop(args, f"the evaluation of epoch {epoch}",
                      f"{ckpt.LATEST} holds epoch {epoch}'s training, which a rerun evaluates first")
        eval_kwargs = dict(amp_dtype=amp_dtype, label_to_category_id=label_map, max_iters=max_iters,
                           after_batch=after_batch)
        results = os.path.join(args.output_dir, "eval", f"results{epoch:04d}.json") \
            if args.save_results and args.output_dir else None
        # Each process evaluates its share with rank 0's batch-norm statistics, those a checkpoint holds.
        dist_utils.broadcast_state([*model.buffers(), *(ema.buffers() if ema is not None else ())])
        try:
            test_stats, _ = evaluate(model, criterion, postprocessors, val_loader, base_ds, device,
                                     results_file=results, **eval_kwargs)
            ema_stats = evaluate(ema.module, criterion, postprocessors, val_loader, base_ds, device,
                                 **eval_kwargs)[0] if ema is not None else None
        except NonFiniteOutputError as e:
            diverged = NonFiniteOutputError(f"epoch {epoch}: {e}; {state.back_to_last_good(epoch)}")
            diverged.__dict__.update(vars(e))  # which process met it
            raise diverged from None
        log_stats = {**{f"train_{k}": v for k, v in Meters(train_meters).averages().items()},
                     **{f"test_{k}": v for k, v in test_stats.items()}}
        candidates = [("regular", test_stats)]
        if ema is not None:
            log_stats.update({f"ema_test_{k}": v for k, v in ema_stats.items()})
            candidates.append(("ema", ema_stats))
        new_best = []
        for kind, stats in candidates:
            ap = stats["coco_eval_bbox"][0]
            if ap > best.get(kind, {}).get("ap", -1.0):
                best[kind] = {"ap": ap, "epoch": epoch}
                new_best.append(f"checkpoint_best_{kind}.pth")
        log_stats.update(epoch=epoch, n_parameters=args.n_parameters,
                         epoch_time=train_time + time.time() - eval_started)
        if tensorboard is not None:
            for key, value in log_stats.items():
                values = value if isinstance(value, list) else [value]
                for i, v in enumerate(values[:3]):  # AP, AP50, AP75 of the COCO stats
                    tensorboard.add_scalar(key if len(values) == 1 else f"{key}/{i}", v, epoch)
            tensorboard.flush()
        if args.output_dir and dist_utils.is_main_process():
            run_dir.append_log(args.output_dir, log_stats)
            with open(os.path.join(args.output_dir, "eval", "latest.json"), "w") as f:
                json.dump({"epoch": epoch, "coco_eval_bbox": test_stats["coco_eval_bbox"]}, f)
        names = new_best + [ckpt.LATEST]
        if (epoch + 1) % args.save_checkpoint_interval == 0:
            names.append(f"checkpoint{epoch:04d}.pth")
        state.save(names, epoch=epoch, iteration=0, samples_done=0, best=best, meters={}, recent_losses=losses.recent)
        kept = best.get("regular")  # none when the disk had no room for the first best file
        logger.info("Epoch %d done in %.0f s: bbox AP %.4f (%s)", epoch, log_stats["epoch_time"],
                    test_stats["coco_eval_bbox"][0],
                    f"best {kept['ap']:.4f} at epoch {kept['epoch']}" if kept else "no best file kept")

    losses = LossWatch(position.recent_losses)
    if position.pending:
        logger.info("Epoch %d was trained but not evaluated: evaluating it first", position.pending["epoch"])
        evaluate_and_record(**position.pending)
    logger.info("Start training: epochs %d..%d, %d iterations per epoch", position.epoch, args.epochs - 1, iterations)
    started = time.time()
    # Global samples of position.epoch already trained on, and the number that epoch trains.
    samples_done, epoch_samples = position.samples_done, position.epoch_samples
    sample_record = _sample_record(args)
    for epoch in range(position.epoch, args.epochs):
        if _early_stop(args, best, epoch - 1):
            break
        epoch_started = time.time()
        train_sampler.set_epoch(epoch)
        train_sampler.set_start(samples_done, epoch_samples)
        epoch_samples, window = train_sampler.epoch_samples, train_sampler.step_samples
        start_iter = samples_done // window
        meters = Meters(position.meters if samples_done else None)
        # The last completed step: what a periodic save, a stop signal or a failed step records.
        last = dict(iteration=start_iter, samples_done=samples_done, epoch_samples=epoch_samples,
                    meters=meters.state(), rng_state=None)

        def after_iteration(it, meters, targets, epoch=epoch, first=samples_done, start_iter=start_iter):
            last.update(iteration=it, samples_done=min(first + (it - start_iter) * window, last["epoch_samples"]),
                        meters=meters.state(), rng_state=capture_rng_state())
            losses.add(meters.last["loss"])
            if sample_record is not None:
                sample_record.write(f"{epoch} " + " ".join(str(int(t["image_id"])) for t in targets) + "\n")
                sample_record.flush()
            stop = interrupt.stop_requested()
            if stop or (args.save_every_iters > 0 and it % args.save_every_iters == 0 and it < iterations):
                state.save([ckpt.LATEST], epoch=epoch - 1, best=best, recent_losses=losses.recent, wait=stop, **last)
            if stop:
                _stop(args, f"epoch {epoch}", f"saved {os.path.join(args.output_dir, ckpt.LATEST)} at iteration {it}")

        try:
            train_one_epoch(model, criterion, train_loader, optimizer, device, epoch, max_norm=args.clip_max_norm,
                            scaler=scaler, amp_dtype=amp_dtype, ema=ema,
                            iteration_scheduler=state.scheduler if per_iteration else None, start_iter=start_iter,
                            steps=train_sampler.steps_left(), meters=meters, after_iteration=after_iteration,
                            max_iters=max_iters, log_progress=args.save_log, accumulate_steps=args.accumulate_steps,
                            short_last_step=train_sampler.ends_short(),
                            lr_factor=linear_warmup(args.lr_warmup_iters, epoch * iterations),
                            stop_requested=interrupt.stop_requested)
        except StopInsideStep:
            state.save([ckpt.LATEST], epoch=epoch - 1, best=best, recent_losses=losses.recent, wait=True, **last)
            _stop(args, f"epoch {epoch}", f"saved {os.path.join(args.output_dir, ckpt.LATEST)} at iteration "
                  f"{last['iteration']}, the start of the step under way")
        except Exception as e:
            together = dist_utils.get_world_size() == 1 or hasattr(e, "rank") or isinstance(e, OutOfMemoryStop)
            if together and not isinstance(e, (FloatingPointError, ckpt.CheckpointWriteError,
                                               interrupt.TrainingInterrupted)):
                _save_before_failure(args, state, epoch, last, best, losses)
            raise
        samples_done, epoch_samples = 0, None
        if not per_iteration:
            state.scheduler.step()
        train_time = time.time() - epoch_started
        # Saved before evaluating (as DINO and DETR do): a crash or a kill during a long evaluation loses no training.
        state.save([ckpt.LATEST], epoch=epoch, iteration=0, samples_done=0, best=best, meters=meters.state(),
                   recent_losses=losses.recent, eval_pending=True, epoch_time=train_time)
        evaluate_and_record(epoch, meters.state(), train_time)
    state.finish()
    logger.info("Training time %s", datetime.timedelta(seconds=int(time.time() - started)))
    return 0

BAD_INPUT = (ValueError, FileNotFoundError, ckpt.CheckpointError, run_dir.OutputDirError)
TRAINING_FAILURES = (FloatingPointError, ckpt.CheckpointWriteError)


def cli(argv=None) -> int:
    """The one place that turns failures into one `error:` line and an exit code: 2 for bad input, 1 for a
    failure during training, 3 after a stop signal (state saved). --debug lets unexpected errors raise."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = None
    try:
        args = parse_args(argv)
        code = main(args)
        dist_utils.leave_process_group()
        return code
    except interrupt.TrainingInterrupted:
        return interrupt.EXIT_INTERRUPTED
    except KeyboardInterrupt:
        return _fail(f"stopped by Ctrl-C before a save; {_last_save(args)}", 130, args)
    except BAD_INPUT as e:
        return _fail(str(e), 2, args)
    except (NonFiniteLossError, OutOfMemoryStop) as e:
        return _fail(f"{e}; {_last_save(args)}", 1, args)
    except TRAINING_FAILURES as e:
        return _fail(str(e), 1, args)
    except Exception as e:
        if _lost_contact(e):
            return _fail(f"lost contact with another process of this run, which probably failed (see its error): "
                         f"{str(e).splitlines()[0]}", 1, args)
        if "--debug" in argv:
            raise
        return _fail(f"unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", 1, args,
                     hint=_traceback_to_info(args))


def _lost_contact(error: Exception) -> bool:
    """A collective failed because a partner process ended (NCCL's error, or gloo's closed connection)."""
    return isinstance(error, torch.distributed.DistBackendError) or "Connection closed by peer" in str(error)


def _last_save(args) -> str:
    path = os.path.join(args.output_dir, ckpt.LATEST) if args is not None and args.output_dir else ""
    return f"{path} still holds the last good state" if path and os.path.exists(path) else "no checkpoint was saved"


def _traceback_to_info(args) -> str:
    """Keep the full traceback in info.txt, so the console shows one line."""
    info = os.path.join(args.output_dir, "info.txt") if args is not None and args.output_dir else ""
    if not info or not os.path.exists(info) or not dist_utils.is_main_process():
        return " (rerun with --debug for the traceback)"
    with open(info, "a") as f:
        traceback.print_exc(file=f)
    return f" (traceback in {info}; --debug prints it)"


def _fail(message: str, code: int, args, hint: str = "") -> int:
    rank = dist_utils.get_rank()
    failed = getattr(sys.exc_info()[1], "rank", rank)  # an error another process met (check_together)
    if failed != rank:
        message += f" (on process {failed})"
    message += hint
    line = f"error: {message}" if rank == 0 else f"[rank {rank}] error: {message}"
    info = os.path.join(args.output_dir, "info.txt") if args is not None and args.output_dir else ""
    if rank == 0 and info and os.path.exists(info):
        with open(info, "a") as f:
            f.write(line + "\n")
    sys.stdout.flush()
    sys.stderr.write(line + "\n")  # one write: lines of several processes sharing a pipe stay whole
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    sys.exit(cli())
