"""coco_eval_backend: pycocotools and faster-coco-eval give the same numbers; per-class AP; the refusals at
start-up; the timing command (python -m tools.benchmark --eval_backends)."""
import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch
from pycocotools.cocoeval import COCOeval

from datasets.coco_eval import CocoEvaluator, coco_evaluation, per_class_ap, per_class_table
from datasets.synthetic import CATEGORIES, generate_synthetic_coco
from runner import ROOT, read_log, run_main
from tools.benchmark.eval_backends import generated_ground_truth, indexed, made_up_detections


@pytest.fixture(scope="module")
def coco():
    """300 generated images of 6 classes, and a 7th class ('unseen') that has no ground truth."""
    ground_truth = generated_ground_truth(300, categories=6)
    ground_truth["categories"].append({"id": 7, "name": "unseen"})
    return indexed(ground_truth)


def evaluated(coco, backend, detections=None):
    evaluator = CocoEvaluator(coco, backend=backend)
    evaluator.update(made_up_detections(coco) if detections is None else detections)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def test_both_backends_give_the_same_numbers(coco):
    pytest.importorskip("faster_coco_eval")
    reference, faster = evaluated(coco, "pycocotools"), evaluated(coco, "faster")
    assert type(faster.coco_eval).__module__.startswith("faster_coco_eval")
    assert 0.1 < reference.stats[0] < 0.9  # neither trivial nor perfect: the matching is exercised
    assert faster.stats == pytest.approx(reference.stats, abs=1e-4)
    assert faster.per_class_ap == pytest.approx(reference.per_class_ap, abs=1e-4)
    assert faster.per_class_ap["unseen"] is None


def test_per_class_ap_is_the_ap_of_a_one_class_evaluation(coco):
    evaluator = evaluated(coco, "pycocotools")
    ap, ap50 = evaluator.per_class_ap, per_class_ap(evaluator.coco_eval, iou=0.5)
    assert list(ap) == [f"class{c}" for c in range(1, 7)] + ["unseen"]
    assert ap["unseen"] is None and ap50["unseen"] is None
    with contextlib.redirect_stdout(io.StringIO()):
        single = COCOeval(coco, coco.loadRes(evaluator.results()), "bbox")
        single.params.catIds = [3]
        single.evaluate()
        single.accumulate()
        single.summarize()
    assert ap["class3"] == pytest.approx(single.stats[0], abs=1e-12)
    assert ap50["class3"] == pytest.approx(single.stats[1], abs=1e-12)
    assert ap["class3"] != pytest.approx(ap["class4"], abs=1e-6)  # each class its own number, not the mean


def test_without_detections_a_class_with_ground_truth_gets_0_and_one_without_none(coco):
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    evaluator = evaluated(coco, "pycocotools", detections={i: empty for i in (2, 4)})  # classes 1-4 and 6
    present = {a["category_id"] for i in (2, 4) for a in coco.imgToAnns[i]}
    assert 0 < len(present) < 6
    assert evaluator.stats == [0.0] * 12
    assert evaluator.per_class_ap == {f"class{c}": 0.0 if c in present else None for c in range(1, 7)} | {
        "unseen": None}


def test_the_per_class_table_shows_the_worst_and_the_best_twenty():
    ap = {f"c{i:02d}": i / 100 for i in range(30)}
    ap["gone"] = None
    lines = per_class_table(ap, ap).splitlines()
    assert lines[1].split()[:2] == ["c00", "0.0000"] and lines[-2].split()[:2] == ["c29", "0.2900"]
    assert "10 more" in lines[11] and len(lines) == 1 + 20 + 1 + 1
    assert lines[-1] == "no ground truth: gone"


