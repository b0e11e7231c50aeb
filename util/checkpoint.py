"""Checkpoint I/O shared by main.py, engine.py and the SLURM launcher.

Checkpoints hold only tensors and plain Python values, so they are always read with
``weights_only=True``: a checkpoint from elsewhere can never run code on load. Writes are atomic, so
a job killed mid-save (or a full disk) leaves the previous checkpoint intact.
"""
import argparse
import errno
import logging
import os
import pickle
import random
import re
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from util.misc import atomic_write

logger = logging.getLogger('dino.checkpoint')


class CheckpointError(RuntimeError):
    """A checkpoint file could not be read; the message says which file and why."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; any previous file at that path is unchanged."""


# ---------------------------------------------------------------------------------------------
# Writing

def atomic_save(obj, path):
    """torch.save obj so that path holds either the old file or the complete new one, never a part."""
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except Exception as e:
        hint = ' (disk full?)' if getattr(e, 'errno', None) in (errno.ENOSPC, errno.EDQUOT) else ''
        raise CheckpointWriteError(f"could not write checkpoint {os.fspath(path)}: {e}{hint}; "
                                   "the previous file at that path, if any, is unchanged") from e


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
# Model weights

def strip_module_prefix(state_dict: dict) -> dict:
    """Drop the 'module.' that DistributedDataParallel puts in front of every key."""
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}


@dataclass
class LoadReport:
    """What load_model_weights did with every key, so a partial load is never silent."""
    loaded: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    shape_mismatch: List[Tuple[str, tuple, tuple]] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    unused_patterns: List[str] = field(default_factory=list)

    def format(self) -> str:
        mismatch_by_shapes = defaultdict(list)
        for key, ckpt_shape, model_shape in self.shape_mismatch:
            mismatch_by_shapes[(ckpt_shape, model_shape)].append(key)
        mismatch = [f"checkpoint {list(c)} vs model {list(m)}: {', '.join(summarize_keys(keys))}"
                    for (c, m), keys in mismatch_by_shapes.items()]
        rows = [('loaded', len(self.loaded), summarize_keys(self.loaded)),
                ('ignored', len(self.ignored), summarize_keys(self.ignored)),
                ('shape mismatch', len(self.shape_mismatch), mismatch),
                ('missing', len(self.missing), summarize_keys(self.missing)),
                ('unexpected', len(self.unexpected), summarize_keys(self.unexpected))]
        lines = []
        for name, count, names in rows:
            text = f"{name:<15}{count:>6}  "
            sep = '; ' if name == 'shape mismatch' else ', '
            lines.append(textwrap.fill(sep.join(names) or '-', width=110, initial_indent=text,
                                       subsequent_indent=' ' * len(text), break_on_hyphens=False))
        if self.unused_patterns:
            lines.append(f"WARNING: ignore patterns that matched no checkpoint key: {', '.join(self.unused_patterns)}")
        return '\n'.join(lines)


def summarize_keys(keys: Sequence[str], limit: int = 8) -> List[str]:
    """Shorten a long key list to at most ~limit entries like 'transformer.decoder.layers.* (54 keys)'.

    Keys are grouped by their first few dotted components, using the deepest grouping that still
    fits in limit entries.
    """
    if len(keys) <= limit:
        return list(keys)
    depth = 1
    while len({_prefix(k, depth + 1) for k in keys}) <= limit and depth < max(k.count('.') for k in keys):
        depth += 1
    groups = defaultdict(list)
    for key in keys:
        groups[_prefix(key, depth)].append(key)
    return [members[0] if len(members) == 1 else f"{prefix}.* ({len(members)} keys)"
            for prefix, members in groups.items()]


def _prefix(key: str, depth: int) -> str:
    parts = key.split('.')
    return '.'.join(parts[:depth]) if len(parts) > depth else key


def load_model_weights(model: torch.nn.Module, state_dict: dict, ignore_patterns: Sequence[str] = ()) -> LoadReport:
    """Load what fits from state_dict into model and report everything that did not.

    Keys containing an ignore pattern and keys whose shape differs from the model's (e.g. a new
    num_classes) are skipped rather than failing the load.
    """
    model_tensors = model.state_dict(keep_vars=True)
    report = LoadReport()
    used_patterns = set()
    to_load = {}
    for key, value in strip_module_prefix(state_dict).items():
        hits = [p for p in ignore_patterns if p in key]
        if hits:
            used_patterns.update(hits)
            report.ignored.append(key)
        elif key not in model_tensors:
            report.unexpected.append(key)
        elif isinstance(value, torch.Tensor) and value.shape != model_tensors[key].shape:
            report.shape_mismatch.append((key, tuple(value.shape), tuple(model_tensors[key].shape)))
        else:
            to_load[key] = value
    result = model.load_state_dict(to_load, strict=False)

    # A tensor registered under several names (shared heads) counts as handled if any of its names was.
    handled = set(to_load) | set(report.ignored) | {k for k, _, _ in report.shape_mismatch}
    handled_ids = {id(model_tensors[k]) for k in handled if k in model_tensors}
    report.missing = [k for k in result.missing_keys if id(model_tensors[k]) not in handled_ids]
    report.loaded = list(to_load)
    report.unused_patterns = [p for p in ignore_patterns if p not in used_patterns]
    return report


# ---------------------------------------------------------------------------------------------
# Random number generators

