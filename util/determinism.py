"""Bit-identical runs: the same inputs give the same weights, so a resumed run equals an uninterrupted one.

On CPU every kernel this project uses is deterministic already. On CUDA some are not by default: cuDNN may
pick algorithms by timing them, cuBLAS splits reductions by workspace, and grid_sample's backward (the
deformable attention's default on CUDA) accumulates with atomics. `--deterministic` (the default) turns all
of that off; the attention core then takes its sparse path (models/ops/ms_deform_attn.py)."""
import os

import torch

OFF_NOTE = ("deterministic: off (--no-deterministic): a resumed run continues from the exact saved state, but is "
            "not bit-identical to an uninterrupted run")


def configure(deterministic: bool) -> str:
    """Set torch's kernels for this process; returns the line the run's header shows. Call before any CUDA
    work: cuBLAS reads its workspace setting when it starts."""
    torch.use_deterministic_algorithms(deterministic, warn_only=True)  # a kernel without a deterministic
    torch.backends.cudnn.deterministic = deterministic                # version warns (naming it) and runs
    torch.backends.cudnn.benchmark = False
    if not deterministic:
        return OFF_NOTE
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return "deterministic: on (deterministic kernels; the same command gives bit-identical weights, interrupted or not)"
