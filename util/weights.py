"""Load what fits of a state dict into a model, and report every key that did not: a partial load is never silent."""
import difflib
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch


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
    closest: Dict[str, List[str]] = field(default_factory=dict)  # unused pattern -> the keys' parts most like it
    by_name: List[str] = field(default_factory=list)  # class tensors whose rows were carried over by class name

    def format(self) -> str:
        mismatch_by_shapes = defaultdict(list)
        for key, ckpt_shape, model_shape in self.shape_mismatch:
            mismatch_by_shapes[(ckpt_shape, model_shape)].append(key)
        mismatch = [f"checkpoint {list(c)} vs model {list(m)}: {', '.join(summarize_keys(keys))}"
                    for (c, m), keys in mismatch_by_shapes.items()]
        rows = [('loaded', len(self.loaded), summarize_keys(self.loaded))]
        rows += [('classes by name', len(self.by_name), summarize_keys(self.by_name))] if self.by_name else []
        rows += [
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
            unused = [pattern + (f" (closest: {', '.join(self.closest[pattern])})" if self.closest.get(pattern) else "")
                      for pattern in self.unused_patterns]
            lines.append(f"WARNING: ignore patterns that matched no checkpoint key: {'; '.join(unused)}")
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


def load_model_weights(model: torch.nn.Module, state_dict: dict, ignore_patterns: Sequence[str] = (),
                       by_name: Optional[Dict[str, torch.Tensor]] = None) -> LoadReport:
    """Load what fits from state_dict into model and report everything that did not.

    Keys containing an ignore pattern and keys whose shape differs from the model's (e.g. a new
    num_classes) are skipped rather than failing the load. by_name: class tensors already remapped to the
    model's classes (checkpoint/finetune.py), loaded whatever the patterns say.
    """
    model_tensors = model.state_dict(keep_vars=True)
    report = LoadReport()
    used_patterns = set()
    to_load = {}
    by_name = by_name or {}
    state_dict = strip_module_prefix(state_dict)
    for key, value in state_dict.items():
        hits = [p for p in ignore_patterns if p in key]
        if key in by_name:
            used_patterns.update(hits)
            to_load[key] = by_name[key]
            report.by_name.append(key)
        elif hits:
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
    report.loaded = [key for key in to_load if key not in by_name]
    report.unused_patterns = [p for p in ignore_patterns if p not in used_patterns]
    report.closest = {p: closest_keys(p, list(state_dict)) for p in report.unused_patterns}
    return report


def closest_keys(pattern: str, keys: List[str], count: int = 3) -> List[str]:
    """The parts of the keys (one to three dotted names) most like a pattern that matched nothing."""
    parts = set()
    for key in keys:
        names = key.split('.')
        parts.update('.'.join(names[i:j]) for i in range(len(names)) for j in range(i + 1, min(i + 3, len(names)) + 1))
    return difflib.get_close_matches(pattern, sorted(parts), n=count, cutoff=0.6)
