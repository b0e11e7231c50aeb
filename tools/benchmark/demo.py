"""The demo race: the demo's training for this tree and REV, back to back in alternating order, timed from each
command's start until its log.txt showed the target APs."""
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tools.benchmark import ROOT, BenchmarkError, options_args, progress
from tools.benchmark.report import number
from tools.benchmark.revisions import in_tree, revision_worktree
from tools.benchmark.timing import summary

# Variables that lower the instruction set torch uses, and so whether bfloat16 is native.
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def best_ap(record: dict) -> float:
    """An epoch's bbox AP: of its best weights, the EMA's when the run keeps an EMA (use_ema) and it is better,
    as checkpoint_best_ema.pth holds them from then on."""
    return max(record["test_coco_eval_bbox"][0], record.get("ema_test_coco_eval_bbox", [-1.0])[0])


def time_to_ap(epochs: list, target: float):
    """Seconds from the command's start until the log showed an epoch with bbox AP >= target; None if never."""
    return next((e["seen_s"] for e in epochs if e["ap"] >= target), None)


def demo_run(label, root, opts, out_dir: Path) -> dict:
    """One demo training of the tree at root, its log.txt watched while it runs to date each epoch's line."""
    from util.run_dir import read_log  # our tree's reader (a line still being written is skipped till complete)
    out_dir.mkdir(parents=True)
    cmd = [sys.executable, "main.py", "-c", in_tree(root, opts.config), "--output_dir", str(out_dir),
           "--coco_path", str(opts.coco_path)] + options_args(opts.demo_options)
    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads)}
    started = time.perf_counter()
    seen = []
    with open(out_dir / "output.txt", "w") as output:
        proc = subprocess.Popen(cmd, cwd=root, stdout=output, stderr=subprocess.STDOUT, env=env)
        while True:
            finished = proc.poll() is not None
            records = read_log(str(out_dir), quiet=True)
            seen += [time.perf_counter() - started] * (len(records) - len(seen))
            if finished:
                break
            time.sleep(0.2)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (out_dir / "output.txt").read_text().strip().splitlines()[-20:]
        print("\n".join(tail), file=sys.stderr)
        raise BenchmarkError(f"the demo training of {label} exited with code {proc.returncode} (its output above)")
    epochs = [{"epoch": r["epoch"], "epoch_time": r["epoch_time"], "ap": best_ap(r), "seen_s": s}
              for r, s in zip(records, seen)]
    return {"revision": label, "wall_s": wall, "epochs": epochs,
            "time_to_ap": {str(t): time_to_ap(epochs, t) for t in opts.targets}}


def schedule(labels: list, repeats: int) -> list:
    """(repeat, label) in running order: the order alternates, so no revision always runs first."""
    return [(r, label) for r in range(repeats) for label in (labels if r % 2 == 0 else labels[::-1])]


def demo_summary(values: list):
    """median/min/max of the runs' values, or how many runs have none (a target not reached)."""
    missing = sum(v is None for v in values)
    return summary(values) if not missing else {"not_reached": missing, "runs": len(values)}


def _cell(stats: dict) -> str:
    if "not_reached" in stats:
        return f"not reached ({stats['not_reached']} of {stats['runs']} runs)"
    return f"{number(stats['median'])} ({number(stats['min'])}-{number(stats['max'])})"


def prepare_demo_data(opts) -> None:
    """Generate the demo's dataset before any timed run, so that no run pays for it."""
    from datasets.synthetic import ensure_synthetic_coco
    from main import parse_args
    args = parse_args(["-c", opts.config, "--coco_path", str(opts.coco_path)] + options_args(opts.demo_options))
    if args.dataset_file == "synthetic":
        ensure_synthetic_coco(args.coco_path, args.synthetic_num_train, args.synthetic_num_val,
                              args.synthetic_image_size, seed=0)


