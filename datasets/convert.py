"""Pascal VOC, YOLO and COCO datasets read, checked and written in the layout that main.py --coco_path reads:
DST/{train,val}2017/ (links to the source images; test2017/ when the source has a test split) and
DST/annotations/instances_{split}2017.json.

Conventions, and why:
- VOC coordinates are 1-based pixel indices, both ends included: xmin=1, xmax=W spans the whole image. Like
  detectron2 (pascal_voc.py) pixel i covers [i - 1, i] in COCO's continuous coordinates, so x = xmin - 1,
  y = ymin - 1, w = xmax - xmin + 1, h = ymax - ymin + 1 and a whole-image box is [0, 0, W, H]; back to VOC
  is xmin = x + 1, xmax = x + w. (torchvision hands the raw numbers over; mmdet reads xmin..xmax as they are;
  the difference is one pixel.)
- VOC objects marked difficult become iscrowd=1 ('ignore', the default): main.py does not train on them and
  COCOeval neither rewards nor penalises detecting them, VOC's own evaluation rule. 'keep' trains on them like
  any object (detectron2's choice), 'drop' leaves them out.
- A box reaching at most 1 px beyond its image (rounding in exports) is clipped; one further out is an error,
  usually labels in another format than assumed. A box without area is dropped with a warning.
- Category ids: YOLO class index + 1; VOC names in the order of a class list (--classes, or classes.txt in
  the source) or else sorted; COCO ids as they are. Names are always kept.
- A source without a val split is split by sorting the images by path and shuffling with random.Random(seed),
  the same on every machine; a source with one keeps it, and --val-fraction is then refused.
- Image sizes come from file headers (PIL, no decoding): the size main.py will see (EXIF rotation ignored).
"""
import json
import math
import os
import random
import shutil
import tempfile
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import count

from .validate import DatasetError, _image_size, _Problems, check_dataset, read_annotations

IMAGE_EXTENSIONS = {".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}
CLIP_PX = 1  # boxes reaching this far beyond their image are clipped, further out they are errors
DEFAULT_VAL_FRACTION = 0.1  # of a source without a val split
YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml")
CLASS_LISTS = ("classes.txt", "obj.names")  # one name per line (obj.names: Darknet's)
DIFFICULT = ("ignore", "keep", "drop")


@dataclass
class Sample:
    """One image: its file, its path relative to the source (sorting and splitting use it), its size and its
    COCO annotations (without ids)."""
    path: str
    key: str
    size: tuple = None
    boxes: list = field(default_factory=list)


@dataclass
class Source:
    """What a reader found: samples per split ('train' alone when the source has no split) and categories."""
    splits: dict
    categories: list
    layout: str


class Report:
    """Problems that make the data unusable (nothing is written) and problems fixed by dropping something
    (warned about, the conversion goes on), each grouped by kind as datasets/validate.py does."""

    def __init__(self):
        self.errors, self.dropped = _Problems(), _Problems()
        self.clipped = 0

    def warnings(self) -> list:
        return [f"{what}: {fix}" for what, fix in self.dropped.lines()]

    def raise_errors(self, src: str) -> None:
        if self.errors.kinds:
            raise DatasetError(self.errors.message(src))


def read_source(fmt: str, src: str, report: Report, classes: str = None, difficult: str = "ignore") -> Source:
    """The source's samples and categories; structural mistakes raise DatasetError, the rest goes to report."""
    if not os.path.exists(src):
        raise DatasetError(f"source {src} not found: give the dataset's folder")
    if fmt == "voc":
        return read_voc(src, report, classes, difficult)
    if fmt == "yolo":
        return read_yolo(src, report, classes)
    return read_coco(src, report)


def _find_images(folder: str) -> list:
    """Image files below folder, sorted, so that every machine sees the same order."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return found


def _files_with_extension(folder: str, extension: str) -> list:
    return sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files
                  if f.lower().endswith(extension) and f not in CLASS_LISTS)


def _key(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def _read_sizes(samples: list, report: Report) -> list:
    """The samples whose image header can be read, with their size; the others are reported."""
    with ThreadPoolExecutor(max_workers=8) as pool:  # header reads wait on the disk, not the CPU
        found = list(pool.map(_image_size, [s.path for s in samples]))
    readable = []
    for sample, (size, error) in zip(samples, found):
        if error:
            report.errors.add("image files that cannot be read as images",
                              "replace or delete them (and their label files)", f"{sample.key}: {error}")
        else:
            sample.size = size
            readable.append(sample)
    return readable


def _read_names(path: str) -> list:
    """A class list: one name per line, blank lines ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"class list {path} cannot be read ({getattr(e, 'strerror', None) or e}): give a text "
                           "file with one class name a line") from None
    if len(set(names)) != len(names) or not names:
        raise DatasetError(f"class list {path} is empty or names a class twice: list each class once, one a line")
    return names


