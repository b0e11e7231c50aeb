"""Every restart continues: rerunning the command of an interrupted run continues that run, whatever its flags,
whichever signal stopped it and wherever (training, evaluation, DataLoader workers)."""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from datasets.sampler import epoch_order
from runner import ROOT, assert_same_training, last_event, popen_main, read_log, run_main, wait_for_event


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    """A one-epoch run: the file fine-tuning and --resume start from."""
    out = tmp_path_factory.mktemp("pretrained")
    run_main(data, out, options=["epochs=1"])
    return out / "checkpoint.pth"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    run_main(data, out)
    return out


def _interrupt(proc, out, at: dict, sig=signal.SIGTERM, group=False):
    """Send `sig` once events.jsonl records `at` ({"event": ..., fields}); returns the output."""
    wait_for_event(proc, out, **at)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 3, output[-3000:]
    return output


SLOW_STEPS = {"DINO_FAULTS": '[{"at": "after_step", "sleep": 0.3}]'}  # a pause between an iteration's progress
# line and its stop check, as in a real run


@pytest.mark.parametrize("flags", [["--finetune_ignore", "class_embed", "--start_epoch", "1"], []],
                         ids=["finetune", "resume"])
def test_rerunning_an_interrupted_command_continues_it(data, pretrained, tmp_path, flags):
    command = ["--resume", str(pretrained), *flags]
    run_main(data, tmp_path / "uninterrupted", *command, options=["epochs=3"])
    out = tmp_path / "run"
    output = _interrupt(popen_main(data, out, *command, options=["epochs=3"], env=SLOW_STEPS), out,
                        {"event": "step", "epoch": 1, "iteration": 3})
    # The signal lands at iteration 3 or, on a very busy machine, a little later: the rerun continues where it saved.
    saved_at = int(re.search(r"SIGTERM received during epoch 1: saved \S+ at iteration (\d+)", output).group(1))
    rerun = run_main(data, out, *command, options=["epochs=3"])
    started = f"started from {pretrained}" + (" with --finetune_ignore class_embed --start_epoch 1" if flags else "")
    assert f"Continuing the interrupted run in {out} ({started}): epoch 1, iteration {saved_at} of 8" in rerun.stdout
    assert "Loaded model weights only" not in rerun.stdout and "Resuming training from" not in rerun.stdout
    assert [e["epoch"] for e in read_log(out)] == [1, 2]
    assert_same_training(tmp_path / "uninterrupted", out)

    # Another starting point on the same output_dir starts over, and says so: another --resume file,
    other_file = tmp_path / "other.pth"
    shutil.copy(pretrained, other_file)
    switched = run_main(data, out, "--resume", str(other_file), *flags, options=["epochs=3"])
    assert f"Starting over: the run in {out} {started}, but this command starts from {other_file}" in switched.stdout
    assert [e["epoch"] for e in read_log(out)] == [1, 2]
    started = started.replace(str(pretrained), str(other_file))
    # or training from scratch.
    other = run_main(data, out, options=["epochs=1"])
    assert f"Starting over: the run in {out} {started}, but this command starts from scratch" in other.stdout
    assert [e["epoch"] for e in read_log(out)] == [0]
    again = run_main(data, out, "--no_auto_resume", options=["epochs=1"])
    assert "--no_auto_resume: starting over" in again.stdout


def test_sigterm_to_the_process_group_with_workers_saves_and_continues(data, reference, tmp_path):
    output = _interrupt(popen_main(data, tmp_path, workers=2, new_session=True), tmp_path,
                        {"event": "step", "epoch": 0, "iteration": 3}, group=True)
    assert "SIGTERM received during epoch 0: saved" in output and "Traceback" not in output
    rerun = run_main(data, tmp_path, "--num_workers", "2")
    assert last_event(tmp_path, "start")["how"] == "continue"
    assert_same_training(reference, tmp_path)


SLOW_EVALUATION = {"DINO_FAULTS": '[{"at": "eval_batch", "sleep": 1.0}]'}  # a long COCO evaluation: the stop
# signal lands in the middle of it