def cpu_facts() -> dict:
    """What decides the demo's precision on this CPU, as its runs see it (they inherit this environment):
    torch's instruction set, bfloat16's measured slow-down, and any variable that lowers the instruction set."""
    from util.precision import NATIVE_AT_MOST, bfloat16_slowdown
    slowdown = bfloat16_slowdown()
    return {"capability": torch.backends.cpu.get_cpu_capability(), "bfloat16_slowdown": slowdown,
            "bfloat16": "native" if slowdown <= NATIVE_AT_MOST else "emulated",
            "limits": {k: os.environ[k] for k in ISA_LIMITS if k in os.environ}}


def demo(opts) -> dict:
    """Train the demo for ours and --against REV, and print how long each took to reach the target APs."""
    progress(f"preparing the data in {opts.coco_path}")
    prepare_demo_data(opts)
    cpu = cpu_facts()
    labels, runs = demo_runs(opts)
    print_runs(opts, cpu, runs)
    summaries = print_summary(opts, labels, runs)
    return {"demo": {"config": opts.config, "options": opts.demo_options or [], "threads": opts.threads, "cpu": cpu,
                     "targets": opts.targets, "against": opts.against, "runs": runs, "summary": summaries}}


def demo_runs(opts):
    """(labels, runs): opts.repeats demo trainings of ours and of --against REV (in a temporary worktree), in
    schedule's order."""
    with contextlib.ExitStack() as stack:
        trees = {"ours": ROOT}
        if opts.against:
            trees[opts.against] = stack.enter_context(revision_worktree(opts.against))[0]
        out = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        runs = []
        for repeat, label in schedule(list(trees), opts.repeats):
            progress(f"demo training, {label}, repeat {repeat + 1} of {opts.repeats}")
            run = demo_run(label, trees[label], opts, out / f"{label.replace('/', '_')}-{repeat}")
            runs.append({"repeat": repeat, **run})
    return list(trees), runs


def print_runs(opts, cpu, runs) -> None:
    """The setup, the CPU's kind (which decides the demo's precision) and one row per training."""
    print(f"# demo: {' '.join([opts.config, *(opts.demo_options or [])])}, {opts.threads} threads, {opts.repeats} "
          f"repeats in alternating order; seconds from each command's start until its log.txt showed the AP")
    limits = " ".join(f"{k}={v}" for k, v in cpu["limits"].items())
    print(f"# CPU: torch capability {cpu['capability']}{', limited by ' + limits if limits else ''}; bfloat16 "
          f"{cpu['bfloat16']} ({cpu['bfloat16_slowdown']:.1f}x float32's time in util.precision's probe)")
    print("| repeat | revision | " + " | ".join(f"AP {t} at s" for t in opts.targets) + " | final AP | wall s |")
    print("|---|---|" + "---|" * len(opts.targets) + "---|---|")
    for r in runs:
        reached = [number(r["time_to_ap"][str(t)]) if r["time_to_ap"][str(t)] is not None else "not reached"
                   for t in opts.targets]
        final = number(r["epochs"][-1]["ap"]) if r["epochs"] else "-"
        print(f"| {r['repeat'] + 1} | {r['revision']} | {' | '.join(reached)} | {final} | {number(r['wall_s'])} |")


def print_summary(opts, labels, runs) -> dict:
    """Per revision, the median (min-max) of its runs' times to the APs, final AP and wall time: printed and
    returned."""
    rows = {f"time to AP {t}, s": lambda r, t=t: r["time_to_ap"][str(t)] for t in opts.targets}
    rows["final AP"] = lambda r: r["epochs"][-1]["ap"] if r["epochs"] else None
    rows["wall time of the run, s"] = lambda r: r["wall_s"]
    summaries = {what: {label: demo_summary([value(r) for r in runs if r["revision"] == label]) for label in labels}
                 for what, value in rows.items()}
    print()
    print("| what | " + " | ".join(f"{label} median (min-max)" for label in labels) + " |")
    print("|---|" + "---|" * len(labels))
    for what, cells in summaries.items():
        print(f"| {what} | " + " | ".join(_cell(stats) for stats in cells.values()) + " |")
    return summaries
