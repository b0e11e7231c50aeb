"""Train and evaluate DINO: `python main.py -c config/DINO/DINO_4scale.py --coco_path DIR --output_dir DIR`."""
import argparse
import datetime
import json
import logging
import os
import random
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader

import util.checkpoint as ckpt
from datasets import build_dataset, get_coco_api_from_dataset
from datasets.sampler import ResumableSampler
from engine import Meters, NonFiniteLossError, evaluate, train_one_epoch
from models import build_model
from util import distributed as dist_utils
from util import interrupt
from util.config import DictAction, dump_config, load_config, merge_config
from util.logger import setup_logging
from util.misc import atomic_write, collate_fn

logger = logging.getLogger("dino.main")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("DINO training and evaluation", add_help=add_help)
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
    p.add_argument("--no_auto_resume", action="store_true",
                   help="do not resume from output_dir/checkpoint.pth when it exists")
    p.add_argument("--pretrain_model_path", default=None, help="load model weights only (fine-tuning)")
    p.add_argument("--finetune_ignore", nargs="+", default=None,
                   help="drop checkpoint keys containing any of these substrings, e.g. label_enc.weight class_embed")
    p.add_argument("--start_epoch", default=None, type=int,
                   help="epoch to start at; overrides the checkpoint's epoch when given")
    p.add_argument("--eval", action="store_true", help="only evaluate the given weights")
    p.add_argument("--num_workers", default=2, type=int, help="data loading worker processes per rank")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument("--find_unused_params", action="store_true", help="DDP find_unused_parameters")
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
    args.config = {k: getattr(args, k) for k in cfg}
    if args.coco_path is None:
        args.coco_path = "data/synthetic" if args.dataset_file == "synthetic" else "data/coco"
    return args


def build_model_main(args):
    return build_model(args)


def _git_hash() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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
    """(sampler, loader). Loaders get their own generator: creating an iterator must not draw from the global
    RNG that training uses, or a resumed run would diverge. Augmentation is seeded per (epoch, index)."""
    sampler = ResumableSampler(len(dataset), shuffle=train, seed=args.seed, num_replicas=dist_utils.get_world_size(),
                               rank=dist_utils.get_rank())
    loader = DataLoader(dataset, batch_sampler=BatchSampler(sampler, args.batch_size, drop_last=train),
                        collate_fn=collate_fn, num_workers=args.num_workers, generator=torch.Generator())
    if len(loader) == 0:
        raise ValueError(f"the {'training' if train else 'validation'} set has {len(dataset)} images, fewer than "
                         f"one batch of {args.batch_size} per process: lower batch_size")
    return sampler, loader


def _check_num_classes(coco, label_map, args) -> None:
    largest = len(label_map) - 1 if label_map else max(coco.getCatIds(), default=0)
    if largest >= args.num_classes:
        raise ValueError(f"the dataset has labels up to {largest} but num_classes is {args.num_classes}: set "
                         f"num_classes={largest + 1} (and dn_labelbook_size >= it), or contiguous_category_ids=True")


def _write_header(args, model) -> None:
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("command: %s", " ".join([sys.executable] + sys.argv))
    logger.info("git: %s | world size: %d | device: %s", _git_hash(), dist_utils.get_world_size(), args.device)
    logger.info("args: %s", json.dumps(ckpt.plain_args(args), sort_keys=True, default=str))
    logger.info("number of trainable parameters: %d (total %d)", n_params, sum(p.numel() for p in model.parameters()))
    if args.output_dir:
        dump_config(args.config, os.path.join(args.output_dir, "config_cfg.py"))
        with open(os.path.join(args.output_dir, "config_args_all.json"), "w") as f:
            json.dump(ckpt.plain_args(args), f, indent=2, sort_keys=True, default=str)
    args.n_parameters = n_params


