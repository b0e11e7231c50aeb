"""The series: the reference run, then the chaos run's starts, each killed as planned and judged, and the
scoreboard they add up to."""
import argparse
import logging
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from checkpoint.format import CheckpointError, load_checkpoint
from checkpoint.resume import decide_start
from checkpoint.store import LATEST, CheckpointStore, numbered_checkpoints

from .checks import CheckpointFiles, describe, differences, error_lines, loads, resumed, sha256
from .plan import Kill, plan_kills, reference_markers
from .processes import POLL, ROOT, Run, limit_file_size, rank_pid, wait_for_temporary_file
from .remote import RemoteView, expected_remote_start, machine_staging

logging.getLogger("dino").addHandler(logging.NullHandler())  # decide_start's warnings are main.py's to print


class ChaosError(Exception):
    """A bad command line or a failed reference run: one line, exit code 2."""


def say(message: str) -> None:
    print(message, flush=True)


@dataclass
class Board:
    """The scoreboard (the package's docstring defines each number)."""
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


def wait_in_window(run: Run, delay: float) -> bool:
    """Wait `delay` seconds after the kill's target event, or less: until the run's next progress event, since
    the kill was aimed inside the window before it (a run faster than the reference's would otherwise finish
    first). False when the run ended meanwhile."""
    until = time.time() + delay
    while time.time() < until:
        if not run.alive():
            return False
        if run.catch_up():
            return True
        time.sleep(POLL)
    return run.alive()


