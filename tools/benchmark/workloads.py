"""What is timed: one revision's training and eval workload, its peak memory, the time inside the library
kernels, and the machine's matmul rate to put every GFLOP/s against."""
import contextlib
import ctypes
import re
import resource
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tools.benchmark import options_args
from tools.benchmark.timing import interleaved, summary, timer

BOXES_PER_IMAGE = 5


class Workload:
    """One revision's model, criterion and optimizer with one synthetic batch, built by the code on sys.path.

    Needs only main.parse_args, models.build_model and util.misc.nested_tensor_from_tensor_list, which every
    revision has, so the same worker times old revisions too."""

    def __init__(self, config, options, size, batch, device):
        import main
        from models import build_model
        from util.misc import nested_tensor_from_tensor_list
        self.args = main.parse_args(["-c", config, "--device", device] + options_args(options))
        torch.manual_seed(0)
        self.model, self.criterion, _ = build_model(self.args)
        self.model.to(device)
        self.criterion.to(device)
        self.optimizer = revision_optimizer(main, self.model, self.args)
        gen = torch.Generator().manual_seed(0)
        self.samples = nested_tensor_from_tensor_list(
            [torch.randn(3, *size, generator=gen) for _ in range(batch)]).to(device)
        self.targets = [synthetic_target(self.args.num_classes, gen, device) for _ in range(batch)]

    def eval_forward(self, autocast_dtype=None):
        self.model.eval()
        with torch.no_grad(), _autocast(self.samples.tensors.device, autocast_dtype):
            self.model(self.samples)

    def train_step(self, autocast_dtype=None):
        """What an iteration of training does: forward with denoising, loss, backward, clipping, AdamW step;
        with autocast_dtype, the forward and loss run under autocast as `main.py --amp` runs them."""
        self.model.train()
        self.criterion.train()
        with _autocast(self.samples.tensors.device, autocast_dtype):
            losses = self.criterion(self.model(self.samples, self.targets), self.targets)
        loss = sum(losses[k] * w for k, w in self.criterion.weight_dict.items() if k in losses)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.args.clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_max_norm)
        self.optimizer.step()


def revision_optimizer(main, model, args):
    """The revision's own optimizer (ours: training.optim's fused AdamW; before training/: main._optimizer), so
    that a step times what the revision's training does; plain AdamW for revisions with neither."""
    try:
        from training.optim import build_optimizer as make_optimizer
    except ImportError:
        make_optimizer = getattr(main, "_optimizer", None)
    if make_optimizer:
        return make_optimizer(model, args)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                             weight_decay=args.weight_decay)


def synthetic_target(num_classes, gen, device) -> dict:
    """BOXES_PER_IMAGE random labelled boxes (cx, cy, w, h), normalised, well inside the image."""
    labels = torch.randint(0, num_classes, (BOXES_PER_IMAGE,), generator=gen)
    boxes = torch.cat([0.2 + 0.6 * torch.rand(BOXES_PER_IMAGE, 2, generator=gen),
                       0.05 + 0.3 * torch.rand(BOXES_PER_IMAGE, 2, generator=gen)], 1)
    return {"labels": labels.to(device), "boxes": boxes.to(device)}


def _autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def peak_memory(fn, device: str):
    """(MiB, how) of the memory fn() needs at its peak above what was in use before it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20, "torch.cuda.max_memory_allocated"
    status = Path("/proc/self/status")
    if status.exists():
        # Linux: free memory that malloc keeps is given back first, or the phase would reuse it unseen; then
        # writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS.
        ctypes.CDLL(None).malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib(status, "VmRSS")
        fn()
        return (_status_kib(status, "VmHWM") - before) / 1024, "peak RSS growth, malloc_trim + VmHWM reset"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # a high-water mark: 0 when below an earlier peak
    fn()
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * scale / 2**20, "ru_maxrss growth"


def _status_kib(status: Path, key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+)", status.read_text(), re.M).group(1))


# The library kernels whose speed this code does not choose: their time bounds what any change that leaves their
# work as it is can win.
KERNELS = {"matmul": ("dense matrix products (mm, addmm, bmm)", {"mm", "addmm", "bmm", "baddbmm"}),
           "conv": ("convolutions, forward and backward", {"convolution", "convolution_backward"}),
           "sdpa": ("scaled dot-product attention, forward and backward",
                    {"_scaled_dot_product_flash_attention_for_cpu",
                     "_scaled_dot_product_flash_attention_for_cpu_backward"})}


class KernelTimes(TorchDispatchMode):
    """Seconds spent inside each group of KERNELS' ops, and inside all other ops, timed op by op (CPU only:
    the ops run synchronously there). The dispatch adds a few microseconds between ops, never inside one."""

    def __init__(self):
        super().__init__()
        self.seconds = dict.fromkeys([*KERNELS, "other"], 0.0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        name = func.overloadpacket.__name__
        dense = all(t.layout == torch.strided for t in args if isinstance(t, torch.Tensor))
        group = next((key for key, (_, ops) in KERNELS.items() if name in ops and dense), "other")
        self.seconds[group] += elapsed
        return out


def matmul_rate(device: str, runs: int, n: int = 2048) -> dict:
    """GFLOP/s of n x n fp32 matmuls: what the machine can do, to put each workload's GFLOP/s against."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    times = interleaved({"mm": timer(lambda: a @ b, device)}, runs)["mm"]
    return summary([2 * n**3 / t / 1e9 for t in times])