def test_a_signal_during_evaluation_stops_at_once_and_the_rerun_evaluates_that_epoch(data, reference, tmp_path):
    out = tmp_path / "run"
    output = _interrupt(popen_main(data, out, env=SLOW_EVALUATION), out, {"event": "evaluating", "epoch": 0})
    assert "SIGTERM received during the evaluation of epoch 0: checkpoint.pth holds epoch 0's training" in output
    saved = torch.load(out / "checkpoint.pth", weights_only=True)
    assert saved["epoch"] == 0 and saved["eval_pending"] and saved["iteration"] == 0
    assert not (out / "log.txt").exists() and not (out / "checkpoint_best_regular.pth").exists()

    rerun = run_main(data, out)
    assert "Epoch 0 was trained but not evaluated: evaluating it first" in rerun.stdout
    assert_same_training(reference, out)
    log = read_log(out)
    assert [e["epoch"] for e in log] == [0, 1]
    best_epoch = max(log, key=lambda e: e["test_coco_eval_bbox"][0])["epoch"]
    best = torch.load(out / "checkpoint_best_regular.pth", weights_only=True)
    assert best["best"]["regular"] == {"ap": log[best_epoch]["test_coco_eval_bbox"][0], "epoch": best_epoch}
    assert best["epoch"] == best_epoch


def test_a_torn_log_line_and_stale_temporary_files_do_not_block_the_next_start(data, reference, tmp_path):
    run_main(data, tmp_path, options=["epochs=1"])
    with open(tmp_path / "log.txt", "a") as f:
        f.write('{"train_loss": 1.5, "train_lr": 0.0')  # a kill while writing epoch 1's line
    (tmp_path / ".checkpoint.pth.tmp-4242").write_bytes(b"half a checkpoint")
    rerun = run_main(data, tmp_path)
    assert "log.txt line 2 is not valid JSON" in rerun.stdout
    assert "Removed 1 temporary file(s) of interrupted saves: .checkpoint.pth.tmp-4242" in rerun.stdout
    assert not (tmp_path / ".checkpoint.pth.tmp-4242").exists()
    assert [e["epoch"] for e in read_log(tmp_path)] == [0, 1]
    assert_same_training(reference, tmp_path)


def test_a_second_run_on_a_busy_output_dir_is_refused_and_a_killed_run_leaves_no_lock(data, tmp_path):
    first = popen_main(data, tmp_path, options=["epochs=50"])
    wait_for_event(first, tmp_path, "start")
    second = run_main(data, tmp_path, options=["epochs=50"], check=False)
    assert second.returncode == 2
    assert f"error: {tmp_path} is in use by another run (pid {first.pid}" in second.stdout.strip().splitlines()[-1]
    first.kill()
    first.wait()
    assert run_main(data, tmp_path, options=["epochs=1"]).returncode == 0


def test_the_ema_best_file_holds_the_ema_weights(data, tmp_path):
    run_main(data, tmp_path, options=["epochs=1", "use_ema=True"])
    latest = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    best = torch.load(tmp_path / "checkpoint_best_ema.pth", weights_only=True)
    assert best["model_is_ema"] and "optimizer" not in best
    ema = {k[len("module."):]: v for k, v in latest["ema_model"].items() if k.startswith("module.")}
    assert best["model"].keys() == ema.keys() and all(torch.equal(best["model"][k], ema[k]) for k in ema)
    assert not all(torch.equal(best["model"][k], latest["model"][k]) for k in ema)  # not the regular weights

    evaluated = run_main(data, tmp_path / "eval", "--eval", "--resume", str(tmp_path / "checkpoint_best_ema.pth"))
    assert "Evaluating the EMA weights of" in evaluated.stdout
    ap = float(evaluated.stdout.split("bbox AP ")[-1].split()[0])
    assert ap == pytest.approx(read_log(tmp_path)[0]["ema_test_coco_eval_bbox"][0], abs=1e-4)
    stripped = tmp_path / "stripped.pth"
    subprocess.run([sys.executable, "tools/inspect_checkpoint.py", str(tmp_path / "checkpoint_best_ema.pth"),
                    "--strip", str(stripped)], cwd=ROOT, check=True, stdout=subprocess.PIPE)
    weights = torch.load(stripped, weights_only=True)["model"]
    assert all(torch.equal(weights[k], ema[k]) for k in ema)


