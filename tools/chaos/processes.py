"""The processes of one start: main.py (or torchrun) in a session of its own, its output drained to a log file,
its progress followed in events.jsonl, and every process it leaves behind found and waited for."""
import os
import resource
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import List, Optional

from util.run_dir import EventTail

from .checks import TEMPORARY
from .events import label, position

ROOT = Path(__file__).resolve().parents[2]
POLL = 0.01  # seconds between two looks at events.jsonl


class Run:
    """One start. Its times are time.time(), as those of its events are."""

    def __init__(self, cmd: List[str], log_path: Path, output_dir: Path, preexec_fn=None, env=None):
        self.started = self.ended = time.time()
        self.events = EventTail(output_dir, since=self.started)  # before the start appends anything
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace", start_new_session=True, preexec_fn=preexec_fn,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.lines: List[str] = []
        self.last_progress = ("", self.started)  # the label and time of the latest progress event
        self._groups = {self.proc.pid}
        self._reader = threading.Thread(target=self._drain, args=(log_path,), daemon=True)
        self._reader.start()

    def _drain(self, log_path: Path) -> None:
        """A pipe nobody reads would block main.py once full."""
        with open(log_path, "w") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                self.lines.append(line)

    def progress(self, deadline: float):
        """The position of each progress event this start writes, until it exits or deadline passes."""
        while True:
            alive = self.alive()  # before reading: what it wrote before exiting is read once more
            yield from self.catch_up()
            if not alive or time.time() >= deadline:
                return
            time.sleep(POLL)

    def catch_up(self) -> List[tuple]:
        """Read the events that have arrived, so last_progress is the latest; their progress positions."""
        positions = []
        for record in self.events.read():
            if position(record) is not None:
                positions.append(position(record))
                self.last_progress = (label(record), record["time"])
        return positions

    def event(self, name: str) -> Optional[dict]:
        """This start's first event of that kind (None: it wrote none; with torchrun only rank 0 writes)."""
        return self.events.first(name)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def groups(self) -> set:
        """Its process groups: its own and, since torchrun starts each rank in a session of its own, those of
        its descendants (remembered: the children of a killed launcher lose their link to it)."""
        table = process_table()
        children = {}
        for pid, (_, parent, _) in table.items():
            children.setdefault(parent, []).append(pid)
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            if pid in table:
                self._groups.add(table[pid][2])
            todo += children.get(pid, [])
        return self._groups

    def signal_all(self, sig: int) -> None:
        for group in self.groups():
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                pass

    def leftovers(self) -> int:
        """Its processes still alive (zombies aside)."""
        return sum(state != "Z" and group in self._groups for state, _, group in process_table().values())

    def end(self, deadline: Optional[float] = None):
        """Wait for the process, then for every other process of its groups (orphaned DataLoader workers hold
        the directory's lock, so a rerun must wait for them too). Returns (exit code, hung, seconds the
        leftovers took); a run past deadline, or leftovers alive after a minute, are killed."""
        hung = False
        self.groups()
        try:
            code = self.proc.wait(timeout=None if deadline is None else max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            hung = True
            self.signal_all(signal.SIGKILL)
            code = self.proc.wait()
        self.ended = time.time()
        while self.leftovers() and time.time() < self.ended + 60:
            time.sleep(0.05)
        if self.leftovers():
            hung = True
            self.signal_all(signal.SIGKILL)
        leftover_s = time.time() - self.ended
        self._reader.join()
        self.catch_up()
        return code, hung, leftover_s

    @property
    def output(self) -> str:
        return "".join(self.lines)


def process_table() -> dict:
    """{pid: (state, parent pid, process group)} of every process, from /proc."""
    table = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state, parent, group = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        table[int(pid)] = (state, int(parent), int(group))
    return table


def rank_pid(launcher: int, rank: int) -> Optional[int]:
    """The pid of torchrun's child with RANK=rank."""
    for task in os.listdir(f"/proc/{launcher}/task"):
        try:
            with open(f"/proc/{launcher}/task/{task}/children") as f:
                children = f.read().split()
        except OSError:
            continue
        for child in children:
            try:
                with open(f"/proc/{child}/environ", "rb") as f:
                    if f"RANK={rank}".encode() in f.read().split(b"\0"):
                        return int(child)
            except OSError:
                continue
    return None


def limit_file_size(limit: int):
    """preexec_fn: a full disk, as a file-size limit; writes past it fail with EFBIG instead of a signal."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def wait_for_temporary_file(directory: Path, stale: set, run: Run, deadline: float) -> str:
    """The name of the first temporary file of a checkpoint save of this run, as soon as it appears."""
    while run.alive() and time.time() < deadline:
        for name in os.listdir(directory):
            if TEMPORARY.match(name) and name not in stale:
                return name
        time.sleep(0.002)
    return ""
