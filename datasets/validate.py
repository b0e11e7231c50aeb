"""Checks of a COCO-format dataset before training, so bad data stops a run at start-up with one message.

read_annotations turns an unreadable or non-JSON annotation file into a DatasetError naming the file (and
line and column). check_dataset then looks at everything else at once (required fields, duplicate ids,
annotations pointing at no image, labels the model cannot represent, image files missing, unreadable or
of another size than the JSON says) and raises one DatasetError listing every kind of problem with its
count and first examples. Images are checked from their headers only (no decoding), and a passed check
is recorded in cache_dir, so a restart with unchanged inputs checks nothing again.
"""
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, UnidentifiedImageError

from util.distributed import is_main_process
from util.misc import atomic_write

logger = logging.getLogger("dino.datasets")

CACHE_FILE = "dataset_checks.json"
CHECKS_VERSION = 1  # part of the cache key: records written by other checks do not count
EXAMPLES = 3  # examples shown per kind of problem
UNREADABLE = (OSError, Image.DecompressionBombError)  # what PIL raises for files it cannot read


def unreadable_reason(error: Exception) -> str:
    """What PIL's error says, without the path it repeats."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image format PIL recognises"
    return getattr(error, "strerror", None) or str(error)


class DatasetError(ValueError):
    """Bad input data. str() is the complete message; its first line says what, where and what to do.

    torch's DataLoader re-raises a worker's exception in the main process as
    type(e)("Caught DatasetError in DataLoader worker process N.\\nOriginal Traceback ...: MESSAGE"); the
    constructor recovers MESSAGE from that text, so the main process gets the worker's error unchanged.
    """

    def __init__(self, message: str):
        last_line_prefix = f"\n{type(self).__module__}.{type(self).__qualname__}: "
        if message.startswith(f"Caught {type(self).__name__} ") and last_line_prefix in message:
            message = message.rpartition(last_line_prefix)[2].rstrip("\n")
        super().__init__(message)


def read_annotations(ann_file: str) -> dict:
    """The annotation file's JSON object; DatasetError if it cannot be read, is not JSON or not an object."""
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"annotation file {ann_file} not found: --coco_path should contain annotations/"
                           "instances_{train,val}2017.json (or set train_ann_file / val_ann_file)") from None
    except OSError as e:
        raise DatasetError(f"annotation file {ann_file} cannot be read ({e.strerror}): "
                           "check the path and its permissions") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"invalid JSON ({e.msg}) in annotation file {ann_file}, line {e.lineno} column "
                           f"{e.colno}: repair or re-export the file") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"annotation file {ann_file} is not UTF-8 text (byte {e.start}): "
                           "use a COCO instances JSON file") from None
    if not isinstance(data, dict):
        raise DatasetError(f"annotation file {ann_file} holds a JSON {type(data).__name__}, not an object with "
                           "'images', 'annotations' and 'categories': use a COCO instances JSON file")
    return data


class Problems:
    """Problems grouped by kind, (what, fix) -> examples, kept in the order found."""

    def __init__(self):
        self.kinds = {}

    def add(self, what: str, fix: str, example: str) -> None:
        self.kinds.setdefault((what, fix), []).append(example)

    def lines(self) -> list:
        """('what: count (first examples)', fix) per kind."""
        lines = []
        for (what, fix), examples in self.kinds.items():
            shown = "; ".join(examples[:EXAMPLES]) + ("; ..." if len(examples) > EXAMPLES else "")
            lines.append((f"{what}: {len(examples)} ({shown})", fix))
        return lines

    def message(self, ann_file: str, img_folder: str = None) -> str:
        lines = self.lines()
        if len(lines) == 1:
            (what, fix), = lines
            return f"{what} in {ann_file}: {fix}"
        images = f" (images in {img_folder})" if img_folder else ""
        return (f"{len(lines)} kinds of problems in {ann_file}{images}, each listed below with "
                "what to do: fix them and rerun\n" + "\n".join(f"  {what}: {fix}" for what, fix in lines))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_box(value) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(_is_number(v) for v in value)


