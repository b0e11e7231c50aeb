"""The splits to write and the layout main.py --coco_path reads, written so that out is complete or absent.

A source without a val split is split by sorting the images by path and shuffling with random.Random(seed), the
same on every machine; a source with one keeps it, and --val-fraction is then refused.
"""
import json
import os
import random
import shutil
import tempfile
from itertools import count

from ..validate import DatasetError
from .common import Source

DEFAULT_VAL_FRACTION = 0.1  # of a source without a val split


def split_off_val(samples: list, fraction: float, seed: int) -> tuple:
    """(train, val): the samples sorted by path, shuffled by random.Random(seed), the first round(fraction * n)
    (at least one, never all) to val; each part sorted again."""
    if len(samples) < 2:
        raise DatasetError(f"{len(samples)} image(s) cannot be split into train and val: add images")
    order = sorted(samples, key=lambda s: s.key)
    random.Random(seed).shuffle(order)
    n_val = min(len(order) - 1, max(1, round(fraction * len(order))))
    return sorted(order[n_val:], key=lambda s: s.key), sorted(order[:n_val], key=lambda s: s.key)


def final_splits(source: Source, val_fraction, seed: int) -> tuple:
    """The splits to write, and a note on how val was made (None when the source had it)."""
    if not source.categories:
        raise DatasetError(f"no classes in the source ({source.layout}): give a class list (--classes FILE)")
    if "val" in source.splits:
        if val_fraction is not None:
            raise DatasetError(f"the source has a val split already ({source.layout}): drop --val-fraction, or merge "
                               "the splits into one folder to split it anew")
        return source.splits, None
    fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    train, val = split_off_val(source.splits["train"], fraction, seed)
    note = (f"no val split in the source: {len(val)} of {len(train) + len(val)} images ({fraction:g}) went to val, "
            f"chosen with seed {seed} (--val-fraction, --seed)")
    splits = {**source.splits, "train": train, "val": val}
    return {split: splits[split] for split in ("train", "val", "test") if split in splits}, note


def check_out(out: str) -> None:
    """Before reading the source, and again before writing: out must be new or an empty folder."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise DatasetError(f"--out {out} exists and is not an empty folder: choose a new path or remove it")


def write_coco_layout(splits: dict, categories: list, out: str, copy: bool = False) -> dict:
    """Write into a temporary folder beside out, then rename it to out: out is complete or absent. Returns how
    many images were linked, hard-linked or copied."""
    out = os.path.abspath(out)
    check_out(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=os.path.dirname(out))
    try:
        methods, image_ids, ann_ids = {}, count(1), count(1)
        os.mkdir(os.path.join(tmp, "annotations"))
        for split, samples in splits.items():
            folder = os.path.join(tmp, f"{split}2017")
            os.mkdir(folder)
            names = unique_names(samples)
            for sample, name in zip(samples, names):
                method = place(sample.path, os.path.join(folder, name), copy)
                methods[method] = methods.get(method, 0) + 1
            data = coco_json(samples, names, categories, image_ids, ann_ids)
            with open(os.path.join(tmp, "annotations", f"instances_{split}2017.json"), "w") as f:
                json.dump(data, f)
        if os.path.isdir(out):
            os.rmdir(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return methods


def unique_names(samples: list) -> list:
    """Base names, '_1', '_2', ... added before the extension where two would clash (case-insensitively: some
    file systems ignore case)."""
    names, taken = [], set()
    for sample in samples:
        stem, ext = os.path.splitext(os.path.basename(sample.path))
        name, n = stem + ext, 0
        while name.lower() in taken:
            n += 1
            name = f"{stem}_{n}{ext}"
        taken.add(name.lower())
        names.append(name)
    return names


def place(src: str, dst: str, copy: bool) -> str:
    """A symbolic link to the absolute source path; a hard link, then a copy, where links cannot be made."""
    if not copy:
        try:
            os.symlink(os.path.abspath(src), dst)
            return "linked"
        except OSError:
            pass
        try:
            os.link(src, dst)
            return "hard-linked"
        except OSError:
            pass
    shutil.copyfile(src, dst)
    return "copied"


def coco_json(samples: list, names: list, categories: list, image_ids, ann_ids) -> dict:
    images, annotations = [], []
    for sample, name in zip(samples, names):
        image_id = next(image_ids)
        images.append({"id": image_id, "file_name": name, "width": sample.size[0], "height": sample.size[1]})
        annotations += [{"id": next(ann_ids), "image_id": image_id, **box} for box in sample.boxes]
    return {"images": images, "annotations": annotations, "categories": categories}


def summary(splits: dict, categories: list, out: str) -> list:
    """Counts per split, and the options main.py needs to train on out (labels are the category ids)."""
    lines = []
    for split, samples in splits.items():
        boxes = [b for s in samples for b in s.boxes]
        crowd = sum(b["iscrowd"] for b in boxes)
        lines.append(f"{split}2017: {len(samples)} images ({sum(not s.boxes for s in samples)} without boxes), "
                     f"{len(boxes)} boxes ({crowd} iscrowd), {len({b['category_id'] for b in boxes})} of "
                     f"{len(categories)} classes")
    n = max(c["id"] for c in categories) + 1
    lines.append(f"train with: python main.py -c CONFIG --dataset_file coco --coco_path {out} "
                 f"--options num_classes={n} dn_labelbook_size={n}")
    if n > 2 * len(categories):
        lines.append(f"  (sparse category ids: or --options contiguous_category_ids=True num_classes={len(categories)} "
                     f"dn_labelbook_size={len(categories)})")
    return lines
