"""Faults injected at named points of a run, so that tests can check what a failure leaves behind without
patching modules. Planned by the environment variable DINO_FAULTS, a JSON list; unset, nothing happens:

    DINO_FAULTS='[{"at": "backward", "rank": 1, "call": 2, "error": "oom"}]'

makes process 1 raise torch.OutOfMemoryError the 2nd time it passes "backward". Points: "forward" and
"backward" (inside autograd's backward pass) and "loss" of every training micro-batch, "eval_batch" of every
evaluation batch, "checkpoint_commit" of a save that writes other files before checkpoint.pth. Errors: "oom",
"error" (an OSError, as a broken file gives), "sigterm" (the process sends itself SIGTERM and goes on), "kill"
(SIGKILL), "nan" (the point's values become NaN: predictions at "eval_batch", loss terms at
"loss").
"rank" and "call" may be left out: every process, every pass. Two more entries change what the run sees:
{"at": "disk_free", "bytes": N} makes the checkpoint store see N bytes free on output_dir's disk, and
{"at": "after_step" or "eval_batch", "sleep": S} pauses S seconds there (a slow step, a long evaluation), so
that a test's signal lands where it means to."""
import collections
import json
import os
import shutil
import signal
import time
from typing import Optional

import torch

from util import distributed as dist_utils

_PLAN = json.loads(os.environ.get("DINO_FAULTS") or "[]")
_passes = collections.Counter()


def _planned(point: str) -> Optional[str]:
    """The error planned for this pass of `point` by this process, or None."""
    if not _PLAN:
        return None
    _passes[point] += 1
    for fault in _PLAN:
        if (fault["at"] == point and "error" in fault and fault.get("rank", dist_utils.get_rank()) == dist_utils.get_rank()
                and fault.get("call", _passes[point]) == _passes[point]):
            return fault["error"]
    return None


def free_bytes(path: str) -> int:
    """The free bytes of path's disk, or the planned "disk_free"."""
    planned = [fault["bytes"] for fault in _PLAN if fault["at"] == "disk_free"]
    return planned[0] if planned else shutil.disk_usage(path).free


def pause(point: str) -> None:
    """Sleep where the plan asks for a pause at `point`."""
    for fault in _PLAN:
        if fault["at"] == point and "sleep" in fault:
            time.sleep(fault["sleep"])


def check(point: str) -> Optional[str]:
    """Raise the error planned for this pass of `point`; returns "nan" when that is planned (the caller spoils
    its values), else None."""
    error = _planned(point)
    if error == "oom":
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected at {point})")
    if error == "error":
        raise OSError(f"injected failure at {point}")
    if error == "sigterm":  # what a scheduler sends; the run goes on until it acts on it
        os.kill(os.getpid(), signal.SIGTERM)
    if error == "kill":  # a machine that dies
        os.kill(os.getpid(), signal.SIGKILL)
    return error


def arm_backward(loss: torch.Tensor) -> None:
    """Check "backward" when autograd reaches `loss` in the backward pass."""
    if _PLAN and loss.requires_grad:
        loss.register_hook(lambda grad: check("backward"))
