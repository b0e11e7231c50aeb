"""The chaos scoreboard: kill a training run again and again, rerun its command each time, and check that it
ends exactly where an uninterrupted run ends.

    python tools/chaos.py --kills 20 --seed 1 [--signal KILL|TERM|mixed] [--nproc 1|2] [--workdir DIR] \\
        -c config/DINO/DINO_demo.py [--coco_path DIR] [--num_workers N] [--options k=v ...] [-- MAIN_ARGS]

Every argument that is not one of the tool's own goes to main.py (those after `--` always do: main.py's own
--seed, for instance); the tool adds --output_dir and --save_log. The outputs are kept in WORKDIR/reference.log
and WORKDIR/starts/NN.log (one per start of the chaos run). The tool:
1. runs the command once, uninterrupted, into WORKDIR/reference;
2. runs it into WORKDIR/chaos and kills it --kills times, rerunning the same command after each kill. The
   instants are drawn with --seed over the reference run's progress lines ('Epoch E [i/n]', 'Evaluating
   epoch E'), plus a random part of the time the reference took to its next line. The kills rotate over
   where (in training; in a checkpoint write: as soon as a `.checkpoint*.pth.tmp-PID` file appears; in
   evaluation), the signal (--signal; mixed alternates SIGKILL and SIGTERM), the target (main.py, with
   --nproc 2 torchrun for SIGTERM and rank 0 for SIGKILL; or the whole process group, which with torchrun
   means every process group of the job, since torchrun starts each rank in a session of its own) and the
   data loading (half of the killed starts get --num_workers 2). Before each rerun the tool waits until
   every process of the killed one (orphaned DataLoader workers included) has exited, as a scheduler would;
3. once between two starts flips one bit in the middle of checkpoint.pth (as soon as a numbered checkpoint
   exists to fall back to; not with --no_bit_flip), and once runs a start under a file-size limit of half a
   checkpoint: it must fail its first save with exit code 1 and 'error: could not write checkpoint', leaving
   checkpoint.pth as it was;
4. lets the last start finish and compares with the reference: the model and optimizer tensors of
   checkpoint.pth (torch.equal), and log.txt's train_* values and test_coco_eval_bbox, epoch by epoch.

The last line is the scoreboard; the exit code is 0 only if all of it holds (K == N, F == 0, C == 0, B == M,
identical), 1 otherwise, 2 for a bad command line or a failed reference run:
    kills survived K/N, resume failures F, corrupt files C, bit flips caught B/M, final state identical: yes|no
N  kills that landed (a start that finishes before its kill ends the series early);
K  of them, those whose start ended as that signal should end it (SIGKILL: -9; SIGTERM: 3 after saving; with
   torchrun, which answers a signal with 1: 'received during' in the output for SIGTERM, anything for a
   rank's SIGKILL) with no 'error:' line (except from the partner of a killed rank), and whose next start
   continued from the newest intact checkpoint;
F  starts that failed: one that ended by itself with a code other than 0 (the file-size start: other than 1
   with its error line and checkpoint.pth unchanged), ended a kill otherwise than above, did not continue
   exactly where main.py's own resume rule says (e.g. trained from scratch after a checkpoint existed), or
   hung (3 times the reference's duration plus 2 minutes);
C  checkpoint*.pth files that load_checkpoint rejected when the tool looked (after every start and at the
   end; each write counted once), except the file the tool flipped until something rewrites it, plus
   temporary files of saves left at the end;
B  flips that load_checkpoint rejected and after which the run still ended identical, of M flips made.
"""
import argparse
import hashlib
import logging
import os
import queue
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import main as dino_main  # noqa: E402
from checkpoint.format import CheckpointError, load_checkpoint  # noqa: E402
from checkpoint.store import LATEST, CheckpointStore, numbered_checkpoints  # noqa: E402
import cli  # noqa: E402
from checkpoint.resume import decide_start  # noqa: E402
from util.run_dir import read_log  # noqa: E402

logging.getLogger("dino").addHandler(logging.NullHandler())  # decide_start's warnings are main.py's to print

