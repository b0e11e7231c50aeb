"""Fine-tuning, foreign and broken checkpoints, and every refusal main.py must make clearly."""
import argparse
import json
import os
import resource
import signal

import pytest
import torch

from runner import read_log, run_main


@pytest.fixture(scope="module")
def one_epoch(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_epoch")
    run_main(data, out, options=["epochs=1"])
    return out


def _params(model_state, names):
    return {k: v for k, v in model_state.items() if k in names}


def _two_class_dataset(data, out_dir):
    """The same images with only categories 1 and 2 annotated: a new 3-class task (ids 0..2)."""
    options = []
    for split in ("train", "val"):
        coco = json.loads((data / "annotations" / f"instances_{split}2017.json").read_text())
        coco["categories"] = [c for c in coco["categories"] if c["id"] <= 2]
        coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] <= 2]
        path = out_dir / f"{split}.json"
        path.write_text(json.dumps(coco))
        options += [f"{split}_ann_file={path}", f"{split}_img_folder={data / f'{split}2017'}"]
    return options


@pytest.mark.parametrize("how", ["--pretrain_model_path", "--resume"])
def test_finetune_to_fewer_classes_keeps_every_other_weight(data, one_epoch, tmp_path, how):
    source = torch.load(one_epoch / "checkpoint.pth", weights_only=True)["model"]
    proc = run_main(data, tmp_path / "out", how, str(one_epoch / "checkpoint.pth"), "--dataset_file", "coco",
                    "--finetune_ignore", "label_enc.weight", "class_embed", "--start_epoch", "1",
                    options=["num_classes=3", "dn_labelbook_size=3", "lr=0.0", "lr_backbone=0.0",
                             *_two_class_dataset(data, tmp_path)])
    tmp_path = tmp_path / "out"
    assert "Loaded model weights only" in proc.stdout
    assert "ignored" in proc.stdout and "class_embed" in proc.stdout and "label_enc.weight" in proc.stdout
    assert [e["epoch"] for e in read_log(tmp_path)] == [1]
    tuned = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert tuned["model"]["class_embed.0.weight"].shape[0] == 3
    assert tuned["model"]["transformer.enc_out_class_embed.weight"].shape[0] == 3
    kept = [k for k in source if "class_embed" not in k and "label_enc" not in k
            and "running_" not in k and "num_batches" not in k]  # BN statistics move even at lr 0
    assert kept and all(torch.equal(source[k], tuned["model"][k]) for k in kept)


def test_unused_finetune_pattern_is_a_warning(data, one_epoch, tmp_path):
    proc = run_main(data, tmp_path, "--pretrain_model_path", str(one_epoch / "checkpoint.pth"),
                    "--finetune_ignore", "no_such_key", options=["epochs=1"])
    assert "matched no checkpoint key: no_such_key" in proc.stdout


def test_official_format_checkpoint_loads_and_a_malicious_one_is_refused(data, one_epoch, tmp_path):
    model = torch.load(one_epoch / "checkpoint.pth", weights_only=True)["model"]
    official = tmp_path / "official.pth"
    torch.save({"model": model, "args": argparse.Namespace(lr=1e-4, backbone="resnet18"), "epoch": 11}, official)
    proc = run_main(data, tmp_path / "eval", "--eval", "--resume", str(official))
    assert "Average Precision" in proc.stdout

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    torch.save({"model": model, "args": Payload()}, evil)
    proc = run_main(data, tmp_path / "evil_out", "--resume", str(evil), check=False)
    assert proc.returncode == 2
    assert "refused" in proc.stdout and "evil.pth" in proc.stdout and "Traceback" not in proc.stdout
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_broken_resume_file_is_one_clear_error(data, one_epoch, tmp_path, damage):
    blob = (one_epoch / "checkpoint.pth").read_bytes()
    bad = tmp_path / "bad.pth"
    bad.write_bytes({"truncated": blob[: len(blob) // 2], "empty": b"", "garbage": os.urandom(4096)}[damage])
    proc = run_main(data, tmp_path / "out", "--resume", str(bad), check=False)
    assert proc.returncode == 2
    assert "bad.pth" in proc.stdout and "Traceback" not in proc.stdout


def test_auto_resume_falls_back_to_the_newest_intact_checkpoint(data, tmp_path):
    run_main(data, tmp_path, options=["epochs=1"])
    latest = tmp_path / "checkpoint.pth"
    latest.write_bytes(latest.read_bytes()[:1000])
    proc = run_main(data, tmp_path)
    assert "fell back to checkpoint0000.pth" in proc.stdout
    assert [e["epoch"] for e in read_log(tmp_path)] == [0, 1]


def test_architecture_change_is_refused_before_loading(data, one_epoch, tmp_path):
    proc = run_main(data, tmp_path, "--resume", str(one_epoch / "checkpoint.pth"), options=["hidden_dim=64"],
                    check=False)
    assert proc.returncode == 2
    assert "hidden_dim: checkpoint 32 vs now 64" in proc.stdout and "--pretrain_model_path" in proc.stdout


def test_explicit_start_epoch_wins_and_positions_the_schedule(data, one_epoch, tmp_path):
    proc = run_main(data, tmp_path, "--resume", str(one_epoch / "checkpoint.pth"), "--start_epoch", "2",
                    options=["epochs=3"])
    assert "--start_epoch 2 overrides the checkpoint's epoch 1" in proc.stdout
    log = read_log(tmp_path)
    assert [e["epoch"] for e in log] == [2]
    assert log[0]["train_lr"] == pytest.approx(5e-4 * 0.1 ** 2)  # StepLR(lr_drop=1) after two epochs


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    run_main(data, tmp_path, options=["epochs=1"])
    before = (tmp_path / "checkpoint.pth").read_bytes()
    proc = run_main(data, tmp_path, check=False, env={"DINO_FAULTS": '[{"at": "loss", "call": 3, "error": "nan"}]'})
    assert proc.returncode == 1, proc.stdout
    assert "non-finite terms: loss_" in proc.stdout and "last good state" in proc.stdout
    assert (tmp_path / "checkpoint.pth").read_bytes() == before


def _small_file_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


def test_a_failed_save_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    run_main(data, tmp_path, options=["epochs=1"])
    before = (tmp_path / "checkpoint.pth").read_bytes()
    import subprocess
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: real_run(*a, preexec_fn=_small_file_limit, **k))
    proc = run_main(data, tmp_path, check=False)
    assert proc.returncode == 1
    assert "could not write checkpoint" in proc.stdout
    assert (tmp_path / "checkpoint.pth").read_bytes() == before
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
