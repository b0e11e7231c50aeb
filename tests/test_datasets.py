"""Datasets: the synthetic generator, COCO loading and its checks, seeded transforms, the sampler, evaluation."""
import argparse
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from datasets import DatasetError, build_dataset, get_coco_api_from_dataset
from datasets import transforms as T
from datasets.coco import CocoDetection
from datasets.validate import read_annotations
from datasets.coco_eval import CocoEvaluator
from datasets.sampler import GlobalBatchSampler, ShardedSampler, epoch_order
from datasets.synthetic import MARKER, ensure_synthetic_coco, generate_synthetic_coco

ROOT = Path(__file__).resolve().parents[1]
SIZE = 80


def data_args(root, **overrides):
    args = dict(dataset_file="synthetic", coco_path=str(root), synthetic_num_train=20, synthetic_num_val=10,
                synthetic_image_size=SIZE, seed=7, num_classes=5, dn_labelbook_size=5, output_dir="",
                contiguous_category_ids=False, train_img_folder=None,
                train_ann_file=None, val_img_folder=None, val_ann_file=None, data_aug_scales=[64, 80, 96],
                data_aug_max_size=128, data_aug_scales2_resize=[64, 80], data_aug_scales2_crop=[48, 80],
                data_aug_val_size=SIZE, data_aug_hflip=True)
    args.update(overrides)
    return argparse.Namespace(**args)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "synthetic"
    generate_synthetic_coco(path, num_train=20, num_val=10, image_size=SIZE, seed=0)
    return path


