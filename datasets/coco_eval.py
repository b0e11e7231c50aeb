"""COCO bbox evaluation over detections gathered from every rank, scored by pycocotools or by faster-coco-eval
(config key coco_eval_backend): the same 12 numbers, the latter's matching and accumulation in C++."""
import contextlib
import io
import json
import logging
from typing import Optional

import numpy as np
from pycocotools.cocoeval import COCOeval

from util.distributed import all_gather_object

logger = logging.getLogger("dino.coco_eval")

BACKENDS = ("pycocotools", "faster")


def check_backend(backend: str) -> None:
    """Refuse an unknown backend, or faster without its package, before a run spends an epoch training."""
    if backend not in BACKENDS:
        raise ValueError(f"coco_eval_backend={backend!r}: expected {' or '.join(BACKENDS)}")
    if backend == "faster":
        try:
            import faster_coco_eval  # noqa: F401
        except ImportError:
            raise ValueError("coco_eval_backend=faster needs the faster_coco_eval package: "
                             "pip install faster-coco-eval") from None


def coco_evaluation(coco_gt, results, backend: str = "pycocotools", img_ids: Optional[list] = None):
    """A bbox COCOeval of `backend`, evaluated and accumulated quietly, over `results` (a COCO results list or
    file, not empty) on `img_ids` (default: every image). The one place that picks the backend's classes.

    faster_coco_eval keeps its own index of the ground truth, built over the same annotation dicts (no copy)."""
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "faster":
            from faster_coco_eval import COCO, COCOeval_faster
            gt = COCO(coco_gt.dataset)  # its own index: it reads fields pycocotools' COCO lacks
            # print: summarize() prints its table as pycocotools does (its default is a logger)
            evaluator = COCOeval_faster(gt, gt.loadRes(results), iouType="bbox", print_function=print)
        else:
            evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
        if img_ids is not None:
            evaluator.params.imgIds = img_ids
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def per_class_ap(coco_eval, iou: Optional[float] = None) -> dict:
    """{category name: AP} from an accumulated COCOeval's precision [IoU T, recall R, class K, area A, maxDets M]
    at area 'all' and the most detections (100), averaged over the IoU thresholds (AP@[.5:.95]) or taken at
    `iou` (0.5: AP50). A class without ground truth in the evaluated images has only -1 entries: None, not 0, as
    COCO's mean AP leaves it out. The classes' mean is COCO's AP when every class has ground truth."""
    p = coco_eval.params
    precision = coco_eval.eval["precision"][:, :, :, p.areaRngLbl.index("all"), -1]
    if iou is not None:
        precision = precision[np.isclose(p.iouThrs, iou)]
    names = [str(coco_eval.cocoGt.cats[c].get("name", c)) for c in p.catIds]
    return {name: float(column[column > -1].mean()) if (column > -1).any() else None
            for name, column in zip(names, np.moveaxis(precision, 2, 0).reshape(len(names), -1))}


def per_class_table(ap: dict, ap50: dict, most: int = 20) -> str:
    """The classes sorted by AP, worst first, for the log: all of them up to `most`, else the worst and best
    halves of `most` around a line that counts the others; classes without ground truth last."""
    width = max(map(len, ["class", *ap]))
    scored = sorted((v, name) for name, v in ap.items() if v is not None)
    rows = [f"{name:>{width}}  {v:.4f}  {ap50[name]:.4f}" for v, name in scored]
    if len(rows) > most:
        rows = rows[:most // 2] + [f"{'...':>{width}}  {len(rows) - most} more"] + rows[-(most // 2):]
    missing = [name for name, v in ap.items() if v is None]
    if missing:
        rows.append(f"no ground truth: {', '.join(missing)}")
    return "\n".join([f"{'class':>{width}}  {'AP':>6}  {'AP50':>6}"] + rows)


class CocoEvaluator:
    """Collects detections per image, then scores them with COCOeval on the images that were seen.

    Each image counts once however often it was predicted (a padded distributed sampler repeats some),
    and only the evaluated images are scored, so a partial pass gives that subset's AP.
    """

    def __init__(self, coco_gt, label_to_category_id=None, backend: str = "pycocotools"):
        self.coco_gt, self.backend = coco_gt, backend
        self.label_to_category_id = None if label_to_category_id is None else np.asarray(label_to_category_id)
        self.detections = {}  # image id -> float64 array [n, 6]: x, y, w, h, score, category id
        self.coco_eval = None
        self.stats = []
        self.per_class_ap = {}

    def update(self, predictions) -> None:
        """predictions: image id -> {'scores', 'labels', 'boxes' (absolute xyxy in original pixels)}."""
        for image_id, pred in predictions.items():
            if image_id in self.detections:
                continue
            boxes = pred["boxes"].detach().cpu().double().numpy().reshape(-1, 4)
            scores = pred["scores"].detach().cpu().double().numpy()
            labels = pred["labels"].detach().cpu().long().numpy()
            if self.label_to_category_id is not None:  # labels past the mapping name no category: drop them
                keep = labels < len(self.label_to_category_id)
                boxes, scores = boxes[keep], scores[keep]
                labels = self.label_to_category_id[labels[keep]]
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
            self.detections[int(image_id)] = np.column_stack([xywh, scores, labels.astype(np.float64)])

    def synchronize_between_processes(self) -> None:
        merged = {}
        for part in all_gather_object(self.detections):
            for image_id, dets in part.items():
                merged.setdefault(image_id, dets)
        self.detections = merged

    def results(self) -> list:
        """The detections in COCO's result format (a list of dicts), sorted by image id."""
        return [{"image_id": image_id, "category_id": int(d[5]), "bbox": d[:4].tolist(), "score": float(d[4])}
                for image_id in sorted(self.detections) for d in self.detections[image_id]]

    def write_results(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.results(), f)

    def accumulate(self) -> None:
        results = self.results()  # pycocotools cannot load an empty list: no detections, no COCOeval
        self.coco_eval = coco_evaluation(self.coco_gt, results, self.backend, sorted(self.detections)) \
            if results else None

    def summarize(self) -> None:
        """Prints COCO's 12 numbers (stats) and logs a per-class table (per_class_ap: {name: AP or None})."""
        print("IoU metric: bbox")
        if self.coco_eval is None:
            print(f"no detections on {len(self.detections)} images: every COCO metric is 0.0")
            self.stats = [0.0] * 12
            self.per_class_ap = self._without_detections()
            return
        self.coco_eval.summarize()
        self.stats = [float(s) for s in self.coco_eval.stats]
        self.per_class_ap = per_class_ap(self.coco_eval)
        logger.info("per-class bbox AP (%s):\n%s", self.backend,
                    per_class_table(self.per_class_ap, per_class_ap(self.coco_eval, iou=0.5)))

    def _without_detections(self) -> dict:
        """No detections: AP 0 for each class with (non-crowd) ground truth in the evaluated images, else None."""
        gt = self.coco_gt
        present = {a["category_id"] for a in gt.loadAnns(gt.getAnnIds(imgIds=list(self.detections)))
                   if not a.get("iscrowd", 0)}
        return {str(c.get("name", c["id"])): 0.0 if c["id"] in present else None
                for c in gt.loadCats(gt.getCatIds())}
