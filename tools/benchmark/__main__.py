"""The command line: `python -m tools.benchmark ...` (see the package's docstring), and the workers' entry."""
import argparse
import json
import sys
from pathlib import Path

import torch

import tools.benchmark
from tools.benchmark import ROOT, BenchmarkError
from tools.benchmark.demo import demo
from tools.benchmark.eval_backends import eval_backends
from tools.benchmark.model import benchmark
from tools.benchmark.revisions import resolve_revision, worker_main

DEMO_CONFIG = "config/DINO/DINO_demo.py"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.benchmark", description=tools.benchmark.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_file", "-c", dest="config", default=None,
                   help="model config (default: config/DINO/DINO_4scale.py; with --demo: the demo's)")
    p.add_argument("--options", nargs="+", default=None, help="config overrides, as main.py's --options k=v")
    p.add_argument("--size", nargs=2, type=int, default=[320, 480], metavar=("H", "W"), help="image size")
    p.add_argument("--batch", type=int, default=1, help="images per forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--runs", type=int, default=5, help="timed repeats of each measurement")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (OMP_NUM_THREADS of the demo runs)")
    p.add_argument("--against", default=None, metavar="REV", help="also time this git revision, e.g. c89fd32")
    p.add_argument("--json", default=None, metavar="FILE", help="write every number here")
    p.add_argument("--demo", action="store_true", help="time the demo's training to the --targets APs")
    p.add_argument("--repeats", type=int, default=2, help="--demo: trainings per revision")
    p.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.65], help="--demo: bbox APs to time")
    p.add_argument("--demo_options", nargs="+", default=None, help="--demo: main.py --options for every run")
    p.add_argument("--coco_path", default=str(ROOT / "data" / "synthetic"),
                   help="--demo, --eval_backends: the demo's dataset folder")
    p.add_argument("--eval_backends", action="store_true",
                   help="time COCO evaluation by pycocotools and faster-coco-eval on the same made-up detections")
    p.add_argument("--images", type=int, default=5000, help="--eval_backends: images of the generated set")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: time the tree at this root
    return p


def main(argv=None) -> None:
    opts = get_args_parser().parse_args(argv)
    opts.config = opts.config or (DEMO_CONFIG if opts.demo else "config/DINO/DINO_4scale.py")
    if opts.worker:
        return worker_main(opts)
    sys.path.insert(0, str(ROOT))
    try:
        if min(opts.runs, opts.repeats, opts.batch, opts.threads, opts.images, *opts.size) < 1:
            raise BenchmarkError("--runs, --repeats, --batch, --threads, --images and --size must be at least 1")
        if opts.against:
            resolve_revision(opts.against)  # fail before the measurements, not after
        results = eval_backends(opts) if opts.eval_backends else demo(opts) if opts.demo else benchmark(opts)
    except (BenchmarkError, ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"benchmark: error: {e}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