def files_of(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


def ground_truth_predictions(coco, image_ids, category_to_label=lambda c: c):
    preds = {}
    for image_id in image_ids:
        anns = coco.imgToAnns[image_id]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        labels = torch.tensor([category_to_label(a["category_id"]) for a in anns], dtype=torch.int64)
        preds[image_id] = {"scores": torch.ones(len(anns)), "boxes": boxes, "labels": labels}
    return preds


def evaluate(coco, predictions, label_to_category_id=None):
    evaluator = CocoEvaluator(coco, label_to_category_id)
    evaluator.update(predictions)
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats


def write_coco(path, annotations, categories=({"id": 1, "name": "a"},), size=(40, 30)):
    """A one-image COCO file (and its image) for the loader's checks."""
    (path / "img").mkdir()
    Image.new("RGB", size).save(path / "img" / "1.png")
    ann_file = path / "ann.json"
    ann_file.write_text(json.dumps({"images": [{"id": 1, "file_name": "1.png", "width": size[0], "height": size[1]}],
                                    "annotations": annotations, "categories": list(categories)}))
    return path / "img", ann_file


def coco_dataset(img_folder, ann_file, transforms=None, **kwargs):
    return CocoDetection(img_folder, ann_file, read_annotations(ann_file), transforms, seed=0, **kwargs)


def box(ann_id, bbox, category_id=1, iscrowd=0):
    return {"id": ann_id, "image_id": 1, "category_id": category_id, "bbox": bbox, "area": 1.0, "iscrowd": iscrowd}


# --- synthetic generator ---------------------------------------------------------------------------------

def test_synthetic_layout_loads_in_pycocotools(root):
    assert sorted(os.listdir(root)) == ["annotations", MARKER, "train2017", "val2017"]
    for split, count in (("train2017", 20), ("val2017", 10)):
        coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
        assert len(coco.imgs) == count == len(os.listdir(root / split))
        assert [(c["id"], c["name"], c["supercategory"]) for c in coco.loadCats(coco.getCatIds())] == [
            (1, "ellipse", "shape"), (2, "rectangle", "shape"), (3, "triangle", "shape"), (4, "cross", "shape")]
        assert len(coco.anns) >= count  # 1-5 objects on most images
        for image in coco.imgs.values():
            assert (image["width"], image["height"]) == (SIZE, SIZE)
            assert Image.open(root / split / image["file_name"]).size == (SIZE, SIZE)
        for ann in coco.anns.values():
            x, y, w, h = ann["bbox"]
            assert all(isinstance(v, float) for v in ann["bbox"]) and ann["iscrowd"] == 0
            assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= SIZE and y + h <= SIZE
            assert 0 < ann["area"] <= w * h and 1 <= ann["category_id"] <= 4


def test_synthetic_boxes_are_tight(root):
    """A rectangle's box is its own pixels: the colour inside differs from the ring just outside it."""
    coco = COCO(str(root / "annotations" / "instances_train2017.json"))
    checked = 0
    for ann in coco.anns.values():
        x, y, w, h = (int(v) for v in ann["bbox"])
        if ann["category_id"] != 2 or w < 8 or h < 8 or x == 0 or y == 0 or x + w == SIZE or y + h == SIZE:
            continue
        pixels = np.asarray(Image.open(root / "train2017" / coco.imgs[ann["image_id"]]["file_name"]), dtype=float)
        inner_edge = np.concatenate([pixels[y, x + 2:x + w - 2], pixels[y + h - 1, x + 2:x + w - 2]])
        outer_edge = np.concatenate([pixels[y - 1, x + 2:x + w - 2], pixels[y + h, x + 2:x + w - 2]])
        inside = pixels[y + h // 2, x + w // 2]
        if np.abs(inner_edge - inside).max() > 30:  # something drawn over this edge: not a clean witness
            continue
        assert np.linalg.norm(outer_edge - inside, axis=1).mean() > 40
        checked += 1
    assert checked >= 2


def test_generator_is_deterministic(tmp_path):
    generate_synthetic_coco(tmp_path / "a", num_train=4, num_val=2, image_size=64, seed=3)
    generate_synthetic_coco(tmp_path / "b", num_train=4, num_val=2, image_size=64, seed=3)
    generate_synthetic_coco(tmp_path / "c", num_train=4, num_val=2, image_size=64, seed=4)
    a, b, c = files_of(tmp_path / "a"), files_of(tmp_path / "b"), files_of(tmp_path / "c")
    assert len(a) == 4 + 2 + 2 + 1 and a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.suffix == ".png")


def test_ensure_is_a_no_op_then_refuses_other_parameters(tmp_path, monkeypatch):
    out = tmp_path / "syn"
    ensure_synthetic_coco(out, 4, 2, 64, seed=0)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    monkeypatch.setattr("datasets.synthetic._write_split", lambda *a: pytest.fail("regenerated"))
    ensure_synthetic_coco(out, 4, 2, 64, seed=0)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(ValueError, match="delete the folder or choose another --coco_path"):
        ensure_synthetic_coco(out, 5, 2, 64, seed=0)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("not a dataset")
    with pytest.raises(ValueError, match="choose another --coco_path"):
        ensure_synthetic_coco(tmp_path / "other", 4, 2, 64, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "syn"]  # no temporary folder left behind


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr("datasets.synthetic._write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_coco(tmp_path / "syn", 4, 2, 64, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_losing_the_rename_race_accepts_an_identical_winner(tmp_path, monkeypatch):
    generate_synthetic_coco(tmp_path / "same", 4, 2, 64, seed=0)
    generate_synthetic_coco(tmp_path / "other", 4, 2, 64, seed=9)
    real_rename = os.rename
    winner = tmp_path / "same"

    def rival_finishes_first(src, dst):
        shutil.copytree(winner, dst)
        real_rename(src, dst)
    monkeypatch.setattr(os, "rename", rival_finishes_first)
    generate_synthetic_coco(tmp_path / "a", 4, 2, 64, seed=0)
    assert files_of(tmp_path / "a") == files_of(tmp_path / "same")
    winner = tmp_path / "other"
    with pytest.raises(OSError):
        generate_synthetic_coco(tmp_path / "b", 4, 2, 64, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "other", "same"]  # temporary copies removed


def test_cli_prints_summary_and_racing_processes_agree(tmp_path):
    out = tmp_path / "syn"
    cmd = [sys.executable, "tools/make_synthetic_coco.py", "--out", str(out), "--num-train", "6", "--num-val", "3",
           "--image-size", "64", "--seed", "1"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    boxes = sum(len(json.loads((out / "annotations" / f"instances_{s}2017.json").read_text())["annotations"])
                for s in ("train", "val"))
    for stdout, _ in outputs:
        match = re.search(r"(\d+) images, (\d+) boxes, ([\d.]+)% small", stdout)
        assert match and int(match[1]) == 9 and int(match[2]) == boxes and 0 <= float(match[3]) <= 100
    generate_synthetic_coco(tmp_path / "ref", 6, 3, 64, seed=1)
    assert files_of(out) == files_of(tmp_path / "ref")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref", "syn"]


# --- evaluation ------------------------------------------------------------------------------------------

def test_ground_truth_as_predictions_scores_ap_1(root):
    coco = get_coco_api_from_dataset(build_dataset("val", data_args(root)))
    preds = ground_truth_predictions(coco, coco.getImgIds())
    stats = evaluate(coco, preds)
    assert len(stats) == 12 and stats[0] == pytest.approx(1.0) and stats[1] == pytest.approx(1.0)
    # Dropping one image's boxes must cost recall, so the 1.0 above is a real measurement.
    image_id = next(i for i in coco.getImgIds() if coco.imgToAnns[i])
    preds[image_id] = {k: v[:0] for k, v in preds[image_id].items()}
    assert evaluate(coco, preds)[8] < 1.0


def test_evaluator_counts_repeated_images_once_and_scores_only_seen_images(root):
    coco = COCO(str(root / "annotations" / "instances_val2017.json"))
    ids = coco.getImgIds()
    preds = ground_truth_predictions(coco, ids[:4])
    evaluator = CocoEvaluator(coco)
    evaluator.update(preds)
    evaluator.update(preds)  # a padded sampler repeats images
    evaluator.synchronize_between_processes()
    assert sorted(evaluator.detections) == ids[:4]
    assert len(evaluator.results()) == sum(len(coco.imgToAnns[i]) for i in ids[:4])
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_evaluator_maps_contiguous_labels_back(root):
    coco = COCO(str(root / "annotations" / "instances_val2017.json"))
    preds = ground_truth_predictions(coco, coco.getImgIds(), category_to_label=lambda c: c - 1)
    assert evaluate(coco, preds, label_to_category_id=[1, 2, 3, 4])[0] == pytest.approx(1.0)
    assert evaluate(coco, preds)[0] < 0.5  # unmapped, the labels name the wrong categories


def test_evaluator_without_detections_gives_zeros(root, capsys):
    coco = COCO(str(root / "annotations" / "instances_val2017.json"))
    empty = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    assert evaluate(coco, {i: empty for i in coco.getImgIds()}) == [0.0] * 12
    assert evaluate(coco, {}) == [0.0] * 12
    assert "every COCO metric is 0.0" in capsys.readouterr().out


# --- dataset and transforms ------------------------------------------------------------------------------

def test_val_sample_matches_annotations(root):
    dataset = build_dataset("val", data_args(root))
    image, target = dataset[0]
    ann = dataset.coco.imgToAnns[dataset.ids[0]]
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    assert target["image_id"].item() == dataset.ids[0] and target["image_id"].dtype == torch.int64
    assert target["orig_size"].tolist() == target["size"].tolist() == [SIZE, SIZE]
    expected = torch.tensor([[x + w / 2, y + h / 2, w, h] for x, y, w, h in (a["bbox"] for a in ann)]) / SIZE
    assert torch.allclose(target["boxes"], expected.reshape(-1, 4).float())
    assert target["boxes"].dtype == torch.float32
    assert target["labels"].tolist() == [a["category_id"] for a in ann] and target["labels"].dtype == torch.int64


def test_train_transforms_keep_boxes_inside_in_cxcywh(root):
    dataset = build_dataset("train", data_args(root))
    sizes = set()
    for epoch in range(3):
        for index in range(len(dataset)):
            image, target = dataset[(epoch, index)]
            h, w = target["size"].tolist()
            assert image.shape[1:] == (h, w)
            sizes.add((h, w))
            b = target["boxes"]
            assert b.dtype == torch.float32 and len(b) == len(target["labels"]) == len(target["area"])
            assert ((b >= 0) & (b <= 1)).all() and (b[:, 2:] > 0).all()
            assert (b[:, :2] - b[:, 2:] / 2 >= -1e-6).all() and (b[:, :2] + b[:, 2:] / 2 <= 1 + 1e-6).all()
    assert len(sizes) > 3  # resizes and crops really happened


def test_hflip_and_crop_move_boxes():
    image = Image.new("RGB", (100, 50))
    target = {"boxes": torch.tensor([[10.0, 5.0, 30.0, 25.0], [80.0, 0.0, 100.0, 10.0]]),
              "labels": torch.tensor([1, 2]), "area": torch.tensor([400.0, 200.0]), "iscrowd": torch.zeros(2)}
    _, flipped = T.hflip(image, target)
    assert flipped["boxes"].tolist() == [[70.0, 5.0, 90.0, 25.0], [0.0, 0.0, 20.0, 10.0]]
    cropped_image, cropped = T.crop(image, target, (0, 20, 30, 50))  # top, left, height, width
    assert cropped_image.size == (50, 30) and cropped["size"].tolist() == [30, 50]
    assert cropped["boxes"].tolist() == [[0.0, 5.0, 10.0, 25.0]] and cropped["labels"].tolist() == [1]
    assert cropped["area"].tolist() == [200.0]
    resized_image, resized = T.resize(image, target, 25, max_size=40)  # the longer side caps the scale
    assert resized_image.size == (40, 20) and resized["boxes"][0].tolist() == [4.0, 2.0, 12.0, 10.0]
    tensor, normalized = T.Compose([T.ToTensor(), T.Normalize()])(image, target, random.Random(0))
    assert tensor.shape == (3, 50, 100) and tensor[0, 0, 0].item() == pytest.approx(-0.485 / 0.229)
    assert torch.allclose(normalized["boxes"][0], torch.tensor([0.2, 0.3, 0.2, 0.4]))


def test_augmentation_is_a_function_of_epoch_and_index(root):
    dataset = build_dataset("train", data_args(root))
    for key in [(2, 5), (0, 3)]:
        (a, ta), (b, tb) = dataset[key], dataset[key]
        assert torch.equal(a, b) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert torch.equal(dataset[3][0], dataset[(0, 3)][0])
    differs = [not torch.equal(dataset[(0, i)][0], dataset[(1, i)][0]) for i in range(5)]
    assert sum(differs) >= 3
    other_seed = build_dataset("train", data_args(root, seed=8))
    assert any(not torch.equal(dataset[(0, i)][0], other_seed[(0, i)][0]) for i in range(5))


def test_unusable_boxes_are_dropped_with_one_warning(tmp_path, caplog):
    img_folder, ann_file = write_coco(tmp_path, [box(1, [1, 2, 10, 8]), box(2, [5, 5, 0, 4]), box(3, [5, 5, 4, -2]),
                                                 box(4, [50, 5, 4, 4]), box(5, [1, 1, 5, 5], category_id=8),
                                                 box(6, [0, 0, 20, 20], iscrowd=1)])
    with caplog.at_level(logging.WARNING, logger="dino.datasets"):
        dataset = coco_dataset(img_folder, ann_file, T.Compose([T.ToTensor()]))
    warnings = [r for r in caplog.records if r.name == "dino.datasets"]
    assert len(warnings) == 1 and "dropped 4 boxes" in warnings[0].getMessage()
    assert "annotation id 2" in warnings[0].getMessage()
    _, target = dataset[0]
    assert target["boxes"].tolist() == [[1.0, 2.0, 11.0, 10.0]]  # the crowd box is not a target either
    assert target["iscrowd"].tolist() == [0] and target["size"].tolist() == [30, 40]


def test_missing_annotations_default_to_what_cocoeval_reads(tmp_path):
    """'iscrowd' and 'area' are optional in the file but COCOeval reads both."""
    img_folder, ann_file = write_coco(tmp_path, [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 8]}])
    coco = coco_dataset(img_folder, ann_file).coco
    assert coco.anns[1]["iscrowd"] == 0 and coco.anns[1]["area"] == 80
    stats = evaluate(coco, ground_truth_predictions(coco, [1]))
    assert stats[0] == pytest.approx(1.0)


def test_missing_files_give_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"nowhere/ann\.json not found: .*instances_\{train,val\}2017\.json"):
        read_annotations(tmp_path / "nowhere" / "ann.json")
    img_folder, ann_file = write_coco(tmp_path, [box(1, [1, 2, 10, 8])])
    (img_folder / "1.png").unlink()
    dataset = coco_dataset(img_folder, ann_file)
    with pytest.raises(DatasetError, match=r"^image file not found \(image id 1 .*img/1\.png\) in .*ann\.json: "):
        dataset[0]