PROGRESS = re.compile(r"\bEpoch (\d+) \[(\d+)/\d+\]|\bEvaluating epoch (\d+)\b")
TEMPORARY = re.compile(r"^\.checkpoint.*\.pth\.tmp-\d+$")
ERROR_LINE = re.compile(r"^(\[rank \d+\] )?error: .*$", re.MULTILINE)
CONTINUED = re.compile(r"Continuing the interrupted run in .*: epoch (\d+), iteration (\d+) of")
WHERE = ("training", "a checkpoint write", "evaluation")


class ChaosError(Exception):
    """A bad command line or a failed reference run: one line, exit code 2."""


def progress_label(line: str) -> str:
    """'Epoch 1 [4/8]' or 'Evaluating epoch 1' out of a log line."""
    return line.split("] ", 1)[-1].split(" loss")[0].strip()


def progress_position(line: str):
    """(epoch, 0, iteration) for 'Epoch E [i/n]', (epoch, 1, 0) for 'Evaluating epoch E', else None."""
    match = PROGRESS.search(line)
    if match is None:
        return None
    if match.group(3) is not None:
        return int(match.group(3)), 1, 0
    return int(match.group(1)), 0, int(match.group(2))


# ---------------------------------------------------------------------------------------------
# One start: its processes in the background, its output read as it comes

class Run:
    """main.py (or torchrun) in a session of its own; a thread drains its output into a queue and a file."""

    def __init__(self, cmd: List[str], log_path: Path, preexec_fn=None):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace", start_new_session=True, preexec_fn=preexec_fn,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.timed, self.lines, self.eof = [], queue.Queue(), False
        self.last_progress = ("", self.started)
        self._groups = {self.proc.pid}
        self._reader = threading.Thread(target=self._read, args=(log_path,), daemon=True)
        self._reader.start()

    def _read(self, log_path: Path) -> None:
        with open(log_path, "w") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                self.timed.append((time.monotonic(), line))
                self.lines.put(line)
        self.lines.put(None)

    def progress(self, deadline: float):
        """Each progress line's position until the output ends (self.eof) or deadline passes."""
        while not self.eof:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            if line is None:
                self.eof = True
                return
            position = progress_position(line)
            if position is not None:
                self.last_progress = (progress_label(line), time.monotonic())
                yield position

    def catch_up(self) -> None:
        """Read what has arrived, so last_progress is the latest line."""
        for _ in self.progress(time.monotonic()):
            pass

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
            code = self.proc.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung = True
            self.signal_all(signal.SIGKILL)
            code = self.proc.wait()
        exited = time.monotonic()
        while self.leftovers() and time.monotonic() < exited + 60:
            time.sleep(0.05)
        if self.leftovers():
            hung = True
            self.signal_all(signal.SIGKILL)
        leftover_s = time.monotonic() - exited
        self._reader.join()
        return code, hung, leftover_s

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.timed)


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


# ---------------------------------------------------------------------------------------------
# The plan

@dataclass
class Marker:
    position: tuple
    label: str
    window: float  # seconds the reference took from this line to its next progress line (evaluation: to 'done')


@dataclass
class Kill:
    where: str
    signal: str  # 'KILL' or 'TERM'
    group: bool
    workers: bool
    target: tuple  # the progress position to wait for
    label: str
    delay: float  # then seconds to wait (a checkpoint write: the first temporary file instead)


def reference_markers(run: Run) -> List[Marker]:
    """The reference run's progress lines, each with the time to its next one."""
    timed = [(t, line, progress_position(line)) for t, line in run.timed]
    progress = [(t, progress_label(line), p) for t, line, p in timed if p]
    markers = []
    for i, (t, label, position) in enumerate(progress):
        if position[1] == 1:
            done = [u for u, line, _ in timed if u > t and f"Epoch {position[0]} done in" in line]
            end = done[0] if done else t
        else:
            end = progress[i + 1][0] if i + 1 < len(progress) else timed[-1][0]
        markers.append(Marker(position, label, max(0.0, end - t)))
    return markers


