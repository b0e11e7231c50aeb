"""tools/export_onnx.py: a dynamic-shape export of a trained checkpoint, run with onnxruntime against PyTorch."""
import re

import pytest
import torch

from runner import run_tool

from models import load_detector
from models.inference import as_pil_image

for _module in ("onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(_module, reason="ONNX export needs onnx, onnxscript, onnxruntime: "
                                         "pip install -r requirements-extra.txt")



def _export(*args):
    return run_tool("export_onnx.py", *args)


def test_dynamic_export_matches_the_detector(trained_run, data, tmp_path):
    import onnxruntime

    proc = _export("--checkpoint", trained_run / "checkpoint.pth", "--out", tmp_path / "model.onnx", "--dynamic")
    assert proc.returncode == 0, proc.stdout[-3000:]
    # The tool's own checks: the exported size with 1 image, another size with 3 images.
    checked = re.findall(r"at (\d+)x3x(\d+)x(\d+): max \|boxes diff\| (\S+) \(over (\d+) of (\d+) detections; "
                         r"(\d+) without a PyTorch twin\), max \|scores diff\| (\S+)", proc.stdout)
    assert [c[:3] for c in checked] == [("1", "64", "64"), ("3", "104", "88")], proc.stdout
    for *_, boxes, matched, detections, unmatched, scores in checked:
        assert float(boxes) < 1e-4 and float(scores) < 1e-4 and matched == detections and unmatched == "0"

    # Two real images (a batch size the tool did not try), against load_detector's PostProcess path.
    detector = load_detector(trained_run / "checkpoint.pth")
    paths = sorted((data / "val2017").glob("*.png"))[:2]
    expected = detector.predict(paths, threshold=-1.0)
    images = torch.stack([detector.preprocess(as_pil_image(p)) for p in paths])  # 64 x 64: no resize
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    boxes, scores, labels = session.run(None, {"images": images.numpy()})
    assert boxes.shape == (2, 30, 4) and scores.shape == (2, 30) and labels.shape == (2, 30)
    for i, prediction in enumerate(expected):
        torch.testing.assert_close(torch.from_numpy(boxes[i]) * 64, prediction["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(torch.from_numpy(scores[i]), prediction["scores"], atol=1e-5, rtol=0)
        assert labels[i].tolist() == prediction["labels"].tolist()


def test_missing_checkpoint_is_one_error_line(tmp_path):
    proc = _export("--checkpoint", tmp_path / "none.pth", "--out", tmp_path / "m.onnx")
    assert proc.returncode == 2 and "none.pth does not exist" in proc.stdout and "Traceback" not in proc.stdout
