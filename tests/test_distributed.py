"""Real engines: torchrun with two CPU processes (gloo), and submitit's local executor with preemption."""
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from datasets.sampler import GlobalBatchSampler
from datasets.synthetic import ensure_synthetic_coco
from runner import (ROOT, TINY_OPTIONS, assert_same_training, last_event, popen_main, read_log, run_main,
                    wait_for_event)


def _torchrun(data, out, *extra, options=(), faults=None):
    """main.py on 2 processes; `faults`: a DINO_FAULTS plan (util/faults.py)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "main.py"), "-c", "config/DINO/DINO_demo.py", "--coco_path", str(data), "--output_dir",
           str(out), "--num_workers", "0", "--save_log", "--no-amp", *extra, "--options", *TINY_OPTIONS, "synthetic_num_train=24",
           "epochs=3", *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"DINO_FAULTS": json.dumps(faults)} if faults else {})}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def _finish(proc, timeout=300):
    """(exit code, output) of a process group that must end by itself within timeout: a wait in a collective
    for a process that stopped would not."""
    try:
        output = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"still running after {timeout} s: {proc.communicate()[0][-3000:]}") from None
    return proc.returncode, output


def test_a_mid_epoch_checkpoint_continues_on_any_number_of_processes(tmp_path):
    """2 processes x batch 2 stopped mid-epoch, continued on 1 x batch 1 and stopped mid-epoch again, then on
    2 x 2 to the end (whose last step may hold fewer than 4 images, one process even none): by the record of
    the image ids each process trained on, every image of every epoch is trained exactly once."""
    data, out = tmp_path / "data", tmp_path / "out"
    record = ["--options", "record_sample_ids=True"]
    first = _torchrun(data, out, *record)
    wait_for_event(first, out, "step", epoch=1, iteration=2)  # after a full epoch with its evaluation
    os.killpg(first.pid, signal.SIGTERM)  # what a scheduler does: every process of the job gets it
    first_out = first.communicate(timeout=240)[0]  # torchrun itself exits 1 on SIGTERM; its workers saved first
    assert "SIGTERM received during epoch 1: saved" in first_out, first_out[-3000:]
    saved = torch.load(out / "checkpoint.pth", weights_only=True)
    assert saved["epoch"] == 0 and saved["iteration"] > 0 and len(saved["rng"]) == 2, first_out[-3000:]
    assert saved["data_order"]["samples_done"] == 4 * saved["iteration"]

    alone = popen_main(data, out, options=["synthetic_num_train=24", "epochs=3", "record_sample_ids=True",
                                           "batch_size=1", "keep_global_batch=False"])
    text = wait_for_event(alone, out, "step", epoch=1)
    alone.send_signal(signal.SIGTERM)
    text += alone.communicate(timeout=120)[0]
    assert alone.returncode == 3, text[-3000:]
    done = saved["data_order"]["samples_done"]
    assert f"iteration {done} of 24" in text, text[-3000:]
    assert ("written by 2 process(es) x batch 2 x accumulate_steps 1, now 1 x 1 x 1: epoch 1 continues from sample "
            f"{done} of its order, split among the processes now running; the global batch changed from 4 to 1"
            ) in text, text[-3000:]
    inspected = subprocess.run([sys.executable, "tools/inspect_checkpoint.py", str(out / "checkpoint.pth")],
                               cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True).stdout
    assert re.search(r"epoch 1: \d+ of 24 images done, by 1 process\(es\) x batch 1", inspected), inspected

    before_last = torch.load(out / "checkpoint.pth", weights_only=True)
    last = _torchrun(data, out, *record)
    last_out = last.communicate(timeout=300)[0]
    assert last.returncode == 0, last_out[-4000:]
    assert "now 2 x 2" in last_out and last_event(out, "start")["how"] == "continue"
    rest = (24 - before_last["data_order"]["samples_done"]) % 4 if before_last["epoch"] == 0 else 0
    assert (f"the epoch's last step trains its last {rest} image(s)" in last_out) == (rest > 0), last_out[-3000:]
    assert [e["epoch"] for e in read_log(out)] == [0, 1, 2]  # one line per epoch, written by rank 0 only
    info = (out / "info.txt").read_text()
    assert info.count("command:") == 3 and "world size: 2" in info
    trained = {}
    for rank_file in (out / "sample_ids").glob("rank*.txt"):
        for line in rank_file.read_text().splitlines():
            epoch, *ids = map(int, line.split())
            trained.setdefault(epoch, []).extend(ids)
    assert sorted(trained) == [0, 1, 2]
    for epoch in range(3):
        assert sorted(trained[epoch]) == list(range(1, 25)), (epoch, trained[epoch])


def test_continuing_on_more_processes_keeps_the_global_batch_by_accumulation(tmp_path):
    """1 process x batch 4 stopped mid-epoch, continued by torchrun on 2 processes x batch 1: keep_global_batch
    accumulates 2 batches per step, so the global batch stays 4 and the epoch goes on at the same step."""
    data, out = tmp_path / "data", tmp_path / "out"
    options = ["synthetic_num_train=24", "epochs=3", "record_sample_ids=True"]
    alone = popen_main(data, out, options=options + ["batch_size=4"])
    text = wait_for_event(alone, out, "step", epoch=0)
    alone.send_signal(signal.SIGTERM)
    text += alone.communicate(timeout=120)[0]
    assert alone.returncode == 3, text[-3000:]
    done = torch.load(out / "checkpoint.pth", weights_only=True)["data_order"]["samples_done"]
    assert 0 < done < 24 and done % 4 == 0, text[-3000:]
    both = _torchrun(data, out, options=["record_sample_ids=True", "batch_size=1"])
    both_out = both.communicate(timeout=300)[0]
    assert both.returncode == 0, both_out[-4000:]
    assert ("written by 1 process(es) x batch 4 x accumulate_steps 1, now 2 x 1 x 2: epoch 0 continues from sample "
            f"{done} of its order, split among the processes now running; the global batch 4 is kept by "
            "accumulate_steps 2 (keep_global_batch)") in both_out, both_out[-3000:]
    assert f"epoch 0, iteration {done // 4} of 6" in both_out, both_out[-3000:]
    saved = torch.load(out / "checkpoint.pth", weights_only=True)
    assert saved["data_order"]["accumulate_steps"] == 2 and saved["data_order"]["requested_accumulate_steps"] == 1
    assert saved["args"]["accumulate_steps"] == 1  # the command's: a resumed layout never rewrites the arguments
    trained = {}
    for rank_file in (out / "sample_ids").glob("rank*.txt"):
        for line in rank_file.read_text().splitlines():
            epoch, *ids = map(int, line.split())
            trained.setdefault(epoch, []).extend(ids)
    assert sorted(trained) == [0, 1, 2] and all(sorted(ids) == list(range(1, 25)) for ids in trained.values())


def test_rerunning_an_interrupted_torchrun_fine_tune_continues_it(tmp_path):
    """The restart rule under torchrun: the same command with --resume, --finetune_ignore and --start_epoch,
    rerun after a SIGTERM to every process, continues the run at the iteration it saved."""
    data, out = tmp_path / "data", tmp_path / "out"
    run_main(data, tmp_path / "pretrained", options=["synthetic_num_train=24", "epochs=1"])
    source = tmp_path / "pretrained" / "checkpoint.pth"
    command = ["--resume", str(source), "--finetune_ignore", "class_embed", "--start_epoch", "1"]
    first = _torchrun(data, out, *command)
    wait_for_event(first, out, "step", epoch=1, iteration=2)
    os.killpg(first.pid, signal.SIGTERM)
    first_out = first.communicate(timeout=240)[0]
    assert "SIGTERM received during epoch 1" in first_out, first_out[-3000:]
    rerun = _torchrun(data, out, *command)
    rerun_out = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, rerun_out[-3000:]
    continuing = (f"Continuing the interrupted run in {out} (started from {source} with --finetune_ignore class_embed "
                  "--start_epoch 1): epoch 1")
    assert continuing in rerun_out, rerun_out[-3000:]
    saved_at = re.search(r"SIGTERM received during epoch 1: saved \S+ at iteration (\d+)", first_out)
    if saved_at:  # the signal landed in training, not (on a very busy machine) in the evaluation after it
        assert f"{continuing}, iteration {saved_at.group(1)} of 6" in rerun_out, rerun_out[-3000:]
    assert [e["epoch"] for e in read_log(out)] == [1, 2]


# One optimizer step (SGD, lr 1: the parameters move by minus the gradient) over the batches LAYOUT[rank] of
# three fixed images, on as many processes as LAYOUT has ranks; with several, as an epoch's shorter last step.
UNEVEN_STEP = """
import os, sys
sys.path[:0] = [{root!r}, {tests!r}]
import torch
from engine import EpochPlan, train_one_epoch
from models import build_model
from training.step import TrainStep
from tiny import tiny_args
from util.misc import collate_fn

