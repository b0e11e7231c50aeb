"""Every bad input gets one clear line: main.py on a broken copy of a tiny dataset stops with exit code 2 and
one `error: what, where: what to do` line as its last output, without a traceback, before training starts
(or, for faults only decoding reveals, at the image that has them)."""
import argparse
import json
import math
import shutil

import pytest
from PIL import Image

from runner import run_main

from datasets import DatasetError, build_dataset, validate
from datasets.synthetic import generate_synthetic_coco
from datasets.validate import CACHE_FILE, check_dataset, read_annotations

IMAGE = "{:012d}.png".format  # the generated file names


@pytest.fixture(scope="session")
def clean(tmp_path_factory):
    """4 training and 2 validation images of 64 px, categories 1..4 (the demo config has num_classes=5)."""
    root = tmp_path_factory.mktemp("bad_data") / "clean"
    generate_synthetic_coco(root, num_train=4, num_val=2, image_size=64, seed=0)
    return root


def ann_path(root, split):
    return root / "annotations" / f"instances_{split}2017.json"


def edit(split, change):
    """A case that loads the split's JSON, lets change(data) edit it in place, and writes it back."""
    def apply(root):
        data = json.loads(ann_path(root, split).read_text())
        change(data)
        ann_path(root, split).write_text(json.dumps(data))
    return apply


def write(split, text):
    return lambda root: ann_path(root, split).write_bytes(text)


def replace_image(split, image_id, make):
    return lambda root: make(root / f"{split}2017" / IMAGE(image_id))


def label_9(data):
    data["categories"].append({"id": 9, "name": "ninth"})
    data["annotations"][0]["category_id"] = 9


def drop_sizes(data):
    for image in data["images"]:
        del image["width"], image["height"]


def truncate(path):
    path.write_bytes(path.read_bytes()[:3000])  # the header is intact: only decoding finds the missing data


def thin(root):
    Image.new("RGB", (1, 300)).save(root / "train2017" / IMAGE(1))
    edit("train", lambda d: d["images"][0].update(width=1, height=300))(root)


# name: (make the bad dataset, extra main.py arguments, texts the error line must hold)
CASES = {
    "training label beyond num_classes": (
        edit("train", label_9), [], ["category ids beyond num_classes=5, dn_labelbook_size=5: 1 (category 9) in ",
                                     ": set num_classes and dn_labelbook_size to 10, or contiguous_category_ids=True"]),
    "annotation file is a list": (
        write("train", b"[]"), [], ["instances_train2017.json holds a JSON list, not an object with 'images'"]),
    "images without width and height": (
        edit("val", drop_sizes), [], ["image entries with missing or invalid fields: 2 (image id 1: 'width', "
                                      "'height'; image id 2: 'width', 'height') in "]),
    "malformed JSON": (
        write("train", b'{\n "images": [\n  {"id": 1,}\n ]\n}'), [],
        ["invalid JSON (Expecting property name enclosed in double quotes) in annotation file",
         "instances_train2017.json, line 3 column 12: repair or re-export the file"]),
    "missing image file": (
        lambda root: (root / "train2017" / IMAGE(3)).unlink(), [],
        ["image files not found: 1 (image id 3 ", "train2017/000000000003.png) in "]),
    "corrupt image": (
        replace_image("val", 2, lambda p: p.write_bytes(b"\x00garbage" * 50)), [],
        ["image files that cannot be read as images: 1 (image id 2 ",
         "val2017/000000000002.png: not an image format PIL recognises) in "]),
    "truncated image (loader worker)": (
        replace_image("train", 2, truncate), ["--num_workers", "1"],
        ["image file cannot be decoded (image id 2 ", "train2017/000000000002.png: image file is truncated) in "]),
    "image too thin to resize": (
        thin, [], ["image too thin to resize (image id 1 ",
                   "1x300: resizing to shorter side 64 with max_size 64 gives 0x0) in ", ": remove it from the "]),
    "annotation of an image that does not exist": (
        edit("train", lambda d: d["annotations"][0].update(image_id=99)), [],
        ["annotations whose image_id is no image in 'images': 1 (annotation id 1: image_id 99) in "]),
    "image size differs from the JSON": (
        edit("val", lambda d: d["images"][0].update(width=80)), [],
        ["images whose size differs from their 'width' and 'height': 1 (image id 1 ",
         "is 64x64, the JSON says 80x64) in "]),
    "annotation file missing": (
        lambda root: ann_path(root, "train").unlink(), [], ["instances_train2017.json not found: --coco_path should"]),
    "image folder missing": (
        lambda root: shutil.rmtree(root / "val2017"), [], ["image folder not found: 1 (", "val2017) in "]),
}


