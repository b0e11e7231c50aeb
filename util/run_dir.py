"""The output_dir of a run: one run at a time (a lock a killed run cannot leave stuck), log.txt, events.jsonl,
and setting aside the files of a previous run."""
import fcntl
import json
import logging
import os
import re
import time
from typing import List, Optional

from util.misc import atomic_write

logger = logging.getLogger("dino.run_dir")

LOCK = ".lock"
LOG = "log.txt"
EVENTS = "events.jsonl"


class OutputDirError(RuntimeError):
    """output_dir cannot be used: another live run holds it, or it cannot be written."""


def lock(output_dir: str):
    """Hold output_dir for this process's lifetime. The kernel drops the lock when its holder dies, however it
    dies, so a killed run never leaves the directory locked. A POSIX record lock (lockf), not an flock: forked
    DataLoader workers do not inherit it, so they cannot keep it alive after a killed main process.
    Returns the open file (keep a reference; closing any handle of the file releases the lock)."""
    path = os.path.join(output_dir, LOCK)
    handle = open(path, "a+")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise OutputDirError(f"{output_dir} is in use by another run ({holder}); wait for it to end, or choose "
                            "another --output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def _records(path: str, quiet: bool = False):
    """(line, record) pairs of a JSON-lines file; a line a kill tore apart is skipped (with a warning unless
    quiet), never fatal."""
    if not os.path.exists(path):
        return []
    pairs = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                if quiet:
                    continue
                logger.warning("%s line %d is not valid JSON (cut off by a kill?): dropped", path, number)
                continue
            if isinstance(record, dict):
                pairs.append((line if line.endswith("\n") else line + "\n", record))
    return pairs


def read_log(output_dir: str, quiet: bool = False) -> list:
    """log.txt's epoch records (quiet: a torn line is dropped without a warning, for readers that poll)."""
    return [record for _, record in _records(os.path.join(output_dir, LOG), quiet)]


def read_epochs(output_dir: str) -> list:
    """log.txt's records one per epoch, in epoch order: where a resumed run wrote an epoch again (an older
    log, or a kill between the line and the save), the later line wins."""
    by_epoch = {record["epoch"]: record for record in read_log(output_dir) if isinstance(record.get("epoch"), int)}
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def truncate_log(output_dir: str, first_epoch: int) -> None:
    """Keep only the records of epochs before first_epoch: the later ones will be written again."""
    path = os.path.join(output_dir, LOG)
    if os.path.exists(path):
        kept = "".join(line for line, record in _records(path) if record.get("epoch", -1) < first_epoch)
        atomic_write(path, lambda f: f.write(kept.encode()))


def append_event(output_dir: str, event: str, **fields) -> None:
    """One line of events.jsonl, the run's machine-readable history, {"time", "event", ...}; programs read it
    (read_events), never the log's sentences. Events, with their fields:
      started    world_size, precision, eval_only
      start      how (continue, resume, weights or scratch), path (the file it starts from), reason (why it
                 does not continue), run_id, epoch, iteration, pending (an epoch to evaluate first, or null)
      step       epoch, iteration, iterations, loss: every tenth of an epoch
      evaluating epoch
      saved      files, epoch_done (the last completed epoch), iteration, eval_pending, seconds: once written
      evaluated  epoch, ap, ema_ap
      stopped    signal, where, saved, epoch, iteration
      finished   seconds, epoch
      error      message, code"""
    if output_dir:
        record = {"time": round(time.time(), 3), "event": event, **fields}
        with open(os.path.join(output_dir, EVENTS), "a") as f:
            f.write(json.dumps(record) + "\n")


def read_events(output_dir: str, event: Optional[str] = None) -> list:
    """events.jsonl's records (only those of one kind with `event`); a torn last line is skipped."""
    path = os.path.join(output_dir, EVENTS)
    return [r for _, r in _records(path, quiet=True) if event is None or r.get("event") == event]


class EventTail:
    """The events appended to output_dir's events.jsonl since this object was made, read as they come: the
    file is appended to across restarts, so these are one start's."""

    def __init__(self, output_dir, whole: bool = False, since: float = 0.0):
        """whole: the events already there count too. since: only events of that time (time.time()) or later,
        for a file that arrives whole (pulled from an object store)."""
        self.path = os.path.join(output_dir, EVENTS)
        self.records: List[dict] = []
        self.since = since
        try:
            stat = os.stat(self.path)
            self.inode, self.offset = stat.st_ino, 0 if whole else stat.st_size
        except FileNotFoundError:
            self.inode, self.offset = None, 0

    def read(self) -> List[dict]:
        """The records appended since the last read. Whole lines only: one being written waits for the next
        read; one a kill cut off is skipped. A new file (main.py sets the old one aside when it starts over) is
        read from its beginning."""
        try:
            with open(self.path, "rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                if inode != self.inode:
                    self.inode, self.offset = inode, 0
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        whole = data[:data.rfind(b"\n") + 1]
        self.offset += len(whole)
        new = []
        for line in whole.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "event" in record and record.get("time", 0) >= self.since:
                new.append(record)
        self.records += new
        return new

    def first(self, event: str) -> Optional[dict]:
        """This start's first event of that kind, or None."""
        return next((record for record in self.records if record["event"] == event), None)


def append_log(output_dir: str, record: dict) -> None:
    with open(os.path.join(output_dir, LOG), "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


# What a run leaves in its output_dir beside info.txt (which keeps every run's history) and the dataset checks.
RUN_FOLDERS = ("eval", "tb", "sample_ids")
RUN_FILES = re.compile(r'^(checkpoint.*\.pth|log\.txt|events\.jsonl|run_id\.txt|config_cfg\.py|config_args_all\.json|'
                       + "|".join(RUN_FOLDERS) + r')$')


def is_run_file(name: str) -> bool:
    """Whether a path relative to output_dir (a file in one of RUN_FOLDERS too) belongs to the run."""
    return bool(RUN_FILES.match(name.split("/")[0]))


def set_aside(output_dir: str, run_id: Optional[str], keep: Optional[str] = None) -> tuple:
    """Move the files of the run `run_id` in output_dir to output_dir/previous/<run_id>/, so that a new run never
    mixes with them (pruning, falling back). `keep`: a path left in place (the new run's own source).
    Returns (the folder, the names moved); (None, []) when there was nothing to move."""
    if not os.path.isdir(output_dir):
        return None, []
    names = [f for f in sorted(os.listdir(output_dir)) if RUN_FILES.match(f)
             and not (keep and os.path.realpath(os.path.join(output_dir, f)) == os.path.realpath(keep))]
    if not any(f.endswith(".pth") or f == LOG for f in names):  # no run was there, only empty folders
        return None, []
    folder = os.path.join(output_dir, 'previous', run_id or time.strftime('unknown-%Y%m%d-%H%M%S'))
    while os.path.exists(folder):
        folder += '+'
    os.makedirs(folder)
    for name in names:
        os.rename(os.path.join(output_dir, name), os.path.join(folder, name))
    os.makedirs(os.path.join(output_dir, "eval"), exist_ok=True)  # the new run's, made at its start
    return folder, names
