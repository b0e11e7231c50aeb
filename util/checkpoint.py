"""The checkpoint file format and its safe I/O (the resume policy is util/resume.py).

Checkpoints hold only tensors and plain Python values, so they are always read with
``weights_only=True``: a checkpoint from elsewhere can never run code on load. Writes are atomic, so
a job killed mid-save (or a full disk) leaves the previous checkpoint intact.
"""
import argparse
import errno
import io
import os
import pickle
import re
import zipfile
from typing import List

import torch

from util.misc import atomic_write

class CheckpointError(RuntimeError):
    """A checkpoint file could not be read; the message says which file and why."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; any previous file at that path is unchanged."""


# ---------------------------------------------------------------------------------------------
# Writing

def atomic_save(obj, path):
    """torch.save obj so that path holds either the old file or the complete new one, never a part.

    The file is serialised in memory first and written with plain file I/O, so a failed write reports the
    operating system's reason (a full disk, a file-size limit) rather than torch's internal stream error."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        atomic_write(path, lambda f: f.write(buffer.getbuffer()))
    except OSError as e:
        reason = _WRITE_ERRORS.get(e.errno, e.strerror or str(e))
        raise CheckpointWriteError(f"could not write checkpoint {os.fspath(path)} ({buffer.tell() / 2**20:.0f} MB): "
                                   f"{reason}; the previous file at that path, if any, is unchanged") from None


_WRITE_ERRORS = {
    errno.ENOSPC: "the disk is full (no space left on device): free some space or choose another --output_dir",
    errno.EDQUOT: "the disk quota is exceeded: free some space or choose another --output_dir",
    errno.EFBIG: "the file exceeds this process's file-size limit (ulimit -f): raise the limit",
    errno.EROFS: "the file system is read-only: choose another --output_dir",
    errno.EACCES: "permission denied: choose a writable --output_dir",
}


# ---------------------------------------------------------------------------------------------
# Reading

_ZIP_MAGIC = b'PK\x03\x04'
_PICKLE_PROTO = b'\x80'  # every pickle of protocol >= 2, hence every legacy torch.save file


def load_checkpoint(path, map_location='cpu') -> dict:
    """Load a checkpoint safely and return a dict with at least a 'model' state dict.

    Official DINO checkpoints pickle their argparse.Namespace under 'args'; it is allowed through
    and returned as a plain dict. A bare state dict is returned as {'model': state_dict}.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, 'rb') as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); the save that wrote it probably "
                              "failed; use an earlier checkpoint")
    is_zip = magic == _ZIP_MAGIC
    if is_zip and not _zip_holds_torch_pickle(path):
        raise CheckpointError(f"{path} is a zip archive but not a PyTorch checkpoint (it holds no data.pkl)")
    if not is_zip and not magic.startswith(_PICKLE_PROTO):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (it starts with neither a zip nor a pickle header)")

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        forbidden = _forbidden_global(str(e))
        if forbidden:
            raise CheckpointError(
                f"refused to load {path}: it contains a pickled object of type {forbidden} that is not "
                "allowed (only tensors, plain Python types and argparse.Namespace); nothing from it "
                "was executed") from None
        raise _unreadable(path, is_zip, e) from None
    except RuntimeError as e:
        if 'PytorchStreamReader' in str(e):
            raise _unreadable(path, is_zip, e) from None
        raise CheckpointError(f"cannot load checkpoint {path}: {_first_sentence(e)}") from None
    except Exception as e:  # a damaged file also surfaces as OSError, ValueError, UnicodeDecodeError, ...
        raise _unreadable(path, is_zip, e) from None

    if isinstance(ckpt, dict) and isinstance(ckpt.get('args'), argparse.Namespace):
        ckpt['args'] = dict(vars(ckpt['args']))
    if isinstance(ckpt, dict) and isinstance(ckpt.get('model'), dict):
        return ckpt
    if isinstance(ckpt, dict) and ckpt and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt.items()):
        return {'model': ckpt}
    found = f"a dict with keys {sorted(map(str, ckpt))[:10]}" if isinstance(ckpt, dict) else type(ckpt).__name__
    raise CheckpointError(f"{path} is not a model checkpoint: expected a dict with a 'model' state dict "
                          f"or a bare state dict, found {found}")


def _zip_holds_torch_pickle(path: str) -> bool:
    """torch.save's zip files hold <name>/data.pkl; a truncated one has no readable directory (torch reports it)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return True


def _forbidden_global(message: str):
    """Name of the disallowed object in torch's weights_only error message, or None."""
    for pattern in (r"GLOBAL (\S+)", r"unrecognized function (\S+)", r"add_safe_globals`,? but got (.+)$"):
        match = re.search(pattern, message, flags=re.MULTILINE)
        if match:
            return re.sub(r"^<class '(.+)'>$", r"\1", match.group(1))
    return None


