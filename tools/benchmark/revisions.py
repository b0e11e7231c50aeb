"""Other revisions: a temporary git worktree of REV, and workers that time a tree's model in a subprocess of our
benchmark code with that tree's model code, so that two revisions are timed in the same interleaved rounds."""
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from tools.benchmark import ROOT, BenchmarkError, options_args, progress
from tools.benchmark.timing import timer
from tools.benchmark.workloads import Workload


def resolve_revision(rev: str) -> str:
    found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        raise BenchmarkError(f"--against {rev}: not a commit of the repository at {ROOT} (try git log --oneline)")
    return found.stdout.strip()


@contextlib.contextmanager
def revision_worktree(rev: str):
    """A temporary `git worktree` of rev: (its root, its commit); removed at the end."""
    commit = resolve_revision(rev)
    path = Path(tempfile.mkdtemp(prefix="benchmark-")) / rev.replace("/", "_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit],
                   check=True, capture_output=True)
    progress(f"worktree of {rev} ({commit[:9]}) at {path}")
    try:
        yield path, commit
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], capture_output=True)
        shutil.rmtree(path.parent, ignore_errors=True)
        progress(f"worktree {path} removed")


def in_tree(root: Path, config: str) -> str:
    """The config path for the tree at root: a file of this repository names the same file there."""
    path = Path(config).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


class Worker:
    """`python -m tools.benchmark --worker ROOT` in a subprocess: builds the workload with ROOT's code and times
    on request. It starts in our root, where -m finds our package (an older tree has its own tools/benchmark.py),
    and then moves to ROOT's tree (use_tree)."""

    def __init__(self, label, root, opts, log_dir):
        self.label = label
        self.errors = open(Path(log_dir) / f"{label}.stderr", "w+")
        cmd = [sys.executable, "-m", "tools.benchmark", "--worker", str(root), "-c", in_tree(root, opts.config),
               "--size", *map(str, opts.size), "--batch", str(opts.batch), "--device", opts.device,
               "--threads", str(opts.threads)] + options_args(opts.options)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.errors, text=True)
        self._reply()

    def timed(self, what: str):
        def ask():
            self.proc.stdin.write(what + "\n")
            self.proc.stdin.flush()
            return self._reply()["s"]
        return ask

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.errors.seek(0)
            last = (self.errors.read().strip().splitlines() or ["no message"])[-1]
            raise BenchmarkError(f"the worker timing {self.label} exited with code {self.proc.wait()}: {last}")
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()
        self.errors.close()


def use_tree(root: Path) -> None:
    """Make the tree at root the only project code this process imports, as root's own main.py would see it: root
    first on sys.path and the working directory, and our root off sys.path, or a module that root lacks
    (training/ in revisions before it) would be imported from our tree."""
    sys.path[:] = [str(root)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    os.chdir(root)


def worker_main(opts) -> None:
    """Reads 'eval' or 'train' lines, answers each with {"s": seconds of one call} on stdout."""
    use_tree(Path(opts.worker))
    replies, sys.stdout = sys.stdout, sys.stderr  # whatever the revision prints goes to stderr
    torch.set_num_threads(opts.threads)
    try:
        work = Workload(opts.config, opts.options, opts.size, opts.batch, opts.device)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"{type(e).__name__}: {e}")
    jobs = {"eval": timer(work.eval_forward, opts.device), "train": timer(work.train_step, opts.device),
            "eval_bf16": timer(lambda: work.eval_forward(torch.bfloat16), opts.device),
            "train_bf16": timer(lambda: work.train_step(torch.bfloat16), opts.device)}
    print(json.dumps({"ready": True}), file=replies, flush=True)
    for line in sys.stdin:
        print(json.dumps({"s": jobs[line.strip()]()}), file=replies, flush=True)
