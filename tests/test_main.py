"""main.py end to end: the files a run writes, config errors, --eval."""
import json

import pytest
import torch

from datasets.synthetic import CATEGORIES
from runner import read_log, run_main

from main import parse_args


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One 2-epoch run shared by the tests that inspect its output."""
    base = tmp_path_factory.mktemp("run")
    proc = run_main(data, base / "out")
    return base, proc


def test_training_writes_every_documented_file(trained):
    base, proc = trained
    out = base / "out"
    assert "Training from scratch" in proc.stdout
    info = (out / "info.txt").read_text()
    for expected in ("command:", "git:", "world size: 1", "args:", "number of trainable parameters:"):
        assert expected in info
    log = read_log(out)
    assert [e["epoch"] for e in log] == [0, 1]
    for entry in log:
        assert len(entry["test_coco_eval_bbox"]) == 12
        assert entry["n_parameters"] > 0 and entry["epoch_time"] > 0
        assert {"train_loss", "train_lr", "train_loss_ce", "train_loss_bbox_dn", "test_loss"} <= set(entry)
    assert log[0]["train_lr"] == pytest.approx(5e-4) and log[1]["train_lr"] == pytest.approx(5e-5)  # lr_drop=1
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["iteration"] == 0
    assert isinstance(checkpoint["args"], dict) and checkpoint["args"]["hidden_dim"] == 32
    assert {"model", "optimizer", "lr_scheduler", "rng", "best", "format_version", "torch_version"} <= set(checkpoint)
    assert (out / "checkpoint0000.pth").exists() and (out / "checkpoint0001.pth").exists()
    assert (out / "checkpoint_best_regular.pth").exists()
    assert json.loads((out / "eval" / "latest.json").read_text())["epoch"] == 1
    saved = json.loads((out / "config_args_all.json").read_text())
    assert saved["hidden_dim"] == 32 and saved["dataset_file"] == "synthetic"


def test_dumped_config_loads_again_with_the_same_values(trained):
    base, _ = trained
    again = parse_args(["-c", str(base / "out" / "config_cfg.py"), "--dataset_file", "synthetic"])
    assert again.hidden_dim == 32 and again.data_aug_scales == [64] and again.backbone == "resnet18"


def test_eval_only_evaluates(data, trained, tmp_path):
    base, _ = trained
    proc = run_main(data, tmp_path / "eval", "--eval", "--resume", str(base / "out" / "checkpoint.pth"))
    stats = json.loads((tmp_path / "eval" / "eval" / "eval_stats.json").read_text())
    assert len(stats["test_coco_eval_bbox"]) == 12
    assert not (tmp_path / "eval" / "log.txt").exists()
    assert not (tmp_path / "eval" / "checkpoint.pth").exists()
    assert "Average Precision" in proc.stdout


def test_option_typo_is_an_error_naming_the_key(tmp_path):
    proc = run_main(tmp_path / "data", tmp_path / "out", options=["hiden_dim=64"], check=False)
    assert proc.returncode == 2
    assert "hiden_dim" in proc.stdout and "hidden_dim" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_config_key_colliding_with_an_argument_is_an_error(tmp_path):
    config = tmp_path / "bad.py"
    config.write_text("_base_ = ['%s']\nseed = 3\n" % (parse_args.__globals__["__file__"].rsplit("/", 1)[0]
                                                       + "/config/DINO/DINO_demo.py"))
    proc = run_main(tmp_path / "data", tmp_path / "out", config=str(config), check=False)
    assert proc.returncode == 2
    assert "'seed'" in proc.stdout and "--seed" in proc.stdout


def test_eval_without_weights_is_a_clear_error(data, tmp_path):
    proc = run_main(data, tmp_path / "out", "--eval", check=False)
    assert proc.returncode == 2
    assert "--eval needs weights" in proc.stdout


def test_ema_and_tensorboard(data, tmp_path):
    run_main(data, tmp_path, options=["epochs=1", "use_ema=True", "ema_decay=0.9", "use_tensorboard=True"])
    log = read_log(tmp_path)
    assert len(log[0]["ema_test_coco_eval_bbox"]) == 12
    assert (tmp_path / "checkpoint_best_ema.pth").exists()
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert "ema_model" in checkpoint and set(checkpoint["best"]) == {"regular", "ema"}
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert set(log[0]["ema_test_per_class_ap"]) == set(log[0]["test_per_class_ap"]) == set(CATEGORIES)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = EventAccumulator(str(tmp_path / "tb")).Reload().Tags()["scalars"]
    named = {f"test_per_class_ap/{name}" for name, ap in log[0]["test_per_class_ap"].items() if ap is not None}
    assert named and named <= set(tags) and "test_coco_eval_bbox/0" in tags