def add_box(sample: Sample, x0, y0, x1, y1, category_id: int, where: str, report: Report, **extra) -> None:
    """Clip a box reaching at most CLIP_PX beyond the image; report one further out; drop one without area."""
    width, height = sample.size
    if not all(map(math.isfinite, (x0, y0, x1, y1))):
        report.errors.add("boxes with coordinates that are not finite numbers", "correct or remove them", where)
        return
    if x0 < -CLIP_PX or y0 < -CLIP_PX or x1 > width + CLIP_PX or y1 > height + CLIP_PX:
        report.errors.add(f"boxes more than {CLIP_PX} px outside their image",
                          "correct these labels (are they in the format given?) or remove them",
                          f"{where}: [{x0:g}, {y0:g}, {x1:g}, {y1:g}] in {width}x{height}")
        return
    clipped = (max(x0, 0), max(y0, 0), min(x1, width), min(y1, height))
    report.clipped += clipped != (x0, y0, x1, y1)
    x0, y0, x1, y1 = clipped
    if x1 <= x0 or y1 <= y0:
        report.dropped.add("boxes with no width or height", "dropped; correct them to keep them", where)
        return
    bbox = [round(v, 3) for v in (x0, y0, x1 - x0, y1 - y0)]
    sample.boxes.append({"category_id": category_id, "bbox": bbox, "area": extra.pop("area", bbox[2] * bbox[3]),
                         "iscrowd": extra.pop("iscrowd", 0)})


# Pascal VOC


def read_voc(src: str, report: Report, classes: str = None, difficult: str = "ignore") -> Source:
    """VOC's layout (Annotations/, JPEGImages/, optional ImageSets/Main/*.txt) or XML beside the images."""
    voc_layout = os.path.isdir(os.path.join(src, "Annotations"))
    xml_dir = os.path.join(src, "Annotations") if voc_layout else src
    image_dir = os.path.join(src, "JPEGImages") if voc_layout else None
    if voc_layout and not os.path.isdir(image_dir):
        raise DatasetError(f"{src} has Annotations/ but no JPEGImages/: put the images there")
    xmls = _files_with_extension(xml_dir, ".xml")
    if not xmls:
        raise DatasetError(f"no VOC annotation files (*.xml) in {xml_dir}: give the folder holding Annotations/ "
                           "and JPEGImages/, or the XML files beside their images")
    parsed = [p for p in (_parse_voc_xml(path, image_dir, src, report) for path in xmls) if p]
    labelled = {}
    for sample, key, _, _ in parsed:
        if labelled.setdefault(os.path.abspath(sample.path), key) != key:
            report.errors.add("images named by two annotation files", "keep one annotation file per image",
                              f"{sample.key} by {labelled[os.path.abspath(sample.path)]} and {key}")
    background = [Sample(path, _key(path, src)) for path in _find_images(image_dir or src)
                  if os.path.abspath(path) not in labelled]
    names = _read_names(classes) if classes else _voc_default_names(src, parsed)
    ids = {name: i + 1 for i, name in enumerate(names)}
    readable = _read_sizes([p[0] for p in parsed] + background, report)
    for sample, key, xml_size, objects in parsed:
        if sample.size:
            _add_voc_objects(sample, key, xml_size, objects, ids, difficult, report)
    every = sorted(readable, key=lambda s: s.key)
    splits, layout = _voc_splits(src, every, report) if voc_layout else ({"train": every}, "XML beside images")
    return Source(splits, [{"id": i, "name": n} for n, i in ids.items()], f"Pascal VOC, {layout}")


def _voc_default_names(src: str, parsed: list) -> list:
    """classes.txt in the source when there is one, else every object name found, sorted."""
    listed = _first_file(src, CLASS_LISTS)
    if listed:
        return _read_names(listed)
    return sorted({name for *_, objects in parsed for name, *_ in objects})


