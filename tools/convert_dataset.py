"""Convert a Pascal VOC, YOLO or COCO dataset to the layout main.py --coco_path reads, checking it on the way.

    python tools/convert_dataset.py yolo data/my_yolo --out data/my_coco
    python tools/convert_dataset.py voc VOCdevkit/VOC2007 --out data/voc07 [--difficult ignore|keep|drop]
    python tools/convert_dataset.py coco exported/annotations.json --out data/mine --val-fraction 0.2 --seed 1

Images are linked (symbolic links to the source files), not copied, unless --copy. A source without a val split
is split (--val-fraction, default 0.1, --seed); one with a val split keeps it. Conventions: datasets/convert/
and docs/datasets.md. Exit code 2, with every problem listed and nothing written, when the data is unusable.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import convert  # noqa: E402
from datasets.validate import DatasetError  # noqa: E402


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=["voc", "yolo", "coco"])
    parser.add_argument("src", help="the dataset's folder (for yolo also its data.yaml, for coco also one .json)")
    parser.add_argument("--out", required=True, help="folder to create (must not exist, or be empty)")
    parser.add_argument("--val-fraction", type=fraction, help="share of images for val when the source has no val "
                        f"split (default {convert.DEFAULT_VAL_FRACTION}); refused when it has one")
    parser.add_argument("--seed", type=int, default=0, help="seed of the val split")
    parser.add_argument("--copy", action="store_true", help="copy the images instead of linking them")
    parser.add_argument("--classes", help="class names, one a line, in category id order (voc, yolo)")
    parser.add_argument("--difficult", choices=convert.DIFFICULT, default="ignore",
                        help="VOC objects marked difficult: ignore (iscrowd=1, neither trained on nor scored), "
                        "keep (ordinary boxes) or drop")
    opts = parser.parse_args(argv)
    report = convert.Report()
    try:
        convert.check_out(opts.out)
        source = convert.read_source(opts.format, opts.src, report, opts.classes, opts.difficult)
        for warning in report.warnings():
            print(f"warning: {warning}", file=sys.stderr)
        report.raise_errors(opts.src)
        splits, note = convert.final_splits(source, opts.val_fraction, opts.seed)
        methods = convert.write_coco_layout(splits, source.categories, opts.out, opts.copy)
    except (DatasetError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{opts.src} ({source.layout}) -> {opts.out}: images {', '.join(f'{n} {m}' for m, n in methods.items())}")
    if note:
        print(note)
    if report.clipped:
        print(f"{report.clipped} boxes reaching at most {convert.CLIP_PX} px beyond their image were clipped")
    print("\n".join(convert.summary(splits, source.categories, opts.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
