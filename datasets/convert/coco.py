"""COCO: annotation files checked as main.py checks them, category ids kept as they are."""
import os

from ..validate import DatasetError, check_dataset, read_annotations
from .common import Report, Sample, Source, add_box, files_with_extension, relative_key


def read_coco(src: str, report: Report) -> Source:
    """The --coco_path layout, split folders each holding one JSON (Roboflow's train/, valid/), or one JSON
    file (its images beside it or in images/ beside it), checked as main.py checks them."""
    root = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    splits, categories = {}, {}
    for split, ann_file, img_folder in _annotation_files(src):
        data = read_annotations(ann_file)
        check_dataset(data, ann_file, img_folder, num_classes=2 ** 62, dn_labelbook_size=2 ** 62)  # ids as they are
        splits[split] = _samples(data, ann_file, img_folder, root, report)
        categories[ann_file] = sorted(({"id": c["id"], "name": str(c.get("name", c["id"]))}
                                       for c in data["categories"]), key=lambda c: c["id"])
    first, *others = categories.values()
    if any(other != first for other in others):
        raise DatasetError(f"the annotation files {', '.join(categories)} have different categories: give every "
                           "split the same 'categories'")
    return Source(splits, first, "COCO, " + ", ".join(f"{s}={relative_key(f, root)}" for s, f in zip(splits, categories)))


def _annotation_files(src: str) -> list:
    """(split, annotation file, image folder) per split found."""
    if os.path.isfile(src):
        folder = os.path.dirname(os.path.abspath(src))
        images = os.path.join(folder, "images")
        return [("train", src, images if os.path.isdir(images) else folder)]
    found = [(split, os.path.join(src, "annotations", f"instances_{split}2017.json"), os.path.join(src, f"{split}2017"))
             for split in ("train", "val", "test")]
    found = [f for f in found if os.path.isfile(f[1])]
    for split, folder in (("train", "train"), ("val", "valid"), ("val", "val"), ("test", "test")):
        folder = os.path.join(src, folder)
        jsons = files_with_extension(folder, ".json") if os.path.isdir(folder) else []
        if len(jsons) == 1 and split not in {f[0] for f in found}:
            found.append((split, jsons[0], os.path.dirname(jsons[0])))
    if not found:
        top = [os.path.join(src, f) for f in sorted(os.listdir(src)) if f.endswith(".json")]
        if len(top) != 1:
            raise DatasetError(f"no COCO annotation file found in {src}: give the folder holding annotations/"
                               "instances_{train,val}2017.json, or one .json file as the source")
        return _annotation_files(top[0])
    return found


def _samples(data: dict, ann_file: str, img_folder: str, root: str, report: Report) -> list:
    category_ids = {c["id"] for c in data["categories"]}
    samples = {}
    for image in data["images"]:
        path = os.path.join(img_folder, image["file_name"])
        samples[image["id"]] = Sample(path, relative_key(path, root), (image["width"], image["height"]))
    for ann in data["annotations"]:
        where = f"{os.path.basename(ann_file)} annotation id {ann['id']}"
        if ann["category_id"] not in category_ids:
            report.dropped.add("annotations whose category_id is not in 'categories'", "dropped", where)
            continue
        x, y, w, h = ann["bbox"]
        add_box(samples[ann["image_id"]], x, y, x + w, y + h, ann["category_id"], where, report,
                iscrowd=int(bool(ann.get("iscrowd", 0))), area=ann.get("area", w * h))
    return sorted(samples.values(), key=lambda s: s.key)
