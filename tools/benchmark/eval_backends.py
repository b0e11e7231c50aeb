"""--eval_backends: COCO evaluation by pycocotools against faster-coco-eval (config key coco_eval_backend) on the
same detections, on the demo's validation set (--coco_path) and on a generated COCO-sized one (--images, 80
classes).

The detections are made up, so no model is needed: each ground-truth box is found with probability 0.9, jittered
by 10% of its size and given the wrong class one time in ten, and false positives fill each image up to 100
detections (the demo's num_select), scores random (fixed seeds). What is timed is what main.py runs after each
epoch: CocoEvaluator.accumulate() and summarize(), from the collected detections to the 12 numbers and per-class
AP, both backends in interleaved rounds."""
import contextlib
import io
import os

import numpy as np
import torch

from tools.benchmark import BenchmarkError, progress
from tools.benchmark.report import Table
from tools.benchmark.timing import interleaved, ratio, summary, timer

DETECTIONS_PER_IMAGE = 100
IMAGE_SIZE = np.array([640, 480])


def generated_ground_truth(images: int, categories: int = 80, seed: int = 0) -> dict:
    """COCO annotations without pixels, shaped like COCO's validation set: 640x480 images holding 0-14 boxes
    (7 on average) of `categories` classes, sides log-uniform from 8 to 400 px (a quarter of them small)."""
    rng = np.random.default_rng(seed)
    annotations = []
    for image_id in range(1, images + 1):
        count = int(rng.integers(0, 15))
        wh = np.minimum(np.exp(rng.uniform(np.log(8), np.log(400), (count, 2))), IMAGE_SIZE)
        xy = rng.uniform(0, 1, (count, 2)) * (IMAGE_SIZE - wh)
        for (x, y), (w, h), category in zip(xy, wh, rng.integers(1, categories + 1, count)):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(category),
                                "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h),
                                "iscrowd": 0})
    return {"images": [{"id": i, "width": int(IMAGE_SIZE[0]), "height": int(IMAGE_SIZE[1])}
                       for i in range(1, images + 1)],
            "annotations": annotations,
            "categories": [{"id": c, "name": f"class{c}"} for c in range(1, categories + 1)]}


def made_up_detections(coco_gt, seed: int = 1) -> dict:
    """image id -> {'boxes' (xyxy), 'scores', 'labels'}, as the postprocessor hands them to CocoEvaluator.update
    (see the module's docstring); the labels are category ids, drawn from every category of coco_gt."""
    rng = np.random.default_rng(seed)
    category_ids = np.array(sorted(coco_gt.cats))
    detections = {}
    for image_id in sorted(coco_gt.imgs):
        anns = coco_gt.imgToAnns[image_id]
        found = [a for a in anns if rng.random() < 0.9]
        xywh = np.array([a["bbox"] for a in found], dtype=np.float64).reshape(-1, 4)
        xywh += rng.normal(0, 0.1, xywh.shape) * xywh[:, [2, 3, 2, 3]]
        labels = np.array([a["category_id"] for a in found], dtype=np.int64)
        wrong = rng.random(len(labels)) < 0.1
        labels[wrong] = rng.choice(category_ids, int(wrong.sum()))
        size = np.array([coco_gt.imgs[image_id]["width"], coco_gt.imgs[image_id]["height"]])
        false = max(0, DETECTIONS_PER_IMAGE - len(found))
        wh = rng.uniform(0.02, 0.5, (false, 2)) * size
        xywh = np.vstack([xywh, np.hstack([rng.uniform(0, 1, (false, 2)) * (size - wh), wh])])
        detections[image_id] = {
            "boxes": torch.from_numpy(np.hstack([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]])),
            "scores": torch.from_numpy(np.concatenate([rng.uniform(0.3, 1, len(found)), rng.uniform(0, 0.6, false)])),
            "labels": torch.from_numpy(np.concatenate([labels, rng.choice(category_ids, false)]))}
    return detections


def indexed(dataset: dict):
    """A pycocotools COCO over an annotation dict, built quietly."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def demo_validation_set(coco_path: str):
    ann_file = os.path.join(coco_path, "annotations", "instances_val2017.json")
    if not os.path.isfile(ann_file):
        raise BenchmarkError(f"{ann_file} does not exist: generate the demo's dataset with python "
                             f"tools/make_synthetic_coco.py --out {coco_path}, or pass --coco_path")
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(ann_file)


def _evaluate(evaluator) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.accumulate()
        evaluator.summarize()


def eval_backends(opts) -> dict:
    """Times both backends on each dataset and prints a table per dataset; returns their rows."""
    from datasets.coco_eval import BACKENDS, CocoEvaluator, check_backend

    check_backend("faster")
    datasets = {f"the demo's validation set ({opts.coco_path})": demo_validation_set(opts.coco_path),
                f"a generated set of {opts.images} images": indexed(generated_ground_truth(opts.images))}
    rows = {}
    for name, coco_gt in datasets.items():
        detections = made_up_detections(coco_gt)
        evaluators = {backend: CocoEvaluator(coco_gt, backend=backend) for backend in BACKENDS}
        for evaluator in evaluators.values():
            evaluator.update(detections)
        progress(f"{name}: {opts.runs} interleaved rounds of both backends after one warm-up")
        times = interleaved({b: timer(lambda e=e: _evaluate(e)) for b, e in evaluators.items()}, opts.runs)
        old, new = (evaluators[b].stats for b in BACKENDS)
        table = Table()
        table.add("images", "images", len(coco_gt.imgs), "count")
        table.add("detections", "detections", sum(len(d["scores"]) for d in detections.values()), "count")
        table.add("pycocotools", "pycocotools", summary(times["pycocotools"]), "s")
        table.add("faster", "faster-coco-eval", summary(times["faster"]), "s")
        table.add("ratio", "ratio pycocotools / faster-coco-eval", ratio(times["pycocotools"], times["faster"]), "x")
        table.add("max_difference", "max abs difference of the 12 stats", float(np.max(np.abs(np.subtract(old, new)))),
                  "")
        table.print(f"# COCO bbox evaluation, {name}: medians of {opts.runs} runs after 1 warm-up (min-max); "
                    "ratio: per-round ratios of interleaved rounds")
        rows[name] = table.rows
    return rows
