"""Run main.py as a user would (a subprocess) on a tiny DINO and a tiny generated dataset."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = "config/DINO/DINO_demo.py"
TINY_OPTIONS = ["hidden_dim=32", "nheads=4", "dim_feedforward=64", "enc_layers=1", "dec_layers=2", "num_queries=20",
                "num_select=30", "dn_number=6", "return_interm_indices=[1,2]", "synthetic_num_train=16",
                "synthetic_num_val=6", "synthetic_image_size=64", "data_aug_scales=[64]", "data_aug_max_size=64",
                "data_aug_val_size=64", "batch_size=2", "epochs=2", "lr_drop=1"]


def run_main(coco_path, output_dir, *extra, options=(), config=DEMO, timeout=300, check=True, env=None):
    """Returns the CompletedProcess; output is stdout+stderr in .stdout."""
    cmd = [sys.executable, str(ROOT / "main.py"), "-c", config, "--coco_path", str(coco_path),
           "--output_dir", str(output_dir), "--num_workers", "0", *extra]
    cmd += ["--options", *TINY_OPTIONS, *options]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"main.py exited {proc.returncode}:\n{proc.stdout[-4000:]}")
    return proc


def read_log(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "log.txt").read_text().splitlines() if line.strip()]


def wait_for_line(proc, needle, timeout=240):
    """Read a running process's output until a line contains needle; returns everything read so far."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if needle in line:
            return "".join(lines)
    raise AssertionError(f"never saw {needle!r}:\n{''.join(lines)[-4000:]}")
