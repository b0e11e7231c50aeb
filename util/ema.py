"""The exponential moving average of the weights (use_ema), with an optional warm-up of its decay."""
import math

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def build_ema(model: torch.nn.Module, decay: float, warmup_iters: int) -> AveragedModel:
    """An AveragedModel of model's parameters and buffers, updated once per optimizer step.

    warmup_iters 0 keeps the decay fixed, as the official DINO. Otherwise the n-th update uses
    decay * (1 - exp(-n / warmup_iters)), as RT-DETR and YOLO do: without it the average keeps the initial weights
    for thousands of steps (0.9997 ** 1000 = 74% of them), which makes it useless on short schedules. The count n
    is the AveragedModel's own n_averaged buffer, saved in checkpoints, so a resumed run continues the same way."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_decay must be in [0, 1], got {decay}")
    if warmup_iters < 0:
        raise ValueError(f"ema_warmup_iters must be >= 0, got {warmup_iters}")

    @torch.no_grad()
    def update(ema_tensors, tensors, num_averaged):
        step_decay = decay * -math.expm1(-float(num_averaged) / warmup_iters) if warmup_iters else decay
        get_ema_multi_avg_fn(step_decay)(ema_tensors, tensors, num_averaged)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)
