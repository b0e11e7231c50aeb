"""Interruptions are a non-event: bit-exact resume at epoch ends and mid-epoch, and clear stops."""
import signal

import pytest
import torch

from runner import assert_same_training, last_event, popen_main, read_log, run_main, wait_for_event


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    run_main(data, out)
    return out


def test_resume_at_an_epoch_boundary_also_extends_epochs(data, reference, tmp_path):
    run_main(data, tmp_path, options=["epochs=1", "keep_checkpoints=1"])
    proc = run_main(data, tmp_path, options=["keep_checkpoints=1"])  # same output_dir: auto-resume, to 2 epochs
    assert "Continuing the interrupted run in" in proc.stdout
    assert "(started from scratch): epoch 1, iteration 0 of 8, to 2 total epochs" in proc.stdout
    assert "epochs: 1 -> 2" in proc.stdout
    assert_same_training(reference, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("checkpoint0*.pth")) == ["checkpoint0001.pth"]  # pruned


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_mid_epoch_saves_and_resumes_bit_exactly(data, reference, tmp_path, workers):
    proc = popen_main(data, tmp_path, workers=workers)
    wait_for_event(proc, tmp_path, "step", epoch=0, iteration=3)  # the signal lands well before training ends
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 3, rest
    assert "SIGTERM received during epoch 0: saved" in rest and "rerun the same command to continue" in rest
    saved = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert saved["iteration"] > 0  # stopped inside an epoch, at an iteration boundary
    run_main(data, tmp_path, "--num_workers", str(workers))
    start = last_event(tmp_path, "start")
    assert (start["how"], start["epoch"], start["iteration"]) == ("continue", saved["epoch"] + 1, saved["iteration"])
    assert [e["epoch"] for e in read_log(tmp_path)] == [0, 1]
    assert_same_training(reference, tmp_path)


def test_kill_9_after_a_periodic_save_resumes_bit_exactly(data, reference, tmp_path):
    proc = popen_main(data, tmp_path, options=["save_every_iters=3"])
    wait_for_event(proc, tmp_path, "saved", iteration=3)  # the periodic save at iteration 3 is on disk
    proc.kill()
    proc.wait()
    saved = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert saved["iteration"] in (0, 3, 6)  # the newest periodic save (or the epoch end, on a slow machine)
    run_main(data, tmp_path, options=["save_every_iters=3"])
    start = last_event(tmp_path, "start")
    assert (start["how"], start["epoch"], start["iteration"]) == ("continue", saved["epoch"] + 1, saved["iteration"])
    assert_same_training(reference, tmp_path)
