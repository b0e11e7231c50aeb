"""Plot training runs: losses, lr and AP per epoch from log.txt, per-class AP and precision-recall from the last
evaluation's detections. Several runs are overlaid, labelled with their folder names.

    python tools/plot_logs.py runs/demo runs/other --out curves.png [--ann instances_val2017.json] [--dump-json data.json]
                              [--per-class] [--coco_eval_backend faster]

--per-class adds a panel per run: each class's AP@[.5:.95] over the epochs, from log.txt's test_per_class_ap.

A resumed run's log.txt is one curve: when an epoch appears twice the later line wins. The per-class panels
need detections (main.py --save_results writes eval/results{epoch}.json, --eval --save_results eval/results.json;
the newest is used) and the ground truth: --ann, else the run's val_ann_file or coco_path/annotations/
instances_val2017.json from config_args_all.json.
"""
import argparse
import contextlib
import io
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoint.remote import Mirror, is_url  # noqa: E402
from datasets.coco_eval import BACKENDS, check_backend, coco_evaluation, per_class_ap  # noqa: E402
from util.run_dir import read_epochs  # noqa: E402

logger = logging.getLogger("dino.plot_logs")

COCO_NAMES = ("AP", "AP50", "AP75")


def epoch_series(records: list) -> dict:
    """{'epoch': [...], key: [...]} for every number logged, plus AP/AP50/AP75 (and ema_*) from the COCO stats and
    per_class_AP (and ema_per_class_AP), {class: [...]}. An epoch that lacks a key or a class has None there."""
    series = {"epoch": [r["epoch"] for r in records]}
    keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k != "epoch"})
    for key in keys:
        series[key] = [r.get(key) for r in records]
    for prefix in ("", "ema_"):
        stats = [r.get(f"{prefix}test_coco_eval_bbox") for r in records]
        if any(stats):
            for i, name in enumerate(COCO_NAMES):
                series[prefix + name] = [s[i] if s else None for s in stats]
        per_class = [r.get(f"{prefix}test_per_class_ap") or {} for r in records]
        if any(per_class):
            classes = dict.fromkeys(name for ap in per_class for name in ap)
            series[prefix + "per_class_AP"] = {name: [ap.get(name) for ap in per_class] for name in classes}
    return series


def latest_results(run_dir: str):
    """The newest eval/results*.json main.py wrote, or None."""
    folder = os.path.join(run_dir, "eval")
    if not os.path.isdir(folder):
        return None
    found = [os.path.join(folder, n) for n in os.listdir(folder) if re.fullmatch(r"results(\d{4})?\.json", n)]
    return max(found, key=lambda p: (os.path.getmtime(p), p)) if found else None


