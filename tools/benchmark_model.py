"""Time the official DINO-4scale R50 on CPU: eval forward and one full training step (DN, loss, backward, AdamW).

    python tools/benchmark_model.py [--runs 5 --threads 2 --height 320 --width 480]

Prints medians of --runs timed repetitions (after one warm-up) and the ratio to the official code's
figures measured on this kind of machine (../shared/README.md: 1.78-1.87 s eval, 5.96-6.37 s train step),
plus the attention core against the reference formula, both timed in this run.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from main import parse_args  # noqa: E402
from models import build_model  # noqa: E402
from models.ops import multi_scale_deformable_attn  # noqa: E402
from util.misc import nested_tensor_from_tensor_list  # noqa: E402

OFFICIAL_EVAL_S = 1.83  # midpoint of the official code's 1.78-1.87 s
OFFICIAL_TRAIN_S = 6.1  # midpoint of 5.96-6.37 s


def median_time(fn, runs: int, spread: list = None) -> float:
    """Median wall time of `runs` calls after one warm-up call; (min, max) go to `spread` if given."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    if spread is not None:
        spread.append((min(times), max(times)))
    return statistics.median(times)


def reference_core(value, shapes, locations, weights):
    """The attention core written as the official pure-PyTorch formula (stack, multiply, sum): the baseline."""
    n, _, m, d = value.shape
    _, lq, _, levels, points, _ = locations.shape
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = values[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    w_ = weights.transpose(1, 2).reshape(n * m, 1, lq, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * w_).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--width", type=int, default=480)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)

    args = parse_args(["-c", "config/DINO/DINO_4scale.py", "--device", "cpu"])
    model, criterion, _ = build_model(args)
    samples = nested_tensor_from_tensor_list([torch.randn(3, opts.height, opts.width)])
    targets = [{"labels": torch.tensor([1, 5, 17, 44, 62]),
                "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2], [0.5, 0.7, 0.1, 0.1],
                                       [0.2, 0.8, 0.2, 0.2], [0.8, 0.2, 0.15, 0.3]])}]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)

    def eval_forward():
        model.eval()
        with torch.no_grad():
            model(samples)

    def train_step():
        model.train()
        loss = criterion.total_loss(criterion(model(samples, targets), targets))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()

    spreads = []
    eval_s = median_time(eval_forward, opts.runs, spreads)
    train_s = median_time(train_step, opts.runs, spreads)

    shapes = [(opts.height // s, opts.width // s) for s in (8, 16, 32)]
    shapes.append(((shapes[-1][0] + 1) // 2, (shapes[-1][1] + 1) // 2))
    tokens = sum(h * w for h, w in shapes)
    value = torch.randn(1, tokens, 8, 32, requires_grad=True)
    locations = torch.rand(1, tokens, 8, 4, 4, 2, requires_grad=True)
    weights = torch.rand(1, tokens, 8, 4, 4).softmax(-1).requires_grad_(True)
    grad = torch.randn(1, tokens, 256)

    def core(fn):
        return lambda: fn(value, shapes, locations, weights).backward(grad)

    ref_core_s = median_time(core(reference_core), opts.runs)
    our_core_s = median_time(core(multi_scale_deformable_attn), opts.runs, spreads)

    print(f"DINO-4scale R50, {opts.height}x{opts.width}, batch 1, {opts.threads} threads, median of {opts.runs} runs")
    print(f"{'what':<44}{'baseline s':>12}{'ours s':>10}{'speed-up':>10}{'ours min-max s':>18}")
    rows = [("eval forward (baseline: official code)", OFFICIAL_EVAL_S, eval_s),
            ("train step, DN 5 boxes (baseline: official)", OFFICIAL_TRAIN_S, train_s),
            (f"MSDA core fwd+bwd, encoder, {tokens} queries", ref_core_s, our_core_s)]
    for (name, base, ours), (low, high) in zip(rows, spreads):
        print(f"{name:<44}{base:>12.3f}{ours:>10.3f}{base / ours:>9.2f}x{low:>11.3f}-{high:.3f}")


if __name__ == "__main__":
    main()
