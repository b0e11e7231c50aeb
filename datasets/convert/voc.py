"""Pascal VOC: Annotations/ + JPEGImages/ (+ ImageSets/Main splits), or XML files beside their images.

- Coordinates are 1-based pixel indices, both ends included: xmin=1, xmax=W spans the whole image. Like
  detectron2 (pascal_voc.py) pixel i covers [i - 1, i] in COCO's continuous coordinates, so x = xmin - 1,
  y = ymin - 1, w = xmax - xmin + 1, h = ymax - ymin + 1 and a whole-image box is [0, 0, W, H]; back to VOC
  is xmin = x + 1, xmax = x + w. (torchvision hands the raw numbers over; mmdet reads xmin..xmax as they are;
  the difference is one pixel.)
- Objects marked difficult become iscrowd=1 ('ignore', the default): main.py does not train on them and
  COCOeval neither rewards nor penalises detecting them, VOC's own evaluation rule. 'keep' trains on them like
  any object (detectron2's choice), 'drop' leaves them out.
- Category ids: names in the order of a class list (--classes, or classes.txt in the source) or else sorted.
"""
import os
import xml.etree.ElementTree as ET

from ..validate import DatasetError
from .common import (CLASS_LISTS, IMAGE_EXTENSIONS, Report, Sample, Source, add_box, files_with_extension,
                     find_images, first_file, read_class_list, read_sizes, relative_key)

DIFFICULT = ("ignore", "keep", "drop")


def read_voc(src: str, report: Report, classes: str = None, difficult: str = "ignore") -> Source:
    """VOC's layout (Annotations/, JPEGImages/, optional ImageSets/Main/*.txt) or XML beside the images."""
    voc_layout = os.path.isdir(os.path.join(src, "Annotations"))
    xml_dir = os.path.join(src, "Annotations") if voc_layout else src
    image_dir = os.path.join(src, "JPEGImages") if voc_layout else None
    if voc_layout and not os.path.isdir(image_dir):
        raise DatasetError(f"{src} has Annotations/ but no JPEGImages/: put the images there")
    xmls = files_with_extension(xml_dir, ".xml")
    if not xmls:
        raise DatasetError(f"no VOC annotation files (*.xml) in {xml_dir}: give the folder holding Annotations/ "
                           "and JPEGImages/, or the XML files beside their images")
    parsed = [p for p in (_parse_xml(path, image_dir, src, report) for path in xmls) if p]
    labelled = {}
    for sample, key, _, _ in parsed:
        if labelled.setdefault(os.path.abspath(sample.path), key) != key:
            report.errors.add("images named by two annotation files", "keep one annotation file per image",
                              f"{sample.key} by {labelled[os.path.abspath(sample.path)]} and {key}")
    background = [Sample(path, relative_key(path, src)) for path in find_images(image_dir or src)
                  if os.path.abspath(path) not in labelled]
    names = read_class_list(classes) if classes else _default_names(src, parsed)
    ids = {name: i + 1 for i, name in enumerate(names)}
    readable = read_sizes([p[0] for p in parsed] + background, report)
    for sample, key, xml_size, objects in parsed:
        if sample.size:
            _add_objects(sample, key, xml_size, objects, ids, difficult, report)
    every = sorted(readable, key=lambda s: s.key)
    splits, layout = _splits(src, every, report) if voc_layout else ({"train": every}, "XML beside images")
    return Source(splits, [{"id": i, "name": n} for n, i in ids.items()], f"Pascal VOC, {layout}")


def _default_names(src: str, parsed: list) -> list:
    """classes.txt in the source when there is one, else every object name found, sorted."""
    listed = first_file(src, CLASS_LISTS)
    if listed:
        return read_class_list(listed)
    return sorted({name for *_, objects in parsed for name, *_ in objects})


def _parse_xml(path: str, image_dir: str, src: str, report: Report):
    """(Sample, the file's key, its <size>, [(name, difficult, (xmin, ymin, xmax, ymax), where)]), or None when
    the file is unusable."""
    key = relative_key(path, src)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        report.errors.add("annotation files that are not valid XML", "repair or re-export them", f"{key}: {e}")
        return None
    image = _image_for_xml(path, root.findtext("filename"), image_dir or os.path.dirname(path))
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
    return Sample(image, relative_key(image, src)), key, xml_size, objects


def _image_for_xml(xml_path: str, filename, folder: str):
    """The image named in <filename>, or else the one with the XML file's stem, in folder."""
    stem = os.path.splitext(os.path.basename(xml_path))[0]
    candidates = ([filename.strip()] if filename and filename.strip() else []) + \
        [stem + e for ext in sorted(IMAGE_EXTENSIONS) for e in (ext, ext.upper())]
    return next((os.path.join(folder, c) for c in candidates if os.path.isfile(os.path.join(folder, c))), None)


def _add_objects(sample: Sample, key: str, xml_size: tuple, objects: list, ids: dict, difficult: str,
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


def _splits(src: str, samples: list, report: Report):
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
                              f"{relative_key(list_file, src)}: {image_id}")
    return sorted((by_id[i] for i in set(ids) if i in by_id), key=lambda s: s.key)
