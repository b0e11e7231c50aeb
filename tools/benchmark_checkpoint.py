"""How long a checkpoint save and load take, and what a save costs a training epoch.

    python tools/benchmark_checkpoint.py [--runs 5] [--demo_log runs/demo/log.txt]

Saves the full training state (model, AdamW moments, RNG, args) of DINO-4scale R50 and of the demo model
with util.checkpoint.atomic_save (fsync included) and reads it back with load_checkpoint (weights_only).
Medians of --runs. With --demo_log, the demo's save time is put against its measured epoch time.
"""
import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from main import _optimizer, _scheduler, parse_args  # noqa: E402
from tools.benchmark import median_time  # noqa: E402
from models import build_model  # noqa: E402
from util.checkpoint import atomic_save, load_checkpoint, training_state  # noqa: E402
from util.rng import capture_rng_state  # noqa: E402


def _state(config: str) -> dict:
    args = parse_args(["-c", config, "--device", "cpu"])
    args.world_size = 1
    model, _, _ = build_model(args)
    optimizer = _optimizer(model, args)
    for p in model.parameters():  # give AdamW its moment buffers, as after a real step
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    optimizer.step()
    return training_state(model, optimizer, _scheduler(optimizer, args, 1), None, None, epoch=0, iteration=0,
                          samples_done=0, num_samples=1, iterations=1, args=args, best={}, meters={},
                          rng_states=[capture_rng_state()], facts={})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--demo_log", default="runs/demo/log.txt")
    opts = parser.parse_args()
    print(f"{'checkpoint':<28}{'size MB':>9}{'save s':>9}{'load s':>9}")
    results = {}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for name, config in (("DINO-4scale R50", "config/DINO/DINO_4scale.py"), ("demo", "config/DINO/DINO_demo.py")):
            path = Path(tmp) / "checkpoint.pth"
            state = _state(config)
            save_s = median_time(lambda: atomic_save(state, path), opts.runs)
            load_s = median_time(lambda: load_checkpoint(path), opts.runs)
            results[name] = save_s
            print(f"{name:<28}{path.stat().st_size / 2**20:>9.1f}{save_s:>9.3f}{load_s:>9.3f}")
    log = Path(opts.demo_log)
    if log.exists():
        epoch_times = [json.loads(line)["epoch_time"] for line in log.read_text().splitlines() if line.strip()]
        epoch_s = statistics.median(epoch_times)
        stall = 3 * results["demo"]  # checkpoint.pth + checkpoint{epoch}.pth + checkpoint_best_regular.pth
        print(f"demo: an epoch end writes up to 3 files, {stall:.3f} s of a {epoch_s:.0f} s epoch = "
              f"{100 * stall / epoch_s:.2f}% (epoch time: median over {log})")


if __name__ == "__main__":
    main()
