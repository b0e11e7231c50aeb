"""Fine-tuning from a checkpoint on other classes, through main.py: class rows carried over by name, the load
plan (--plan), and one clear error for what neither --finetune_ignore nor the mapping covers."""
import json
import re

import pytest

from checkpoint.finetune import OFFICIAL_COCO_ROWS, checkpoint_label_names, map_classes
from runner import run_main

FINETUNE = ["--finetune_ignore", "label_enc.weight", "class_embed"]  # the official recipe's flags


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny model trained long enough (12 epochs on 64 images) to score well above chance on its training
    images: 4 shapes, category ids 1..4 (ellipse, rectangle, triangle, cross)."""
    root = tmp_path_factory.mktemp("pretrained")
    data, out = root / "data", root / "run"
    run_main(data, out, options=["epochs=12", "lr_drop=10", "lr=0.0004", "synthetic_num_train=64",
                                 "synthetic_num_val=4"], timeout=600)
    return data, out / "checkpoint.pth"


def _dataset(pretrained, tmp_path, name: str, ids: dict) -> list:
    """Options that train and evaluate on the pre-training images with categories renumbered (old id -> new
    id; categories not in `ids` left out, with their boxes)."""
    data, _ = pretrained
    coco = json.loads((data / "annotations" / "instances_train2017.json").read_text())
    coco["categories"] = [{**c, "id": ids[c["id"]]} for c in coco["categories"] if c["id"] in ids]
    coco["annotations"] = [{**a, "category_id": ids[a["category_id"]]} for a in coco["annotations"]
                           if a["category_id"] in ids]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(coco))
    images = data / "train2017"
    return [f"train_ann_file={path}", f"val_ann_file={path}", f"train_img_folder={images}",
            f"val_img_folder={images}", "synthetic_num_train=64", "synthetic_num_val=4"]


def _eval_ap(pretrained, dataset, *extra, options=()) -> float:
    proc = run_main(pretrained[0], "", "--eval", "--pretrain_model_path", str(pretrained[1]), *extra,
                    options=[*dataset, *options])
    return float(re.search(r"bbox AP ([0-9.]+)", proc.stdout).group(1))


def test_classes_are_carried_over_by_name(pretrained, tmp_path):
    """The same classes under other ids score as before (exactly, on this CPU); on a subset of them (one class
    fewer, ids shuffled) the carried rows score far above the official reset rows and above rows loaded by
    position."""
    original = _eval_ap(pretrained, _dataset(pretrained, tmp_path, "same", {1: 1, 2: 2, 3: 3, 4: 4}))
    shuffled = _eval_ap(pretrained, _dataset(pretrained, tmp_path, "shuffled", {1: 4, 2: 3, 3: 1, 4: 2}), *FINETUNE)
    assert original > 0.02 and abs(shuffled - original) <= 0.002  # equal here; other kernels may round otherwise

    subset = _dataset(pretrained, tmp_path, "subset", {1: 3, 2: 1, 3: 2})
    carried = _eval_ap(pretrained, subset, *FINETUNE)
    reset = _eval_ap(pretrained, subset, *FINETUNE, options=["map_classes_by_name=False"])
    by_position = _eval_ap(pretrained, subset, options=["map_classes_by_name=False"])
    assert carried > 5 * reset and carried > 2 * by_position, (carried, reset, by_position)


def test_plan_says_what_loads_and_writes_nothing(pretrained, tmp_path):
    """--plan: the tensors, the classes carried, new and dropped, and the schedule; no output_dir appears."""
    subset = _dataset(pretrained, tmp_path, "plan", {1: 2, 3: 1})
    coco = json.loads((tmp_path / "plan.json").read_text())
    coco["categories"].append({"id": 3, "name": "star"})
    (tmp_path / "plan.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    proc = run_main(pretrained[0], out, "--plan", "--pretrain_model_path", str(pretrained[1]), *FINETUNE,
                    "--start_epoch", "2", options=[*subset, "epochs=6", "lr_drop=4"])
    text = proc.stdout
    assert "Loaded model weights only from" in text and "classes by name" in text
    assert re.search(r"classes by name \(from the checkpoint's recorded categories\): 2 carried over, 1 new, 2 of "
                     r"the checkpoint's not in this dataset", text), text[-3000:]
    assert re.search(r"carried +triangle \(3->1\), ellipse \(1->2\)\n", text) and re.search(r"new +star", text)
    assert re.search(r"dropped +rectangle, cross", text)
    assert "lr schedule step: lr 0.0005 at epoch 2; x0.1 at epoch 4; trains to epoch 5\n" in text
    assert "--plan: nothing was trained and no file was written" in text
    assert not out.exists()


def test_plan_of_an_interrupted_run_says_where_the_schedule_stands(pretrained, tmp_path):
    """Continuing the pre-training run with more epochs: the drop has passed, and the plan says so."""
    out = pretrained[1].parent
    before = sorted(p.name for p in out.iterdir())
    proc = run_main(pretrained[0], out, "--plan",
                    options=["epochs=14", "lr_drop=10", "lr=0.0004", "synthetic_num_train=64", "synthetic_num_val=4"])
    assert "Continuing the interrupted run in" in proc.stdout
    assert ("lr schedule step: lr 4e-05 at epoch 12, after the drop at epoch 10; no drop before the end; trains "
            "to epoch 13 (the checkpoint's run planned 12 epochs)") in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_head_that_fits_neither_way_is_one_error(pretrained, tmp_path):
    """Three unnamed-in-common classes and no --finetune_ignore: the error names the tensor, the shapes, the fix."""
    renamed = _dataset(pretrained, tmp_path, "renamed", {1: 1, 2: 2})
    coco = json.loads((tmp_path / "renamed.json").read_text())
    coco["categories"] = [{**c, "name": f"new-{c['name']}"} for c in coco["categories"]]
    (tmp_path / "renamed.json").write_text(json.dumps(coco))
    proc = run_main(pretrained[0], tmp_path / "out", "--pretrain_model_path", str(pretrained[1]), check=False,
                    options=[*renamed, "num_classes=3", "dn_labelbook_size=3"])
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stdout
    assert re.search(r"error: .*checkpoint\.pth: (\S*class_embed\S*|label_enc\.weight) is \[5, 32\] in the "
                     r"checkpoint but \[3, 32\] in "
                     r"this model \(and \d+ more\): add --finetune_ignore label_enc.weight class_embed", errors[0])


def test_a_mistyped_ignore_pattern_names_the_closest_keys(pretrained, tmp_path):
    proc = run_main(pretrained[0], tmp_path / "out", "--plan", "--pretrain_model_path", str(pretrained[1]),
                    "--finetune_ignore", "clas_embed", options=_dataset(pretrained, tmp_path, "same", {1: 1, 2: 2}))
    assert "ignore patterns that matched no checkpoint key: clas_embed (closest: class_embed" in proc.stdout


def test_official_coco_checkpoints_are_named_by_coco_ids():
    """Official files record no categories: with 91 rows their labels are COCO category ids."""
    names, source = checkpoint_label_names({"model": {}}, OFFICIAL_COCO_ROWS)
    assert (names[1], names[18], names[12], source) == ("person", "dog", None, "COCO names (91 classes)")
    mapping = map_classes(names, [None, "Dog", "person ", "zebra crossing"], source)
    assert mapping.carried == [(1, 18, "Dog"), (2, 1, "person ")]
    assert mapping.fresh == [(3, "zebra crossing")] and len(mapping.dropped) == 78
    assert checkpoint_label_names({"model": {}}, 7) == (None, "")
    assert map_classes(["a", "b"], [None, "c"], "x") is None  # nothing shared: nothing carried by accident