def ground_truth_file(run_dir: str, ann):
    """--ann, else what the run evaluated against (from config_args_all.json), or None."""
    if ann:
        return ann
    try:
        with open(os.path.join(run_dir, "config_args_all.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    candidate = saved.get("val_ann_file") or (
        saved.get("coco_path") and os.path.join(saved["coco_path"], "annotations", "instances_val2017.json"))
    return candidate if candidate and os.path.isfile(candidate) else None


def evaluation_curves(results_file: str, ann_file: str, backend: str) -> dict:
    """Per-class AP@[.5:.95] and the class-averaged precision-recall curves at IoU 0.5 and 0.75 (area all,
    100 detections), from the precision array of `backend`'s COCOeval."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress for every step
        gt = COCO(ann_file)
    evaluator = coco_evaluation(gt, results_file, backend)
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # IoU thresholds x recall x classes
    valid = np.where(precision > -1, precision, np.nan)  # -1: a class without ground truth
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the mean of an all-nan slice is nan, as wanted
        pr = {f"precision_iou{int(t * 100)}": np.nanmean(valid[i], axis=1)
              for i, t in enumerate(evaluator.params.iouThrs) if round(t * 100) in (50, 75)}
    return {"results_file": results_file, "ann_file": ann_file, "per_class_ap": per_class_ap(evaluator),
            "recall": evaluator.params.recThrs.tolist(),
            **{k: [_number(x) for x in v] for k, v in pr.items()}}


def _number(value):
    return None if np.isnan(value) else float(value)


def collect_series(run_dirs: list, ann, backend: str) -> dict:
    """Everything the figure shows: {run label: {'dir', 'series' (epoch_series), 'evaluation' (or None)}}."""
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    runs = {}
    for run_dir, name in zip(run_dirs, names):
        if is_url(run_dir):  # an output_dir on an object store: its logs and evaluations, copied here
            local = tempfile.mkdtemp(prefix="plot_logs-")
            Mirror(run_dir, local).pull(checkpoint=False)  # the logs and eval/ are all a plot needs
            run_dir = local
        log = os.path.join(run_dir, "log.txt")
        if not os.path.isfile(log):
            raise ValueError(f"{run_dir} has no log.txt: is it a main.py --output_dir?")
        records = read_epochs(run_dir)
        if not records:
            raise ValueError(f"{log} holds no complete epoch yet")
        label = name if names.count(name) == 1 else run_dir
        runs[label] = {"dir": run_dir, "series": epoch_series(records),
                       "evaluation": _evaluation(run_dir, ann, backend)}
    return runs


def _evaluation(run_dir: str, ann, backend: str):
    results, ann_file = latest_results(run_dir), ground_truth_file(run_dir, ann)
    if results is None or ann_file is None:
        logger.warning("warning: %s: no per-class AP or precision-recall: %s", run_dir,
                       "no eval/results*.json (train or evaluate with --save_results)" if results is None else
                       "ground truth not found (pass --ann FILE)")
        return None
    with open(results) as f:
        if not json.load(f):
            logger.warning("warning: %s holds no detections: no per-class AP or precision-recall", results)
            return None
    return evaluation_curves(results, ann_file, backend)


def plot(runs: dict, out: str, per_class: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 + (-(-len(runs) // 4) if per_class else 0)  # per class: a row of four runs' panels, or more rows
    fig, axes = plt.subplots(rows, 4, figsize=(22, 4.75 * rows), squeeze=False)
    panels = [("train_loss", "training loss", False), ("train_loss_", "training loss terms (last decoder layer)", True),
              ("test_loss", "test loss", False), ("test_loss_", "test loss terms (last decoder layer)", True)]
    for ax, (key, title, terms) in zip(axes[0], panels):
        for colour, (label, run) in _coloured(runs):
            series = run["series"]
            keys = [k for k in series if re.fullmatch(re.escape(key) + "[a-z]+", k)] if terms else [key]
            for style, k in zip(("-", "--", ":", "-."), keys):
                if k in series:
                    ax.plot(series["epoch"], series[k], style, color=colour, marker=".",
                            label=f"{label} {k[len(key):]}" if terms else label)
        _finish(ax, title, "loss")
    for colour, (label, run) in _coloured(runs):
        series = run["series"]
        if "train_lr" in series:
            axes[1, 0].plot(series["epoch"], series["train_lr"], color=colour, marker=".", label=label)
        for style, name in zip(("-", "--", ":"), COCO_NAMES):
            for prefix, alpha in (("", 1.0), ("ema_", 0.5)):
                if prefix + name in series:
                    axes[1, 1].plot(series["epoch"], series[prefix + name], style, color=colour, alpha=alpha,
                                    marker=".", label=f"{label} {prefix}{name}")
    axes[1, 0].set_yscale("log")
    _finish(axes[1, 0], "learning rate", "lr")
    _finish(axes[1, 1], "bbox AP (COCO)", "AP")
    _plot_evaluations(axes[1, 2], axes[1, 3], runs)
    if per_class:
        _plot_per_class(axes[2:].ravel(), runs)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _coloured(runs: dict):
    return [(f"C{i}", item) for i, item in enumerate(runs.items())]


def _finish(ax, title: str, ylabel: str, xlabel: str = "epoch") -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _plot_evaluations(bars_ax, pr_ax, runs: dict) -> None:
    evaluated = [(colour, label, run["evaluation"]) for colour, (label, run) in _coloured(runs) if run["evaluation"]]
    if not evaluated:
        for ax in (bars_ax, pr_ax):
            ax.text(0.5, 0.5, "no evaluation results\n(main.py --save_results)", ha="center", va="center")
            ax.set_axis_off()
        return
    classes = list(dict.fromkeys(c for _, _, e in evaluated for c in e["per_class_ap"]))
    width = 0.8 / len(evaluated)
    for i, (colour, label, evaluation) in enumerate(evaluated):
        values = [evaluation["per_class_ap"].get(c) or 0.0 for c in classes]
        bars_ax.bar(np.arange(len(classes)) + (i - (len(evaluated) - 1) / 2) * width, values, width, color=colour,
                    label=f"{label} ({os.path.basename(evaluation['results_file'])})")
        for style, key in (("-", "precision_iou50"), ("--", "precision_iou75")):
            precision = [np.nan if p is None else p for p in evaluation[key]]
            pr_ax.plot(evaluation["recall"], precision, style, color=colour, label=f"{label} IoU {key[-2:]}")
    bars_ax.set_xticks(np.arange(len(classes)), classes, rotation=90 if len(classes) > 8 else 0)
    _finish(bars_ax, "per-class AP@[.5:.95], last evaluation", "AP", xlabel="")
    _finish(pr_ax, "precision-recall, last evaluation (mean over classes)", "precision", xlabel="recall")


def _plot_per_class(axes, runs: dict) -> None:
    """A panel per run: each class's AP@[.5:.95] per epoch (a class without ground truth leaves a gap)."""
    for ax, (label, run) in zip(axes, runs.items()):
        series = run["series"]
        for name, values in series.get("per_class_AP", {}).items():
            ax.plot(series["epoch"], [np.nan if v is None else v for v in values], marker=".", label=name)
        if "per_class_AP" not in series:
            ax.text(0.5, 0.5, "no test_per_class_ap in log.txt", ha="center", va="center")
        _finish(ax, f"{label}: per-class AP@[.5:.95]", "AP")
    for ax in axes[len(runs):]:
        ax.set_axis_off()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="main.py output directories")
    parser.add_argument("--out", default="training_curves.png", help="the figure (.png, .pdf, .svg)")
    parser.add_argument("--ann", help="ground-truth COCO annotations for the per-class panels")
    parser.add_argument("--dump-json", metavar="FILE", help="also write the plotted numbers as JSON")
    parser.add_argument("--per-class", action="store_true", help="also plot each class's AP per epoch, per run")
    parser.add_argument("--coco_eval_backend", default="pycocotools", choices=BACKENDS,
                        help="what scores the detections of the per-class panels (as main.py's config key)")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if opts.ann and not os.path.isfile(opts.ann):
            raise ValueError(f"--ann {opts.ann} does not exist")
        check_backend(opts.coco_eval_backend)
        runs = collect_series(opts.runs, opts.ann, opts.coco_eval_backend)
        plot(runs, opts.out, opts.per_class)
        if opts.dump_json:
            with open(opts.dump_json, "w") as f:
                json.dump(runs, f, indent=1)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