class Chaos:
    """The reference run, then the chaos run: its plan, its starts and what each did."""

    def __init__(self, opts, main_args: List[str], parsed, workdir: Path):
        """With parsed.output_url (--output_dir s3://...), the chaos run goes there, each start on a new
        machine (its own staging folder, WORKDIR/machines/NN), and WORKDIR/chaos is a view of the bucket."""
        self.opts, self.main_args, self.workdir = opts, main_args, workdir
        self.out, self.logs = workdir / "chaos", workdir / "starts"
        self.url = parsed.output_url
        self.view = RemoteView(self.url, self.out) if self.url else None
        self.parsed = argparse.Namespace(**{**vars(parsed), "output_dir": str(self.out)})
        self.rng = random.Random(opts.seed)
        self.board, self.files, self.count = Board(), CheckpointFiles(self.out), 0
        self.current, self.stale = None, set()  # the run in progress; the files there before it started
        self.workspace = self.out  # where the current start writes (for a remote run: its machine's staging)

    def command(self, output_dir: Path, workers: bool = False) -> List[str]:
        launcher = [sys.executable] if self.opts.nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.opts.nproc}"]
        return [*launcher, str(ROOT / "main.py"), *self.main_args, "--output_dir", str(output_dir), "--save_log",
                *(["--num_workers", "2"] if workers else [])]

    def reference(self) -> None:
        self.logs.mkdir(parents=True)
        out = self.workdir / "reference"
        run = self.current = Run(self.command(out), self.workdir / "reference.log", out)
        code, _, _ = run.end()
        if code != 0:
            errors = error_lines(run.output) or ["no error line"]
            raise ChaosError(f"the reference run failed with exit code {code} ({errors[-1]}); its output is in "
                             f"{self.workdir / 'reference.log'}")
        self.markers = reference_markers(run.events.records)
        if not self.markers:
            raise ChaosError(f"the reference run wrote no progress events (step, evaluating) to "
                             f"{run.events.path}: nothing to aim at")
        seconds = run.ended - run.started
        self.timeout = 3 * seconds + 120
        self.checkpoint_size = (out / LATEST).stat().st_size
        numbered = numbered_checkpoints(out)
        last_epoch = self.markers[-1].position[0]
        first = int(numbered[0][10:14]) if numbered else last_epoch
        self.fallback_from = (first + 1, 0, 0) if first < last_epoch else None
        say(f"reference: exit 0 in {seconds:.1f} s, {len(self.markers)} progress events, in {out}")

    def expected_start(self):
        """(epoch, iteration) main.py will continue from, by its own rule; None when there is nothing to
        continue (or nothing intact: then the start must fail, which counts)."""
        try:
            start, _ = expected_remote_start(self.parsed, self.url) if self.url else \
                decide_start(self.parsed, CheckpointStore(self.parsed.output_dir))
        except CheckpointError:
            return None
        if start.kind != "continue":
            return None
        return start.checkpoint["epoch"] + 1, start.checkpoint.get("iteration", 0)

    def start(self, workers=False, preexec_fn=None) -> tuple:
        """A rerun of the command in the chaos directory, and where main.py's rule says it must continue."""
        self.count += 1
        expected = self.expected_start()
        env = None
        if self.url:  # a new machine: an empty staging folder
            machine = self.workdir / "machines" / f"{self.count:02d}"
            self.workspace, env = machine_staging(self.url, machine), {"DINO_STAGING_DIR": str(machine)}
        self.stale = set(os.listdir(self.workspace)) if self.workspace.is_dir() else set()
        command = self.command(self.url or self.out, workers)
        self.current = Run(command, self.logs / f"{self.count:02d}.log", self.workspace, preexec_fn, env)
        return self.current, expected

    def abandon(self) -> None:
        """End the run in progress (the tool was interrupted): its processes are in a session of their own."""
        if self.current is not None:
            self.current.signal_all(signal.SIGKILL)

    def series(self) -> Board:
        kills = plan_kills(self.opts.kills, self.rng, self.markers, self.opts.signal, self.fallback_from)
        full_slot = self.rng.randint(1, len(kills)) if kills else None
        full_slot = None if self.url else full_slot  # a remote run's machine pulls checkpoint.pth past such a limit
        flip_slot = self.rng.randint(1, len(kills)) if kills and not self.opts.no_bit_flip else None
        flip = "no bit flip" if flip_slot is None else (f"after kill {flip_slot} (or the first later one that "
                                                        "leaves a numbered checkpoint to fall back to), a bit flip")
        full = "no file-size limit" if full_slot is None else f"after kill {full_slot}, a start under a file-size limit"
        full += f"; every start on a new machine, output_dir {self.url}" if self.url else ""
        say(f"plan (seed {self.opts.seed}): {len(kills)} kills; {full}; {flip}")
        kill_ok = None  # the last landed kill ended as it should; it survived if the next start continues right
        for slot, kill in enumerate(kills + [None]):
            if slot and slot == full_slot:
                kill_ok = self.settle(kill_ok, self.file_size_start())
            if slot and flip_slot is not None and slot >= flip_slot and not self.board.flips:
                self.flip()
            resume_ok, landed, ok, finished = self.one_start(kill)
            kill_ok = self.settle(kill_ok, resume_ok)
            if landed:
                kill_ok = ok
            if finished:
                if kill is not None:
                    say(f"the run finished before kill {self.board.landed + 1}: {self.board.landed} of {len(kills)} "
                        "planned kills landed")
                break
        left = self.files.temporary_files()  # a remote run's die with their machine
        for name in left:
            say(f"corrupt: temporary file left at the end: {name}")
        self.board.corrupt = len(self.files.corrupt) + len(left)
        self.board.differences = differences(self.workdir / "reference", self.out)
        for difference in self.board.differences:
            say(f"final state differs: {difference}")
        return self.board

    def one_start(self, kill: Optional[Kill]) -> tuple:
        """A start, killed as planned or (kill None) left to finish, judged and reported:
        (it continued right, the kill landed, it ended as it should, training finished)."""
        run, expected = self.start(workers=bool(kill and kill.workers))
        if kill is None:
            code, hung, _ = run.end(run.started + self.timeout)
            landed, ending, ok = False, f"ran to the end: exit {code}", code == 0
        else:
            landed, ending, ok, code, hung = self.kill(run, kill)
        resume_ok, said, failed = self.judge(run, expected, hung)
        finished = run.event("finished") is not None and not landed  # after a kill in the last writes: rerun
        if landed:
            self.board.landed += 1
            if not ok:
                failed.append(f"a SIG{kill.signal} should end it otherwise")
        elif not finished or (kill is None and code != 0):
            failed.append("ended by itself before the end of training" if not finished
                          else "a run that finishes must exit with code 0")
        self.report(run, said, ending, failed)
        return resume_ok, landed, ok, finished

    def judge(self, run: Run, expected, hung: bool) -> tuple:
        """(it continued right, what it said, its failures so far) of a start that has ended."""
        resume_ok, said = resumed(run.event("start"), expected)
        failed = [] if resume_ok else [f"expected to continue at {describe(expected)}"]
        if hung:
            failed.append("hung (killed)")
        return resume_ok, said, failed

    def settle(self, kill_ok, resume_ok):
        """The previous kill survived if it ended as it should and this start continued right."""
        if kill_ok is not None:
            self.board.survived += bool(kill_ok and resume_ok)
        return None

    def report(self, run: Run, said: str, ending: str, failed: List[str]) -> None:
        """One line per start; then any damaged checkpoint file it left."""
        if self.view is not None:
            self.view.sync()
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
            tmp = wait_for_temporary_file(self.workspace, self.stale, run, deadline)
            reached = bool(tmp)
        elif reached:
            reached = wait_in_window(run, kill.delay)
        run.catch_up()
        line, at = run.last_progress
        target = self.send(run, kill) if reached and run.alive() else ""
        sent = time.time()
        code, hung, leftover = run.end(deadline)
        if not target or (run.event("finished") and code == 0):
            aim = "the first checkpoint write" if kill.where == "a checkpoint write" else f"{kill.delay:.2f} s"
            return (False, f"kill {self.board.landed + 1} (SIG{kill.signal} aimed at {kill.where}, {aim} after "
                    f"'{kill.label}') did not land: exit {code}", False, code, hung)
        workers = " (with 2 workers)" if kill.workers else ""
        when = (f"in a checkpoint write ({tmp}{', left behind' if (self.workspace / tmp).exists() else ''})"
                if tmp else f"aimed at {kill.where}")
        if run.event("finished"):  # training had ended: the kill hit the last writes (a remote run's uploads)
            when = f"after training finished, in its last writes (aimed at {kill.where})"
        description = (f"kill {self.board.landed + 1}: SIG{kill.signal} to {target}{workers} {when}, {sent - at:.2f} s "
                       f"after '{line}', {sent - run.started:.1f} s after start: exit {code}"
                       + (f"; its leftover processes took {leftover:.1f} s to exit" if leftover > 0.5 else ""))
        return True, description, self.ended_as_killed(run, code, kill), code, hung

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

    def ended_as_killed(self, run: Run, code: int, kill: Kill) -> bool:
        rank_killed = self.opts.nproc > 1 and kill.signal == "KILL" and not kill.group
        if error_lines(run.output) and not rank_killed:
            return False
        if kill.signal == "KILL":
            return code == (1 if rank_killed else -9)
        if code == -signal.SIGTERM:
            return True
        return run.event("stopped") is not None and code == (3 if self.opts.nproc == 1 else 1)

    def file_size_start(self) -> bool:
        """A start under a file-size limit of half a checkpoint: its first save must fail cleanly.
        Returns whether it continued from the right place (it counts as a rerun)."""
        limit = self.checkpoint_size // 2
        latest = self.out / LATEST
        before = sha256(latest)
        run, expected = self.start(preexec_fn=limit_file_size(limit))
        code, hung, _ = run.end(run.started + self.timeout)
        resume_ok, said, failed = self.judge(run, expected, hung)
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
        if self.view is not None:
            self.view.sync()
        latest = self.out / LATEST
        numbered = numbered_checkpoints(self.out)[::-1] if latest.exists() else []
        fallback = next((name for name in numbered if loads(self.out / name)), None)
        if fallback is None:
            return
        size = latest.stat().st_size
        offset, bit = size // 2, self.rng.randrange(8)
        with open(latest, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ (1 << bit)]))
        if self.view is not None:
            self.view.upload(LATEST)
        self.files.flipped(LATEST)
        self.board.flips += 1
        try:
            load_checkpoint(latest)
            verdict = "load_checkpoint accepted it: the flip went unnoticed"
        except CheckpointError as e:
            self.board.flip_rejected = True
            verdict = f"load_checkpoint rejected it ({e}); {fallback} is there to fall back to"
        say(f"bit flip: checkpoint.pth byte {offset} of {size}, bit {bit}: {verdict}")