def capture_rng_state() -> Dict[str, object]:
    """Every RNG a training step draws from, as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': {'kind': kind, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                  'has_gauss': int(has_gauss), 'cached_gaussian': float(cached_gaussian)},
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, object]):
    """Undo capture_rng_state: later draws repeat the ones that followed the capture."""
    version, internal, gauss_next = state['python']
    random.setstate((version, tuple(internal), gauss_next))
    np_state = state['numpy']
    np.random.set_state((np_state['kind'], np_state['keys'].cpu().numpy().astype(np.uint32), np_state['pos'],
                         np_state['has_gauss'], np_state['cached_gaussian']))
    torch.set_rng_state(state['torch'].cpu())
    cuda_states = state.get('cuda', [])
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda_states) != available:
        logger.warning("checkpoint has RNG state for %d CUDA device(s) but %d are visible; restoring the "
                       "first %d", len(cuda_states), available, min(len(cuda_states), available))
    for index, cuda_state in enumerate(cuda_states[:available]):
        torch.cuda.set_rng_state(cuda_state.cpu(), index)


# ---------------------------------------------------------------------------------------------
# Training checkpoints and resume decisions (used by main.py, engine hooks and the SLURM launcher)

FORMAT_VERSION = 1
LATEST = 'checkpoint.pth'
_NUMBERED = re.compile(r'checkpoint(\d{4})\.pth$')

# Changing one of these makes the checkpoint's weights meaningless for the new model.
ARCHITECTURE_KEYS = ('modelname', 'backbone', 'backbone_norm', 'return_interm_indices', 'dilation', 'hidden_dim',
                     'nheads', 'num_queries', 'enc_layers', 'dec_layers', 'dim_feedforward',
                     'transformer_activation', 'num_feature_levels', 'enc_n_points', 'dec_n_points', 'num_classes',
                     'dn_labelbook_size')
# Changing one of these is allowed on resume but worth a line in the log.
HYPERPARAMETER_KEYS = ('lr', 'lr_backbone', 'weight_decay', 'batch_size', 'lr_scheduler', 'lr_drop', 'lr_drop_list',
                       'clip_max_norm', 'epochs', 'use_ema', 'ema_decay', 'amp', 'seed', 'dataset_file', 'coco_path')


def plain_args(args) -> dict:
    """args as plain JSON-like values, so checkpoints never pickle a Namespace."""
    return {k: v for k, v in vars(args).items()
            if k != 'config' and isinstance(v, (int, float, str, bool, list, tuple, dict, type(None)))}


def resolve_resume(resume: str, output_dir: str, auto_resume: bool) -> Tuple[str, dict, str]:
    """Pick the checkpoint to resume from: (path, checkpoint, how) or ('', {}, reason).

    An explicit --resume always wins and a broken one is fatal. Auto-resume reads output_dir/checkpoint.pth
    and, if it is damaged, falls back to the newest intact checkpoint*.pth there, saying so.
    """
    if resume:
        return resume, load_checkpoint(resume), 'explicit --resume'
    latest = os.path.join(output_dir, LATEST) if output_dir else ''
    if not auto_resume or not latest or not os.path.exists(latest):
        return '', {}, 'starting from scratch' if auto_resume else 'auto-resume disabled'
    candidates = [latest] + sorted((os.path.join(output_dir, f) for f in os.listdir(output_dir) if _NUMBERED.match(f)),
                                   key=os.path.getmtime, reverse=True)
    for path in candidates:
        try:
            checkpoint = load_checkpoint(path)
        except CheckpointError as e:
            logger.warning("auto-resume: %s", e)
            continue
        how = 'auto-resume' if path == latest else f'auto-resume fell back to {os.path.basename(path)}, ' \
                                                   f'the newest intact checkpoint'
        return path, checkpoint, how
    raise CheckpointError(f"every checkpoint in {output_dir} is damaged; move them away to start from scratch, "
                          "or pass --no_auto_resume")


def architecture_differences(saved: dict, current: dict) -> List[str]:
    return [f"{k}: checkpoint {saved[k]!r} vs now {current.get(k)!r}" for k in ARCHITECTURE_KEYS
            if k in saved and saved[k] != current.get(k)]


def hyperparameter_changes(saved: dict, current: dict) -> List[str]:
    return [f"{k}: {saved[k]!r} -> {current.get(k)!r}" for k in HYPERPARAMETER_KEYS
            if k in saved and saved[k] != current.get(k)]


def training_state(model, optimizer, lr_scheduler, scaler, ema, *, epoch: int, iteration: int, iterations: int,
                   args, best: dict, meters: dict, rng_states: list, categories: list = ()) -> dict:
    """Everything needed to continue exactly. `epoch` is the last completed epoch (DINO's convention) and
    `iteration` the steps already done in epoch + 1 (0 at an epoch boundary)."""
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
        # The training set's [{'id', 'name'}], so a checkpoint alone can name what it detects.
        'categories': list(categories),
        'best': dict(best),
        'meters': meters,
        'rng': rng_states,
        'format_version': FORMAT_VERSION,
        'torch_version': str(torch.__version__),
    }
    if scaler is not None:
        state['scaler'] = scaler.state_dict()
    if ema is not None:
        state['ema_model'] = ema.state_dict()
    return state


def save_numbered(state: dict, output_dir: str, epoch: int, keep: int) -> None:
    """checkpoint{epoch:04d}.pth, then drop the oldest numbered ones beyond `keep` (0 keeps all)."""
    atomic_save(state, os.path.join(output_dir, f'checkpoint{epoch:04d}.pth'))
    if keep > 0:
        numbered = sorted(f for f in os.listdir(output_dir) if _NUMBERED.match(f))
        for name in numbered[:-keep]:
            os.remove(os.path.join(output_dir, name))
