"""The precision a run computes in: --amp with amp_dtype "auto" picks what the device runs fast.

CUDA: bfloat16 where the GPU supports it, else float16 with a loss scaler. CPU: bfloat16 only where it runs
natively (AVX-512 BF16, AMX); elsewhere torch emulates it, about 10-100x slower than float32, so "auto"
trains in float32. Whether a CPU is native is measured (a bfloat16 matrix product and convolution against
float32, a few milliseconds), which also sees the instruction set that ONEDNN_MAX_CPU_ISA or
ATEN_CPU_CAPABILITY lowers a process to.
"""
import functools
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
CHOICES = ("auto", *AMP_DTYPES)
# Native bfloat16 runs the probe at 0.5-1x float32's time, emulated at 40-80x (2 AMD EPYC cores, 2026-12-07).
NATIVE_AT_MOST = 2.0


@dataclass
class Precision:
    dtype: Optional[torch.dtype]  # the autocast dtype; None: float32
    reason: str  # the log line: which precision and why
    warning: str = ""  # said when an explicit choice runs slowly

    @property
    def name(self) -> str:
        return str(self.dtype).replace("torch.", "") if self.dtype is not None else "float32"

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16


def choose(amp: bool, amp_dtype: str, device_type: str, cpu_slowdown=None) -> Precision:
    """The precision of --amp / amp_dtype on this device. `cpu_slowdown()` gives bfloat16's time over float32's
    on this CPU (default: bfloat16_slowdown, measured)."""
    if amp_dtype not in CHOICES:
        raise ValueError(f"amp_dtype={amp_dtype!r} is not one of {', '.join(CHOICES)}: set --options "
                         "amp_dtype=auto (bfloat16 where the device runs it fast, else float16 on CUDA, "
                         "float32 on CPU)")
    if not amp:
        return Precision(None, "float32 (--amp is off)")
    if device_type == "cuda":
        return _cuda(amp_dtype)
    if amp_dtype == "float16":
        raise ValueError(f"--amp with amp_dtype=float16 needs CUDA, and the device is {device_type}: use "
                         "--options amp_dtype=auto (bfloat16 where this CPU runs it natively)")
    slowdown = (cpu_slowdown or bfloat16_slowdown)()
    native = slowdown <= NATIVE_AT_MOST
    measured = f"measured {slowdown:.1f}x the time of float32"
    if amp_dtype == "auto" and not native:
        return Precision(None, f"float32: this CPU emulates bfloat16 ({measured}), so --amp is off")
    reason = f"bfloat16 autocast: this CPU runs it natively ({measured})" if native else \
        "bfloat16 autocast (amp_dtype=bfloat16), emulated by this CPU"
    warning = "" if native else (f"amp_dtype=bfloat16 on a CPU that emulates it: {measured}; amp_dtype=auto "
                                 "(or --no-amp) trains in float32")
    return Precision(torch.bfloat16, reason, warning)


def float32_overrides(args) -> dict:
    """The config keys its float32_recipe sets for a run that computes in float32 (--no-amp, or amp_dtype auto
    on a CPU that emulates bfloat16); keys given in --options keep their value."""
    recipe = getattr(args, "float32_recipe", None) or {}
    if not recipe or choose(args.amp, args.amp_dtype, torch.device(args.device).type).dtype is not None:
        return {}
    return {key: value for key, value in recipe.items() if key not in (args.options or {})}


def _cuda(amp_dtype: str) -> Precision:
    supported = torch.cuda.is_bf16_supported()
    if amp_dtype == "bfloat16" and not supported:
        raise ValueError("--amp with amp_dtype=bfloat16 needs a GPU that supports bfloat16, and this one does not: "
                         "use --options amp_dtype=auto (float16 with a loss scaler), or --no-amp")
    if amp_dtype == "float16" or (amp_dtype == "auto" and not supported):
        why = "amp_dtype=float16" if amp_dtype == "float16" else "this GPU has no bfloat16"
        return Precision(torch.float16, f"float16 autocast with a loss scaler ({why})")
    why = "amp_dtype=bfloat16" if amp_dtype == "bfloat16" else "this GPU supports it"
    return Precision(torch.bfloat16, f"bfloat16 autocast ({why})")


@functools.lru_cache(maxsize=None)
def bfloat16_slowdown(repeats: int = 7) -> float:
    """bfloat16's time over float32's for a 256x256 matrix product and a 3x3 convolution, the best of
    `repeats` each, taken in turns so that a busy machine slows both alike: about 0.6 where the CPU runs
    bfloat16 natively, 40 or more where it is emulated. Three rounds taken one dtype after the other once
    measured 98x on a native CPU running five other jobs."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 256, generator=generator), torch.randn(256, 256, generator=generator)
    x, w = torch.randn(2, 32, 32, 32, generator=generator), torch.randn(32, 32, 3, 3, generator=generator)

    def work(dtype):
        torch.mm(a.to(dtype), b.to(dtype))
        F.conv2d(x.to(dtype), w.to(dtype), padding=1)

    def timed(dtype):
        started = time.perf_counter()
        work(dtype)
        return time.perf_counter() - started

    work(torch.bfloat16)  # first calls pick kernels
    work(torch.float32)
    rounds = [(timed(torch.bfloat16), timed(torch.float32)) for _ in range(repeats)]
    return min(bf16 for bf16, _ in rounds) / min(fp32 for _, fp32 in rounds)
