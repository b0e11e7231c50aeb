"""YOLO: lines 'class cx cy w h' in fractions of the image size, in labels/ beside images/ or beside the images.
Category ids are the class index + 1."""
import os

from ..validate import DatasetError
from .common import (CLASS_LISTS, Report, Sample, Source, add_box, files_with_extension, find_images, first_file,
                     read_class_list, read_sizes, relative_key)

YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml")


def read_yolo(src: str, report: Report, classes: str = None) -> Source:
    """images/ + labels/ (split folders images/train..., or Roboflow's train/images...), or labels beside images;
    class names from --classes, data.yaml (which may also name the split folders) or classes.txt."""
    root, config_file = (os.path.dirname(os.path.abspath(src)), src) if os.path.isfile(src) else \
        (src, first_file(src, YAML_NAMES))
    config = _read_yaml(config_file) if config_file else {}
    names = read_class_list(classes) if classes else _class_names(root, config, config_file)
    split_dirs, layout = _split_dirs(root, config, config_file)
    splits, used, label_dirs = {}, set(), set()
    for split, (images, folders) in split_dirs.items():
        used |= {os.path.abspath(_label_path(p)) for p in images}
        label_dirs |= {os.path.dirname(_label_path(os.path.join(folder, "x"))) for folder in folders}
        splits[split] = read_sizes([Sample(p, relative_key(p, root)) for p in images], report)
        for sample in splits[split]:
            label = _label_path(sample.path)
            if os.path.isfile(label):
                _add_labels(sample, label, relative_key(label, root), len(names), report)
    for label in sorted({p for folder in label_dirs for p in files_with_extension(folder, ".txt")}):
        if os.path.abspath(label) not in used:
            report.dropped.add("label files without an image", "skipped; add their images to keep them",
                               relative_key(label, root))
    return Source(splits, [{"id": i + 1, "name": n} for i, n in enumerate(names)], f"YOLO, {layout}")


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


def _class_names(root: str, config: dict, config_file) -> list:
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
    listed = first_file(root, CLASS_LISTS)
    if listed is None:
        raise DatasetError(f"no class names for the YOLO dataset {root}: add data.yaml with names: [...], or "
                           "classes.txt with one name a line (class 0 first), or pass --classes FILE")
    return read_class_list(listed)


def _split_dirs(root: str, config: dict, config_file):
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
            found[split] = (find_images(folder), [folder])
    if found:
        return found, "split folders " + ", ".join(relative_key(folders[0], root) for _, folders in found.values())
    folder = os.path.join(root, "images")
    if os.path.isdir(folder):
        return {"train": (find_images(folder), [folder])}, "images/ + labels/, no split"
    return {"train": (find_images(root), [root])}, "labels beside images, no split"


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
            images += find_images(found)
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


def _add_labels(sample: Sample, label: str, key: str, num_names: int, report: Report) -> None:
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
