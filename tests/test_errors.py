"""Every bad input and every failure ends in one truthful `error:` line and a non-zero exit, without a
traceback: wrong options and configs, unusable checkpoints, full disks, signals at awkward moments and
diverged models (bad datasets: tests/test_bad_data.py)."""
import os
import resource
import signal
import subprocess
import sys
import zipfile

import pytest
import torch

from runner import DEMO, ROOT, TINY_OPTIONS, popen_main, run_main, wait_for_event, wait_for_line


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    run_main(data, out, options=["epochs=1"])
    return torch.load(out / "checkpoint.pth", weights_only=True)


def checkpoint_file(change):
    """A case argument: the trained checkpoint changed by change(checkpoint) (which may return a replacement)."""
    def make(tmp_path, trained):
        checkpoint = {k: v for k, v in trained.items()}
        checkpoint = change(checkpoint) or checkpoint
        torch.save(checkpoint, tmp_path / "given.pth")
        return ["--resume", str(tmp_path / "given.pth")]
    return make


def arguments(*extra):
    return lambda tmp_path, trained: list(extra)


def raising_config(tmp_path, trained):
    (tmp_path / "cfg.py").write_text(f"_base_ = [{str(ROOT / DEMO)!r}]\nlr = undefined_name * 2\n")
    return ["-c", str(tmp_path / "cfg.py")]


def output_dir_is_a_file(tmp_path, trained):
    (tmp_path / "out").write_text("not a directory")
    return []


def zip_without_torch(tmp_path, trained):
    with zipfile.ZipFile(tmp_path / "given.pth", "w") as archive:
        archive.writestr("weights.txt", "hello")
    return ["--resume", str(tmp_path / "given.pth")]


def all_shapes_wrong(checkpoint):
    return {k: torch.zeros(3, 3, 3, 3) for k in checkpoint["model"]}


def weights_of_another_architecture(checkpoint):
    """Weights only, of which 15 tensors fit this model: the rest have other shapes."""
    return {"model": {k: v if i < 15 else torch.zeros(2, 3) for i, (k, v) in enumerate(checkpoint["model"].items())}}


def without_args(checkpoint):
    del checkpoint["args"]


def scheduler_key(checkpoint):
    checkpoint["scheduler"] = checkpoint.pop("lr_scheduler")


def resume_a_directory(tmp_path, trained):
    (tmp_path / "folder.pth").mkdir()
    return ["--resume", str(tmp_path / "folder.pth")]


def config_with_a_set(tmp_path, trained):
    (tmp_path / "cfg.py").write_text(f"_base_ = [{str(ROOT / DEMO)!r}]\nlr_drop_list = {{3, 4}}\n")
    return ["-c", str(tmp_path / "cfg.py")]