def _official_trainer_file(ours, path, shuffle_optimizer=False):
    """What the official DINO trainer saves: model, optimizer, lr_scheduler, epoch and a pickled Namespace."""
    checkpoint = torch.load(ours, weights_only=True)
    optimizer = checkpoint["optimizer"]
    if shuffle_optimizer:  # a trainer that registered its parameters in another order
        ids = sorted(optimizer["state"])
        optimizer["state"] = {new: optimizer["state"][old] for new, old in zip(ids, ids[1:] + ids[:1])}
    torch.save({"model": checkpoint["model"], "optimizer": optimizer, "lr_scheduler": checkpoint["lr_scheduler"],
                "epoch": checkpoint["epoch"], "args": argparse.Namespace(**checkpoint["args"])}, path)
    return checkpoint


@pytest.mark.parametrize("shuffle", [False, True], ids=["official-order", "foreign-order"])
def test_a_checkpoint_of_the_official_trainer_resumes(data, pretrained, tmp_path, shuffle):
    ours = _official_trainer_file(pretrained, tmp_path / "official.pth", shuffle_optimizer=shuffle)
    run = run_main(data, tmp_path / "out", "--resume", str(tmp_path / "official.pth"))
    assert f"Resuming training from {tmp_path / 'official.pth'}: epoch 1, iteration 0 of 8" in run.stdout
    assert [e["epoch"] for e in read_log(tmp_path / "out")] == [1]
    steps = [s["step"].item() for s in torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
             ["optimizer"]["state"].values()]
    before = [s["step"].item() for s in ours["optimizer"]["state"].values()]
    if shuffle:
        assert "does not fit this model's parameter order: the optimizer starts fresh" in run.stdout
        assert set(steps) == {8}  # one epoch of fresh AdamW steps
    else:
        assert "starts fresh" not in run.stdout
        assert set(steps) == {b + 8 for b in before}  # the loaded moments went on


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    import resource
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


def test_a_failed_save_on_rank_0_ends_every_rank_promptly(data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "main.py"),
           "-c", "config/DINO/DINO_demo.py", "--coco_path", str(data), "--output_dir", str(tmp_path),
           "--num_workers", "0", "--options", *__import__("runner").TINY_OPTIONS, "epochs=1"]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=_limit_file_size)
    assert proc.returncode != 0
    assert "error: could not write checkpoint" in proc.stdout
    assert "[rank 1] error: could not write checkpoint" in proc.stdout or "rank 0 could not write" in proc.stdout


def test_a_data_error_on_one_rank_ends_every_rank_promptly(tmp_path):
    """A training image that disappears after the dataset check passed: the rank that reads it stops with a line
    naming the image, and the other rank ends at once too instead of waiting in a collective for a timeout."""
    data = tmp_path / "data"
    run_main(data, tmp_path / "first", options=["epochs=1"])  # generates the data and records its check as passed
    (tmp_path / "run").mkdir()
    shutil.copy(tmp_path / "first" / "dataset_checks.json", tmp_path / "run")
    images = json.loads((data / "annotations" / "instances_train2017.json").read_text())["images"]
    ids = sorted(image["id"] for image in images)
    order = epoch_order(len(ids), 42, 0)
    # batch_size 2 on 2 processes: step 0 gives the order's samples 0-1 to rank 0 and 2-3 to rank 1
    missing = next(image["file_name"] for image in images if image["id"] == ids[order[2]])
    (data / "train2017" / missing).unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "main.py"),
           "-c", "config/DINO/DINO_demo.py", "--coco_path", str(data), "--output_dir", str(tmp_path / "run"),
           "--num_workers", "0", "--options", *__import__("runner").TINY_OPTIONS, "epochs=1"]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and time.monotonic() - started < 120, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if "error:" in line]
    assert any(line.startswith("[rank 1] error:") and missing in line for line in errors), errors
    assert "checking the" not in proc.stdout  # the recorded check was trusted, so the loader met the missing file


def test_a_nearly_full_disk_skips_numbered_and_best_files_but_keeps_checkpoint_pth(data, pretrained, tmp_path):
    free = int(1.5 * pretrained.stat().st_size)  # room for one more checkpoint.pth, not for two files
    proc = popen_main(data, tmp_path / "run", options=["epochs=1"],
                      env={"DINO_FAULTS": json.dumps([{"at": "disk_free", "bytes": free}])})
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "too little for checkpoint_best_regular.pth, checkpoint0000.pth" in output
    assert "kept checkpoint.pth" in output
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint*.pth")) == ["checkpoint.pth"]
    assert torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["epoch"] == 0
