"""How long training pauses for a checkpoint, synchronous against asynchronous, and how long a load takes.

    python tools/benchmark_checkpoint.py [--runs 5] [--demo_log runs/demo/log.txt]

For the full training state (model, AdamW moments, RNG, args) of DINO-4scale R50 and of the demo model, in
interleaved rounds: the synchronous pause (seal + atomic write with fsync, what training would wait for), the
asynchronous pause (the copy to host memory that training.trainer.Trainer.save makes before a background thread
writes it), their ratio per round, and load_checkpoint (integrity check + weights_only load). Medians of --runs
with min-max. With --demo_log, the demo's pauses are put against its measured epoch time.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoint.format import load_checkpoint, plain_args, seal, snapshot, write_bytes  # noqa: E402
from cli import parse_args  # noqa: E402
from models import build_model  # noqa: E402
from training.optim import build_optimizer, build_scheduler  # noqa: E402
from training.progress import Layout, Progress  # noqa: E402
from util.ema import build_ema  # noqa: E402
from util.rng import capture_rng_state  # noqa: E402


def _state(config: str) -> dict:
    args = parse_args(["-c", config, "--device", "cpu"])
    model, _, _ = build_model(args)
    optimizer = build_optimizer(model, args)
    for p in model.parameters():  # give AdamW its moment buffers, as after a real step
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    optimizer.step()
    ema = build_ema(model, args.ema_decay, args.ema_warmup_iters) if args.use_ema else None  # the demo keeps one
    layout = Layout(1, args.batch_size, args.accumulate_steps, args.accumulate_steps, args.seed, 1)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "lr_scheduler": build_scheduler(optimizer, args, 1).state_dict(), "args": plain_args(args),
             **Progress(epoch=1).to_state(layout, [capture_rng_state()])}
    if ema is not None:
        state["ema_model"] = ema.state_dict()
    return state


def _interleaved(runs: int, **workloads):
    """{name: [seconds per round]}, the workloads taking turns in every round after one warm-up round."""
    times = {name: [] for name in workloads}
    for round_ in range(runs + 1):
        for name, work in workloads.items():
            started = time.perf_counter()
            work()
            if round_:
                times[name].append(time.perf_counter() - started)
    return times


def _summary(values) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--demo_log", default="runs/demo/log.txt")
    opts = parser.parse_args()
    print("| checkpoint | size MB | synchronous pause s | asynchronous pause s | async / sync | load s |")
    print("|---|---|---|---|---|---|")
    pauses = {}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        path = Path(tmp) / "checkpoint.pth"
        for name, config in (("DINO-4scale R50", "config/DINO/DINO_4scale.py"), ("demo", "config/DINO/DINO_demo.py")):
            state = _state(config)
            times = _interleaved(opts.runs, sync=lambda: write_bytes(seal(state), path),
                                 snapshot=lambda: snapshot(state), load=lambda: load_checkpoint(path))
            ratios = [a / s for a, s in zip(times["snapshot"], times["sync"])]
            pauses[name] = (statistics.median(times["sync"]), statistics.median(times["snapshot"]))
            print(f"| {name} | {path.stat().st_size / 2**20:.1f} | {_summary(times['sync'])} | "
                  f"{_summary(times['snapshot'])} | {100 * statistics.median(ratios):.0f}% "
                  f"({100 * min(ratios):.0f}-{100 * max(ratios):.0f}%) | {_summary(times['load'])} |")
    log = Path(opts.demo_log)
    if log.exists():
        epoch_times = [json.loads(line)["epoch_time"] for line in log.read_text().splitlines() if line.strip()]
        epoch_s = statistics.median(epoch_times)
        sync, asynchronous = (2 * p for p in pauses["demo"])  # checkpoint.pth before and after the evaluation
        print(f"demo: two saves per epoch pause training {sync:.3f} s synchronously, {asynchronous:.3f} s "
              f"asynchronously, of a {epoch_s:.0f} s epoch ({100 * asynchronous / epoch_s:.2f}%; epoch time: "
              f"median over {log})")


if __name__ == "__main__":
    main()