def _unreadable(path: str, is_zip: bool, error: Exception) -> CheckpointError:
    if is_zip or isinstance(error, EOFError):
        return CheckpointError(f"checkpoint {path} is truncated or corrupt ({_first_sentence(error)}); the file "
                               "was probably cut off during a copy or a save; use an earlier checkpoint")
    return CheckpointError(f"{path} is not a readable PyTorch checkpoint ({_first_sentence(error)})")


def _first_sentence(error: Exception) -> str:
    """torch's messages go on with advice that does not apply here."""
    text = str(error).split('WeightsUnpickler error:')[-1].strip()
    return text.split('\n')[0].split('. ')[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# Training checkpoints: what they hold and where they live in output_dir

FORMAT_VERSION = 2  # 2: 'origin', 'eval_pending', 'epoch_time'
LATEST = 'checkpoint.pth'
_NUMBERED = re.compile(r'checkpoint(\d{4})\.pth$')
_TEMPORARY = re.compile(r'^\..+\.tmp-\d+$')  # util.misc.atomic_write's temporary files


def plain_args(args) -> dict:
    """args as plain JSON-like values, so checkpoints never pickle a Namespace."""
    return {k: v for k, v in vars(args).items()
            if k != 'config' and isinstance(v, (int, float, str, bool, list, tuple, dict, type(None)))}


def training_state(model, optimizer, lr_scheduler, scaler, ema, *, epoch: int, iteration: int, iterations: int,
                   args, best: dict, meters: dict, rng_states: list, origin: dict, categories: list = (),
                   eval_pending: bool = False, epoch_time: float = 0.0) -> dict:
    """Everything needed to continue exactly. `epoch` is the last completed epoch (DINO's convention) and
    `iteration` the steps already done in epoch + 1 (0 at an epoch boundary). `eval_pending`: epoch `epoch`
    is trained but not yet evaluated; `meters` then holds its loss sums and `epoch_time` its training time."""
    state = {
        'model': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'lr_scheduler': lr_scheduler.state_dict(),
        'epoch': epoch,
        'iteration': iteration,
        'iterations_per_epoch': iterations,
        # The data order is a pure function of these (see datasets/sampler.py), so nothing else is needed to
        # skip exactly the batches already trained on.
        'data_order': {'seed': args.seed, 'world_size': getattr(args, 'world_size', 1), 'batch_size': args.batch_size,
                       'samples_done_per_rank': iteration * args.batch_size},
        'args': plain_args(args),
        # The starting point of the run that wrote this file (util/resume.py): a rerun of the same command continues it.
        'origin': dict(origin),
        # The training set's [{'id', 'name'}], so a checkpoint alone can name what it detects.
        'categories': list(categories),
        'best': dict(best),
        'meters': meters,
        'eval_pending': eval_pending,
        'epoch_time': epoch_time,
        'rng': rng_states,
        'format_version': FORMAT_VERSION,
        'torch_version': str(torch.__version__),
    }
    if scaler is not None:
        state['scaler'] = scaler.state_dict()
    if ema is not None:
        state['ema_model'] = ema.state_dict()
    return state


def ema_weights_state(state: dict, ema) -> dict:
    """checkpoint_best_ema.pth: the EMA weights as 'model' (as the official code saves them) and no optimizer,
    so --eval, fine-tuning and the tools use the EMA model and a --resume of it loads weights only."""
    keep = ('epoch', 'args', 'origin', 'categories', 'best', 'format_version', 'torch_version')
    return {'model': ema.module.state_dict(), 'model_is_ema': True, **{k: state[k] for k in keep}}


def save_numbered(state: dict, output_dir: str, epoch: int, keep: int) -> None:
    """checkpoint{epoch:04d}.pth, then drop the oldest numbered ones beyond `keep` (0 keeps all)."""
    atomic_save(state, os.path.join(output_dir, f'checkpoint{epoch:04d}.pth'))
    if keep > 0:
        for name in numbered_checkpoints(output_dir)[:-keep]:
            os.remove(os.path.join(output_dir, name))


def numbered_checkpoints(output_dir: str) -> List[str]:
    """checkpoint{epoch:04d}.pth names in output_dir, oldest epoch first."""
    return sorted(f for f in os.listdir(output_dir) if _NUMBERED.match(f))


def remove_stale_temporary_files(output_dir: str) -> List[str]:
    """Temporary files of saves that a kill interrupted; call only while holding output_dir's lock."""
    stale = [f for f in os.listdir(output_dir) if _TEMPORARY.match(f)]
    for name in stale:
        os.remove(os.path.join(output_dir, name))
    return stale