def run_on(root, tmp_path, *extra):
    options = [f"{split}_{kind}={root / sub}" for split in ("train", "val") for kind, sub in
               (("ann_file", f"annotations/instances_{split}2017.json"), ("img_folder", f"{split}2017"))]
    return run_main(root, tmp_path / "out", "--dataset_file", "coco", *extra, options=options, check=False)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_data_stops_with_one_error_line(name, clean, tmp_path):
    make_bad, extra, texts = CASES[name]
    root = tmp_path / "data"
    shutil.copytree(clean, root)
    make_bad(root)
    proc = run_on(root, tmp_path, *extra)
    lines = proc.stdout.rstrip("\n").splitlines()
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert "error: " in lines[-1] and sum("error" in line for line in lines) == 1, proc.stdout[-3000:]
    for text in texts:
        assert text in lines[-1]


def test_every_problem_is_listed_in_one_message_and_a_passed_check_is_not_repeated(clean, tmp_path):
    """Three kinds of problems in the training set: one message, the summary on the error line, one indented
    line per kind. The validation set passed, which output_dir records: the second run does not check it again,
    while the broken training set is checked on every run."""
    root = tmp_path / "data"
    shutil.copytree(clean, root)
    edit("train", label_9)(root)
    for image_id in (2, 3):
        (root / "train2017" / IMAGE(image_id)).unlink()
    edit("train", lambda d: d["images"][0].update(height=70))(root)
    outputs = []
    for _ in range(2):
        proc = run_on(root, tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stdout
        lines = proc.stdout.rstrip("\n").splitlines()
        assert "error: 3 kinds of problems in " in lines[-4] and "instances_train2017.json (images in " in lines[-4]
        assert sorted(line.partition(" (")[0] for line in lines[-3:]) == [
            "  category ids beyond num_classes=5, dn_labelbook_size=5: 1", "  image files not found: 2",
            "  images whose size differs from their 'width' and 'height': 1"]
        assert any(line.endswith(": set num_classes and dn_labelbook_size to 10, or contiguous_category_ids=True")
                   for line in lines[-3:])
        assert any("(image id 2 " in line and "; image id 3 " in line for line in lines[-3:])
        assert "checking the 4 image files of " in proc.stdout
        outputs.append(proc.stdout)
    assert "checking the 2 image files of " in outputs[0] and "checking the 2 image files of " not in outputs[1]
    cache = json.loads((tmp_path / "out" / CACHE_FILE).read_text())
    assert [json.loads(key)[1] for key in cache] == [str(ann_path(root, "val"))]


# --- every other input the checks read, in-process (one check costs milliseconds) -----------------------

def with_image_entry(**fields):
    return lambda d: d["images"][0].update(fields)


def with_annotation(**fields):
    return lambda d: d["annotations"][0].update(fields)


def without(section, index, key):
    return lambda d: d[section][index].pop(key)


FIELD_CASES = {
    "no 'categories'": (lambda d: d.pop("categories"), "top-level keys missing or not a list: 1 ('categories')"),
    "'images' is an object": (lambda d: d.update(images={}), "top-level keys missing or not a list: 1 ('images')"),
    "an image entry is a number": (lambda d: d["images"].append(7), "image entries that are not JSON objects: 1 "
                                                                    "(images[4])"),
    "image id a string": (with_image_entry(id="a"), "image entries with missing or invalid fields: 1 "
                                                    "(images[0]: 'id')"),
    "image without file_name": (without("images", 1, "file_name"), "(image id 2: 'file_name')"),
    "image width 0": (with_image_entry(width=0), "(image id 1: 'width')"),
    "duplicate image id": (lambda d: d["images"][1].update(id=1), "image ids listed more than once: 1 (1)"),
    "annotation without bbox": (without("annotations", 0, "bbox"), "annotations with missing or invalid fields: 1 "
                                                                  "(annotation id 1: 'bbox')"),
    "bbox of 3 numbers": (with_annotation(bbox=[1, 2, 3]), "(annotation id 1: 'bbox')"),
    "bbox with NaN": (with_annotation(bbox=[1, 2, math.nan, 3]), "(annotation id 1: 'bbox')"),
    "annotation without category_id": (without("annotations", 0, "category_id"), "(annotation id 1: 'category_id')"),
    "annotation without id": (without("annotations", 0, "id"), "(annotations[0]: 'id')"),
    "duplicate annotation id": (lambda d: d["annotations"][1].update(id=1), "annotation ids used more than once: "
                                                                            "1 (1)"),
    "category without id": (without("categories", 0, "id"), "categories without an integer 'id': 1 "
                                                             "(categories[0])"),
    "duplicate category id": (lambda d: d["categories"][1].update(id=1), "category ids listed more than once: 1 (1)"),
    "negative category id": (lambda d: d["categories"][0].update(id=-1), "negative category ids: 1 (category -1)"),
}


@pytest.mark.parametrize("name", list(FIELD_CASES))
def test_field_problems_name_the_entry(name, clean):
    change, text = FIELD_CASES[name]
    ann_file = ann_path(clean, "train")
    data = read_annotations(ann_file)
    change(data)
    with pytest.raises(DatasetError) as error:
        check_dataset(data, str(ann_file), str(clean / "train2017"), num_classes=5, dn_labelbook_size=5)
    message = str(error.value)
    assert text in message and f" in {ann_file}" in message.splitlines()[0]


@pytest.mark.parametrize("contiguous, num_classes, dn_labelbook_size, text", [
    (False, 4, 5, "category ids beyond num_classes=4, dn_labelbook_size=5: 1 (category 4) in "),
    (False, 5, 4, "category ids beyond num_classes=5, dn_labelbook_size=4: 1 (category 4) in "),
    (True, 3, 3, "more categories than labels with contiguous_category_ids=True and num_classes=3, "
                 "dn_labelbook_size=3: 1 (4 categories) in "),
    (True, 4, 4, None),
])
def test_labels_must_fit_the_model(contiguous, num_classes, dn_labelbook_size, text, clean):
    """Labels are the category ids (1..4 here), or 0..K-1 for K categories with contiguous_category_ids."""
    ann_file = ann_path(clean, "train")
    check = dict(data=read_annotations(ann_file), ann_file=str(ann_file), img_folder=str(clean / "train2017"),
                 num_classes=num_classes, dn_labelbook_size=dn_labelbook_size, contiguous_category_ids=contiguous)
    if text is None:
        check_dataset(**check)
        return
    with pytest.raises(DatasetError) as error:
        check_dataset(**check)
    assert str(error.value).startswith(text) and str(error.value).endswith(
        f": set num_classes and dn_labelbook_size to {4 if contiguous else 5}" +
        ("" if contiguous else ", or contiguous_category_ids=True"))


@pytest.mark.parametrize("content, text", [
    (b"", "invalid JSON (Expecting value) in annotation file {}, line 1 column 1: repair or re-export the file"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "annotation file {} is not UTF-8 text (byte 0): use a COCO instances JSON file"),
    (b'"images"', "annotation file {} holds a JSON str, not an object with 'images', 'annotations' and "),
])
def test_unreadable_annotation_files_are_named(content, text, tmp_path):
    ann_file = tmp_path / "ann.json"
    ann_file.write_bytes(content)
    with pytest.raises(DatasetError) as error:
        read_annotations(str(ann_file))
    assert str(error.value).startswith(text.format(ann_file))


def test_cache_key_covers_the_file_and_the_label_settings(clean, tmp_path, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(clean, root)
    ann_file, img_folder = str(ann_path(root, "train")), str(root / "train2017")
    opened = []
    real = validate.image_size
    monkeypatch.setattr(validate, "image_size", lambda path: opened.append(path) or real(path))

    def check(num_classes=5):
        opened.clear()
        check_dataset(read_annotations(ann_file), ann_file, img_folder, num_classes, 5, cache_dir=str(tmp_path))
        return len(opened)
    assert check() == 4 and check() == 0
    assert check(num_classes=6) == 4  # another label setting: checked again
    edit("train", lambda d: d["annotations"].pop())(root)
    assert check() == 4 and check() == 0  # another file content: checked again
    (root / "train2017" / IMAGE(1)).unlink()
    assert check() == 0  # a file removed later is found when loaded (test above), not on every start


def test_a_path_option_that_is_not_a_path_is_named(tmp_path):
    """--options train_ann_file=a,b gives a list (a comma makes one)."""
    args = argparse.Namespace(dataset_file="coco", coco_path=str(tmp_path), train_img_folder=None,
                              train_ann_file=["a", "b"])
    with pytest.raises(DatasetError, match=r"^train_ann_file is \['a', 'b'\], not a path: give one path"):
        build_dataset("train", args)
