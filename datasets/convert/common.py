"""What every reader shares: the samples it builds, the report it fills, image discovery and sizes, class lists
and add_box, where every box is checked the same way.

- A box reaching at most CLIP_PX beyond its image (rounding in exports) is clipped; one further out is an error,
  usually labels in another format than assumed. A box without area is dropped with a warning.
- Image sizes come from file headers (PIL, no decoding): the size main.py will see (EXIF rotation ignored).
"""
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..validate import DatasetError, Problems, image_size

IMAGE_EXTENSIONS = {".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}
CLIP_PX = 1  # boxes reaching this far beyond their image are clipped, further out they are errors
CLASS_LISTS = ("classes.txt", "obj.names")  # one name per line (obj.names: Darknet's)


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
        self.errors, self.dropped = Problems(), Problems()
        self.clipped = 0

    def warnings(self) -> list:
        return [f"{what}: {fix}" for what, fix in self.dropped.lines()]

    def raise_errors(self, src: str) -> None:
        if self.errors.kinds:
            raise DatasetError(self.errors.message(src))


def find_images(folder: str) -> list:
    """Image files below folder, sorted, so that every machine sees the same order."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return found


def files_with_extension(folder: str, extension: str) -> list:
    return sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files
                  if f.lower().endswith(extension) and f not in CLASS_LISTS)


def relative_key(path: str, root: str) -> str:
    """path below root with '/' separators: the same key, and so the same order and split, on every system."""
    return os.path.relpath(path, root).replace(os.sep, "/")


def read_sizes(samples: list, report: Report) -> list:
    """The samples whose image header can be read, with their size; the others are reported."""
    with ThreadPoolExecutor(max_workers=8) as pool:  # header reads wait on the disk, not the CPU
        found = list(pool.map(image_size, [s.path for s in samples]))
    readable = []
    for sample, (size, error) in zip(samples, found):
        if error:
            report.errors.add("image files that cannot be read as images",
                              "replace or delete them (and their label files)", f"{sample.key}: {error}")
        else:
            sample.size = size
            readable.append(sample)
    return readable


def read_class_list(path: str) -> list:
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


def first_file(folder: str, names: tuple):
    return next((os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))), None)


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
