"""Long schedules without babysitting: early stopping, a save before a failing step, run records, the data
fingerprint and the loss check after a resume, each resumable like the rest of training."""
import json
import logging
import shutil
import signal

import pytest
import torch

from runner import assert_same_training, last_event, popen_main, read_log, run_main, wait_for_event


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    run_main(data, out)
    return out


def test_early_stopping_ends_where_an_uninterrupted_run_does(data, tmp_path):
    options = ["epochs=6", "early_stop_patience=1", "lr=1e-6", "lr_backbone=1e-6"]  # AP will not improve
    whole = run_main(data, tmp_path / "whole", options=options)
    assert "Early stop: bbox AP has not improved for 1 epochs" in whole.stdout
    epochs = [e["epoch"] for e in read_log(tmp_path / "whole")]
    assert len(epochs) < 6

    proc = popen_main(data, tmp_path / "cut", options=options)
    wait_for_event(proc, tmp_path / "cut", "step", epoch=1, iteration=3)
    proc.send_signal(signal.SIGTERM)
    assert proc.communicate(timeout=120)[0] and proc.returncode == 3
    rerun = run_main(data, tmp_path / "cut", options=options)
    assert "Early stop" in rerun.stdout
    assert [e["epoch"] for e in read_log(tmp_path / "cut")] == epochs
    assert_same_training(tmp_path / "whole", tmp_path / "cut")
    again = run_main(data, tmp_path / "cut", options=options)  # a finished run stays finished
    assert "Early stop" in again.stdout and [e["epoch"] for e in read_log(tmp_path / "cut")] == epochs


def test_a_failing_step_saves_the_last_completed_one_and_the_rerun_continues(data, reference, tmp_path):
    """The sixth step's forward fails (a broken file): with batch norm, as the demo trains, whose statistics
    that forward changed before failing."""
    proc = popen_main(data, tmp_path / "run", env={"DINO_FAULTS": '[{"at": "loss", "call": 6, "error": "error"}]'})
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 1, output[-3000:]
    assert "a training step failed after epoch 0 iteration 5: saved" in output
    assert output.strip().splitlines()[-1].startswith("error: unexpected OSError: injected failure at loss")
    saved = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert (saved["epoch"], saved["iteration"]) == (-1, 5)
    rerun = run_main(data, tmp_path / "run")
    start = last_event(tmp_path / "run", "start")
    assert (start["how"], start["epoch"], start["iteration"]) == ("continue", 0, 5)
    assert "after the resume, the first" in rerun.stdout
    assert_same_training(reference, tmp_path / "run")


def test_changed_training_data_is_refused_on_resume_unless_allowed(data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    run_main(copy, tmp_path / "run", options=["epochs=1"])
    saved = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert saved["datasets"]["train"]["images"] == 16 and len(saved["datasets"]["val"]["sha256"]) == 64
    ann = copy / "annotations" / "instances_train2017.json"
    coco = json.loads(ann.read_text())
    coco["annotations"] = coco["annotations"][1:]
    ann.write_text(json.dumps(coco))
    refused = run_main(copy, tmp_path / "run", check=False)
    last = refused.stdout.strip().splitlines()[-1]
    assert refused.returncode == 2 and last.startswith("error: the data changed since"), last
    boxes = saved["datasets"]["train"]["boxes"]
    assert f"train boxes: {boxes} -> {boxes - 1}" in last and "--allow_data_change" in last
    allowed = run_main(copy, tmp_path / "run", "--allow_data_change")
    assert "the data changed since the checkpoint (--allow_data_change): train boxes" in allowed.stdout


def test_run_records_are_kept_and_their_changes_listed_on_resume(data, tmp_path):
    run_main(data, tmp_path, options=["epochs=1"])
    info = (tmp_path / "info.txt").read_text()
    record = json.loads(info.split("environment: ")[1].splitlines()[0])
    assert record["torch"] == str(torch.__version__) and record["world_size"] == 1 and "git_dirty" in record
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert checkpoint["environment"] == record
    checkpoint["environment"]["torch"] = "1.0.0"
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    resumed = run_main(data, tmp_path)
    assert f"the environment changed since the checkpoint: torch: 1.0.0 -> {torch.__version__}" in resumed.stdout


def test_the_loss_watch_gives_no_verdict_without_enough_losses_before_the_resume(caplog):
    from training.watch import LossWatch
    caplog.set_level(logging.INFO, logger="dino.watch")
    few = LossWatch([1.0])
    for loss in (5.0, 5.0, 5.0):
        few.add(loss)
    assert not caplog.records  # one loss before: no noise to judge a jump by
    enough = LossWatch([1.0, 1.1, 0.9, 1.0, 1.05])
    for loss in (5.0,) * 5:
        enough.add(loss)
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "a jump beyond" in caplog.records[0].getMessage()


def test_a_diverged_epoch_leaves_checkpoint_pth_at_the_last_good_state(data, reference, tmp_path):
    """Epoch 1's evaluation finds non-finite predictions: checkpoint.pth goes back to epoch 0's evaluated
    state (the diverged one is kept aside), so the rerun continues from a good state, not from the divergence."""
    run = tmp_path / "run"
    proc = popen_main(data, run, env={"DINO_FAULTS": '[{"at": "eval_batch", "call": 4, "error": "nan"}]'})
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: epoch 1: the evaluated model gives non-finite scores or boxes"), last
    assert ("checkpoint.pth is back at checkpoint0000.pth, the last evaluated state, which a rerun continues (the "
            "same settings diverge the same way: lower lr); the diverged epoch is in checkpoint_diverged.pth") in last
    saved = torch.load(run / "checkpoint.pth", weights_only=True)
    assert saved["epoch"] == 0 and not saved["eval_pending"]
    assert torch.load(run / "checkpoint_diverged.pth", weights_only=True)["epoch"] == 1
    rerun = run_main(data, run)
    start = last_event(run, "start")
    assert (start["how"], start["epoch"], start["iteration"]) == ("continue", 1, 0)
    assert_same_training(reference, run)