def test_category_ids_as_is_or_contiguous(tmp_path):
    cats = [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]
    img_folder, ann_file = write_coco(tmp_path, [box(1, [1, 1, 5, 5], 7), box(2, [2, 2, 5, 5], 3)], cats)
    as_is = coco_dataset(img_folder, ann_file)
    contiguous = coco_dataset(img_folder, ann_file, contiguous_category_ids=True)
    assert as_is[0][1]["labels"].tolist() == [7, 3] and as_is.label_to_category_id is None
    assert contiguous[0][1]["labels"].tolist() == [1, 0] and contiguous.label_to_category_id == [3, 7]


def test_build_uses_override_paths(root, tmp_path):
    img_folder, ann_file = write_coco(tmp_path, [box(1, [1, 1, 5, 5])])
    args = data_args(tmp_path / "unused", dataset_file="coco", val_img_folder=str(img_folder),
                     val_ann_file=str(ann_file))
    dataset = build_dataset("val", args)
    assert len(dataset) == 1 and dataset.ann_file == str(ann_file)
    with pytest.raises(DatasetError, match="instances_train2017.json not found"):
        build_dataset("train", args)


# --- sampler ---------------------------------------------------------------------------------------------

def test_training_batches_are_cut_from_one_global_order_per_epoch():
    ranks = [GlobalBatchSampler(11, batch_size=2, seed=1, num_replicas=2, rank=r) for r in range(2)]
    order = epoch_order(11, seed=1, epoch=0)
    assert order == torch.randperm(11, generator=torch.Generator().manual_seed(1)).tolist()
    batches = [list(s) for s in ranks]
    assert [len(b) for b in batches] == [2, 2] and len(ranks[0]) == 2  # 11 // 4 steps; the last 3 samples wait
    for step in range(2):
        for rank in range(2):
            assert [i for _, i in batches[rank][step]] == order[4 * step + 2 * rank:4 * step + 2 * rank + 2]
    ranks[0].set_epoch(1)
    assert {e for batch in ranks[0] for e, _ in batch} == {1}