def test_plot_logs_per_class_curves_are_the_same_with_either_backend(coco, tmp_path):
    pytest.importorskip("faster_coco_eval")
    from tools.plot_logs import evaluation_curves

    (tmp_path / "gt.json").write_text(json.dumps(coco.dataset))
    evaluator = evaluated(coco, "pycocotools")
    evaluator.write_results(tmp_path / "results.json")
    reference, faster = (evaluation_curves(str(tmp_path / "results.json"), str(tmp_path / "gt.json"), backend)
                         for backend in ("pycocotools", "faster"))
    assert reference["per_class_ap"] == pytest.approx(evaluator.per_class_ap, abs=1e-12)
    assert faster["per_class_ap"] == pytest.approx(reference["per_class_ap"], abs=1e-4)
    assert faster["precision_iou50"] == pytest.approx(reference["precision_iou50"], abs=1e-4)


def test_a_run_with_the_faster_backend_logs_per_class_ap_by_name(data, tmp_path):
    pytest.importorskip("faster_coco_eval")
    out = tmp_path / "run"
    proc = run_main(data, out, "--save_results", options=["epochs=1", "coco_eval_backend=faster"])
    logged = read_log(out)[-1]["test_per_class_ap"]
    assert list(logged) == list(CATEGORIES)
    assert "per-class bbox AP (faster)" in proc.stdout and "per-class bbox AP" in (out / "info.txt").read_text()
    # the numbers are pycocotools' on the same detections, to the 4 digits logged
    ground_truth = indexed(json.loads((data / "annotations" / "instances_val2017.json").read_text()))
    detections = json.loads((out / "eval" / "results0000.json").read_text())
    expected = per_class_ap(coco_evaluation(ground_truth, detections, "pycocotools"))
    assert logged == pytest.approx(expected, abs=1e-4)

    evaluated_only = run_main(data, tmp_path / "eval", "--eval", "--resume", str(out / "checkpoint.pth"),
                              options=["coco_eval_backend=faster"])
    stats = json.loads((tmp_path / "eval" / "eval" / "eval_stats.json").read_text())
    assert stats["test_per_class_ap"] == logged, evaluated_only.stdout[-2000:]


def refused(data, tmp_path, option, env=None):
    proc = run_main(data, tmp_path / "out", options=[option], check=False, env=env)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    return lines[0]


def test_an_unknown_backend_is_refused_in_one_line(data, tmp_path):
    line = refused(data, tmp_path, "coco_eval_backend=fast")
    assert line == "error: coco_eval_backend='fast': expected pycocotools or faster"


def test_the_faster_backend_without_its_package_is_refused_in_one_line(data, tmp_path):
    hidden = tmp_path / "hidden"  # a module that shadows the installed package, as if it were not there
    hidden.mkdir()
    (hidden / "faster_coco_eval.py").write_text("raise ImportError(\"No module named 'faster_coco_eval'\")\n")
    line = refused(data, tmp_path, "coco_eval_backend=faster", env={"PYTHONPATH": str(hidden)})
    assert line.startswith("error: coco_eval_backend=faster needs") and line.endswith("pip install faster-coco-eval")
    assert not (tmp_path / "out").exists()


def test_the_timing_command_prints_a_table_per_dataset(tmp_path):
    pytest.importorskip("faster_coco_eval")
    generate_synthetic_coco(tmp_path / "demo", num_train=1, num_val=8, image_size=64)
    proc = subprocess.run([sys.executable, "-m", "tools.benchmark", "--eval_backends", "--images", "50", "--runs",
                           "1", "--coco_path", str(tmp_path / "demo"), "--json", str(tmp_path / "times.json")],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tables = proc.stdout.split("# COCO bbox evaluation, ")[1:]
    assert len(tables) == 2 and "demo's validation set" in tables[0] and "generated set of 50 images" in tables[1]
    for table in tables:
        for what in ("images", "detections", "pycocotools", "faster-coco-eval", "ratio pycocotools / faster",
                     "max abs difference of the 12 stats"):
            assert f"| {what}" in table
    rows = json.loads((tmp_path / "times.json").read_text())
    demo, generated = rows.values()
    assert demo["images"]["median"] == 8 and generated["images"]["median"] == 50
    assert generated["detections"]["median"] == 50 * 100
    for dataset in (demo, generated):
        assert dataset["max_difference"]["median"] <= 1e-4
        assert len(dataset["faster"]["samples"]) == 1 and dataset["ratio"]["median"] > 0
