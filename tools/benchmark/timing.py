"""Timing: medians and per-round ratios of interleaved rounds, so that a shared machine's drift hits both sides."""
import statistics
import time

import torch


def summary(samples) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": list(samples)}


def median_time(fn, runs: int) -> float:
    """Median wall time of `runs` calls after one warm-up call."""
    return statistics.median(interleaved({"fn": timer(fn)}, runs)["fn"])


def timer(fn, device: str = "cpu"):
    """fn -> a function that calls it and returns the seconds it took (queued CUDA work included)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed():
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start
    return timed


def interleaved(timed: dict, runs: int) -> dict:
    """One warm-up call of each, then `runs` rounds that call each in turn: {name: [seconds per round]}.

    Alternating rounds expose every workload to the same drift of a shared machine, so their ratio holds."""
    for fn in timed.values():
        fn()
    times = {name: [] for name in timed}
    for _ in range(runs):
        for name, fn in timed.items():
            times[name].append(fn())
    return times


def ratio(baseline, ours) -> dict:
    """Per-round ratios baseline / ours of interleaved rounds."""
    return summary([b / o for b, o in zip(baseline, ours)])
