"""tools/convert_dataset.py on tiny generated VOC, YOLO and COCO datasets, and one training run on its output."""
import contextlib
import io
import json
import os
import random
import re
import subprocess

import pytest
import torch
from PIL import Image

from runner import run_main, run_tool
from tools import convert_dataset


def convert(*args):
    """The command line's main() in this process, stdout and stderr together: a subprocess spends seconds on
    importing torch (datasets/ does), so the subprocess runs are the problem report's and the training test's."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        code = convert_dataset.main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, output.getvalue())


def write_image(path, size=(96, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 140, 30)).save(path)


def load(out, split):
    return json.loads((out / "annotations" / f"instances_{split}2017.json").read_text())


def boxes_by_file(data):
    """file_name -> sorted [(category name, bbox, iscrowd)]."""
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {i["id"]: i["file_name"] for i in data["images"]}
    found = {name: [] for name in files.values()}
    for ann in data["annotations"]:
        found[files[ann["image_id"]]].append((names[ann["category_id"]], ann["bbox"], ann["iscrowd"]))
    return {name: sorted(boxes) for name, boxes in found.items()}


def printed_num_classes(output):
    return int(re.search(r"--options num_classes=(\d+) dn_labelbook_size=\1\b", output).group(1))


def voc_xml(filename, size, objects):
    """objects: (name, (xmin, ymin, xmax, ymax), difficult)."""
    parts = [f"<annotation><filename>{filename}</filename>",
             f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"]
    for name, (x0, y0, x1, y1), difficult in objects:
        parts.append(f"<object><name>{name}</name><difficult>{int(difficult)}</difficult><bndbox><xmin>{x0}</xmin>"
                     f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


def yolo_dataset(root, images, names_file="classes.txt", names=("cat", "dog")):
    """images: {relative image path under root: ((width, height), [label lines])}, labels by YOLO's rule."""
    for rel, (size, lines) in images.items():
        write_image(root / rel, size)
        label = (root / rel.replace("images", "labels", 1)).with_suffix(".txt")
        if lines is not None:
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("".join(line + "\n" for line in lines))
    if names_file:
        (root / names_file).write_text("\n".join(names) + "\n")
    return root


