"""What a run ran on (versions, devices, processes, code), recorded in info.txt and in every checkpoint, so a
resumed run can list what changed under it."""
import hashlib
import platform
import subprocess
from pathlib import Path

import torch
import torchvision

_REPO = Path(__file__).resolve().parents[1]


def _git(*args) -> str:
    try:
        return subprocess.check_output(["git", *args], cwd=_REPO, stderr=subprocess.DEVNULL).decode()
    except (OSError, subprocess.CalledProcessError):
        return ""


def run_record(world_size: int) -> dict:
    cuda = torch.cuda.is_available()
    diff = _git("diff", "HEAD")
    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "cuda": str(torch.version.cuda) if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda
        else [f"cpu ({platform.machine()})"],
        "world_size": world_size,
        "git_commit": _git("rev-parse", "HEAD").strip() or "unknown",
        "git_dirty": bool(diff),
        "git_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None,
    }


def differences(saved: dict, current: dict) -> list:
    return [f"{key}: {saved[key]} -> {current.get(key)}" for key in saved if saved[key] != current.get(key)]