def _check_images(images, problems) -> list:
    """Required fields and unique ids; returns (image, (width, height) or None) for the files to check."""
    fix = "give every image an integer 'id', a 'file_name' and positive 'width' and 'height'"
    checkable, seen = [], set()
    for index, image in enumerate(images):
        if not isinstance(image, dict):
            problems.add("image entries that are not JSON objects", fix, f"images[{index}]")
            continue
        bad = [key for key, ok in (("id", _is_int(image.get("id"))),
                                   ("file_name", isinstance(image.get("file_name"), str) and image["file_name"]),
                                   ("width", _is_number(image.get("width")) and image["width"] > 0),
                                   ("height", _is_number(image.get("height")) and image["height"] > 0)) if not ok]
        if bad:
            name = f"images[{index}]" if "id" in bad else f"image id {image['id']}"
            problems.add("image entries with missing or invalid fields", fix,
                         f"{name}: {', '.join(repr(k) for k in bad)}")
        if "id" not in bad:
            if image["id"] in seen:
                problems.add("image ids listed more than once", "give every image its own 'id'", str(image["id"]))
            seen.add(image["id"])
            if "file_name" not in bad:
                size = None if {"width", "height"} & set(bad) else (image["width"], image["height"])
                checkable.append((image, size))
    return checkable


def _check_annotations(annotations, image_ids, problems) -> None:
    fix = "give every annotation an integer 'id', 'image_id' and 'category_id', and a 'bbox' of 4 finite numbers"
    seen = set()
    for index, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            problems.add("annotation entries that are not JSON objects", fix, f"annotations[{index}]")
            continue
        bad = [key for key, ok in (("id", _is_int(ann.get("id"))), ("image_id", _is_int(ann.get("image_id"))),
                                   ("category_id", _is_int(ann.get("category_id"))),
                                   ("bbox", _is_box(ann.get("bbox")))) if not ok]
        name = f"annotations[{index}]" if "id" in bad else f"annotation id {ann['id']}"
        if bad:
            problems.add("annotations with missing or invalid fields", fix,
                         f"{name}: {', '.join(repr(k) for k in bad)}")
        if "id" not in bad:
            if ann["id"] in seen:
                problems.add("annotation ids used more than once", "give every annotation its own 'id'",
                             str(ann["id"]))
            seen.add(ann["id"])
        if "image_id" not in bad and ann["image_id"] not in image_ids:
            problems.add("annotations whose image_id is no image in 'images'",
                         "remove these annotations or add their images", f"{name}: image_id {ann['image_id']}")


def _check_categories(categories, num_classes, dn_labelbook_size, contiguous, problems) -> None:
    """Unique integer ids, and labels (the ids, or 0..K-1 when contiguous) that the model can represent."""
    ids = []
    for index, cat in enumerate(categories):
        if not (isinstance(cat, dict) and _is_int(cat.get("id"))):
            problems.add("categories without an integer 'id'", "give every category an integer 'id' and a 'name'",
                         f"categories[{index}]")
        elif cat["id"] in ids:
            problems.add("category ids listed more than once", "give every category its own 'id'", str(cat["id"]))
        else:
            ids.append(cat["id"])
    limit = min(num_classes, dn_labelbook_size)
    sizes = f"num_classes={num_classes}, dn_labelbook_size={dn_labelbook_size}"
    if contiguous and len(ids) > limit:
        problems.add(f"more categories than labels with contiguous_category_ids=True and {sizes}",
                     f"set num_classes and dn_labelbook_size to {len(ids)}", f"{len(ids)} categories")
    elif not contiguous:
        for category_id in sorted(ids):
            if category_id < 0:
                problems.add("negative category ids", "use ids >= 0, or contiguous_category_ids=True",
                             f"category {category_id}")
            elif category_id >= limit:
                problems.add(f"category ids beyond {sizes}",
                             f"set num_classes and dn_labelbook_size to {max(ids) + 1}, "
                             "or contiguous_category_ids=True", f"category {category_id}")


