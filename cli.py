"""The command line: arguments, the config file and --options merged and checked, and the one place that turns
a run's outcome into an exit code and, for a failure, one `error:` line."""
import argparse
import logging
import os
import sys
import traceback

import torch

from checkpoint import remote
from checkpoint.format import CheckpointError, CheckpointWriteError
from checkpoint.store import LATEST
from datasets.coco_eval import check_backend
from training.step import NonFiniteLossError, OutOfMemoryStop
from util import distributed as dist_utils
from util import interrupt, options, precision, run_dir
from util.config import DictAction, load_config, merge_config

logger = logging.getLogger("dino.cli")


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
    p.add_argument("--plan", action="store_true",
                   help="print where the run would start and what it would load (tensors, classes by name, the lr "
                   "schedule), then exit without training or writing anything")
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
    _place_output_dir(args)
    return args


def _place_output_dir(args) -> None:
    """An output_dir on an object store (a URL) becomes output_url; the run then works in a local staging
    folder (args.output_dir) that checkpoint/remote.py mirrors there. Sources given as URLs are checked now."""
    for flag, value in (("--resume", args.resume), ("--pretrain_model_path", args.pretrain_model_path)):
        if remote.is_url(value):
            remote.filesystem(value, flag)
    args.output_url = ""
    if remote.is_url(args.output_dir):
        if args.plan:
            raise ValueError(f"--plan reads a local --output_dir, not {args.output_dir}: give it a local copy of the "
                             "run, or no --output_dir to see what a checkpoint would load")
        remote.filesystem(args.output_dir)
        args.output_url = args.output_dir.rstrip("/")
        args.output_dir = remote.staging_dir(args.output_url)


def _check_command_line(args) -> None:
    """Mistakes that would otherwise fail late, obscurely, or not at all."""
    if args.output_dir and os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(f"--output_dir {args.output_dir} is a file, not a directory: choose another path")
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available on this machine; use --device cpu")
    if args.finetune_ignore and not (args.resume or args.pretrain_model_path):
        raise ValueError("--finetune_ignore needs a checkpoint to fine-tune from: add --resume CHECKPOINT or "
                         "--pretrain_model_path CHECKPOINT")
    check_backend(args.coco_eval_backend)
    if args.start_epoch is not None and not args.eval and not 0 <= args.start_epoch < args.epochs:
        raise ValueError(f"--start_epoch {args.start_epoch} is not in [0, epochs={args.epochs}): nothing would be "
                         "trained; lower --start_epoch or raise epochs (--options epochs=N)")


BAD_INPUT = (ValueError, FileNotFoundError, CheckpointError, run_dir.OutputDirError)
TRAINING_FAILURES = (FloatingPointError, CheckpointWriteError)


def run(main, argv=None) -> int:
    """Parse argv and run main(args): 0 when it ends well, 2 for bad input, 1 for a failure during training,
    3 after a stop signal (state saved), each failure as one `error:` line. --debug lets unexpected errors
    raise."""
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


def _push_logs() -> None:
    """The logs of a remote output_dir follow the failure there if the store answers at once; if it does not,
    they stay in the staging folder (the error line has said what is where)."""
    mirror = remote.active()
    if mirror is not None:
        try:
            mirror.push([], attempts=1)
        except remote.RemoteError:
            pass


def _lost_contact(error: Exception) -> bool:
    """A collective failed because a partner process ended (NCCL's error, or gloo's closed connection)."""
    return isinstance(error, torch.distributed.DistBackendError) or "Connection closed by peer" in str(error)


def _last_save(args) -> str:
    path = os.path.join(args.output_dir, LATEST) if args is not None and args.output_dir else ""
    if not path or not os.path.exists(path):
        return "no checkpoint was saved"
    shown = f"{args.output_url}/{LATEST}" if args.output_url else path
    return f"{shown} still holds the last good state"


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
        run_dir.append_event(args.output_dir, "error", message=message, code=code)
    sys.stdout.flush()
    sys.stderr.write(line + "\n")  # one write: lines of several processes sharing a pipe stay whole
    sys.stderr.flush()
    if rank == 0:
        _push_logs()
    return code


