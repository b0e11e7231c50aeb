"""COCO-format detection datasets: any image folder with an instances JSON, or the generated synthetic set.

Indexing with (epoch, index) seeds the augmentation with random.Random(f"{seed}-{epoch}-{index}"), so what a
sample looks like depends only on those three numbers: not on worker processes, nor on where a run resumed.
"""
import contextlib
import hashlib
import io
import logging
import os
import random

import torch
from PIL import Image
from pycocotools.coco import COCO

from .synthetic import ensure_synthetic_coco
from .transforms import ImageTooThin, make_coco_transforms
from .validate import UNREADABLE, DatasetError, check_dataset, read_annotations, unreadable_reason

logger = logging.getLogger("dino.datasets")


def label_names(categories: list, num_classes: int, contiguous: bool) -> list:
    """The class name of each of num_classes labels (None where no category has that label), by the label
    convention of CocoDetection: labels are category ids, or with contiguous ids the categories in id order."""
    if contiguous:
        names = [str(c["name"]) for c in sorted(categories, key=lambda c: int(c["id"]))]
    else:
        by_id = {int(c["id"]): str(c["name"]) for c in categories}
        names = [by_id.get(label) for label in range(num_classes)]
    return (names + [None] * num_classes)[:num_classes]


def coco_class_names() -> list:
    """The 91 label slots of DINO on COCO (label = COCO category id; 'N/A' marks the unused ids)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    return list(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])


class CocoDetection(torch.utils.data.Dataset):
    """Images with their non-crowd boxes as (image, target) pairs, DETR's target layout.

    data is the annotation file's content, checked by check_dataset. Annotations without 'iscrowd' or 'area'
    (which COCOeval reads) get 0 and the box area. Labels are the COCO category ids as they are (DINO's
    convention: num_classes = max id + 1), or with contiguous_category_ids the ids in sorted order mapped
    to 0..K-1; label_to_category_id maps them back (None when labels are the ids themselves).
    """

    def __init__(self, img_folder, ann_file, data: dict, transforms, seed: int, contiguous_category_ids: bool = False):
        for ann in data["annotations"]:
            ann.setdefault("iscrowd", 0)
            ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()
        self.img_folder, self.ann_file = str(img_folder), str(ann_file)
        self.transforms, self.seed = transforms, seed
        self.ids = sorted(self.coco.imgs)
        if contiguous_category_ids:
            self.label_to_category_id = sorted(self.coco.cats)
            category_to_label = {c: i for i, c in enumerate(self.label_to_category_id)}
        else:
            self.label_to_category_id = None
            category_to_label = {c: c for c in self.coco.cats}
        self._objects = {}  # image id -> [(xyxy box, label)], crowds and unusable boxes left out
        dropped = []
        for image_id in self.ids:
            info = self.coco.imgs[image_id]
            objects = []
            for ann in self.coco.imgToAnns[image_id]:
                if ann["iscrowd"]:
                    continue
                x, y, w, h = ann["bbox"]
                if w <= 0 or h <= 0 or ann["category_id"] not in category_to_label:
                    dropped.append(ann["id"])
                    continue
                x0, y0 = min(max(x, 0), info["width"]), min(max(y, 0), info["height"])
                x1, y1 = min(max(x + w, 0), info["width"]), min(max(y + h, 0), info["height"])
                if x1 <= x0 or y1 <= y0:  # entirely outside the image
                    dropped.append(ann["id"])
                    continue
                objects.append(([x0, y0, x1, y1], category_to_label[ann["category_id"]]))
            self._objects[image_id] = objects
        if dropped:
            logger.warning("%s: dropped %d boxes (width or height <= 0, outside the image, or a category_id not in "
                           "'categories'), e.g. annotation id %s", ann_file, len(dropped), dropped[0])

    def categories(self) -> list:
        """[{'id', 'name'}] in id order: what the checkpoint records so that predictions can be named."""
        return [{"id": int(c), "name": str(self.coco.cats[c].get("name", c))} for c in sorted(self.coco.cats)]

    def fingerprint(self) -> dict:
        """What identifies this data: recorded in checkpoints, so that resuming on changed data is noticed. The
        path is informative only: a dataset moved elsewhere is the same data."""
        digest = hashlib.sha256()
        with open(self.ann_file, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        return {"annotation_file": self.ann_file, "sha256": digest.hexdigest(), "images": len(self.ids),
                "boxes": sum(len(objects) for objects in self._objects.values()),
                "categories": [[c["id"], c["name"]] for c in self.categories()]}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image_id = self.ids[index]
        path = os.path.join(self.img_folder, self.coco.imgs[image_id]["file_name"])
        try:
            with Image.open(path) as f:
                image = f.convert("RGB")
        except FileNotFoundError:
            raise DatasetError(f"image file not found (image id {image_id} {path}) in {self.ann_file}: restore it or "
                               "remove its entry from the annotation file") from None
        except UNREADABLE as e:
            raise DatasetError(f"image file cannot be decoded (image id {image_id} {path}: {unreadable_reason(e)}) in "
                               f"{self.ann_file}: replace it or remove its entry from the annotation file") from None
        w, h = image.size
        objects = self._objects[image_id]
        boxes = torch.tensor([box for box, _ in objects], dtype=torch.float32).reshape(-1, 4)
        target = {
            "boxes": boxes,
            "labels": torch.tensor([label for _, label in objects], dtype=torch.int64),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            "iscrowd": torch.zeros(len(objects), dtype=torch.int64),
            "orig_size": torch.tensor([h, w]),
            "size": torch.tensor([h, w]),
        }
        if self.transforms is not None:
            try:
                image, target = self.transforms(image, target, random.Random(f"{self.seed}-{epoch}-{index}"))
            except ImageTooThin as e:
                raise DatasetError(f"image too thin to resize (image id {image_id} {path}, {w}x{h}: {e}) in "
                                   f"{self.ann_file}: remove it from the annotation file or change data_aug_scales / "
                                   "data_aug_max_size") from None
        return image, target


def build(image_set: str, args) -> CocoDetection:
    """The train or val split under args.coco_path, unless {image_set}_img_folder / _ann_file name other paths.

    The split is checked first (check_dataset: one DatasetError listing every problem; the pass is recorded
    in args.output_dir so a restart skips it), so bad data stops a run before the model trains.
    """
    if args.dataset_file == "synthetic":
        ensure_synthetic_coco(args.coco_path, args.synthetic_num_train, args.synthetic_num_val,
                              args.synthetic_image_size, seed=0)
    img_folder = getattr(args, f"{image_set}_img_folder") or os.path.join(args.coco_path, f"{image_set}2017")
    ann_file = getattr(args, f"{image_set}_ann_file") or os.path.join(
        args.coco_path, "annotations", f"instances_{image_set}2017.json")
    for key, path in ((f"{image_set}_img_folder", img_folder), (f"{image_set}_ann_file", ann_file)):
        if not isinstance(path, (str, os.PathLike)):
            raise DatasetError(f"{key} is {path!r}, not a path: give one path (in --options a comma makes a list: "
                               "set a path holding a comma in a config file)")
    data = read_annotations(ann_file)
    check_dataset(data, ann_file, img_folder, args.num_classes, args.dn_labelbook_size,
                  args.contiguous_category_ids, cache_dir=None if getattr(args, "plan", False) else args.output_dir or None)
    return CocoDetection(img_folder, ann_file, data, make_coco_transforms(image_set, args), seed=args.seed,
                         contiguous_category_ids=args.contiguous_category_ids)