def image_size(path):
    """(width, height) read from the file's header without decoding pixels, or why it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.size, None
    except FileNotFoundError:
        return None, "missing"
    except UNREADABLE as e:
        return None, unreadable_reason(e)


def _check_image_files(images, img_folder, problems) -> None:
    """images: (image, (width, height) from the JSON or None)."""
    if not os.path.isdir(img_folder):
        problems.add("image folder not found", "--coco_path should contain train2017/ and val2017/ "
                     "(or set train_img_folder / val_img_folder)", img_folder)
        return
    paths = [os.path.join(img_folder, image["file_name"]) for image, _ in images]
    with ThreadPoolExecutor(max_workers=8) as pool:  # header reads wait on the disk, not the CPU
        found = list(pool.map(image_size, paths))
    for (image, expected), path, (size, error) in zip(images, paths, found):
        name = f"image id {image['id']} {path}"
        if error == "missing":
            problems.add("image files not found", "restore them or remove their entries from the annotation file",
                         name)
        elif error:
            problems.add("image files that cannot be read as images",
                         "replace them or remove their entries from the annotation file", f"{name}: {error}")
        elif expected is not None and size != expected:
            problems.add("images whose size differs from their 'width' and 'height'",
                         "correct 'width' and 'height' (or the files)",
                         f"{name} is {size[0]}x{size[1]}, the JSON says {expected[0]}x{expected[1]}")


def _cache_key(ann_file, img_folder, num_classes, dn_labelbook_size, contiguous) -> str:
    stat = os.stat(ann_file)
    return json.dumps([CHECKS_VERSION, os.path.abspath(ann_file), stat.st_size, stat.st_mtime_ns,
                       os.path.abspath(img_folder), num_classes, dn_labelbook_size, bool(contiguous)])


def _read_cache(path) -> dict:
    """Keys of the inputs that passed; a missing or damaged cache (it is only ours) means none."""
    try:
        with open(path) as f:
            cache = json.load(f)
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}


def check_dataset(data: dict, ann_file: str, img_folder: str, num_classes: int, dn_labelbook_size: int,
                  contiguous_category_ids: bool = False, cache_dir=None) -> None:
    """Raise one DatasetError listing every problem of this split, unless cache_dir records that these very
    inputs (annotation file path, size and mtime, image folder, label settings) passed before."""
    cache_path = os.path.join(cache_dir, CACHE_FILE) if cache_dir else None
    key = _cache_key(ann_file, img_folder, num_classes, dn_labelbook_size, contiguous_category_ids)
    if cache_path and key in _read_cache(cache_path):
        return
    problems = Problems()
    sections = {}
    for section in ("images", "annotations", "categories"):
        if isinstance(data.get(section), list):
            sections[section] = data[section]
        else:
            problems.add("top-level keys missing or not a list", "a COCO instances file has 'images', "
                         "'annotations' and 'categories', each a list", repr(section))
    images = _check_images(sections.get("images", []), problems)
    if "annotations" in sections and "images" in sections:
        image_ids = {image["id"] for image in sections["images"]
                     if isinstance(image, dict) and _is_int(image.get("id"))}
        _check_annotations(sections["annotations"], image_ids, problems)
    if "categories" in sections:
        _check_categories(sections["categories"], num_classes, dn_labelbook_size, contiguous_category_ids, problems)
    if images:
        logger.info("checking the %d image files of %s in %s%s", len(images), ann_file, img_folder,
                    f" (a pass is recorded in {cache_path})" if cache_path else "")
        _check_image_files(images, img_folder, problems)
    if problems.kinds:
        raise DatasetError(problems.message(ann_file, img_folder))
    if cache_path and is_main_process():
        cache = _read_cache(cache_path)
        cache[key] = {"images": len(sections["images"]), "annotations": len(sections["annotations"])}
        atomic_write(cache_path, lambda f: f.write(json.dumps(cache, indent=1).encode()))
