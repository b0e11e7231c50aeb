"""A real single-node Slurm (tools/slurm/local_cluster.sh): a job requeued mid-run finishes as if never stopped."""
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from runner import ROOT, TINY_OPTIONS, last_event, read_log, run_main, wait_for_event

CLUSTER = ROOT / "tools" / "slurm" / "local_cluster.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(t) is None]
    if missing or os.geteuid() != 0:
        pytest.skip(f"SLURM TESTS SKIPPED: need root and Debian's slurm-wlm/munge packages (missing: {missing}); "
                    "`.ci/run` installs them")
    state = tmp_path_factory.mktemp("slurm")
    up = subprocess.run(["bash", str(CLUSTER), "up", str(state)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, timeout=120)
    assert up.returncode == 0, up.stdout
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf"), "OMP_NUM_THREADS": "1"}
    yield env
    subprocess.run(["bash", str(CLUSTER), "down", str(state)], timeout=60)


def _submit(slurm, data, job_dir, *extra, options=()):
    cmd = [sys.executable, str(ROOT / "tools" / "run_with_submitit.py"), "--cluster", "slurm", "--ngpus", "1",
           "--cpus_per_task", "1", "--job_dir", str(job_dir), *extra, "-c", "config/DINO/DINO_demo.py",
           "--coco_path", str(data), "--device", "cpu", "--num_workers", "0", "--save_log", "--no-amp",
           "--options", *TINY_OPTIONS, *options]
    proc = subprocess.run(cmd, cwd=ROOT, env=slurm, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout
    return proc.stdout.split("Submitted job ")[1].split(";")[0]


def _job_text(job_dir):
    return "".join(p.read_text(errors="replace") for p in sorted(job_dir.glob("*_log.*")))


def _wait(job_dir, needle, timeout, count=1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _job_text(job_dir).count(needle) >= count:
            return
        time.sleep(0.5)
    raise AssertionError(f"never saw {needle!r} x{count}:\n{_job_text(job_dir)[-4000:]}")


def _start_now(slurm, job_id):
    """A requeued job waits ~2 minutes (BeginTime); start it now, as an admin would."""
    time.sleep(3)
    for _ in range(20):
        if subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=slurm).returncode == 0:
            return
        time.sleep(1)


def _same_weights(a, b):
    ma = torch.load(a / "checkpoint.pth", weights_only=True)["model"]
    mb = torch.load(b / "checkpoint.pth", weights_only=True)["model"]
    return all(torch.equal(ma[k], mb[k]) for k in ma)


def test_scontrol_requeue_mid_run_resumes_and_matches_an_uninterrupted_run(slurm, data, tmp_path):
    options = ["epochs=12"]  # a few seconds of training, so the requeue lands mid-run
    reference = tmp_path / "reference"
    run_main(data, reference, options=options)
    job_dir = tmp_path / "job"
    job_id = _submit(slurm, data, job_dir, options=options)
    wait_for_event(None, job_dir, "step", epoch=2, iteration=3)
    subprocess.run(["scontrol", "requeue", job_id], env=slurm, check=True)
    wait_for_event(None, job_dir, "stopped", timeout=60)  # in training or the evaluation of an epoch
    _start_now(slurm, job_id)
    wait_for_event(None, job_dir, "finished", timeout=300)
    assert last_event(job_dir, "start")["how"] == "continue"
    assert [e["epoch"] for e in read_log(job_dir)] == list(range(12))
    assert _same_weights(reference, job_dir)


@pytest.mark.slow
def test_time_limit_saves_requeues_and_finishes(slurm, data, tmp_path):
    job_dir = tmp_path / "job"
    # ~70 s of training: the time-limit notice (SIGUSR2, 75 s before the 2-minute limit) lands mid-run.
    job_id = _submit(slurm, data, job_dir, "--timeout", "2", "--signal_delay_s", "75",
                     options=["epochs=120", "save_checkpoint_interval=1000"])
    _wait(job_dir, "Requeued job", timeout=200)  # submitit's own line, after our save
    _start_now(slurm, job_id)
    wait_for_event(None, job_dir, "start", timeout=120, how="continue")
    wait_for_event(None, job_dir, "finished", timeout=900)
    assert [e["epoch"] for e in read_log(job_dir)] == list(range(120))