def test_voc_layout_keeps_imagesets_splits_and_the_pixel_convention(tmp_path):
    src = tmp_path / "VOC2007"
    objects = {"a": [("dog", (10, 20, 50, 60), False), ("cat", (1, 1, 96, 64), True)],
               "b": [("cat", (5, 6, 7, 8), False)], "c": [("dog", (30, 10, 40, 20), False)]}
    for stem, objs in objects.items():
        write_image(src / "JPEGImages" / f"{stem}.jpg")
        (src / "Annotations").mkdir(exist_ok=True)
        (src / "Annotations" / f"{stem}.xml").write_text(voc_xml(f"{stem}.jpg", (96, 64), objs))
    (src / "ImageSets" / "Main").mkdir(parents=True)
    (src / "ImageSets" / "Main" / "train.txt").write_text("a\nb\n")
    (src / "ImageSets" / "Main" / "val.txt").write_text("c\n")
    out = tmp_path / "out"
    proc = convert("voc", src, "--out", out)
    assert proc.returncode == 0, proc.stdout
    train, val = load(out, "train"), load(out, "val")
    assert train["categories"] == val["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    # xmin=1..xmax=W is the whole image; difficult objects are kept as iscrowd=1
    assert boxes_by_file(train) == {"a.jpg": [("cat", [0, 0, 96, 64], 1), ("dog", [9, 19, 41, 41], 0)],
                                    "b.jpg": [("cat", [4, 5, 3, 3], 0)]}
    assert boxes_by_file(val) == {"c.jpg": [("dog", [29, 9, 11, 11], 0)]}
    assert all(i["width"] == 96 and i["height"] == 64 for i in train["images"] + val["images"])
    assert printed_num_classes(proc.stdout) == 3
    assert "train2017: 2 images (0 without boxes), 3 boxes (1 iscrowd), 2 of 2 classes" in proc.stdout
    assert os.path.islink(out / "train2017" / "a.jpg")
    assert os.path.samefile(out / "train2017" / "a.jpg", src / "JPEGImages" / "a.jpg")

    refused = convert("voc", src, "--out", tmp_path / "other", "--val-fraction", "0.5")
    assert refused.returncode == 2 and refused.stdout.startswith("error: the source has a val split already")
    assert len(refused.stdout.splitlines()) == 1 and not (tmp_path / "other").exists()


def test_voc_beside_images_with_class_list_clipping_and_dropped_boxes(tmp_path):
    src = tmp_path / "flat"
    for stem in "abcd":
        write_image(src / f"{stem}.png", (80, 60))
    (src / "a.xml").write_text(voc_xml("a.png", (80, 60), [("cat", (1, 1, 81, 20), False),
                                                           ("dog", (5, 5, 9, 9), True)]))
    (src / "b.xml").write_text(voc_xml("b.png", (80, 60), [("dog", (10, 10, 5, 30), False),
                                                           ("dog", (2, 3, 4, 5), False)]))
    (src / "gone.xml").write_text(voc_xml("gone.png", (80, 60), [("cat", (1, 1, 5, 5), False)]))
    (src / "classes.txt").write_text("dog\ncat\n")
    out = tmp_path / "out"
    proc = convert("voc", src, "--out", out, "--difficult", "drop", "--copy", "--val-fraction", "0.5", "--seed", "1")
    assert proc.returncode == 0, proc.stdout
    assert "warning: boxes with no width or height: 1 (b.xml object 1): dropped" in proc.stdout
    assert "warning: annotation files whose image is not found: 1 (gone.xml)" in proc.stdout
    assert "1 boxes reaching at most 1 px beyond their image were clipped" in proc.stdout
    train, val = load(out, "train"), load(out, "val")
    assert train["categories"] == [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}]
    found = {**boxes_by_file(train), **boxes_by_file(val)}
    assert found == {"a.png": [("cat", [0, 0, 80, 20], 0)], "b.png": [("dog", [1, 2, 3, 3], 0)],
                     "c.png": [], "d.png": []}
    assert len(train["images"]) == len(val["images"]) == 2
    assert not os.path.islink(out / "train2017" / train["images"][0]["file_name"])  # --copy