def _parse_voc_xml(path: str, image_dir: str, src: str, report: Report):
    """(Sample, the file's key, its <size>, [(name, difficult, (xmin, ymin, xmax, ymax), where)]), or None when
    the file is unusable."""
    key = _key(path, src)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        report.errors.add("annotation files that are not valid XML", "repair or re-export them", f"{key}: {e}")
        return None
    image = _voc_image(path, root.findtext("filename"), image_dir or os.path.dirname(path))
    if image is None:
        report.dropped.add("annotation files whose image is not found",
                           "skipped; put the image beside them (or in JPEGImages/) to keep them", key)
        return None
    objects = []
    for index, obj in enumerate(root.iter("object")):
        where = f"{key} object {index + 1}"
        try:
            box = tuple(float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            report.errors.add("objects without a valid <bndbox> (xmin, ymin, xmax, ymax)",
                              "repair or remove these objects", where)
            continue
        objects.append(((obj.findtext("name") or "").strip(), obj.findtext("difficult", "0").strip() == "1",
                        box, where))
    try:
        xml_size = tuple(int(float(root.findtext(f"size/{k}") or 0)) for k in ("width", "height"))
    except ValueError:
        xml_size = (0, 0)  # the image's header gives the size
    return Sample(image, _key(image, src)), key, xml_size, objects


def _voc_image(xml_path: str, filename, folder: str):
    """The image named in <filename>, or else the one with the XML file's stem, in folder."""
    stem = os.path.splitext(os.path.basename(xml_path))[0]
    candidates = ([filename.strip()] if filename and filename.strip() else []) + \
        [stem + e for ext in sorted(IMAGE_EXTENSIONS) for e in (ext, ext.upper())]
    return next((os.path.join(folder, c) for c in candidates if os.path.isfile(os.path.join(folder, c))), None)


def _add_voc_objects(sample: Sample, key: str, xml_size: tuple, objects: list, ids: dict, difficult: str,
                     report: Report) -> None:
    if any(xml_size) and xml_size != sample.size:
        report.errors.add("images whose size differs from their XML's <size>", "correct <size> or the image",
                          f"{key}: {xml_size[0]}x{xml_size[1]}, the image is "
                          f"{sample.size[0]}x{sample.size[1]}")
        return
    for name, is_difficult, (xmin, ymin, xmax, ymax), where in objects:
        if name not in ids:
            report.errors.add("object names not in the class list", "add them to the class list or rename them",
                              f"{where}: {name!r}")
        elif not (is_difficult and difficult == "drop"):
            add_box(sample, xmin - 1, ymin - 1, xmax, ymax, ids[name], where, report,
                    iscrowd=int(is_difficult and difficult == "ignore"))


def _voc_splits(src: str, samples: list, report: Report):
    """ImageSets/Main: train.txt + val.txt (+ test.txt), or trainval.txt + test.txt as train and val."""
    main = os.path.join(src, "ImageSets", "Main")
    have = {name for name in ("train", "val", "trainval", "test") if os.path.isfile(os.path.join(main, f"{name}.txt"))}
    if {"train", "val"} <= have:
        chosen = {"train": "train", "val": "val", **({"test": "test"} if "test" in have else {})}
    elif {"trainval", "test"} <= have:
        chosen = {"train": "trainval", "val": "test"}
    elif have - {"test"}:
        chosen = {"train": "trainval" if "trainval" in have else sorted(have - {"test"})[0]}
    else:
        return {"train": samples}, "Annotations/ + JPEGImages/, no ImageSets/Main split"
    by_id = {os.path.splitext(os.path.basename(s.path))[0]: s for s in samples}
    splits = {split: _listed(os.path.join(main, f"{name}.txt"), by_id, src, report) for split, name in chosen.items()}
    shown = ", ".join(f"{split}={name}.txt" for split, name in chosen.items())
    return splits, f"Annotations/ + JPEGImages/, ImageSets/Main splits {shown}"


def _listed(list_file: str, by_id: dict, src: str, report: Report) -> list:
    with open(list_file, encoding="utf-8") as f:
        ids = [line.split()[0] for line in f if line.strip()]
    for image_id in ids:
        if image_id not in by_id:
            report.errors.add("ids in ImageSets/Main lists without a readable image",
                              "add the images (and annotations) or remove the ids",
                              f"{_key(list_file, src)}: {image_id}")
    return sorted((by_id[i] for i in set(ids) if i in by_id), key=lambda s: s.key)


# YOLO


def read_yolo(src: str, report: Report, classes: str = None) -> Source:
    """images/ + labels/ (split folders images/train..., or Roboflow's train/images...), or labels beside images;
    class names from --classes, data.yaml (which may also name the split folders) or classes.txt."""
    root, config_file = (os.path.dirname(os.path.abspath(src)), src) if os.path.isfile(src) else \
        (src, _first_file(src, YAML_NAMES))
    config = _read_yaml(config_file) if config_file else {}
    names = _read_names(classes) if classes else _yolo_names(root, config, config_file)
    split_dirs, layout = _yolo_split_dirs(root, config, config_file)
    splits, used, label_dirs = {}, set(), set()
    for split, (images, folders) in split_dirs.items():
        used |= {os.path.abspath(_label_path(p)) for p in images}
        label_dirs |= {os.path.dirname(_label_path(os.path.join(folder, "x"))) for folder in folders}
        splits[split] = _read_sizes([Sample(p, _key(p, root)) for p in images], report)
        for sample in splits[split]:
            label = _label_path(sample.path)
            if os.path.isfile(label):
                _add_yolo_labels(sample, label, _key(label, root), len(names), report)
    for label in sorted({p for folder in label_dirs for p in _files_with_extension(folder, ".txt")}):
        if os.path.abspath(label) not in used:
            report.dropped.add("label files without an image", "skipped; add their images to keep them",
                               _key(label, root))
    return Source(splits, [{"id": i + 1, "name": n} for i, n in enumerate(names)], f"YOLO, {layout}")


def _first_file(folder: str, names: tuple):
    return next((os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))), None)