def _restore_full_state(checkpoint, path, how, model, optimizer, scaler, ema, args, iterations):
    """Continue a run exactly: returns (start_epoch, start_iter, best, meters, scheduler steps done)."""
    saved_args = checkpoint.get("args") or {}
    model.load_state_dict(ckpt.strip_module_prefix(checkpoint["model"]), strict=True)
    optimizer.load_state_dict(checkpoint["optimizer"])
    _apply_configured_lrs(optimizer, args)
    scheduler_steps = checkpoint["lr_scheduler"]["last_epoch"]
    if scaler is not None and "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    if ema is not None:
        if "ema_model" in checkpoint:
            ema.load_state_dict(checkpoint["ema_model"])
        else:
            logger.warning("the checkpoint has no EMA weights: the EMA restarts from the current model")
    start_epoch, start_iter = checkpoint["epoch"] + 1, checkpoint.get("iteration", 0)
    meters = checkpoint.get("meters") or {}
    logger.info("Resuming training from %s (%s): epoch %d, iteration %d of %d, to %d total epochs",
                path, how, start_epoch, start_iter, iterations, args.epochs)
    for change in ckpt.hyperparameter_changes(saved_args, vars(args)):
        logger.info("  changed since the checkpoint: %s", change)
    same_layout = (saved_args.get("world_size", 1) == dist_utils.get_world_size()
                   and saved_args.get("batch_size") == args.batch_size)
    rng = checkpoint.get("rng") or []
    if start_iter and not same_layout:
        logger.warning("  the checkpoint stopped mid-epoch with %s process(es) x batch %s; now %d x %d: the data "
                       "order differs, so epoch %d restarts from its first iteration",
                       saved_args.get("world_size", 1), saved_args.get("batch_size"), dist_utils.get_world_size(),
                       args.batch_size, start_epoch)
        start_iter, meters = 0, {}
    if len(rng) == dist_utils.get_world_size():
        ckpt.restore_rng_state(rng[dist_utils.get_rank()])
    elif rng:
        logger.warning("  RNG states were saved for %d process(es), now %d: random draws will differ from an "
                       "uninterrupted run", len(rng), dist_utils.get_world_size())
    if args.start_epoch is not None and args.start_epoch != start_epoch:
        logger.info("  --start_epoch %d overrides the checkpoint's epoch %d", args.start_epoch, start_epoch)
        start_epoch, start_iter, meters = args.start_epoch, 0, {}
        scheduler_steps = start_epoch * (iterations if args.lr_scheduler == "onecycle" else 1)
    return start_epoch, start_iter, checkpoint.get("best") or {}, meters, scheduler_steps


def _apply_configured_lrs(optimizer, args) -> None:
    """A loaded optimizer carries the old run's lr and weight decay; the current config's win (and are
    logged as changed), so changing lr on resume is never silently ignored."""
    for group, lr in zip(optimizer.param_groups, (args.lr, args.lr_backbone)):
        group["lr"] = group["initial_lr"] = lr
        group["weight_decay"] = args.weight_decay