def test_yolo_roboflow_layout_with_data_yaml(tmp_path):
    src = tmp_path / "rf"
    images = {"train/images/p.jpg": ((128, 64), ["1 0.5 0.5 0.25 0.5", "0 0.1 0.2 0.2 0.4"]),
              "train/images/q.jpg": ((64, 64), []),
              "valid/images/p.jpg": ((100, 80), ["0 0.25 0.75 0.5 0.5"])}
    yolo_dataset(src, images, names_file=None)
    (src / "train" / "labels" / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (src / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnc: 2\nnames: {0: cat, 1: dog}\n")
    out = tmp_path / "out"
    proc = convert("yolo", src, "--out", out)
    assert proc.returncode == 0, proc.stdout
    assert "warning: label files without an image: 1 (train/labels/orphan.txt)" in proc.stdout
    train, val = load(out, "train"), load(out, "val")
    assert train["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert boxes_by_file(train) == {"p.jpg": [("cat", [0, 0, 25.6, 25.6], 0), ("dog", [48, 16, 32, 32], 0)],
                                    "q.jpg": []}
    assert boxes_by_file(val) == {"p.jpg": [("cat", [0, 40, 50, 40], 0)]}
    sizes = {i["file_name"]: (i["width"], i["height"]) for i in train["images"]}
    assert sizes == {"p.jpg": (128, 64), "q.jpg": (64, 64)}
    assert "train2017: 2 images (1 without boxes), 2 boxes (0 iscrowd), 2 of 2 classes" in proc.stdout
    assert printed_num_classes(proc.stdout) == 3


def yolo_unsplit(root):
    """10 images in images/ (two folders that share file names) + labels/, one without a label file."""
    images = {f"images/{folder}/{i}.png": ((64, 64), [f"{i % 2} 0.5 0.5 0.5 0.5"]) for folder in "ab" for i in range(5)}
    images["images/a/0.png"] = ((64, 64), None)
    return yolo_dataset(root, images)


def test_yolo_split_is_reproducible_and_names_do_not_collide(tmp_path):
    src = yolo_unsplit(tmp_path / "src")
    splits = []
    for out, seed in (("one", "3"), ("two", "3"), ("three", "4")):
        proc = convert("yolo", src, "--out", tmp_path / out, "--val-fraction", "0.3", "--seed", seed)
        assert proc.returncode == 0, proc.stdout
        assert "3 of 10 images (0.3) went to val, chosen with seed" in proc.stdout
        splits.append([sorted(os.readlink(p) for p in (tmp_path / out / f"{s}2017").iterdir())
                       for s in ("train", "val")])
    assert splits[0] == splits[1] and splits[0] != splits[2]
    keys = sorted(f"images/{folder}/{i}.png" for folder in "ab" for i in range(5))
    random.Random(3).shuffle(keys)  # the documented rule: sorted paths, shuffled by random.Random(seed)
    assert splits[0][1] == sorted(str(src / k) for k in keys[:3])
    renamed = 0
    for split in ("train", "val"):  # images/a/1.png and images/b/1.png in one split: 1.png and 1_1.png
        names = [i["file_name"] for i in load(tmp_path / "one", split)["images"]]
        assert len(set(names)) == len(names) == len(list((tmp_path / "one" / f"{split}2017").iterdir()))
        renamed += sum("_1." in n for n in names)
    assert renamed >= 2
    train, val = load(tmp_path / "one", "train"), load(tmp_path / "one", "val")
    assert len(train["annotations"]) + len(val["annotations"]) == 9  # a/0.png has no label file: background


def test_coco_passes_through_with_its_category_ids(tmp_path):
    src = tmp_path / "coco"
    for split, n in (("train", 2), ("val", 1)):
        images = [{"id": 10 + i, "file_name": f"sub/{split}{i}.png", "width": 96, "height": 64} for i in range(n)]
        for image in images:
            write_image(src / f"{split}2017" / image["file_name"])
        anns = [{"id": 100 + i, "image_id": 10 + i, "category_id": 7, "bbox": [1.5, 2, 30, 40], "area": 500.0,
                 "iscrowd": 0} for i in range(n)]
        (src / "annotations").mkdir(exist_ok=True)
        (src / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}))
    out = tmp_path / "out"
    proc = convert("coco", src, "--out", out)
    assert proc.returncode == 0, proc.stdout
    train = load(out, "train")
    assert train["categories"] == [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]
    assert boxes_by_file(train) == {f"train{i}.png": [("b", [1.5, 2, 30, 40], 0)] for i in range(2)}
    assert [a["area"] for a in train["annotations"]] == [500.0, 500.0]  # COCO's own areas are kept
    assert printed_num_classes(proc.stdout) == 8


def test_coco_to_yolo_and_back_keeps_boxes_within_a_pixel(tmp_path):
    rng = random.Random(0)
    src, sizes = tmp_path / "coco", [(128, 96), (64, 100), (100, 64), (80, 80)]
    images, annotations = [], []
    for index, (w, h) in enumerate(sizes):
        images.append({"id": index + 1, "file_name": f"{index}.png", "width": w, "height": h})
        write_image(src / "images" / f"{index}.png", (w, h))
        for _ in range(3):
            x, y = rng.uniform(0, w - 20), rng.uniform(0, h - 20)
            box = [x, y, rng.uniform(2, w - x), rng.uniform(2, h - y)]
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": rng.randint(1, 3),
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n} for i, n in ((1, "x"), (2, "y"), (3, "z"))]}
    (src / "annotations.json").write_text(json.dumps(coco))
    yolo = tmp_path / "yolo"
    for image in images:
        lines = [f"{a['category_id'] - 1} {(a['bbox'][0] + a['bbox'][2] / 2) / image['width']:.6f} "
                 f"{(a['bbox'][1] + a['bbox'][3] / 2) / image['height']:.6f} {a['bbox'][2] / image['width']:.6f} "
                 f"{a['bbox'][3] / image['height']:.6f}" for a in annotations if a["image_id"] == image["id"]]
        yolo_dataset(yolo, {f"images/{image['file_name']}": ((image["width"], image["height"]), lines)},
                     names=("x", "y", "z"))
    for fmt, source, out in (("yolo", yolo, tmp_path / "back"), ("coco", src / "annotations.json", tmp_path / "same")):
        proc = convert(fmt, source, "--out", out, "--val-fraction", "0.25")
        assert proc.returncode == 0, proc.stdout
        found = {**boxes_by_file(load(out, "train")), **boxes_by_file(load(out, "val"))}
        expected = boxes_by_file(coco)
        assert found.keys() == expected.keys()
        for name in expected:
            assert [(c, crowd) for c, _, crowd in found[name]] == [(c, crowd) for c, _, crowd in expected[name]]
            for (_, got, _), (_, want, _) in zip(found[name], expected[name]):
                assert max(abs(g - w) for g, w in zip(got, want)) <= 1, (name, got, want)