def test_the_epoch_continues_from_a_global_sample_on_any_number_of_processes():
    """4 samples done by 2 processes x 2; the rest goes to 1 process x 2, then 2 x 1: each sample once."""
    order = epoch_order(12, seed=3, epoch=2)
    alone = GlobalBatchSampler(12, 2, 3)
    alone.set_epoch(2)
    alone.set_start(4)
    assert alone.steps_left() == 4
    later = [i for batch in alone for _, i in batch][:4]
    assert later == order[4:8]
    seen = []
    for rank in range(2):
        sampler = GlobalBatchSampler(12, 1, 3, num_replicas=2, rank=rank)
        sampler.set_epoch(2)
        sampler.set_start(8)
        seen += [i for batch in sampler for _, i in batch]
    assert sorted(order[:4] + later + seen) == list(range(12))
    alone.set_start(4)
    assert len(list(alone)) == 4 and len(list(alone)) == 6  # the start applies to one pass only


@pytest.mark.parametrize("last_layout", [(2, 1, 2), (4, 1, 1)], ids=["2x1x2", "4x1x1"])
def test_an_epoch_continued_on_other_layouts_trains_each_of_its_samples_once(last_layout):
    """An epoch of 23 begun on 2 processes x batch 2 trains 20 (as drop_last); continued on 1 x 3, then on the
    last layout (processes x batch x accumulate_steps), whose rest of 7 ends in a shorter step dealt among the
    ranks (one of them gets an empty batch): each of the 20 is trained once, the other 3 never."""
    order = epoch_order(23, seed=5, epoch=1)

    def run(layout, start, epoch_samples, steps=None):
        """The samples of `steps` optimizer steps (default: the rest of the epoch), each rank's batches, and
        the samples done after them."""
        world, batch, accumulate = layout
        ranks = [GlobalBatchSampler(23, batch, 5, world, rank, accumulate) for rank in range(world)]
        for sampler in ranks:
            sampler.set_epoch(1)
            sampler.set_start(start, epoch_samples)
        steps_left, end = ranks[0].steps_left(), ranks[0].epoch_samples
        batches = [list(sampler) for sampler in ranks]
        assert [len(b) for b in batches] == [steps_left * accumulate] * world
        steps = steps_left if steps is None else steps
        taken = [i for b in batches for batch in b[:steps * accumulate] for _, i in batch]
        return taken, batches, min(start + steps * world * batch * accumulate, end)

    first = GlobalBatchSampler(23, 2, 5, 2)
    assert first.epoch_samples == 20 and not first.ends_short()
    seen, _, done = run((2, 2, 1), 0, None, steps=1)
    more, _, done = run((1, 3, 1), done, 20, steps=3)
    assert done == 13
    rest, batches, done = run(last_layout, done, 20)
    assert done == 20
    assert any(batch == [] for b in batches for batch in b)  # a rank with nothing in the shorter step
    assert sorted(seen + more + rest) == sorted(order[:20])
    assert len(seen + more + rest) == 20
    tail = GlobalBatchSampler(23, 1, 5, last_layout[0], 0, last_layout[2])
    tail.set_start(13, 20)
    assert tail.steps_left() == 2 and tail.ends_short()


def test_evaluation_shards_cover_every_sample():
    shards = [[i for _, i in ShardedSampler(5, num_replicas=2, rank=r)] for r in range(2)]
    assert shards == [[0, 2, 4], [1, 3, 0]]
    assert [i for _, i in ShardedSampler(5)] == [0, 1, 2, 3, 4]
