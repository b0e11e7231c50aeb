"""Real engines: torchrun with two CPU processes (gloo), and submitit's local executor with preemption."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import torch

from datasets.sampler import ResumableSampler
from datasets.synthetic import ensure_synthetic_coco
from runner import ROOT, TINY_OPTIONS, read_log, run_main, wait_for_line


def _torchrun(data, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "main.py"), "-c", "config/DINO/DINO_demo.py", "--coco_path", str(data), "--output_dir",
           str(out), "--num_workers", "0", "--save_log", *extra, "--options", *TINY_OPTIONS, "synthetic_num_train=24", "epochs=3"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def test_torchrun_two_processes_interrupted_mid_epoch_and_resumed(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    first = _torchrun(data, out)
    wait_for_line(first, "Epoch 1 [1/6]")  # after a full epoch with its evaluation
    os.killpg(first.pid, signal.SIGTERM)  # what a scheduler does: every process of the job gets it
    first_out = first.communicate(timeout=240)[0]
    saved = torch.load(out / "checkpoint.pth", weights_only=True)
    assert saved["epoch"] >= 0 and saved["iteration"] > 0, first_out[-3000:]
    assert len(saved["rng"]) == 2  # one RNG state per process
    shutil.copytree(out, tmp_path / "one_process")
    second = _torchrun(data, out)
    second_out = second.communicate(timeout=300)[0]
    assert second.returncode == 0, second_out[-4000:]
    assert f"epoch {saved['epoch'] + 1}, iteration {saved['iteration']} of 6" in second_out
    assert [e["epoch"] for e in read_log(out)] == [0, 1, 2]  # one line per epoch, written by rank 0 only
    info = (out / "info.txt").read_text()
    assert info.count("command:") == 2 and "world size: 2" in info
    assert len(read_log(out)[-1]["test_coco_eval_bbox"]) == 12

    # The same mid-epoch checkpoint on one process (a node was lost): the epoch restarts, and says so.
    alone = run_main(data, tmp_path / "one_process", options=["synthetic_num_train=24", "epochs=3"])
    assert "the data order differs, so epoch" in alone.stdout and "restarts from its first iteration" in alone.stdout
    assert [e["epoch"] for e in read_log(tmp_path / "one_process")] == [0, 1, 2]


def test_a_rank_whose_batch_has_no_boxes_neither_hangs_nor_crashes(tmp_path):
    """Half the images lose their boxes; with seed 42 some step gives one rank only empty images."""
    data = tmp_path / "data"
    ensure_synthetic_coco(data, num_train=24, num_val=6, image_size=64, seed=0)  # what main.py would generate
    coco = json.loads((data / "annotations" / "instances_train2017.json").read_text())
    empty = {img["id"] for img in coco["images"][::2]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] not in empty]
    (tmp_path / "train.json").write_text(json.dumps(coco))
    boxes = {img["id"]: 0 for img in coco["images"]}
    for a in coco["annotations"]:
        boxes[a["image_id"]] += 1
    ids = sorted(boxes)  # the dataset orders images by id
    per_rank = [[[boxes[ids[i]] for _, i in s] for s in _rank_batches(len(ids), rank)] for rank in (0, 1)]
    assert any(sum(a) == 0 < sum(b) or sum(b) == 0 < sum(a) for a, b in zip(*per_rank)), "test data too easy"
    proc = _torchrun(data, tmp_path / "out", "--options", f"train_ann_file={tmp_path / 'train.json'}")
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-4000:]
    assert len(read_log(tmp_path / "out")) == 3


def _rank_batches(num_images, rank):
    sampler = ResumableSampler(num_images, shuffle=True, seed=42, num_replicas=2, rank=rank)
    sampler.set_epoch(0)
    samples = list(sampler)
    return [samples[i:i + 2] for i in range(0, len(samples) - 1, 2)]


def _children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], stdout=subprocess.PIPE, text=True).stdout
    return [int(p) for p in out.split()]


def _wait_for_file_text(path_glob, needle, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for path in path_glob():
            if needle in path.read_text(errors="replace"):
                return path
        time.sleep(0.2)
    raise AssertionError(f"never saw {needle!r} in {[str(p) for p in path_glob()]}")


def test_submitit_local_preemption_requeues_and_continues_a_fine_tune_mid_epoch(data, tmp_path):
    """The requeued job replays the same argv, --resume and --start_epoch included: it must continue, not restart."""
    run_main(data, tmp_path / "pretrained", options=["epochs=1"])
    job_dir = tmp_path / "job"
    fine_tune = ["--resume", str(tmp_path / "pretrained" / "checkpoint.pth"), "--finetune_ignore", "class_embed",
                 "--start_epoch", "1"]
    cmd = [sys.executable, str(ROOT / "tools" / "run_with_submitit.py"), "--cluster", "local", "--ngpus", "1",
           "--timeout", "20", "--job_dir", str(job_dir), "--cpus_per_task", "1",
           "-c", "config/DINO/DINO_demo.py", "--coco_path", str(data), "--device", "cpu", "--num_workers", "0",
           "--save_log", *fine_tune, "--options", *TINY_OPTIONS, "epochs=12"]
    # A file, not a pipe: the local job inherits the launcher's stdout and would hold a pipe open.
    with open(tmp_path / "submit.txt", "w") as out:
        submitted = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=120,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = (tmp_path / "submit.txt").read_text()
    assert submitted.returncode == 0, text
    controller = int(text.split("Submitted job ")[1].split(";")[0])
    logs = lambda: sorted(job_dir.glob("*_log.out"))  # noqa: E731
    _wait_for_file_text(logs, "Epoch 2 [3/8]")
    for task in _children(controller):
        os.kill(task, signal.SIGUSR2)  # submitit's own preemption path
    _wait_for_file_text(logs, "requeue 1:")
    _wait_for_file_text(logs, "Training time", timeout=300)
    assert [e["epoch"] for e in read_log(job_dir)] == list(range(1, 12))  # every epoch logged exactly once
    text = "".join(p.read_text() for p in logs())
    epoch, iteration = re.search(r"Continuing the interrupted run in .* \(started from .*pretrained/checkpoint.pth with "
                                 r"--finetune_ignore class_embed --start_epoch 1\): epoch (\d+), iteration (\d+)",
                                 text).groups()
    assert int(epoch) >= 2 and int(iteration) > 0  # continued mid-epoch, not from the last epoch end
    assert f"epoch {epoch}, iteration {iteration} of 8" in text