def _read_yaml(path: str) -> dict:
    try:
        import yaml
    except ImportError:
        raise DatasetError(f"reading {path} needs PyYAML: pip install pyyaml, or write the class names one a line "
                           "to classes.txt and pass --classes classes.txt") from None
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise DatasetError(f"{path} is not valid YAML ({str(e).splitlines()[0]}): repair it") from None
    if not isinstance(config, dict):
        raise DatasetError(f"{path} holds no mapping with names:, train: and val:: repair it")
    return config


def _yolo_names(root: str, config: dict, config_file) -> list:
    """names: of data.yaml (a list, or a mapping from 0..K-1), else classes.txt / obj.names in root."""
    if config_file and "names" in config:
        names = config["names"]
        if isinstance(names, dict):
            if sorted(names) != list(range(len(names))):
                raise DatasetError(f"names: in {config_file} maps {sorted(names)}, not 0..{len(names) - 1}: "
                                   "number the classes from 0 without gaps")
            names = [names[i] for i in range(len(names))]
        if not isinstance(names, list) or not names or ("nc" in config and config["nc"] != len(names)):
            raise DatasetError(f"names: in {config_file} is not a non-empty list of the nc={config.get('nc')} class "
                               "names: give names: [a, b, ...] or names: {0: a, 1: b, ...}")
        return [str(n) for n in names]
    listed = _first_file(root, CLASS_LISTS)
    if listed is None:
        raise DatasetError(f"no class names for the YOLO dataset {root}: add data.yaml with names: [...], or "
                           "classes.txt with one name a line (class 0 first), or pass --classes FILE")
    return _read_names(listed)


def _yolo_split_dirs(root: str, config: dict, config_file):
    """(image files, the folders they were looked for in) per split: data.yaml's train:/val:/test:, else split
    folders, else images/ or root; and a description of the layout."""
    if any(split in config for split in ("train", "val")):
        splits = {split: _yaml_images(config, split, root, config_file) for split in ("train", "val", "test")
                  if config.get(split)}
        return splits, f"{os.path.basename(config_file)} splits {', '.join(splits)}"
    found = {}  # split -> (images, [folder])
    for split, candidates in (("train", ("images/train", "train/images")),
                              ("val", ("images/val", "images/valid", "valid/images", "val/images")),
                              ("test", ("images/test", "test/images"))):
        folder = next((os.path.join(root, c) for c in candidates if os.path.isdir(os.path.join(root, c))), None)
        if folder:
            found[split] = (_find_images(folder), [folder])
    if found:
        return found, "split folders " + ", ".join(_key(folders[0], root) for _, folders in found.values())
    folder = os.path.join(root, "images")
    if os.path.isdir(folder):
        return {"train": (_find_images(folder), [folder])}, "images/ + labels/, no split"
    return {"train": (_find_images(root), [root])}, "labels beside images, no split"


