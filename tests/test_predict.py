"""load_detector and tools/predict.py on a real (tiny) training checkpoint."""
import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from runner import run_tool

from models import load_detector
from models.inference import _label_names



def _predict(*args):
    return run_tool("predict.py", *args)


@pytest.fixture(scope="module")
def val_images(data, trained_run):
    return sorted((data / "val2017").glob("*.png"))


def test_api_predictions_are_the_evaluations_detections(trained_run, val_images):
    """Same preprocessing and postprocessing as main.py's evaluation: the same boxes, scores and labels."""
    detector = load_detector(trained_run / "checkpoint.pth")
    assert detector.weights == "regular" and not detector.model.training
    assert detector.class_names[1:] == ["ellipse", "rectangle", "triangle", "cross"]
    evaluated = json.loads((trained_run / "eval" / "results0000.json").read_text())
    predictions = detector.predict([str(p) for p in val_images], threshold=-1.0, batch_size=4)
    assert len(predictions) == len(val_images)
    for path, prediction in zip(val_images, predictions):
        expected = [d for d in evaluated if d["image_id"] == int(path.stem)]
        assert len(expected) == len(prediction["scores"]) == 30
        boxes = torch.tensor([d["bbox"] for d in expected])
        boxes[:, 2:] += boxes[:, :2]
        torch.testing.assert_close(prediction["boxes"], boxes, atol=1e-3, rtol=0)
        torch.testing.assert_close(prediction["scores"], torch.tensor([d["score"] for d in expected]), atol=1e-5, rtol=0)
        assert prediction["labels"].tolist() == [d["category_id"] for d in expected]
        assert prediction["names"] == [detector.class_names[d["category_id"]] for d in expected]
    # A single image gives a dict; a CHW tensor in [0, 1] gives the same result as its file.
    single = detector.predict(val_images[0], threshold=-1.0)
    tensor = torch.from_numpy(np.array(Image.open(val_images[0]).convert("RGB"))).permute(2, 0, 1) / 255.0
    torch.testing.assert_close(detector.predict(tensor, threshold=-1.0)["boxes"], single["boxes"])
    torch.testing.assert_close(single["boxes"], predictions[0]["boxes"])


def test_ema_weights_are_chosen_when_present(trained_run, tmp_path):
    checkpoint = torch.load(trained_run / "checkpoint.pth", weights_only=True)
    # Other weights than the regular ones (scaled alike, so the aliases of the shared heads stay equal).
    ema = {k: v * 1.05 if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
    torch.save({**checkpoint, "ema_model": {"n_averaged": torch.tensor(3), **{f"module.{k}": v for k, v in ema.items()}}},
               tmp_path / "with_ema.pth")
    torch.save({"model": ema, "model_is_ema": True, "args": checkpoint["args"], "categories": checkpoint["categories"]},
               tmp_path / "ema_only.pth")
    regular, auto, ema_only = (load_detector(tmp_path / "with_ema.pth", weights="regular"),
                               load_detector(tmp_path / "with_ema.pth"), load_detector(tmp_path / "ema_only.pth"))
    assert (regular.weights, auto.weights, ema_only.weights) == ("regular", "ema", "ema")
    image = torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(0))
    from_regular, from_auto, from_ema_only = (d.predict(image, threshold=-1.0) for d in (regular, auto, ema_only))
    torch.testing.assert_close(from_auto["scores"], from_ema_only["scores"])
    assert not torch.allclose(from_auto["scores"], from_regular["scores"])
    # auto picks the weights whose best evaluation in the run was higher (a use_ema run's best_regular file).
    for regular_ap, ema_ap, chosen in ((0.5, 0.4, "regular"), (0.4, 0.5, "ema")):
        best = {"regular": {"ap": regular_ap, "epoch": 0}, "ema": {"ap": ema_ap, "epoch": 0}}
        torch.save({**torch.load(tmp_path / "with_ema.pth", weights_only=True), "best": best}, tmp_path / "best.pth")
        assert load_detector(tmp_path / "best.pth").weights == chosen
    with pytest.raises(ValueError, match="holds no EMA weights"):
        load_detector(trained_run / "checkpoint.pth", weights="ema")
    with pytest.raises(ValueError, match="holds only EMA weights"):
        load_detector(tmp_path / "ema_only.pth", weights="regular")


def test_a_checkpoint_without_architecture_needs_a_config(trained_run, val_images, tmp_path):
    """Like an official zoo file: some build keys and the categories missing; the run's config fills them."""
    checkpoint = torch.load(trained_run / "checkpoint.pth", weights_only=True)
    args = {k: v for k, v in checkpoint["args"].items() if k not in ("backbone_norm", "backbone_freeze_at")}
    torch.save({"model": checkpoint["model"], "args": args}, tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="backbone_.*pass the config it was trained with"):
        load_detector(tmp_path / "bare.pth")
    detector = load_detector(tmp_path / "bare.pth", config=trained_run / "config_cfg.py")
    reference = load_detector(trained_run / "checkpoint.pth").predict(val_images[0], threshold=-1.0)
    torch.testing.assert_close(detector.predict(val_images[0], threshold=-1.0)["boxes"], reference["boxes"])
    assert detector.class_names == ["0", "1", "2", "3", "4"]  # no categories and not COCO's 91 labels

    proc = _predict("--checkpoint", tmp_path / "bare.pth", "--images", val_images[0], "--out", tmp_path / "out")
    assert proc.returncode == 2 and "error:" in proc.stdout and "--config" in proc.stdout
    assert "Traceback" not in proc.stdout


