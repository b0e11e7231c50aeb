"""tools/inspect_checkpoint.py on a real training checkpoint."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from runner import ROOT, run_main


def _inspect(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "inspect_checkpoint.py"), *map(str, args)],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    base = tmp_path_factory.mktemp("inspect")
    run_main(data, base / "out", options=["epochs=1"])
    return base / "out" / "checkpoint.pth"


def test_reports_position_best_and_config_differences(checkpoint):
    proc = _inspect(checkpoint, "-c", "config/DINO/DINO_demo.py")
    assert proc.returncode == 0, proc.stdout
    assert "epoch 0 completed" in proc.stdout and "best regular:" in proc.stdout
    assert "hidden_dim: checkpoint 32 vs now 128" in proc.stdout


def test_strip_and_safetensors_exports(checkpoint, tmp_path):
    proc = _inspect(checkpoint, "--strip", tmp_path / "w.pth", "--safetensors", tmp_path / "w.safetensors")
    assert proc.returncode == 0, proc.stdout
    source = torch.load(checkpoint, weights_only=True)
    full = source["model"]
    stripped = torch.load(tmp_path / "w.pth", weights_only=True)
    assert set(stripped) == {"model", "args", "categories", "epoch"}  # what predicting and fine-tuning need
    assert stripped["categories"] == source["categories"] and stripped["args"] == source["args"]
    assert all(torch.equal(full[k], stripped["model"][k]) for k in full)
    exported = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(full[k], v) for k, v in exported.items())
    assert "class_embed.0.weight" in exported or "transformer.decoder.class_embed.0.weight" in exported


def test_broken_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    proc = _inspect(bad)
    assert proc.returncode == 2 and "bad.pth" in proc.stdout and "Traceback" not in proc.stdout