def plan_kills(count: int, rng: random.Random, markers: List[Marker], which: str, fallback_from) -> List[Kill]:
    """`count` kills rotating over where, signal, target and workers, sorted by when they land. When a
    numbered checkpoint appears before the last epoch (fallback_from), the last kill comes after it, so
    that the bit flip has a checkpoint to fall back to."""
    training = [m for m in markers if m.position[1] == 0]
    evaluation = [m for m in markers if m.position[1] == 1] or training
    kills = []
    for i in range(count):
        where = WHERE[i % 3]
        marker = rng.choice(evaluation if where == "evaluation" else training)
        delay = 0.0 if where == "a checkpoint write" else rng.random() * marker.window
        kills.append(Kill(where, which if which != "mixed" else ("KILL", "TERM")[i % 2], group=i % 4 in (1, 2),
                          workers=i % 4 in (0, 3), target=marker.position, label=marker.label, delay=delay))
    kills.sort(key=lambda k: k.target)
    later = [m for m in training if fallback_from is not None and m.position >= fallback_from]
    if kills and later and kills[-1].target < fallback_from:
        marker = rng.choice(later)
        kills[-1].target, kills[-1].label, kills[-1].where = marker.position, marker.label, "training"
        kills[-1].delay = rng.random() * marker.window
    return kills


# ---------------------------------------------------------------------------------------------
# Checks

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


def resumed(output: str, expected) -> tuple:
    """(ok, what the start said) against main.py's own resume rule: expected is (epoch, iteration) to continue
    from, or None when there was nothing of this run's to continue."""
    match = CONTINUED.search(output)
    said = f"continued at epoch {match[1]}, iteration {match[2]}" if match else \
        "trained from scratch" if "Training from scratch" in output else "said nowhere where it started"
    fell_back = re.search(r"auto-resume fell back to (\S+),", output)
    said += f" (fell back to {fell_back[1]})" if fell_back else ""
    pending = re.search(r"Epoch (\d+) was trained but not evaluated", output)
    said += f" (evaluating epoch {pending[1]} first)" if pending else ""
    if expected is None:
        return match is None, said
    return bool(match) and (int(match[1]), int(match[2])) == expected, said


def error_lines(output: str) -> List[str]:
    return [match[0] for match in ERROR_LINE.finditer(output)]


def sha256(path: Path) -> Optional[str]:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


# ---------------------------------------------------------------------------------------------
# The series

@dataclass
class Board:
    """The scoreboard (the module's docstring defines each number)."""
    landed: int = 0
    survived: int = 0
    failures: int = 0
    flips: int = 0
    flip_rejected: bool = False
    corrupt: int = 0
    differences: List[str] = field(default_factory=list)

    def line(self) -> str:
        identical = not self.differences
        return (f"kills survived {self.survived}/{self.landed}, resume failures {self.failures}, corrupt files "
                f"{self.corrupt}, bit flips caught {int(self.flip_rejected and identical)}/{self.flips}, "
                f"final state identical: {'yes' if identical else 'no'}")

    def ok(self) -> bool:
        return (self.survived == self.landed and self.failures == 0 and self.corrupt == 0
                and not self.differences and int(self.flip_rejected) == self.flips)