def _file_size_limit(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


# name: (make the case -> extra main.py arguments, extra --options, limit on file sizes, exit code, message texts)
CASES = {
    "--options lr=abc": (arguments(), ["lr=abc"], None, 2, ["--options lr='abc': expected a number"]),
    "--options epochs=abc": (arguments(), ["epochs=abc"], None, 2, ["--options epochs='abc': expected an integer"]),
    "--options without =": (arguments(), ["lr"], None, 2, ["expected KEY=VALUE, got 'lr'"]),
    "a common alias of a key": (arguments(), ["learning_rate=1e-4"], None, 2,
                                ["--options key 'learning_rate' is not in config/DINO/DINO_demo.py: did you mean 'lr'"]),
    "weights of another architecture to --resume": (
        checkpoint_file(weights_of_another_architecture), [], None, 2,
        ["--resume ", "given.pth: only 15 of this model's ", "holds another architecture",
         "--pretrain_model_path"]),
    "unknown key, no close match": (arguments(), ["qqqq=1"], None, 2,
                                    ["'qqqq' is not in config/DINO/DINO_demo.py: the valid keys are the names set in"]),
    "config file that raises": (raising_config, [], None, 2, ["raised NameError at line 2: name 'undefined_name'"]),
    "config file missing": (arguments("-c", "config/DINO/nope.py"), [], None, 2, ["config file not found: "]),
    "--output_dir is a file": (output_dir_is_a_file, [], None, 2, ["is a file, not a directory"]),
    "--device cuda without a GPU": (arguments("--device", "cuda"), [], None, 2, ["no CUDA device is available"]),
    "--start_epoch beyond epochs": (arguments("--start_epoch", "5"), [], None, 2,
                                    ["--start_epoch 5 is not in [0, epochs=2): nothing would be trained"]),
    "--finetune_ignore without a checkpoint": (arguments("--finetune_ignore", "class_embed"), [], None, 2,
                                               ["--finetune_ignore needs a checkpoint to fine-tune from"]),
    "--eval without weights": (arguments("--eval"), [], None, 2, ["--eval needs weights"]),
    "--resume of a missing file": (arguments("--resume", "nowhere.pth"), [], None, 2,
                                   ["checkpoint nowhere.pth does not exist"]),
    "checkpoint with 'scheduler' instead of 'lr_scheduler'": (
        checkpoint_file(scheduler_key), [], None, 2, ["holds an optimizer state but no lr_scheduler (its keys: "]),
    "bare state dict of which nothing fits": (
        checkpoint_file(all_shapes_wrong), [], None, 2, ["none of the", "model tensors in", "fit this model"]),
    "zip archive that is not a checkpoint": (zip_without_torch, [], None, 2,
                                             ["is a zip archive but not a PyTorch checkpoint"]),
    "backbone_freeze_at changed on resume": (checkpoint_file(lambda c: None), ["backbone_freeze_at=1"], None, 2,
                                             ["backbone_freeze_at: checkpoint 0 vs now 1"]),
    "frozen stages with random weights": (arguments(), ["backbone_freeze_at=2"], None, 2,
                                          ["backbone_freeze_at=2 freezes backbone stages whose weights are random"]),
    "disk full during a save": (arguments(), [], 1024 * 1024, 1,
                                ["could not write checkpoint", "exceeds this process's file-size limit",
                                 "the previous file at that path, if any, is unchanged"]),
    "disk full at start-up": (arguments(), [], 16, 2, ["cannot write to --output_dir"]),
    "--resume of a directory": (resume_a_directory, [], None, 2, ["cannot read checkpoint", "folder.pth"]),
    "backbone_weights file missing": (arguments(), ["backbone_weights=/nowhere/resnet18.pth"], None, 2,
                                      ["checkpoint /nowhere/resnet18.pth does not exist"]),
    "config value of an unsupported type": (config_with_a_set, [], None, 2,
                                            ["config key 'lr_drop_list'", "has a value of type set"]),
    "batch larger than the training set": (arguments(), ["batch_size=32"], None, 2,
                                           ["fewer than one batch of 32 per process: lower batch_size"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_input_gets_one_error_line(name, data, trained, tmp_path):
    make, options, file_limit, code, texts = CASES[name]
    extra = make(tmp_path, trained)
    cmd = [sys.executable, str(ROOT / "main.py"), "-c", DEMO, "--coco_path", str(data), "--output_dir",
           str(tmp_path / "out"), "--num_workers", "0", *extra, "--options", *TINY_OPTIONS, *options]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"},
                          preexec_fn=None if file_limit is None else _file_size_limit(file_limit))
    lines = proc.stdout.rstrip("\n").splitlines()
    assert proc.returncode == code, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert "error: " in lines[-1], proc.stdout[-3000:]
    for text in texts:
        assert text in lines[-1], lines[-1]


def test_a_checkpoint_with_an_optimizer_but_no_args_resumes(data, trained, tmp_path):
    extra = checkpoint_file(without_args)(tmp_path, trained)
    proc = run_main(data, tmp_path / "out", *extra)
    assert f"Resuming training from {tmp_path / 'given.pth'}: epoch 1" in proc.stdout


def test_a_diverged_model_gets_no_ap_and_no_best_file(data, trained, tmp_path):
    """NaN predictions must not be scored (pycocotools would give them an AP) nor saved as the best model."""
    checkpoint = {k: v for k, v in trained.items()}
    checkpoint["model"] = {k: v.clone() for k, v in trained["model"].items()}
    for key in checkpoint["model"]:
        if "class_embed" in key:  # every name of the shared heads: they are saved as separate tensors here
            checkpoint["model"][key].fill_(float("nan"))
    torch.save(checkpoint, tmp_path / "nan.pth")
    evaluated = run_main(data, tmp_path / "eval", "--eval", "--resume", str(tmp_path / "nan.pth"), check=False)
    assert evaluated.returncode == 1 and "non-finite scores or boxes for image id" in evaluated.stdout
    assert "bbox AP" not in evaluated.stdout and not (tmp_path / "eval" / "eval" / "eval_stats.json").exists()

    # The same weights as a trained but not yet evaluated epoch of a run: the rerun evaluates it and stops.
    (tmp_path / "run").mkdir()
    torch.save({**checkpoint, "eval_pending": True}, tmp_path / "run" / "checkpoint.pth")
    rerun = run_main(data, tmp_path / "run", check=False)
    last = rerun.stdout.strip().splitlines()[-1]
    assert rerun.returncode == 1 and last.startswith("error: epoch 0: the evaluated model gives non-finite"), last
    assert not (tmp_path / "run" / "checkpoint_best_regular.pth").exists()
    assert not (tmp_path / "run" / "log.txt").exists() or "epoch" not in (tmp_path / "run" / "log.txt").read_text()


def test_finite_predictions_with_a_non_finite_evaluation_loss_are_refused_too():
    """A NaN test loss must never sit beside a good AP in log.txt: evaluation fails on it alone."""
    from engine import NonFiniteOutputError, _check_finite
    outputs = {"pred_logits": torch.zeros(2, 3, 5), "pred_boxes": torch.full((2, 3, 4), 0.5)}
    targets = [{"image_id": torch.tensor(7)}, {"image_id": torch.tensor(9)}]
    _check_finite(outputs, {"loss_ce": torch.tensor(1.0)}, targets)
    with pytest.raises(NonFiniteOutputError, match=r"non-finite losses \(loss_bbox_1\)"):
        _check_finite(outputs, {"loss_ce": torch.tensor(1.0), "loss_bbox_1": torch.tensor(float("nan"))}, targets)


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(data, tmp_path):
    proc = popen_main(data, tmp_path, options=["epochs=50"])
    wait_for_event(proc, tmp_path, "step", epoch=0, iteration=2)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    last = output.strip().splitlines()[-1]
    assert "Traceback" not in output
    if proc.returncode == 3:  # the first Ctrl-C's save finished before the second arrived
        assert "SIGINT received during epoch 0: saved" in output
    else:
        assert proc.returncode == 130 and last.startswith("error: stopped by Ctrl-C before a save"), output[-2000:]


def test_a_stop_signal_without_output_dir_says_nothing_was_saved(data, tmp_path):
    proc = popen_main(data, "", options=["epochs=50"])
    wait_for_line(proc, "Epoch 0 [2/8]")  # no output_dir, no events.jsonl: the progress line
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 3
    assert "SIGTERM received during epoch 0: nothing was saved (no --output_dir)" in output
    assert "saved checkpoint" not in output and "Traceback" not in output


def test_a_non_finite_loss_stops_training_with_one_line(data, tmp_path):
    proc = popen_main(data, tmp_path / "out", options=["epochs=1"],
                      env={"DINO_FAULTS": '[{"at": "loss", "error": "nan"}]'})
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: loss is nan at epoch 0 iteration 0; non-finite terms: loss_"), last
    assert last.endswith("; no checkpoint was saved") and "Traceback" not in output
