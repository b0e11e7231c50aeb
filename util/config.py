"""Plain-Python config files (as in DINO's config/DINO/*.py) and their merge with the command line.

A config file is ordinary Python whose public top-level names become settings. It may inherit
from other files with ``_base_ = 'path.py'`` (or a list of paths). Only plain values are kept so
that configs can be dumped next to a run, diffed, and stored inside checkpoints.
"""
import argparse
import difflib
import keyword
import logging
import math
import os
import pprint
import traceback
import types

from util.misc import atomic_write

logger = logging.getLogger('dino.config')

_PLAIN_SCALARS = (int, float, str, bool, type(None))
_SKIPPED_TYPES = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type)


def load_config(path) -> dict:
    """Execute a config file and return its settings, with its ``_base_`` files merged underneath."""
    return _load(os.path.abspath(os.fspath(path)), chain=())


def _load(path: str, chain: tuple) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    if path in chain:
        raise ValueError(f"circular _base_ in config files: {' -> '.join(chain + (path,))}")
    with open(path, encoding='utf-8') as f:
        source = f.read()
    try:
        code = compile(source, path, 'exec')
    except SyntaxError as e:
        raise ValueError(f"syntax error in config file {path}, line {e.lineno}: {e.msg}") from None
    namespace = {'__file__': path, '__name__': '__config__'}
    try:
        exec(code, namespace)
    except Exception as e:  # the config's own code failed: say where, not our traceback
        line = traceback.extract_tb(e.__traceback__)[-1].lineno
        raise ValueError(f"config file {path} raised {type(e).__name__} at line {line}: {e}; fix that line") from None

    own = {}
    for key, value in namespace.items():
        if (key.startswith('_') and key != '_base_') or isinstance(value, _SKIPPED_TYPES):
            continue
        _check_plain(value, key, path)
        own[key] = value

    bases = own.pop('_base_', [])
    if isinstance(bases, str):
        bases = [bases]
    cfg = {}
    for base in bases:
        if not isinstance(base, str):
            raise ValueError(f"_base_ in {path} must be a path or a list of paths, got {base!r}")
        base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
        cfg = _deep_merge(cfg, _load(base_path, chain + (path,)))
    return _deep_merge(cfg, own)


def _check_plain(value, key: str, path: str):
    """Reject anything that would not survive dump_config or a weights_only checkpoint."""
    if type(value) in _PLAIN_SCALARS:
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{key}[{i}]", path)
        return
    if type(value) is dict:
        for k, item in value.items():
            if type(k) not in _PLAIN_SCALARS:
                raise ValueError(f"config key {key!r} in {path} has a dict key of type {type(k).__name__}")
            _check_plain(item, f"{key}[{k!r}]", path)
        return
    raise ValueError(f"config key {key!r} in {path} has a value of type {type(value).__name__}; "
                     "only int, float, str, bool, None, list, tuple and dict are allowed")


def _deep_merge(base: dict, override: dict) -> dict:
    """Return base updated by override; dicts present on both sides are merged key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            value = _deep_merge(merged[key], value)
        merged[key] = value
    return merged


class DictAction(argparse.Action):
    """Collect ``--options k=v [k=v ...]`` into a dict, coercing values and nesting dotted keys.

    Values: ints, floats, True/False/true/false, None, ``[1,2]``, ``(1,2)``, ``a,b`` (a list) and
    nested brackets; anything else stays a string.
    """

    def __init__(self, option_strings, dest, nargs='+', **kwargs):
        super().__init__(option_strings, dest, nargs=nargs, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        options = dict(getattr(namespace, self.dest, None) or {})
        for item in values:
            key, sep, text = item.partition('=')
            if not sep or not key:
                raise argparse.ArgumentError(self, f"expected KEY=VALUE, got {item!r}")
            try:
                value = _parse_option_value(text)
            except ValueError as e:
                raise argparse.ArgumentError(self, f"{item!r}: {e}") from None
            *parents, leaf = key.split('.')
            node = options
            for part in parents:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            node[leaf] = value
        setattr(namespace, self.dest, options)


def _parse_option_value(text: str):
    """Turn one command-line value into the Python value it spells (see DictAction)."""
    text = text.strip()
    parts = _split_top_level(text)
    if len(parts) > 1 or text.endswith(','):
        return [_parse_option_value(p) for p in parts]
    if text and text[0] in '([' and _closing_index(text) == len(text) - 1:
        inner = text[1:-1]
        items = [_parse_option_value(p) for p in _split_top_level(inner)] if inner.strip() else []
        return items if text[0] == '[' else tuple(items)
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {'True': True, 'true': True, 'False': False, 'false': False, 'None': None}.get(text, text)


def _split_top_level(text: str) -> list:
    """Split on commas outside brackets; a trailing comma (``a,`` or ``(1,)``) adds no item."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in '([':
            depth += 1
        elif char in ')]':
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced brackets in {text!r}")
        elif char == ',' and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced brackets in {text!r}")
    if start == 0 or text[start:].strip():
        parts.append(text[start:])
    return parts


