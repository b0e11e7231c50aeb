"""Dataset construction: COCO-layout folders (real or generated) with DINO's augmentation."""
from .coco import build as build_coco
from .validate import DatasetError

__all__ = ["DatasetError", "build_dataset", "get_coco_api_from_dataset"]


def build_dataset(image_set: str, args):
    """image_set is 'train' or 'val'; args.dataset_file picks 'coco' or 'synthetic'. Bad data raises DatasetError."""
    if args.dataset_file in ("coco", "synthetic"):
        return build_coco(image_set, args)
    raise ValueError(f"unknown dataset_file {args.dataset_file!r}: expected 'coco' or 'synthetic'")


def get_coco_api_from_dataset(dataset):
    """The pycocotools COCO object holding the ground truth (DETR's name for it)."""
    return dataset.coco
