"""Where a run's checkpoints live in output_dir, and how they get there.

checkpoint.pth is the latest state (the commit point: written last, it never names a file that is not on disk);
checkpoint_best_{regular,ema}.pth the best weights by bbox AP; checkpoint{epoch:04d}.pth every
save_checkpoint_interval epochs, the newest keep_checkpoints of them kept. Saves are asynchronous: the state is
copied to host memory (the only stall), then written by a background thread while training goes on, and, for
an output_dir on an object store, pushed there by the same thread (checkpoint/remote.py)."""
import logging
import os
import re
import shutil
import time
from typing import List, Optional

import torch

from checkpoint.format import (BackgroundWriter, CheckpointError, CheckpointWriteError, load_checkpoint, read_record,
                               seal, write_bytes)
from checkpoint.remote import RemoteError
from util import faults, run_dir
from util.misc import atomic_write

logger = logging.getLogger("dino.store")

LATEST = 'checkpoint.pth'
BEST_EMA = 'checkpoint_best_ema.pth'
DIVERGED = 'checkpoint_diverged.pth'
RUN_ID = 'run_id.txt'
_NUMBERED = re.compile(r'checkpoint(\d{4})\.pth$')
_TEMPORARY = re.compile(r'^\..+\.tmp-\d+$')  # util.misc.atomic_write's temporary files


def best_name(kind: str) -> str:
    return f"checkpoint_best_{kind}.pth"


def numbered_name(epoch: int) -> str:
    return f"checkpoint{epoch:04d}.pth"


