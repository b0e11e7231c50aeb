"""What the scoreboard checks: damaged checkpoint files, where a start continued, main.py's error lines, and how
the final state differs from the reference's."""
import hashlib
import os
import re
from pathlib import Path
from typing import List, Optional

import torch

from checkpoint.format import CheckpointError, load_checkpoint
from checkpoint.store import LATEST
from util.run_dir import read_log

TEMPORARY = re.compile(r"^\.checkpoint.*\.pth\.tmp-\d+$")
ERROR_LINE = re.compile(r"^(\[rank \d+\] )?error: .*$", re.MULTILINE)  # main.py's exit protocol, docs/errors.md


class CheckpointFiles:
    """Every checkpoint file of a run directory that load_checkpoint rejects, each write counted once."""

    def __init__(self, directory: Path):
        self.directory, self.seen, self.corrupt = directory, {}, []

    def _key(self, name: str):
        stat = os.stat(self.directory / name)
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def check(self) -> List[str]:
        """The damaged files written since the last look."""
        found = []
        names = os.listdir(self.directory) if self.directory.is_dir() else []
        for name in sorted(n for n in names if n.startswith("checkpoint") and n.endswith(".pth")):
            key = self._key(name)
            if self.seen.get(name) == key:
                continue
            self.seen[name] = key
            try:
                load_checkpoint(self.directory / name)
            except CheckpointError as e:
                found.append(f"{name}: {e}")
        self.corrupt += found
        return found

    def flipped(self, name: str) -> None:
        """The tool damaged this file on purpose: not counted unless something writes it again."""
        self.seen[name] = self._key(name)

    def temporary_files(self) -> List[str]:
        return sorted(n for n in os.listdir(self.directory) if TEMPORARY.match(n))


def differences(reference: Path, run: Path) -> List[str]:
    """How run's final state differs from reference's: checkpoint.pth's position, model and optimizer tensors
    (torch.equal), and log.txt's train_* values and test_coco_eval_bbox, epoch by epoch. [] if identical."""
    try:
        ref, got = load_checkpoint(reference / LATEST), load_checkpoint(run / LATEST)
    except CheckpointError as e:
        return [str(e)]
    found = [f"checkpoint.pth {key}: {ref.get(key)} in the reference, {got.get(key)} here"
             for key in ("epoch", "iteration") if ref.get(key) != got.get(key)]
    found += _tensor_differences("model", ref["model"], got["model"])
    found += _tensor_differences("optimizer state", _flat(ref["optimizer"]["state"]), _flat(got["optimizer"]["state"]))
    ref_log, log = read_log(reference), read_log(run)
    if [e.get("epoch") for e in ref_log] != [e.get("epoch") for e in log]:
        found.append(f"log.txt epochs: {[e.get('epoch') for e in ref_log]} in the reference, "
                     f"{[e.get('epoch') for e in log]} here")
    for a, b in zip(ref_log, log):
        keys = sorted(k for k in a.keys() | b.keys() if k.startswith("train_") or k == "test_coco_eval_bbox")
        bad = [k for k in keys if a.get(k) != b.get(k)]
        if bad:
            found.append(f"log.txt epoch {a.get('epoch')}: {', '.join(bad)}")
    return found


def _flat(optimizer_state: dict) -> dict:
    return {f"{index}.{name}": value for index, state in optimizer_state.items() for name, value in state.items()}


def _tensor_differences(what: str, ref: dict, got: dict) -> List[str]:
    if ref.keys() != got.keys():
        return [f"{what}: {len(ref.keys() ^ got.keys())} keys are not in both"]
    bad = [k for k in ref
           if not (torch.equal(ref[k], got[k]) if isinstance(ref[k], torch.Tensor) else ref[k] == got[k])]
    return [f"{what}: {len(bad)} of {len(ref)} tensors differ, e.g. {bad[0]}"] if bad else []


def resumed(start: Optional[dict], expected) -> tuple:
    """(ok, what the start said) against main.py's own resume rule. start: its `start` event, None when it wrote
    none (killed before, or failed); expected: (epoch, iteration) to continue from, or None when there was
    nothing of this run's to continue."""
    how = start["how"] if start else None
    if how == "continue":
        said = f"continued at epoch {start['epoch']}, iteration {start['iteration']}"
        source = os.path.basename(start.get("path") or LATEST)
        said += f" (fell back to {source})" if source != LATEST else ""
    elif how == "scratch":
        said = "trained from scratch"
    else:
        said = f"started from {start.get('path')} ({how})" if how else "said nowhere where it started"
    if start and start.get("pending") is not None:
        said += f" (evaluating epoch {start['pending']} first)"
    if expected is None:
        return how != "continue", said
    return how == "continue" and (start["epoch"], start["iteration"]) == expected, said


def describe(expected) -> str:
    """Where a start must continue (expected as resumed takes it), in words."""
    return "nothing (a fresh start)" if expected is None else f"epoch {expected[0]}, iteration {expected[1]}"


def error_lines(output: str) -> List[str]:
    return [match[0] for match in ERROR_LINE.finditer(output)]


def sha256(path: Path) -> Optional[str]:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def loads(path: Path) -> bool:
    try:
        load_checkpoint(path)
        return True
    except CheckpointError:
        return False
