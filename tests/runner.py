"""Run main.py as a user would (a subprocess) on a tiny DINO and a tiny generated dataset."""
import os
import select
import subprocess
import sys
import time

import torch

from tiny import ROOT, TINY
from util.run_dir import read_log  # noqa: F401 (the tests' one log.txt reader)

DEMO = "config/DINO/DINO_demo.py"
# The tiny model of tests/tiny.py, at 64 px on 16 + 6 generated images, two short epochs.
TINY_OPTIONS = [f"{key}={value}" for key, value in TINY.items()] + [
    "return_interm_indices=[1,2]", "synthetic_num_train=16", "synthetic_num_val=6", "synthetic_image_size=64",
    "data_aug_scales=[64]", "data_aug_max_size=64", "data_aug_val_size=64", "batch_size=2", "epochs=2", "lr_drop=1",
    "use_ema=False"]  # the demo's EMA doubles each evaluation; the EMA tests turn it on


def run_main(coco_path, output_dir, *extra, options=(), config=DEMO, timeout=300, check=True, env=None,
             precision=("--no-amp",), cwd=None):
    """Returns the CompletedProcess; output is stdout+stderr in .stdout. Float32 unless extra says --amp
    (precision=() keeps the config's own default). `cwd`: another working directory than the project's."""
    config = str(ROOT / config) if cwd else config
    cmd = [sys.executable, str(ROOT / "main.py"), "-c", config, "--coco_path", str(coco_path),
           "--output_dir", str(output_dir), "--num_workers", "0", *precision, *extra]
    cmd += ["--options", *TINY_OPTIONS, *options]
    proc = subprocess.run(cmd, cwd=cwd or ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"main.py exited {proc.returncode}:\n{proc.stdout[-4000:]}")
    return proc


def popen_main(data, out, *extra, options=(), workers=0, new_session=False, env=None):
    """main.py running in the background, printing a progress line per iteration. `env`: more environment
    variables, e.g. DINO_FAULTS (util/faults.py)."""
    cmd = [sys.executable, str(ROOT / "main.py"), "-c", DEMO, "--coco_path", str(data), "--output_dir", str(out),
           "--num_workers", str(workers), "--save_log", "--no-amp", *extra, "--options", *TINY_OPTIONS, *options]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", **(env or {})},
                            start_new_session=new_session)


def run_tool(tool, *args, timeout=600):
    """tools/<tool>.py as a user runs it; output is stdout+stderr in .stdout."""
    return subprocess.run([sys.executable, str(ROOT / "tools" / tool), *map(str, args)], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)


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


def wait_for_event(proc, output_dir, event, timeout=240, **fields):
    """Drain a running main.py's output until its events.jsonl (util/run_dir.py) records, after this call,
    `event` with `fields`, e.g. ("step", epoch=1, iteration=3); returns the output read so far. proc None: a
    job whose output goes elsewhere, whose whole events.jsonl counts."""
    from util.run_dir import EventTail
    tail = EventTail(output_dir, whole=proc is None)
    chunks, deadline = [], time.time() + timeout
    while time.time() < deadline:
        tail.read()
        if any(e["event"] == event and all(e.get(k) == v for k, v in fields.items()) for e in tail.records):
            return b"".join(chunks).decode(errors="replace")
        if proc is None:
            time.sleep(0.1)
        elif select.select([proc.stdout.fileno()], [], [], 0.05)[0]:
            data = os.read(proc.stdout.fileno(), 1 << 16)
            chunks.append(data)
            if not data and proc.poll() is not None:
                break
    raise AssertionError(f"never saw {event} {fields}:\n{b''.join(chunks).decode(errors='replace')[-4000:]}")


def last_event(output_dir, event):
    """The newest record of `event` in output_dir's events.jsonl (None if there is none)."""
    from util.run_dir import read_events
    found = read_events(output_dir, event)
    return found[-1] if found else None


def _state(path):
    checkpoint = torch.load(path, weights_only=True)
    return checkpoint["model"], checkpoint["optimizer"]["state"]


def assert_same_training(ref_dir, other_dir):
    ref_model, ref_opt = _state(ref_dir / "checkpoint.pth")
    model, opt = _state(other_dir / "checkpoint.pth")
    assert ref_model.keys() == model.keys()
    assert all(torch.equal(ref_model[k], model[k]) for k in ref_model)
    assert all(torch.equal(ref_opt[i][k], opt[i][k]) for i in ref_opt for k in ref_opt[i])
    train = lambda log: [{k: v for k, v in e.items() if k.startswith("train_")} for e in log]  # noqa: E731
    assert train(read_log(ref_dir)) == train(read_log(other_dir))
    assert [e["test_coco_eval_bbox"] for e in read_log(ref_dir)] == [e["test_coco_eval_bbox"] for e in read_log(other_dir)]
