"""The checkpoint file format and its safe I/O (where the files live: checkpoint/store.py; the resume policy:
checkpoint/resume.py).

Checkpoints hold only tensors and plain Python values, so they are always read with
``weights_only=True``: a checkpoint from elsewhere can never run code on load. Writes are atomic, so
a job killed mid-save (or a full disk) leaves the previous checkpoint intact.
"""
import argparse
import copy
import errno
import hashlib
import io
import json
import os
import pickle
import re
import threading
import zipfile
import zlib
from typing import Optional

import torch

from checkpoint.remote import RemoteError, is_url, local_copy, redact
from util.misc import atomic_write

class CheckpointError(RuntimeError):
    """A checkpoint file could not be read; the message says which file and why."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; any previous file at that path is unchanged."""


# ---------------------------------------------------------------------------------------------
# Writing

def atomic_save(obj, path):
    """torch.save obj, sealed (see seal), so that path holds either the old file or the complete new one."""
    write_bytes(seal(obj), path)


def seal(obj) -> io.BytesIO:
    """obj serialised by torch.save plus an integrity record, a zip member of its own that torch.load ignores:
    every record's size and CRC-32 (written by torch.save), the format version, epoch, iteration and a hash
    of the configuration. load_checkpoint checks them, so a flipped bit anywhere is caught, not only a cut."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with zipfile.ZipFile(buffer, 'a') as archive:
        members = [[m.filename, m.file_size, m.CRC] for m in archive.infolist()]
        info = obj if isinstance(obj, dict) else {}
        record = {'format_version': info.get('format_version'), 'run_id': info.get('run_id'), 'epoch': info.get('epoch'),
                  'iteration': info.get('iteration'), 'config_hash': config_hash(info.get('args') or {}),
                  'payload_bytes': sum(size for _, size, _ in members), 'members': members}
        archive.writestr(f"{members[0][0].split('/')[0]}/{INTEGRITY}", json.dumps(record))
    return buffer


def config_hash(args: dict) -> str:
    return hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_bytes(buffer: io.BytesIO, path) -> None:
    """Write a sealed checkpoint atomically. Plain file I/O reports the operating system's reason for a failure
    (a full disk, a file-size limit) rather than torch's internal stream error."""
    try:
        atomic_write(path, lambda f: f.write(buffer.getbuffer()))
    except OSError as e:
        reason = _WRITE_ERRORS.get(e.errno, e.strerror or str(e))
        size = len(buffer.getbuffer()) / 2**20
        raise CheckpointWriteError(f"could not write checkpoint {os.fspath(path)} ({size:.0f} MB): {reason}; the "
                                   "previous file at that path, if any, is unchanged") from None


def snapshot(obj, _copies=None):
    """A copy of obj whose tensors live in host memory and share nothing with training: what a background
    writer may serialise while training goes on (the only stall of an asynchronous save). Tensors that share
    storage (the shared prediction heads) still share it in the copy, so the file stores them once."""
    copies = {} if _copies is None else _copies
    if isinstance(obj, torch.Tensor):
        storage = obj.detach().untyped_storage()
        key = (storage.device, storage.data_ptr(), storage.nbytes())
        if key not in copies:
            copies[key] = storage.cpu() if storage.device.type != 'cpu' else storage.clone()
        return torch.empty(0, dtype=obj.dtype).set_(copies[key], obj.storage_offset(), obj.size(), obj.stride())
    if isinstance(obj, dict):
        return {k: snapshot(v, copies) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v, copies) for v in obj)
    return copy.deepcopy(obj)


class BackgroundWriter:
    """Runs one write job at a time on a thread. A job's failure is raised by the next wait(); the thread is
    not a daemon, so a process that ends while a write is under way finishes that write first."""

    def __init__(self):
        self._thread = None
        self._error = None

    def start(self, job) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(job,), name='checkpoint-writer')
        self._thread.start()

    def _run(self, job) -> None:
        try:
            job()
        except BaseException as e:  # reported by wait(), in the training thread
            self._error = e

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


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
INTEGRITY = 'integrity.json'
_PICKLE_PROTO = b'\x80'  # every pickle of protocol >= 2, hence every legacy torch.save file


def load_checkpoint(path, map_location='cpu') -> dict:
    """Load a checkpoint safely and return a dict with at least a 'model' state dict.

    Official DINO checkpoints pickle their argparse.Namespace under 'args'; it is allowed through
    and returned as a plain dict. A bare state dict is returned as {'model': state_dict}.
    """
    path = os.fspath(path)
    if is_url(path):
        try:
            path = local_copy(path)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {redact(path)} does not exist") from None
        except RemoteError as e:
            raise CheckpointError(str(e)) from None
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
    integrity = _verify(path) if is_zip else None
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
        if integrity is not None:
            ckpt['integrity'] = integrity
        return ckpt
    if isinstance(ckpt, dict) and ckpt and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt.items()):
        return {'model': ckpt}
    found = f"a dict with keys {sorted(map(str, ckpt))[:10]}" if isinstance(ckpt, dict) else type(ckpt).__name__
    raise CheckpointError(f"{path} is not a model checkpoint: expected a dict with a 'model' state dict "
                          f"or a bare state dict, found {found}")


def _verify(path: str):
    """Check every record of a zip checkpoint against its CRC-32 and, when the file has one, its integrity
    record; returns that record (None for files written without one, e.g. by other trainers)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if not any(name.endswith('/data.pkl') for name in names):
                raise CheckpointError(f"{path} is a zip archive but not a PyTorch checkpoint (it holds no data.pkl)")
            sealed = [name for name in names if name.endswith('/' + INTEGRITY)]
            record = json.loads(archive.read(sealed[0])) if sealed else None
            members = [[m.filename, m.file_size, m.CRC] for m in archive.infolist() if m.filename not in sealed]
            damaged = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({e}); the file was probably cut off "
                              "during a copy or a save; use an earlier checkpoint") from None
    if damaged or (record is not None and record.get('members') != members):
        where = f"its record {damaged} does not match its checksum" if damaged else \
            "its records differ from its integrity record"
        raise CheckpointError(f"checkpoint {path} is damaged: {where} (bits changed on disk or in a copy); use an "
                              "earlier checkpoint")
    return record


def read_record(path) -> Optional[dict]:
    """The integrity record of a checkpoint alone (run id, epoch, CRCs), without checking or loading the file;
    None for a file without one or that cannot be read as a zip archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            sealed = [name for name in archive.namelist() if name.endswith('/' + INTEGRITY)]
            return json.loads(archive.read(sealed[0])) if sealed else None
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, KeyError):
        return None


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
# Plain values

def plain_args(args) -> dict:
    """args as plain JSON-like values, so checkpoints never pickle a Namespace; no secret a URL may carry."""
    return {k: redact(v) if isinstance(v, str) else v for k, v in vars(args).items()
            if k != 'config' and isinstance(v, (int, float, str, bool, list, tuple, dict, type(None)))}