class CheckpointStore:
    """The checkpoint files of output_dir: writing them (rank 0), finding the newest intact one, pruning.
    `run_id`: the run whose numbered files count as its own (set once the start is decided). `mirror`: the
    remote copy when output_dir is the staging folder of an object-store URL."""

    def __init__(self, output_dir: str, keep: int = 0, mirror=None):
        self.output_dir, self.keep, self.mirror = output_dir, keep, mirror
        self.run_id: Optional[str] = None
        self.best_written: dict = {}  # per kind, the best whose file is on disk
        self.writer = BackgroundWriter()

    def path(self, name: str) -> str:
        return os.path.join(self.output_dir, name)

    def display(self, name: str = "") -> str:
        """Where a file is, as the user named the place: the URL for a remote output_dir."""
        if self.mirror is not None:
            return self.mirror.display(name)
        return self.path(name) if name else self.output_dir

    def flush(self) -> None:
        """Push the logs written since the last save (the end of a run, an evaluation)."""
        self.wait()
        if self.mirror is not None:
            try:
                self.mirror.push([])
            except RemoteError as e:
                raise CheckpointWriteError(f"{e}; the checkpoints in {self.display()} are complete, and the logs "
                                           f"of this run's end are in {self.output_dir} on this machine") from None

    def remove_stale_temporaries(self) -> List[str]:
        """Temporary files of saves that a kill interrupted; call only while holding output_dir's lock."""
        stale = [f for f in os.listdir(self.output_dir) if _TEMPORARY.match(f)]
        for name in stale:
            os.remove(self.path(name))
        return stale

    def save(self, state: dict, names: List[str], wait: bool = False) -> dict:
        """Write `state` (host memory, see checkpoint.format.snapshot) to the files `names` in the background,
        checkpoint.pth last. Returns the best values the files record (_room_for). Raises CheckpointWriteError
        for this save (wait=True) or the previous one."""
        self.writer.wait()
        files = self._room_for(names, state)
        self.writer.start(lambda: self._write(state, files))
        if wait:
            self.writer.wait()
        return state["best"]

    def wait(self) -> None:
        self.writer.wait()

    def _room_for(self, names: List[str], state: dict) -> List[str]:
        """The files this save writes, in order: checkpoint.pth always and last, each other file (best,
        numbered) when the disk keeps room for it and the next checkpoint.pth. A best file skipped for room
        leaves the previous best in the state, so the best recorded is always the best whose weights are kept."""
        free = faults.free_bytes(self.output_dir)
        size = _tensor_bytes(state)
        kept, skipped = [], []
        for name in (n for n in names if n != LATEST):
            need = _tensor_bytes(state["ema_model"]) if name == BEST_EMA else size
            if free < need + size:
                skipped.append(name)
                continue
            kept.append(name)
            free -= need
        best = dict(state["best"])
        for kind in list(best):
            if best_name(kind) in kept:
                self.best_written[kind] = dict(best[kind])
            elif best_name(kind) in skipped and kind in self.best_written:
                best[kind] = dict(self.best_written[kind])
            elif best_name(kind) in skipped:
                del best[kind]
        state["best"] = best
        if skipped:
            logger.warning("the disk has %.0f MB free, too little for %s (%.0f MB each): skipped them, kept %s",
                           free / 2**20, ", ".join(skipped), size / 2**20, LATEST)
        return kept + [LATEST]

    def _write(self, state: dict, names: List[str]) -> None:
        """Write the files in the order given. A kill between them leaves the previous checkpoint.pth, from
        which the rerun writes them again."""
        started = time.time()
        blob = seal(state)
        for name in names:
            if name == LATEST and len(names) > 1:
                faults.check("checkpoint_commit")
            write_bytes(seal(ema_weights_state(state)) if name == BEST_EMA else blob, self.path(name))
            if _NUMBERED.match(name):
                pruned = prune_numbered(self.output_dir, self.keep, state.get("run_id"))
                if self.mirror is not None:
                    self.mirror.remove(pruned)
        if self.mirror is not None:
            try:
                self.mirror.push(names)
            except RemoteError as e:
                raise CheckpointWriteError(f"{e}; {self.display(LATEST)} still holds the previous save, and this one "
                                           f"is in {self.path(LATEST)} on this machine") from None
        run_dir.append_event(self.output_dir, "saved", files=names, epoch_done=state["epoch"],
                             iteration=state["iteration"], eval_pending=state["eval_pending"],
                             seconds=round(time.time() - started, 3))

    def newest_intact(self):
        """(path, checkpoint) of checkpoint.pth, or of the newest intact numbered checkpoint of its run if that
        one is damaged (with a warning); None when there is none at all."""
        if not os.path.isdir(self.output_dir):
            return None
        latest = self.path(LATEST)
        # Fall back only to files of checkpoint.pth's run, named in it or, where it is unreadable, beside it.
        run_id = (read_record(latest) or {}).get("run_id") or self.read_run_id()
        names = ([LATEST] if os.path.exists(latest) else []) + self._numbered(run_id)[::-1]
        for name in names:
            try:
                checkpoint = load_checkpoint(self._fetched(name, run_id))
            except (CheckpointError, FileNotFoundError) as e:
                logger.warning("auto-resume: %s", e)
                continue
            if name != names[0]:
                logger.warning("auto-resume fell back to %s, the newest intact checkpoint in %s", name,
                               self.display())
            return self.path(name), checkpoint
        if names:
            raise CheckpointError(f"every checkpoint in {self.display()} is damaged; move them away to start from "
                                  "scratch, or pass --no_auto_resume")
        return None

    def _numbered(self, run_id: Optional[str]) -> List[str]:
        """This run's numbered checkpoints, oldest first; of a remote output_dir, every numbered name there
        (fetched, and their run checked, only when needed)."""
        if self.mirror is None:
            return numbered_checkpoints(self.output_dir, run_id)
        return [n for n in self.mirror.names() if _NUMBERED.match(n)]

    def _fetched(self, name: str, run_id: Optional[str]) -> str:
        """The local path of a run file, downloaded first from a remote output_dir (where a numbered file of
        another run is refused, as numbered_checkpoints leaves it out locally)."""
        if self.mirror is None or name == LATEST:
            return self.path(name)
        path = self.mirror.fetch(name)
        if (read_record(path) or {}).get("run_id") not in (run_id, None):
            raise CheckpointError(f"{self.display(name)} is another run's")
        return path

    def write_run_id(self, run_id: str) -> None:
        """Which run output_dir's files belong to, readable when checkpoint.pth (which records it too) is not."""
        self.run_id = run_id
        atomic_write(self.path(RUN_ID), lambda f: f.write(run_id.encode() + b"\n"))

    def read_run_id(self) -> Optional[str]:
        try:
            with open(self.path(RUN_ID)) as f:
                return f.read().strip() or None
        except OSError:
            return None

    def previous_run_id(self) -> Optional[str]:
        """The id of the run whose files output_dir holds: checkpoint.pth's, another checkpoint's, or run_id.txt's."""
        names = sorted((f for f in os.listdir(self.output_dir) if f.startswith("checkpoint") and f.endswith(".pth")),
                       key=lambda f: f != LATEST)
        records = [read_record(self.path(name)) or {} for name in names]
        return next((r["run_id"] for r in records if r.get("run_id")), None) or self.read_run_id()

    def back_to_last_good(self, epoch: int) -> str:
        """After the evaluation of `epoch` found it diverged: checkpoint.pth (which holds that epoch's training)
        goes back to this run's newest numbered checkpoint before `epoch`, so that a rerun continues from a good
        state; the diverged one is kept as checkpoint_diverged.pth. Returns what a rerun does."""
        self.wait()
        earlier = [n for n in self._numbered(self.run_id) if int(n[10:14]) < epoch]
        if not earlier:
            return (f"{LATEST} holds that diverged epoch and no earlier evaluated checkpoint is kept: rerun "
                    "with a lower lr and --no_auto_resume")
        os.replace(self.path(LATEST), self.path(DIVERGED))
        with open(self._fetched(earlier[-1], self.run_id), "rb") as source:
            atomic_write(self.path(LATEST), lambda f: shutil.copyfileobj(source, f))
        if self.mirror is not None:
            self.mirror.push([DIVERGED, LATEST])
        return (f"{LATEST} is back at {earlier[-1]}, the last evaluated state, which a rerun continues "
                f"(the same settings diverge the same way: lower lr); the diverged epoch is in {DIVERGED}")