class Chaos:
    """The reference run, then the chaos run: its plan, its starts and what each did."""

    def __init__(self, opts, main_args: List[str], parsed, workdir: Path):
        self.opts, self.main_args, self.workdir = opts, main_args, workdir
        self.out, self.logs = workdir / "chaos", workdir / "starts"
        self.parsed = argparse.Namespace(**{**vars(parsed), "output_dir": str(self.out)})
        self.rng = random.Random(opts.seed)
        self.board, self.files, self.count = Board(), CheckpointFiles(self.out), 0
        self.current, self.stale = None, set()  # the run in progress; the files there before it started

    def command(self, output_dir: Path, workers: bool = False) -> List[str]:
        launcher = [sys.executable] if self.opts.nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.opts.nproc}"]
        return [*launcher, str(ROOT / "main.py"), *self.main_args, "--output_dir", str(output_dir), "--save_log",
                *(["--num_workers", "2"] if workers else [])]

    def reference(self) -> None:
        self.logs.mkdir(parents=True)
        run = self.current = Run(self.command(self.workdir / "reference"), self.workdir / "reference.log")
        code, _, _ = run.end()
        if code != 0:
            errors = error_lines(run.output) or ["no error line"]
            raise ChaosError(f"the reference run failed with exit code {code} ({errors[-1]}); its output is in "
                             f"{self.workdir / 'reference.log'}")
        self.markers = reference_markers(run)
        if not self.markers:
            raise ChaosError("the reference run printed no progress lines ('Epoch E [i/n]'): nothing to aim at")
        self.timeout = 3 * (run.timed[-1][0] - run.started) + 120
        self.checkpoint_size = (self.workdir / "reference" / LATEST).stat().st_size
        numbered = numbered_checkpoints(self.workdir / "reference")
        last_epoch = self.markers[-1].position[0]
        first = int(numbered[0][10:14]) if numbered else last_epoch
        self.fallback_from = (first + 1, 0, 0) if first < last_epoch else None
        say(f"reference: exit 0 in {run.timed[-1][0] - run.started:.1f} s, {len(self.markers)} progress lines, "
            f"in {self.workdir / 'reference'}")

    def expected_start(self):
        """(epoch, iteration) main.py will continue from, by its own rule; None when there is nothing to
        continue (or nothing intact: then the start must fail, which counts)."""
        try:
            start, _ = decide_start(self.parsed, CheckpointStore(self.parsed.output_dir))
        except CheckpointError:
            return None
        if start.kind != "continue":
            return None
        return start.checkpoint["epoch"] + 1, start.checkpoint.get("iteration", 0)

    def start(self, workers=False, preexec_fn=None) -> tuple:
        """A rerun of the command in the chaos directory, and where main.py's rule says it must continue."""
        self.count += 1
        expected = self.expected_start()
        self.stale = set(os.listdir(self.out)) if self.out.is_dir() else set()
        self.current = Run(self.command(self.out, workers), self.logs / f"{self.count:02d}.log", preexec_fn)
        return self.current, expected

    def abandon(self) -> None:
        """End the run in progress (the tool was interrupted): its processes are in a session of their own."""
        if self.current is not None:
            self.current.signal_all(signal.SIGKILL)

    def series(self) -> Board:
        kills = plan_kills(self.opts.kills, self.rng, self.markers, self.opts.signal, self.fallback_from)
        full_slot = self.rng.randint(1, len(kills)) if kills else None
        flip_slot = self.rng.randint(1, len(kills)) if kills and not self.opts.no_bit_flip else None
        flip = "no bit flip" if flip_slot is None else (f"after kill {flip_slot} (or the first later one that "
                                                        "leaves a numbered checkpoint to fall back to), a bit flip")
        full = "no file-size limit" if full_slot is None else f"after kill {full_slot}, a start under a file-size limit"
        say(f"plan (seed {self.opts.seed}): {len(kills)} kills; {full}; {flip}")
        kill_ok = None  # the last landed kill ended as it should; it survived if the next start continues right
        for slot, kill in enumerate(kills + [None]):
            if slot and slot == full_slot:
                kill_ok = self.settle(kill_ok, self.file_size_start())
            if slot and flip_slot is not None and slot >= flip_slot and not self.board.flips:
                self.flip()
            run, expected = self.start(workers=bool(kill and kill.workers))
            if kill is None:
                code, hung, _ = run.end(run.started + self.timeout)
                landed, ending, ok = False, f"ran to the end: exit {code}", code == 0
            else:
                landed, ending, ok, code, hung = self.kill(run, kill)
            resume_ok, said = resumed(run.output, expected)
            kill_ok = self.settle(kill_ok, resume_ok)
            finished = "Training time" in run.output
            failed = [] if resume_ok else [f"expected to continue at {_where(expected)}"]
            if hung:
                failed.append("hung (killed)")
            if landed:
                self.board.landed += 1
                kill_ok = ok
                if not ok:
                    failed.append(f"a SIG{kill.signal} should end it otherwise")
            elif not finished or (kill is None and code != 0):
                failed.append("ended by itself before the end of training" if not finished
                              else "a run that finishes must exit with code 0")
            self.report(run, said, ending, failed)
            if finished:
                if kill is not None:
                    say(f"the run finished before kill {self.board.landed + 1}: {self.board.landed} of {len(kills)} "
                        "planned kills landed")
                break
        left = self.files.temporary_files()
        for name in left:
            say(f"corrupt: temporary file left at the end: {name}")
        self.board.corrupt = len(self.files.corrupt) + len(left)
        self.board.differences = differences(self.workdir / "reference", self.out)
        for difference in self.board.differences:
            say(f"final state differs: {difference}")
        return self.board

    def settle(self, kill_ok, resume_ok):
        """The previous kill survived if it ended as it should and this start continued right."""
        if kill_ok is not None:
            self.board.survived += bool(kill_ok and resume_ok)
        return None

    def report(self, run: Run, said: str, ending: str, failed: List[str]) -> None:
        """One line per start; then any damaged checkpoint file it left."""
        self.board.failures += bool(failed)
        errors = error_lines(run.output)
        say(f"start {self.count:2d}: {said} | {ending}" + (f" | FAILED: {'; '.join(failed)}" if failed else "")
            + (f" | last error line: {errors[-1][:200]}" if errors and failed else ""))
        for damaged in self.files.check():
            say(f"corrupt: {damaged}")

    def kill(self, run: Run, kill: Kill) -> tuple:
        """Wait for the kill's instant and send it: (landed, what happened, ended as it should, code, hung)."""
        deadline = run.started + self.timeout
        reached = any(position >= kill.target for position in run.progress(deadline))
        tmp = ""
        if reached and kill.where == "a checkpoint write":
            tmp = wait_for_temporary_file(self.out, self.stale, run, deadline)
            reached = bool(tmp)
        elif reached:
            try:
                run.proc.wait(timeout=kill.delay)
                reached = False
            except subprocess.TimeoutExpired:
                pass
        run.catch_up()
        line, at = run.last_progress
        target = self.send(run, kill) if reached and run.alive() else ""
        sent = time.monotonic()
        code, hung, leftover = run.end(deadline)
        if not target or "Training time" in run.output:
            aim = "the first checkpoint write" if kill.where == "a checkpoint write" else f"{kill.delay:.2f} s"
            return (False, f"kill {self.board.landed + 1} (SIG{kill.signal} aimed at {kill.where}, {aim} after "
                    f"'{kill.label}') did not land: exit {code}", False, code, hung)
        workers = " (with 2 workers)" if kill.workers else ""
        when = (f"in a checkpoint write ({tmp}{', left behind' if (self.out / tmp).exists() else ''})"
                if tmp else f"aimed at {kill.where}")
        description = (f"kill {self.board.landed + 1}: SIG{kill.signal} to {target}{workers} {when}, {sent - at:.2f} s "
                       f"after '{line}', {sent - run.started:.1f} s after start: exit {code}"
                       + (f"; its leftover processes took {leftover:.1f} s to exit" if leftover > 0.5 else ""))
        return True, description, self.ended_as_killed(run.output, code, kill), code, hung

    def send(self, run: Run, kill: Kill) -> str:
        """Signal the kill's target; returns what it was."""
        sig = signal.SIGKILL if kill.signal == "KILL" else signal.SIGTERM
        if kill.group:
            run.signal_all(sig)
            return "the process group" if self.opts.nproc == 1 else "every process group of the job"
        if self.opts.nproc > 1 and sig == signal.SIGKILL:  # a lone SIGKILL to torchrun would orphan its ranks
            pid = rank_pid(run.proc.pid, 0)
            if pid is not None:
                os.kill(pid, sig)
                return "rank 0"
        run.proc.send_signal(sig)
        return "main.py" if self.opts.nproc == 1 else "torchrun"

    def ended_as_killed(self, output: str, code: int, kill: Kill) -> bool:
        rank_killed = self.opts.nproc > 1 and kill.signal == "KILL" and not kill.group
        if ERROR_LINE.search(output) and not rank_killed:
            return False
        if kill.signal == "KILL":
            return code == (1 if rank_killed else -9)
        if code == -signal.SIGTERM:
            return True
        return "received during" in output and code == (3 if self.opts.nproc == 1 else 1)

    def file_size_start(self) -> bool:
        """A start under a file-size limit of half a checkpoint: its first save must fail cleanly.
        Returns whether it continued from the right place (it counts as a rerun)."""
        limit = self.checkpoint_size // 2
        latest = self.out / LATEST
        before = sha256(latest)
        run, expected = self.start(preexec_fn=limit_file_size(limit))
        code, hung, _ = run.end(run.started + self.timeout)
        resume_ok, said = resumed(run.output, expected)
        failed = [] if resume_ok else [f"expected to continue at {_where(expected)}"]
        if hung:
            failed.append("hung (killed)")
        if code != 1 or "error: could not write checkpoint" not in run.output:
            failed.append("a failed save must end the run with exit code 1 and 'error: could not write checkpoint'")
        if sha256(latest) != before:
            failed.append("checkpoint.pth changed")
        elif before is not None:
            try:
                load_checkpoint(latest)
            except CheckpointError as e:
                failed.append(f"checkpoint.pth is no longer loadable: {e}")
        state = "unchanged" if sha256(latest) == before else "CHANGED"
        self.report(run, said, f"file-size limit {limit / 2**20:.1f} MB: exit {code}, checkpoint.pth {state}", failed)
        return resume_ok

    def flip(self) -> None:
        """Flip one bit in the middle of checkpoint.pth, if a numbered checkpoint is there to fall back to."""
        latest = self.out / LATEST
        numbered = numbered_checkpoints(self.out)[::-1] if latest.exists() else []
        fallback = next((name for name in numbered if _loads(self.out / name)), None)
        if fallback is None:
            return
        size = latest.stat().st_size
        offset, bit = size // 2, self.rng.randrange(8)
        with open(latest, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ (1 << bit)]))
        self.files.flipped(LATEST)
        self.board.flips += 1
        try:
            load_checkpoint(latest)
            verdict = "load_checkpoint accepted it: the flip went unnoticed"
        except CheckpointError as e:
            self.board.flip_rejected = True
            verdict = f"load_checkpoint rejected it ({e}); {fallback} is there to fall back to"
        say(f"bit flip: checkpoint.pth byte {offset} of {size}, bit {bit}: {verdict}")