def test_predict_draws_and_writes_what_the_api_predicts(trained_run, val_images, tmp_path):
    detector = load_detector(trained_run / "checkpoint.pth")
    scores = torch.cat([p["scores"] for p in detector.predict([str(p) for p in val_images], threshold=-1.0)])
    top = scores.sort(descending=True).values
    threshold = float(top[5] + top[6]) / 2  # about six boxes over the six images: few enough to check each
    expected = detector.predict([str(p) for p in val_images], threshold=threshold)

    proc = _predict("--checkpoint", trained_run / "checkpoint.pth", "--images", val_images[0].parent,
                    "--out", tmp_path / "out", "--threshold", threshold, "--batch_size", 4)
    assert proc.returncode == 0, proc.stdout
    assert "6/6" in proc.stdout  # the progress bar reached the end
    detections = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert len(detections) == sum(len(p["scores"]) for p in expected) == 6
    for path, prediction in zip(val_images, expected):
        mine = [d for d in detections if d["image_id"] == int(path.stem)]
        assert all(d["file_name"] == str(path) for d in mine)
        assert [d["category_id"] for d in mine] == prediction["labels"].tolist()
        assert [d["score"] for d in mine] == pytest.approx(prediction["scores"].tolist(), abs=1e-6)
        for d, box in zip(mine, prediction["boxes"].tolist()):
            assert d["bbox"] == pytest.approx([box[0], box[1], box[2] - box[0], box[3] - box[1]], abs=1e-4)

        original = np.asarray(Image.open(path).convert("RGB")).astype(int)
        drawn_image = Image.open(tmp_path / "out" / f"{path.stem}.png")
        assert drawn_image.size == Image.open(path).size
        drawn = np.asarray(drawn_image.convert("RGB")).astype(int)
        if not mine:
            assert (drawn == original).all()
        for d in mine:
            x0, y0, w, h = d["bbox"]
            x0, y0, x1, y1 = (min(max(round(v), 0), 63) for v in (x0, y0, x0 + w, y0 + h))
            outline = [(y, x) for x in range(x0, x1 + 1) for y in (y0, y1)] + \
                      [(y, x) for y in range(y0, y1 + 1) for x in (x0, x1)]
            changed = [(drawn[y, x] != original[y, x]).any() for y, x in outline]
            assert np.mean(changed) > 0.9, (path.name, d)


def test_glob_and_nothing_above_the_threshold(trained_run, val_images, tmp_path):
    proc = _predict("--checkpoint", trained_run / "checkpoint.pth", "--images", val_images[0].parent / "*[12].png",
                    "--out", tmp_path / "out", "--threshold", 1.0)
    assert proc.returncode == 0, proc.stdout
    assert json.loads((tmp_path / "out" / "detections.json").read_text()) == []
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["000000000001.png", "000000000002.png"]
    for name in ("000000000001.png", "000000000002.png"):
        assert (np.asarray(Image.open(tmp_path / "out" / name)) == np.asarray(Image.open(val_images[0].parent / name))).all()


@pytest.mark.parametrize("case", ["no checkpoint", "no images", "not an image"])
def test_bad_inputs_are_one_error_line(trained_run, val_images, tmp_path, case):
    checkpoint, images = trained_run / "checkpoint.pth", val_images[0]
    if case == "no checkpoint":
        checkpoint, expected = tmp_path / "missing.pth", "missing.pth does not exist"
    elif case == "no images":
        images, expected = tmp_path / "*.jpg", "no image files match"
    else:
        images, expected = tmp_path / "broken.png", "cannot read image"
        images.write_bytes(b"not a png")
    proc = _predict("--checkpoint", checkpoint, "--images", images, "--out", tmp_path / "out")
    assert proc.returncode == 2, proc.stdout
    assert expected in proc.stdout and "Traceback" not in proc.stdout
    assert not (tmp_path / "out" / "detections.json").exists()


def test_a_checkpoint_without_categories_is_named_by_coco_ids_or_by_labels():
    """Official zoo checkpoints record no categories: with 91 classes their labels are COCO category ids."""
    names, ids = _label_names({}, argparse.Namespace(num_classes=91, contiguous_category_ids=False))
    assert (names[1], names[18], names[90], ids) == ("person", "dog", "toothbrush", list(range(91)))
    names, ids = _label_names({}, argparse.Namespace(num_classes=5, contiguous_category_ids=False))
    assert names == ["0", "1", "2", "3", "4"] and ids == [0, 1, 2, 3, 4]
