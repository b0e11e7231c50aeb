"""A run's files belong to that run: the commit point of a save, run ids, the previous run's files set aside,
and a starting point recognised however its path is spelled."""
import json
import os
import shutil

import torch

from runner import popen_main, read_log, run_main
from checkpoint.format import read_record


def test_a_new_run_sets_the_previous_runs_files_aside_and_prunes_only_its_own(data, tmp_path):
    """An earlier run left checkpoint0018.pth and checkpoint0019.pth; a new run with keep_checkpoints=1 must
    not prune its own checkpoint0000.pth for them, nor ever fall back to them."""
    out = tmp_path / "out"
    run_main(data, out, options=["epochs=2"])
    old_id = torch.load(out / "checkpoint.pth", weights_only=True)["run_id"]
    os.rename(out / "checkpoint0000.pth", out / "checkpoint0018.pth")
    os.rename(out / "checkpoint0001.pth", out / "checkpoint0019.pth")
    new = run_main(data, out, "--no_auto_resume", options=["epochs=1", "keep_checkpoints=1"])
    previous = out / "previous" / old_id
    assert (f"--no_auto_resume: starting over in {out}; moved the files of the run that was there to {previous}: "
            "checkpoint.pth, checkpoint0018.pth, checkpoint0019.pth, checkpoint_best_regular.pth") in new.stdout
    assert sorted(p.name for p in out.glob("checkpoint*.pth")) == ["checkpoint.pth", "checkpoint0000.pth",
                                                                    "checkpoint_best_regular.pth"]
    assert (previous / "checkpoint0019.pth").exists() and len(read_log(previous)) == 2
    assert [e["epoch"] for e in read_log(out)] == [0]
    new_id = read_record(out / "checkpoint0000.pth")["run_id"]
    assert new_id != old_id and (out / "run_id.txt").read_text().strip() == new_id
    assert read_record(out / "checkpoint_best_regular.pth")["run_id"] == new_id


def test_a_damaged_checkpoint_falls_back_only_to_its_own_runs_files(data, tmp_path):
    """Another run's numbered file copied into output_dir (a newer epoch, the same starting point) is never
    taken for this run's, even when checkpoint.pth cannot be read at all."""
    other, out = tmp_path / "other", tmp_path / "out"
    run_main(data, other, options=["epochs=2"])
    run_main(data, out, options=["epochs=1"])
    shutil.copy(other / "checkpoint0001.pth", out / "checkpoint0019.pth")
    (out / "checkpoint.pth").write_bytes(b"cut off")
    rerun = run_main(data, out, options=["epochs=2"])
    assert f"auto-resume fell back to checkpoint0000.pth, the newest intact checkpoint in {out}" in rerun.stdout
    assert "Continuing the interrupted run" in rerun.stdout and [e["epoch"] for e in read_log(out)] == [0, 1]


def test_a_starting_point_is_the_same_however_its_path_is_spelled(data, tmp_path):
    """--pretrain_model_path ../pre/checkpoint.pth from one directory, then the same file through a symlink
    from another: the same run, continued. The file replaced at the same path: another starting point."""
    run_main(data, tmp_path / "pre", options=["epochs=1"])
    (tmp_path / "a").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "pre")
    out = tmp_path / "out"
    run_main(data, out, "--pretrain_model_path", "../pre/checkpoint.pth", options=["epochs=1"], cwd=tmp_path / "a")
    again = run_main(data, out, "--pretrain_model_path", str(tmp_path / "link" / "checkpoint.pth"),
                     options=["epochs=2"])
    assert f"Continuing the interrupted run in {out} (started from {tmp_path / 'pre' / 'checkpoint.pth'}" \
        in again.stdout, again.stdout[-3000:]
    assert [e["epoch"] for e in read_log(out)] == [0, 1]
    shutil.copy(out / "checkpoint0000.pth", tmp_path / "pre" / "checkpoint.pth")  # another file, same path
    replaced = run_main(data, out, "--pretrain_model_path", str(tmp_path / "link" / "checkpoint.pth"),
                        options=["epochs=3"])
    assert "Starting over: the run in" in replaced.stdout and [e["epoch"] for e in read_log(out)] == [0, 1, 2]


def test_checkpoint_pth_never_names_a_best_file_that_is_not_written(data, tmp_path):
    """The process dies after epoch 0's best file is written and before checkpoint.pth, which would name it:
    the best file already holds epoch 0, and the rerun (which evaluates epoch 0 again) ends as a run that was
    never killed."""
    run_main(data, tmp_path / "reference", options=["epochs=2"])
    out = tmp_path / "run"
    proc = popen_main(data, out, options=["epochs=2"],
                      env={"DINO_FAULTS": json.dumps([{"at": "checkpoint_commit", "call": 1, "error": "kill"}])})
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == -9, output[-3000:]
    best = torch.load(out / "checkpoint_best_regular.pth", weights_only=True)
    latest = torch.load(out / "checkpoint.pth", weights_only=True)
    assert best["epoch"] == 0 and latest["epoch"] == 0 and latest["eval_pending"]  # the commit point not passed
    rerun = run_main(data, out, options=["epochs=2"])
    assert "Epoch 0 was trained but not evaluated: evaluating it first" in rerun.stdout
    for name in ("checkpoint_best_regular.pth", "checkpoint.pth"):
        ref = torch.load(tmp_path / "reference" / name, weights_only=True)
        got = torch.load(out / name, weights_only=True)
        assert ref["epoch"] == got["epoch"] and ref["best"] == got["best"]
        assert all(torch.equal(ref["model"][k], got["model"][k]) for k in ref["model"])