def _loads(path: Path) -> bool:
    try:
        load_checkpoint(path)
        return True
    except CheckpointError:
        return False


def _where(expected) -> str:
    return "nothing (a fresh start)" if expected is None else f"epoch {expected[0]}, iteration {expected[1]}"


def wait_for_temporary_file(directory: Path, stale: set, run: Run, deadline: float) -> str:
    """The name of the first temporary file of a checkpoint save of this run, as soon as it appears."""
    while run.alive() and time.monotonic() < deadline:
        for name in os.listdir(directory):
            if TEMPORARY.match(name) and name not in stale:
                return name
        time.sleep(0.002)
    return ""


def say(message: str) -> None:
    print(message, flush=True)


def parse(argv: List[str]):
    """The tool's options, and main.py's arguments: the rest, and everything after `--`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--kills", type=int, default=20, help="how many times to kill the run (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="draws the kill instants, kinds and slots")
    parser.add_argument("--signal", choices=["KILL", "TERM", "mixed"], default="mixed",
                        help="SIGKILL, SIGTERM, or both alternately (default)")
    parser.add_argument("--nproc", type=int, choices=[1, 2], default=1, help="2: main.py under torchrun")
    parser.add_argument("--no_bit_flip", action="store_true", help="score the kills without flipping a bit")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where reference/, chaos/ and starts/ go (default: a new temporary directory)")
    cut = argv.index("--") if "--" in argv else len(argv)
    opts, main_args = parser.parse_known_args(argv[:cut])
    main_args += argv[cut + 1:]
    if opts.kills < 0:
        raise ChaosError(f"--kills {opts.kills}: give 0 or more")
    try:
        parsed = dino_main.parse_args(main_args)
    except cli.BAD_INPUT as e:
        raise ChaosError(str(e)) from None
    for flag, value, why in (
            ("--output_dir", parsed.output_dir, "the tool chooses WORKDIR/reference and WORKDIR/chaos"),
            ("--no_auto_resume", parsed.no_auto_resume, "every rerun would start over"),
            ("--eval", parsed.eval, "there is no training to interrupt")):
        if value:
            raise ChaosError(f"{flag} cannot be passed to main.py here: {why}; drop it")
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))
    taken = [str(workdir / n) for n in ("reference", "chaos", "starts") if (workdir / n).exists()]
    if taken:
        raise ChaosError(f"{', '.join(taken)} already exist(s): choose another --workdir or remove them")
    return opts, main_args, parsed, workdir


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chaos = None
    try:
        opts, main_args, parsed, workdir = parse(argv)
        chaos = Chaos(opts, main_args, parsed, workdir)
        chaos.reference()
        board = chaos.series()
    except ChaosError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if chaos is not None:
            chaos.abandon()
        print("error: interrupted; the run in progress was killed", file=sys.stderr)
        return 130
    say(board.line())
    return 0 if board.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
