"""tools/plot_logs.py: the numbers it plots, from real and hand-made run folders."""
import json

import numpy as np
import pytest
from PIL import Image

from runner import read_log, run_tool

pytest.importorskip("matplotlib", reason="plot_logs needs matplotlib: pip install -r requirements-extra.txt")



def _plot(*args):
    return run_tool("plot_logs.py", *args)


def _resumed_run(folder, template: dict, data):
    """Epochs 0-2, then a resume that redid epochs 1-2 with other numbers, then a line torn by a kill."""
    folder.mkdir()
    lines = []
    for epoch, loss in [(0, 9.0), (1, 8.0), (2, 7.0), (1, 6.0), (2, 5.0)]:
        record = dict(template, epoch=epoch, train_loss=loss, train_lr=1e-4 * (epoch + 1),
                      test_coco_eval_bbox=[loss / 10, loss / 5, loss / 20] + [0.0] * 9)
        lines.append(json.dumps(record))
    (folder / "log.txt").write_text("\n".join(lines) + '\n{"train_loss": 4.0, "epo')
    (folder / "config_args_all.json").write_text(json.dumps({"coco_path": str(data), "val_ann_file": None}))
    return folder


def _detections(ground_truth: dict, dropped_category: int):
    """Exact boxes for every object, except every second object of one category: AP 1 for the others."""
    detections, seen = [], 0
    for ann in ground_truth["annotations"]:
        if ann["category_id"] == dropped_category:
            seen += 1
            if seen % 2 == 0:
                continue
        detections.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": ann["bbox"],
                           "score": 0.9})
    return detections


def test_series_evaluation_and_figure(trained_run, data, tmp_path):
    resumed = _resumed_run(tmp_path / "resumed", read_log(trained_run)[0], data)
    ground_truth = json.loads((data / "annotations" / "instances_val2017.json").read_text())
    counts = {c["id"]: sum(a["category_id"] == c["id"] for a in ground_truth["annotations"])
              for c in ground_truth["categories"]}
    dropped = max(counts, key=counts.get)
    (resumed / "eval").mkdir()
    (resumed / "eval" / "results0002.json").write_text(json.dumps(_detections(ground_truth, dropped)))

    proc = _plot(trained_run, resumed, "--out", tmp_path / "curves.png", "--dump-json", tmp_path / "data.json")
    assert proc.returncode == 0, proc.stdout
    assert "log.txt line 6 is not valid JSON" in proc.stdout
    with Image.open(tmp_path / "curves.png") as figure:
        assert figure.size[0] > 1000 and figure.size[1] > 500
    runs = json.loads((tmp_path / "data.json").read_text())
    assert list(runs) == ["run", "resumed"]

    series = runs["resumed"]["series"]
    assert series["epoch"] == [0, 1, 2]
    assert series["train_loss"] == [9.0, 6.0, 5.0]  # the resumed epochs' lines win
    assert series["train_lr"] == pytest.approx([1e-4, 2e-4, 3e-4])
    assert series["AP"] == pytest.approx([0.9, 0.6, 0.5]) and series["AP50"] == pytest.approx([1.8, 1.2, 1.0])
    assert series["AP75"] == pytest.approx([0.45, 0.3, 0.25])

    log = read_log(trained_run)[0]
    real = runs["run"]["series"]
    assert real["epoch"] == [0] and real["train_loss_giou"] == [log["train_loss_giou"]]
    assert real["test_loss"] == [log["test_loss"]] and real["AP"] == [log["test_coco_eval_bbox"][0]]

    evaluation = runs["resumed"]["evaluation"]
    assert evaluation["results_file"].endswith("results0002.json")
    names = {c["id"]: c["name"] for c in ground_truth["categories"]}
    kept = (counts[dropped] + 1) // 2
    recall_thresholds = np.linspace(0, 1, 101)
    for category, count in counts.items():
        ap = evaluation["per_class_ap"][names[category]]
        if count == 0:
            assert ap is None
        elif category == dropped:  # precision 1 up to recall kept/count, then nothing
            assert ap == pytest.approx(np.mean(recall_thresholds <= kept / count + 1e-9))
        else:
            assert ap == pytest.approx(1.0)
    assert len(evaluation["recall"]) == len(evaluation["precision_iou50"]) == 101
    assert evaluation["precision_iou50"][0] == pytest.approx(1.0)
    # The trained run's own detections: per-class AP averages to the AP main.py logged.
    own = runs["run"]["evaluation"]
    assert own["results_file"].endswith("results0000.json")
    assert np.mean([v for v in own["per_class_ap"].values() if v is not None]) == pytest.approx(log["test_coco_eval_bbox"][0],
                                                                                               abs=1e-6)


def test_missing_run_is_one_error_line(tmp_path):
    proc = _plot(tmp_path / "nowhere", "--out", tmp_path / "x.png")
    assert proc.returncode == 2 and "error:" in proc.stdout and "no log.txt" in proc.stdout
    assert "Traceback" not in proc.stdout


def test_per_class_ap_over_epochs(trained_run, tmp_path):
    proc = _plot(trained_run, "--per-class", "--out", tmp_path / "classes.png", "--dump-json", tmp_path / "data.json")
    assert proc.returncode == 0, proc.stdout
    logged = read_log(trained_run)[0]["test_per_class_ap"]
    run = json.loads((tmp_path / "data.json").read_text())["run"]
    assert run["series"]["per_class_AP"] == {name: [ap] for name, ap in logged.items()}
    assert logged == pytest.approx(run["evaluation"]["per_class_ap"], abs=1e-4)  # the run's own detections
    with Image.open(tmp_path / "classes.png") as figure:
        assert figure.size[1] == 1425  # a third row of panels, 4.75 inches at 100 dpi
