"""The project's benchmark: model size, FLOPs, speed and memory, with every comparison measured in the same run.

    python -m tools.benchmark -c config/DINO/DINO_4scale.py [--size 320 480] [--batch 1] [--device cpu|cuda]
                             [--runs 5] [--threads 2] [--options k=v ...] [--against REV] [--json FILE]
    python -m tools.benchmark --demo [--against REV] [--repeats 2] [--targets 0.5 0.65] [--demo_options k=v ...]

run from the repository root. Timings are medians of --runs repeats (min-max) after one warm-up. Absolute times
move by 2x between days and machines, so every ratio compares two workloads timed in this run, in interleaved
rounds (A, B, A, B, ...): the attention core against the reference formula, the model against itself with the
reference core swapped in, under bfloat16 autocast (main.py --amp --options amp_dtype=bfloat16) and, for the
training step, as --no-deterministic runs it (the cost of determinism: on CUDA, the attention core's backward),
and with --against REV the code of git revision REV (checked out into a temporary worktree, removed at the end) against
ours, each side in a worker subprocess of this tool that builds the model with its own revision's code.
A ratio is the median (min-max) of the per-round ratios baseline time / our time: above 1 means ours is faster.
On CPU a training step is also timed op by op (KernelTimes): the time inside the matmul, convolution and attention
kernels, whose speed is the library's, bounds what any change that leaves their work as it is can win (with
--against REV: REV's step time / that time).
FLOPs count a multiply-add as 2 (FlopCounterMode's convention; papers quoting fvcore count it as 1); the
attention core's sampling, invisible to FlopCounterMode, is counted from its shapes (sampling_flops).

--demo trains the demo (main.py -c config/DINO/DINO_demo.py) for this tree and REV, back to back in alternating
order, and reports the wall time from each command's start until its log.txt showed the target APs.

    python -m tools.benchmark --eval_backends [--images 5000] [--runs 5] [--coco_path data/synthetic]

--eval_backends times COCO evaluation by pycocotools and by faster-coco-eval (eval_backends.py).

The modules import no module of the project when they are imported, only inside functions: a worker imports
the model code of its revision's tree (revisions.use_tree), which our modules must not have loaded before.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class BenchmarkError(Exception):
    """A problem the user can fix (a bad revision, config or option): reported as one line."""


def progress(message: str) -> None:
    print(f"benchmark: {message}", file=sys.stderr, flush=True)


def options_args(options) -> list:
    """The --options of a command line (main.py's and a worker's), or nothing when there are none."""
    return ["--options", *options] if options else []