def _yaml_images(config: dict, split: str, root: str, config_file: str) -> list:
    """(images, folders) of a split's entry: a folder, a .txt list of image paths, or a list of those, resolved
    against path: (or the YAML file's folder); Roboflow's '../train/images' is also looked for inside the dataset."""
    base = os.path.join(root, str(config.get("path") or ""))
    entries = config[split] if isinstance(config[split], list) else [config[split]]
    images, folders = [], []
    for entry in map(str, entries):
        tries = [os.path.join(base, entry), os.path.join(root, entry),
                 os.path.join(root, entry.replace("\\", "/").lstrip("./"))]
        found = next((t for t in tries if os.path.exists(t)), None)
        if found is None:
            raise DatasetError(f"{split}: {entry} in {config_file} not found (looked for {', '.join(tries)}): "
                               "correct the path in the YAML file")
        if os.path.isdir(found):
            images += _find_images(found)
            folders.append(found)
        else:
            with open(found, encoding="utf-8") as f:
                images += [os.path.join(os.path.dirname(found), line.strip()) for line in f if line.strip()]
    return images, folders


def _label_path(image_path: str) -> str:
    """YOLO's rule: the last images/ folder becomes labels/ and the extension .txt; else beside the image."""
    marker = f"{os.sep}images{os.sep}"
    head, sep, tail = image_path.rpartition(marker)
    path = f"{head}{os.sep}labels{os.sep}{tail}" if sep else image_path
    return os.path.splitext(path)[0] + ".txt"


def _add_yolo_labels(sample: Sample, label: str, key: str, num_names: int, report: Report) -> None:
    """Lines 'class cx cy w h', the box in fractions of the image size."""
    width, height = sample.size
    with open(label, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
        where = f"{key} line {number}"
        fields = line.split()
        if not fields:
            continue
        try:
            cls, (cx, cy, w, h) = int(fields[0]), map(float, fields[1:])
        except ValueError:
            report.errors.add("label lines that are not 'class cx cy w h'",
                              "correct them (segmentation polygons are not read)", where)
            continue
        if not 0 <= cls < num_names:
            report.errors.add(f"class indices outside 0..{num_names - 1} (the {num_names} class names)",
                              "correct the labels or the class names", f"{where}: class {cls}")
            continue
        add_box(sample, (cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height,
                cls + 1, where, report)


# COCO


def read_coco(src: str, report: Report) -> Source:
    """The --coco_path layout, split folders each holding one JSON (Roboflow's train/, valid/), or one JSON
    file (its images beside it or in images/ beside it), checked as main.py checks them."""
    root = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    splits, categories = {}, {}
    for split, ann_file, img_folder in _coco_files(src):
        data = read_annotations(ann_file)
        check_dataset(data, ann_file, img_folder, num_classes=2 ** 62, dn_labelbook_size=2 ** 62)  # ids as they are
        splits[split] = _coco_samples(data, ann_file, img_folder, root, report)
        categories[ann_file] = sorted(({"id": c["id"], "name": str(c.get("name", c["id"]))}
                                       for c in data["categories"]), key=lambda c: c["id"])
    first, *others = categories.values()
    if any(other != first for other in others):
        raise DatasetError(f"the annotation files {', '.join(categories)} have different categories: give every "
                           "split the same 'categories'")
    return Source(splits, first, "COCO, " + ", ".join(f"{s}={_key(f, root)}" for s, f in zip(splits, categories)))


def _coco_files(src: str) -> list:
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
        jsons = _files_with_extension(folder, ".json") if os.path.isdir(folder) else []
        if len(jsons) == 1 and split not in {f[0] for f in found}:
            found.append((split, jsons[0], os.path.dirname(jsons[0])))
    if not found:
        top = [os.path.join(src, f) for f in sorted(os.listdir(src)) if f.endswith(".json")]
        if len(top) != 1:
            raise DatasetError(f"no COCO annotation file found in {src}: give the folder holding annotations/"
                               "instances_{train,val}2017.json, or one .json file as the source")
        return _coco_files(top[0])
    return found


def _coco_samples(data: dict, ann_file: str, img_folder: str, root: str, report: Report) -> list:
    category_ids = {c["id"] for c in data["categories"]}
    samples = {}
    for image in data["images"]:
        path = os.path.join(img_folder, image["file_name"])
        samples[image["id"]] = Sample(path, _key(path, root), (image["width"], image["height"]))
    for ann in data["annotations"]:
        where = f"{os.path.basename(ann_file)} annotation id {ann['id']}"
        if ann["category_id"] not in category_ids:
            report.dropped.add("annotations whose category_id is not in 'categories'", "dropped", where)
            continue
        x, y, w, h = ann["bbox"]
        add_box(samples[ann["image_id"]], x, y, x + w, y + h, ann["category_id"], where, report,
                iscrowd=int(bool(ann.get("iscrowd", 0))), area=ann.get("area", w * h))
    return sorted(samples.values(), key=lambda s: s.key)


# Splitting and writing


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