def test_unusable_data_is_reported_by_kind_and_nothing_is_written(tmp_path):
    images = {f"images/{i}.png": ((64, 64), ["0 0.5 0.5 0.2 0.2"]) for i in range(6)}
    images["images/1.png"] = ((64, 64), ["0 0.5 0.5 0.2 0.2", "5 0.5 0.5 0.2 0.2"])
    images["images/2.png"] = ((64, 64), ["2 0.5 0.5 0.2 0.2"])
    images["images/3.png"] = ((64, 64), ["1 1.5 0.5 0.4 0.4"])  # pixels, not fractions
    src = yolo_dataset(tmp_path / "src", images)
    (src / "images" / "4.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    proc = run_tool("convert_dataset.py", "yolo", src, "--out", out)  # the real command line, exit code and all
    assert proc.returncode == 2
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("error: 3 kinds of problems in ")
    assert lines[1] == "  image files that cannot be read as images: 1 (images/4.png: not an image format PIL " \
        "recognises): replace or delete them (and their label files)"
    assert "  class indices outside 0..1 (the 2 class names): 2 (labels/1.txt line 2: class 5; labels/2.txt line 1: " \
           "class 2)" in proc.stdout
    assert "  boxes more than 1 px outside their image: 1 (labels/3.txt line 1: [83.2, 19.2, 108.8, 44.8] in 64x64)" \
        in proc.stdout
    assert "Traceback" not in proc.stdout and not out.exists() and os.listdir(tmp_path) == ["src"]


@pytest.mark.parametrize("case", ["no class names", "no source", "out not empty"])
def test_user_mistakes_are_one_error_line(tmp_path, case):
    src = yolo_dataset(tmp_path / "src", {f"images/{i}.png": ((64, 64), ["0 0.5 0.5 0.2 0.2"]) for i in range(2)},
                       names_file=None if case == "no class names" else "classes.txt")
    out = tmp_path / "out"
    if case == "out not empty":
        (out / "x").mkdir(parents=True)
    proc = convert("yolo", tmp_path / "missing" if case == "no source" else src, "--out", out, "--val-fraction", "0.5")
    assert proc.returncode == 2 and len(proc.stdout.splitlines()) == 1, proc.stdout
    expected = {"no class names": f"error: no class names for the YOLO dataset {src}: add data.yaml with names:",
                "no source": f"error: source {tmp_path / 'missing'} not found",
                "out not empty": f"error: --out {out} exists and is not an empty folder"}[case]
    assert proc.stdout.startswith(expected), proc.stdout
    if case == "no source":
        assert not out.exists()


def test_main_trains_on_a_converted_dataset(tmp_path):
    src = yolo_unsplit(tmp_path / "src")
    out = tmp_path / "converted"
    proc = convert("yolo", src, "--out", out, "--val-fraction", "0.2")
    assert proc.returncode == 0, proc.stdout
    num_classes = printed_num_classes(proc.stdout)
    run = tmp_path / "run"
    run_main(out, run, "--dataset_file", "coco",
             options=["epochs=1", f"num_classes={num_classes}", f"dn_labelbook_size={num_classes}"])
    assert (run / "log.txt").is_file()
    datasets = torch.load(run / "checkpoint.pth", weights_only=False)["datasets"]
    assert datasets["train"]["images"] == 8 and datasets["val"]["images"] == 2
    assert datasets["train"]["annotation_file"] == str(out / "annotations" / "instances_train2017.json")
    assert datasets["train"]["boxes"] + datasets["val"]["boxes"] == 9
    assert datasets["train"]["categories"] == [[1, "cat"], [2, "dog"]]
