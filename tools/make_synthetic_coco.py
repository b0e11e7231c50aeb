"""Generate the synthetic shapes dataset in COCO layout.

    python tools/make_synthetic_coco.py --out data/synthetic [--num-train 2000 --num-val 200 --image-size 128 --seed 0]

Training with --dataset_file synthetic generates it on first use; this script is for doing it ahead of time.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.synthetic import generate_synthetic_coco  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="dataset root to create (must not exist, or be empty)")
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=200)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    started = time.time()
    generate_synthetic_coco(args.out, args.num_train, args.num_val, args.image_size, args.seed)
    areas, images = [], 0
    for split in ("train2017", "val2017"):
        with open(os.path.join(args.out, "annotations", f"instances_{split}.json")) as f:
            dataset = json.load(f)
        images += len(dataset["images"])
        areas += [a["area"] for a in dataset["annotations"]]
    small = 100 * sum(a < 32 * 32 for a in areas) / max(len(areas), 1)
    print(f"{args.out}: {images} images, {len(areas)} boxes, {small:.1f}% small (area < 32^2), "
          f"{time.time() - started:.1f} s")


if __name__ == "__main__":
    main()