def ema_weights_state(state: dict) -> dict:
    """checkpoint_best_ema.pth: the EMA weights as 'model' (as the official code saves them) and no optimizer,
    so --eval, fine-tuning and the tools use the EMA model and a --resume of it loads weights only."""
    keep = ('epoch', 'args', 'origin', 'run_id', 'categories', 'best', 'format_version', 'torch_version')
    weights = {k[len('module.'):]: v for k, v in state['ema_model'].items() if k.startswith('module.')}
    return {'model': weights, 'model_is_ema': True, **{k: state[k] for k in keep}}


def prune_numbered(output_dir: str, keep: int, run_id: str) -> List[str]:
    """Drop this run's oldest checkpoint{epoch:04d}.pth beyond its newest `keep` (0 keeps all). Called only
    after a new numbered checkpoint was written, so the newest intact one is never the one removed. Files of
    another run are never touched; files without a run id (earlier versions) count as this run's."""
    removed = numbered_checkpoints(output_dir, run_id)[:-keep] if keep > 0 else []
    for name in removed:
        os.remove(os.path.join(output_dir, name))
    return removed


def numbered_checkpoints(output_dir: str, run_id: Optional[str] = None) -> List[str]:
    """checkpoint{epoch:04d}.pth names in output_dir, oldest epoch first; with run_id, only that run's."""
    names = sorted(f for f in os.listdir(output_dir) if _NUMBERED.match(f))
    if run_id is None:
        return names
    return [f for f in names if (read_record(os.path.join(output_dir, f)) or {}).get('run_id') in (run_id, None)]


def _tensor_bytes(obj) -> int:
    """The bytes of the tensors in obj: a checkpoint file's size, but for a few kB of structure."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0