world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    torch.distributed.init_process_group("gloo")
rank = int(os.environ.get("RANK", "0"))
torch.manual_seed(0)
model, criterion, _ = build_model(tiny_args(use_dn=False))
generator = torch.Generator().manual_seed(1)
samples = [(torch.randn(3, 64, 40 + 8 * i, generator=generator),
            {{"labels": torch.tensor([i + 1, 4]), "image_id": torch.tensor(i),
              "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.2 + 0.1 * i], [0.3, 0.6, 0.2, 0.2]])}}) for i in range(3)]
batches = [collate_fn([samples[i] for i in batch]) for batch in {layout}[rank]]
before = {{f"before {{k}}": v.detach().clone() for k, v in model.named_parameters()}}
scaler = torch.amp.GradScaler("cpu", init_scale=4.0) if {scaler} else None  # float16's, as on CUDA
step = TrainStep(model, criterion, torch.optim.SGD(model.parameters(), lr=1.0), "cpu", scaler=scaler,
                 accumulate_steps=len(batches))
stats = train_one_epoch(step, batches, 0, EpochPlan(steps=1, short_last_step=world > 1))
if rank == 0:
    torch.save({{"loss": stats["loss"], **before, **dict(model.named_parameters())}}, {out!r})
if world > 1:  # a process that exits with gloo still set up can abort in its teardown
    torch.distributed.destroy_process_group()
"""


def _uneven_step(tmp_path, name, layout, scaler=False):
    script, out = tmp_path / f"{name}.py", tmp_path / f"{name}.pt"
    script.write_text(UNEVEN_STEP.format(root=str(ROOT), tests=str(ROOT / "tests"), layout=layout, out=str(out),
                                         scaler=scaler))
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(layout)}"]
    launch = launch if len(layout) > 1 else []
    proc = subprocess.run([sys.executable, *launch, str(script)], cwd=tmp_path, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("ranks, alone, scaler", [([[[0, 1]], [[2]]], [[[0, 1], [2]]], False),
                                                  ([[[0]], [[]]], [[[0]]], False),
                                                  ([[[0]], [[]]], [[[0]]], True),
                                                  ([[[0], [1]], [[2], []]], [[[0], [1], [2]]], False)],
                         ids=["2+1 images", "1+0 images", "1+0 images, loss scaler", "accumulated 2+1 images"])
def test_a_shorter_last_step_spread_unevenly_trains_like_one_process(tmp_path, ranks, alone, scaler):
    """The step that ends an epoch continued on another layout: 2 processes hold different numbers of images,
    or one holds none (an empty batch). Its update and loss equal one process's step over the same batches.
    With float16's loss scaler too: a process with no images never scales a loss, yet must unscale."""
    uneven = _uneven_step(tmp_path, "uneven", ranks, scaler)
    reference = _uneven_step(tmp_path, "alone", alone, scaler)
    assert uneven["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    names = [k for k in reference if k != "loss" and not k.startswith("before ")]
    moved = [k for k in names if not torch.equal(reference[k], reference[f"before {k}"])]
    assert len(moved) > 0.9 * len(names)  # the step has gradients to compare
    for name in names:
        torch.testing.assert_close(uneven[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)


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
    sampler = GlobalBatchSampler(num_images, batch_size=2, seed=42, num_replicas=2, rank=rank)
    sampler.set_epoch(0)
    return list(sampler)


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
    wait_for_event(None, job_dir, "step", epoch=2, iteration=3)
    for task in _children(controller):
        os.kill(task, signal.SIGUSR2)  # submitit's own preemption path
    _wait_for_file_text(logs, "requeue 1:")
    wait_for_event(None, job_dir, "finished", timeout=300)
    assert [e["epoch"] for e in read_log(job_dir)] == list(range(1, 12))  # every epoch logged exactly once
    continued = last_event(job_dir, "start")
    assert continued["how"] == "continue" and continued["path"].endswith("checkpoint.pth")
    assert continued["epoch"] >= 2 and continued["iteration"] > 0  # continued mid-epoch, not from the epoch end


def _two_nodes(data, cwds, *extra):
    """main.py as processes 0 and 1 of one run, each in its own working directory: two nodes that do not share
    the relative --output_dir out. Returns each one's (exit code, output)."""
    port = 29500 + os.getpid() % 2000
    procs = []
    for rank, cwd in enumerate(cwds):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, str(ROOT / "main.py"), "-c", str(ROOT / "config/DINO/DINO_demo.py"), "--coco_path",
               str(data), "--output_dir", "out", "--num_workers", "0", "--no-amp", *extra,
               "--options", *TINY_OPTIONS, "epochs=2"]
        procs.append(subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=env, start_new_session=True))
    return [_finish(proc, timeout=120) for proc in procs]


def test_every_process_starts_from_the_checkpoint_process_0_chose_or_the_run_stops(data, tmp_path):
    """Process 0's output_dir holds an interrupted run; process 1's holds nothing, then another run's file.
    Both stop before training, each with one line that names the node, the path and the fix."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    run_main(data, node0 / "out", options=["epochs=1"])
    node1.mkdir()
    results = _two_nodes(data, [node0, node1])
    assert [code for code, _ in results] == [2, 2], results[1][1][-3000:]
    missing = (f"node {platform.node()} cannot read out/checkpoint.pth, which process 0 starts from (checkpoint "
               "out/checkpoint.pth does not exist): output_dir must be shared between the nodes, or the checkpoint "
               "given to every node")
    assert results[0][1].strip().splitlines()[-1] == f"error: {missing} (on process 1)", results[0][1][-3000:]
    assert results[1][1].strip().splitlines()[-1] == f"[rank 1] error: {missing}", results[1][1][-3000:]
    assert "Traceback" not in results[0][1] + results[1][1]

    run_main(data, node1 / "out", options=["epochs=1", "lr=1e-4"])  # another run, at the same path
    results = _two_nodes(data, [node0, node1])
    assert [code for code, _ in results] == [2, 2], results[1][1][-3000:]
    assert results[0][1].strip().splitlines()[-1] == (
        f"error: node {platform.node()} reads another file at out/checkpoint.pth than process 0 does: output_dir "
        "must be shared between the nodes, or the same checkpoint given to every node (on process 1)")
    assert len(read_log(node0 / "out")) == 1  # nothing trained


@pytest.mark.parametrize("fault, message", [
    ("nan", "epoch 0: the evaluated model gives non-finite scores or boxes for image id"),
    ("error", "unexpected OSError: injected failure at eval_batch")])
def test_a_process_failing_alone_in_evaluation_stops_every_process(tmp_path, fault, message):
    """Process 1's predictions diverge, or its file is broken, in its 2nd evaluation batch: every process ends
    at once with that error, instead of waiting in a collective for the one that stopped."""
    proc = _torchrun(tmp_path / "data", tmp_path / "out", options=["epochs=1"],
                     faults=[{"at": "eval_batch", "rank": 1, "call": 2, "error": fault}])
    code, output = _finish(proc, timeout=120)
    assert code != 0
    errors = [line for line in output.splitlines() if "error: " in line and "elastic" not in line]
    assert len(errors) == 2 and all(message in line for line in errors), output[-3000:]
    assert any(line.startswith("error: ") and " (on process 1)" in line for line in errors), errors
    assert any(line.startswith("[rank 1] error: ") for line in errors), errors
    assert torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)["eval_pending"]  # training kept


def test_a_step_failing_on_one_process_saves_every_process_state_and_the_rerun_ends_the_same(tmp_path):
    """Process 1 cannot load its share of iteration 3 (a broken file): every process saves the state after
    iteration 2 and stops; the same command, rerun once the file is mended, ends bit-identical to a run
    that never failed."""
    data = tmp_path / "data"
    reference = _torchrun(data, tmp_path / "reference", options=["epochs=1"])
    assert _finish(reference)[0] == 0
    failing = _torchrun(data, tmp_path / "run", options=["epochs=1"],
                        faults=[{"at": "forward", "rank": 1, "call": 3, "error": "error"}])
    code, output = _finish(failing)
    assert code == 1, output[-3000:]
    assert "a training step failed after epoch 0 iteration 2: saved" in output, output[-3000:]
    assert "error: unexpected OSError: injected failure at forward (on process 1)" in output
    saved = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert (saved["epoch"], saved["iteration"], len(saved["rng"])) == (-1, 2, 2)
    rerun = _torchrun(data, tmp_path / "run", options=["epochs=1"])
    code, output = _finish(rerun)
    assert code == 0 and "epoch 0, iteration 2 of 6" in output, output[-3000:]
    assert_same_training(tmp_path / "reference", tmp_path / "run")
