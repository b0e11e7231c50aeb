"""COCO bbox evaluation with pycocotools, over detections gathered from every rank."""
import contextlib
import io
import json

import numpy as np
from pycocotools.cocoeval import COCOeval

from util.distributed import all_gather_object


class CocoEvaluator:
    """Collects detections per image, then scores them with COCOeval on the images that were seen.

    Each image counts once however often it was predicted (a padded distributed sampler repeats some),
    and only the evaluated images are scored, so a partial pass gives that subset's AP.
    """

    def __init__(self, coco_gt, label_to_category_id=None):
        self.coco_gt = coco_gt
        self.label_to_category_id = None if label_to_category_id is None else np.asarray(label_to_category_id)
        self.detections = {}  # image id -> float64 array [n, 6]: x, y, w, h, score, category id
        self.coco_eval = None
        self.stats = []

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
        results = self.results()
        if not results:  # pycocotools cannot load an empty result list
            self.coco_eval = None
            return
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = self.coco_gt.loadRes(results)
            self.coco_eval = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            self.coco_eval.params.imgIds = sorted(self.detections)
            self.coco_eval.evaluate()
            self.coco_eval.accumulate()

    def summarize(self) -> None:
        print("IoU metric: bbox")
        if self.coco_eval is None:
            print(f"no detections on {len(self.detections)} images: every COCO metric is 0.0")
            self.stats = [0.0] * 12
            return
        self.coco_eval.summarize()
        self.stats = [float(s) for s in self.coco_eval.stats]