def _closing_index(text: str) -> int:
    """Index of the bracket closing the one at text[0]."""
    depth = 0
    for i, char in enumerate(text):
        depth += char in '(['
        depth -= char in ')]'
        if depth == 0:
            return i
    return -1


def merge_config(args: argparse.Namespace, cfg: dict, options, parser_dests) -> argparse.Namespace:
    """Set every config value on args, after applying ``--options`` overrides.

    Config keys may not shadow command-line arguments, and options may only override keys the config
    already has: both mistakes would otherwise silently change which value a run uses.
    """
    source = getattr(args, 'config_file', None) or 'the config'
    collisions = sorted(set(cfg) & set(parser_dests))
    if collisions:
        key = collisions[0]
        raise ValueError(f"config key {key!r} in {source} collides with the command-line argument --{key}; "
                         f"rename it in the config or remove it there and pass --{key} instead"
                         + (f" (also colliding: {', '.join(collisions[1:])})" if collisions[1:] else ''))
    options = options or {}
    _check_options(options, cfg, source, prefix='')
    for key, value in _flatten(options):
        logger.info("--options overrides %s = %r", key, value)
    for key, value in _deep_merge(cfg, options).items():
        setattr(args, key, value)
    return args


# The names other trainers give to this project's keys, for the hint of an unknown --options key.
ALIASES = {"learning_rate": "lr", "base_lr": "lr", "max_epochs": "epochs", "num_epochs": "epochs", "epoch": "epochs",
           "batch": "batch_size", "batch_size_per_gpu": "batch_size", "wd": "weight_decay", "decay": "weight_decay",
           "grad_clip": "clip_max_norm", "max_norm": "clip_max_norm", "warmup_iters": "lr_warmup_iters",
           "warmup_steps": "lr_warmup_iters", "classes": "num_classes", "nc": "num_classes",
           "accumulate": "accumulate_steps", "gradient_accumulation_steps": "accumulate_steps",
           "img_size": "data_aug_max_size", "imgsz": "data_aug_max_size", "ema": "use_ema", "patience":
           "early_stop_patience", "lr_step": "lr_drop", "milestones": "lr_drop_list"}


def _check_options(options: dict, cfg: dict, source: str, prefix: str):
    for key, value in options.items():
        name = prefix + key
        if key not in cfg:
            close = [ALIASES[key]] if ALIASES.get(key) in cfg else []
            close += [c for c in difflib.get_close_matches(key, [str(k) for k in cfg], n=3) if c not in close]
            hint = (f"did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else
                    f"the valid keys are the names set in {source} and its _base_ files")
            raise ValueError(f"--options key {name!r} is not in {source}: {hint}")
        if isinstance(value, dict):
            if not isinstance(cfg[key], dict):
                raise ValueError(f"--options key {name!r}.* needs {name!r} to be a dict in {source}, "
                                 f"but it is {type(cfg[key]).__name__}")
            _check_options(value, cfg[key], source, name + '.')
        else:
            _check_type(name, value, cfg[key])


def _check_type(name: str, value, default) -> None:
    """An option keeps the kind of value its config default has, so `lr=abc` or `epochs=2.5` stop here instead of
    deep inside the optimizer or the training loop. None replaces anything but a number or a flag."""
    number = (int, float)
    if default is None or (value is None and not isinstance(default, number)):
        return
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int)
    elif isinstance(default, float):
        ok = isinstance(value, number)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(f"--options {name}={value!r}: expected {_kind(default)} like the config's {default!r}, "
                         f"got {_kind(value)}")


def _kind(value) -> str:
    if isinstance(value, bool):
        return "True or False"
    return {int: "an integer", float: "a number", str: "a string", list: "a list", tuple: "a list",
            dict: "a dict", type(None): "None"}.get(type(value), type(value).__name__)


def _flatten(options: dict, prefix: str = ''):
    for key, value in options.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def dump_config(cfg: dict, path):
    """Write cfg as a config file that load_config reads back to an equal dict (atomically)."""
    path = os.fspath(path)
    lines = ["# Written by util.config.dump_config; load it with util.config.load_config.\n"]
    for key, value in cfg.items():
        if not isinstance(key, str) or not key.isidentifier() or keyword.iskeyword(key) or key.startswith('_'):
            raise ValueError(f"config key {key!r} cannot be written as a top-level name in a config file")
        _check_plain(value, key, path)
        _check_finite(value, key)
        lines.append(f"{key} = {pprint.pformat(value, sort_dicts=False)}\n")
    atomic_write(path, lambda f: f.write(''.join(lines).encode('utf-8')))


def _check_finite(value, key: str):
    """inf and nan have no literal syntax, so they could not be loaded back."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"config key {key!r} is {value}, which cannot be written to a config file")
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    for item in items:
        _check_finite(item, key)