def _position_scheduler(scheduler, steps: int) -> None:
    """Put a fresh schedule where an uninterrupted run would be after `steps` steps: the same float
    operations in the same order, so the lr is bit-identical."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "scheduler.step() before optimizer.step()": intended
        for _ in range(steps):
            scheduler.step()


def _load_weights(model, path, checkpoint, ignore, reason) -> None:
    report = ckpt.load_model_weights(model, checkpoint["model"], ignore or ())
    logger.info("Loaded model weights only from %s (%s); optimizer and schedule start fresh:\n%s",
                path, reason, report.format())


def _save_training_checkpoint(names, model, optimizer, scheduler, scaler, ema, args, *, epoch, iteration,
                              iterations, best, meters, categories) -> None:
    """Every rank contributes its RNG state; rank 0 writes each name atomically; the others wait."""
    rng = dist_utils.all_gather_object(ckpt.capture_rng_state())
    if dist_utils.is_main_process() and args.output_dir:
        state = ckpt.training_state(model, optimizer, scheduler, scaler, ema, epoch=epoch, iteration=iteration,
                                    iterations=iterations, args=args, best=best, meters=meters, rng_states=rng,
                                    categories=categories)
        for name in names:
            if name.startswith("checkpoint0"):
                ckpt.save_numbered(state, args.output_dir, epoch, args.keep_checkpoints)
            else:
                ckpt.atomic_save(state, os.path.join(args.output_dir, name))
    dist_utils.barrier()


def _truncate_log(output_dir: str, start_epoch: int) -> None:
    """Drop log.txt lines of epochs that will run again (written before a crash that preceded their save)."""
    path = os.path.join(output_dir, "log.txt")
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get("epoch", -1) < start_epoch]
    atomic_write(path, lambda f: f.write("".join(lines).encode()))


def _evaluate_only(args, model, criterion, postprocessors, val_loader, base_ds, label_map, device) -> int:
    """--eval: the weights of --resume or --pretrain_model_path, never an auto-resumed checkpoint."""
    source = args.resume or args.pretrain_model_path
    if not source:
        raise ValueError("--eval needs weights: pass --resume CHECKPOINT or --pretrain_model_path CHECKPOINT")
    _load_weights(model, source, ckpt.load_checkpoint(source), args.finetune_ignore, "--eval")
    results = os.path.join(args.output_dir, "eval", "results.json") if args.save_results and args.output_dir else None
    stats, _ = evaluate(model, criterion, postprocessors, val_loader, base_ds, device, results_file=results,
                        label_to_category_id=label_map, max_iters=10 if args.debug else None)
    if args.output_dir and dist_utils.is_main_process():
        with open(os.path.join(args.output_dir, "eval", "eval_stats.json"), "w") as f:
            json.dump({f"test_{k}": v for k, v in stats.items()}, f)
    logger.info("bbox AP %.4f  AP50 %.4f", stats["coco_eval_bbox"][0], stats["coco_eval_bbox"][1])
    return 0


def main(args) -> int:
    dist_utils.init_distributed_mode(args)
    if args.output_dir and dist_utils.is_main_process():
        os.makedirs(os.path.join(args.output_dir, "eval"), exist_ok=True)
    dist_utils.barrier()
    setup_logging(args.output_dir, dist_utils.get_rank(), args.debug)
    device = torch.device(args.device)
    _seed_everything(args.seed + dist_utils.get_rank())
    model, criterion, postprocessors = build_model_main(args)
    model.to(device)
    if dist_utils.is_main_process():
        _write_header(args, model)
    args.n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)

    dataset_val = build_dataset("val", args)
    base_ds = get_coco_api_from_dataset(dataset_val)
    label_map = getattr(dataset_val, "label_to_category_id", None)
    _check_num_classes(base_ds, label_map, args)
    _, val_loader = _loader(dataset_val, args, train=False)
    if args.eval:
        return _evaluate_only(args, model, criterion, postprocessors, val_loader, base_ds, label_map, device)
    dataset_train = build_dataset("train", args)
    train_sampler, train_loader = _loader(dataset_train, args, train=True)
    iterations = len(train_loader)
    max_iters = 10 if args.debug else None
    optimizer = _optimizer(model, args)
    scaler = torch.amp.GradScaler("cuda") if args.amp and device.type == "cuda" else None
    amp = scaler is not None
    ema = None
    if args.use_ema:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema_decay), use_buffers=True)

    path, checkpoint, how = ckpt.resolve_resume(args.resume, args.output_dir, auto_resume=not args.no_auto_resume)
    start_epoch, start_iter, best, saved_meters = args.start_epoch or 0, 0, {}, {}
    per_iteration = args.lr_scheduler == "onecycle"
    scheduler_steps = start_epoch * (iterations if per_iteration else 1)
    if path and (args.finetune_ignore and how == "explicit --resume" or "optimizer" not in checkpoint):
        _load_weights(model, path, checkpoint, args.finetune_ignore,
                      "--finetune_ignore" if args.finetune_ignore else "the checkpoint holds no optimizer state")
    elif path:
        diffs = ckpt.architecture_differences(checkpoint.get("args") or {}, vars(args))
        if diffs:
            raise ValueError(f"{path} was trained with a different architecture:\n  " + "\n  ".join(diffs) +
                             "\nuse --pretrain_model_path (or --resume with --finetune_ignore) to fine-tune from it")
        start_epoch, start_iter, best, saved_meters, scheduler_steps = _restore_full_state(
            checkpoint, path, how, model, optimizer, scaler, ema, args, iterations)
    elif args.pretrain_model_path:
        _load_weights(model, args.pretrain_model_path, ckpt.load_checkpoint(args.pretrain_model_path),
                      args.finetune_ignore, "--pretrain_model_path")
    else:
        logger.info("Training from scratch (%s)", how)
    del checkpoint
    scheduler = _scheduler(optimizer, args, iterations)  # built now, so the current config's schedule wins
    _position_scheduler(scheduler, scheduler_steps)

    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None,
            find_unused_parameters=args.find_unused_params)
    eval_kwargs = dict(amp=amp, label_to_category_id=label_map, max_iters=max_iters)

    if args.output_dir and dist_utils.is_main_process():
        _truncate_log(args.output_dir, start_epoch)
    interrupt.install()
    save = dict(model=model_without_ddp, optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=ema, args=args,
                iterations=iterations, categories=dataset_train.categories())
    tensorboard = None
    if args.use_tensorboard and args.output_dir and dist_utils.is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        tensorboard = SummaryWriter(os.path.join(args.output_dir, "tb"), purge_step=start_epoch)
    logger.info("Start training: epochs %d..%d, %d iterations per epoch", start_epoch, args.epochs - 1, iterations)
    started = time.time()
    for epoch in range(start_epoch, args.epochs):
        epoch_started = time.time()
        train_sampler.set_epoch(epoch)
        train_sampler.set_start(start_iter * args.batch_size)

        def after_iteration(it, meters, epoch=epoch):
            stop = interrupt.stop_requested(device)
            due = args.save_every_iters > 0 and it % args.save_every_iters == 0 and it < iterations
            if stop or due:
                _save_training_checkpoint([ckpt.LATEST], **save, epoch=epoch - 1, iteration=it, best=best,
                                          meters=meters.state())
            if stop:
                logger.warning("%s received: saved %s at epoch %d iteration %d; rerun the same command to resume",
                               interrupt.received() or "a stop signal on another rank",
                               os.path.join(args.output_dir, ckpt.LATEST), epoch, it)
                raise interrupt.TrainingInterrupted()

        train_stats = train_one_epoch(
            model, criterion, train_loader, optimizer, device, epoch, max_norm=args.clip_max_norm, scaler=scaler,
            amp=amp, ema=ema, iteration_scheduler=scheduler if per_iteration else None, start_iter=start_iter,
            meters=Meters(saved_meters if start_iter else None), after_iteration=after_iteration,
            max_iters=max_iters, log_progress=args.save_log)
        start_iter = 0
        if not per_iteration:
            scheduler.step()

        results = os.path.join(args.output_dir, "eval", f"results{epoch:04d}.json") \
            if args.save_results and args.output_dir else None
        test_stats, _ = evaluate(model_without_ddp, criterion, postprocessors, val_loader, base_ds, device,
                                 results_file=results, **eval_kwargs)
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                     **{f"test_{k}": v for k, v in test_stats.items()}}
        new_best = []
        candidates = [("regular", test_stats)]
        if ema is not None:
            ema_stats, _ = evaluate(ema.module, criterion, postprocessors, val_loader, base_ds, device, **eval_kwargs)
            log_stats.update({f"ema_test_{k}": v for k, v in ema_stats.items()})
            candidates.append(("ema", ema_stats))
        for kind, stats in candidates:
            ap = stats["coco_eval_bbox"][0]
            if ap > best.get(kind, {}).get("ap", -1.0):
                best[kind] = {"ap": ap, "epoch": epoch}
                new_best.append(f"checkpoint_best_{kind}.pth")
        log_stats.update(epoch=epoch, n_parameters=args.n_parameters, epoch_time=time.time() - epoch_started)
        if tensorboard is not None:
            for key, value in log_stats.items():
                values = value if isinstance(value, list) else [value]
                for i, v in enumerate(values[:3]):  # AP, AP50, AP75 of the COCO stats
                    tensorboard.add_scalar(key if len(values) == 1 else f"{key}/{i}", v, epoch)
            tensorboard.flush()
        if args.output_dir and dist_utils.is_main_process():
            with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                f.write(json.dumps(log_stats) + "\n")
            with open(os.path.join(args.output_dir, "eval", "latest.json"), "w") as f:
                json.dump({"epoch": epoch, "coco_eval_bbox": test_stats["coco_eval_bbox"]}, f)
        names = new_best + [ckpt.LATEST]
        if (epoch + 1) % args.save_checkpoint_interval == 0:
            names.append(f"checkpoint{epoch:04d}.pth")
        _save_training_checkpoint(names, **save, epoch=epoch, iteration=0, best=best, meters={})
        logger.info("Epoch %d done in %.0f s: bbox AP %.4f (best %.4f at epoch %d)", epoch,
                    log_stats["epoch_time"], test_stats["coco_eval_bbox"][0], best["regular"]["ap"],
                    best["regular"]["epoch"])
    logger.info("Training time %s", datetime.timedelta(seconds=int(time.time() - started)))
    return 0


def cli(argv=None) -> int:
    try:
        args = parse_args(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return main(args)
    except interrupt.TrainingInterrupted:
        return interrupt.EXIT_INTERRUPTED
    except (ckpt.CheckpointError, ValueError, FileNotFoundError) as e:
        logger.error("error: %s", e)
        return 2
    except (NonFiniteLossError, FloatingPointError) as e:
        logger.error("stopped: %s. checkpoint.pth still holds the last good state.", e)
        return 1
    except ckpt.CheckpointWriteError as e:
        logger.error("stopped: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
