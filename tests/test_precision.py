"""--amp's automatic precision and --deterministic: the choice on CPUs with and without native bfloat16 and on
CUDA (simulated), and the lines a run's header shows."""
import subprocess
import sys

import pytest
import torch

from models import build_model
from models.ops import ms_deform_attn
from runner import DEMO, ROOT, TINY_OPTIONS
from tiny import tiny_args
from util import precision
from util.misc import nested_tensor_from_tensor_list

NATIVE, EMULATED = (lambda: 0.6), (lambda: 55.0)  # bfloat16's time over float32's, as measured on each kind
EMULATE_ON_THIS_CPU = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def test_auto_on_a_cpu_with_native_bfloat16_trains_in_bfloat16():
    chosen = precision.choose(True, "auto", "cpu", cpu_slowdown=NATIVE)
    assert chosen.dtype == torch.bfloat16 and not chosen.needs_scaler and not chosen.warning
    assert chosen.reason == "bfloat16 autocast: this CPU runs it natively (measured 0.6x the time of float32)"


def test_auto_on_a_cpu_that_emulates_bfloat16_trains_in_float32():
    chosen = precision.choose(True, "auto", "cpu", cpu_slowdown=EMULATED)
    assert chosen.dtype is None and chosen.name == "float32" and not chosen.warning
    assert chosen.reason == "float32: this CPU emulates bfloat16 (measured 55.0x the time of float32), so --amp is off"


def test_explicit_bfloat16_on_a_cpu_that_emulates_it_runs_with_a_warning():
    chosen = precision.choose(True, "bfloat16", "cpu", cpu_slowdown=EMULATED)
    assert chosen.dtype == torch.bfloat16
    assert chosen.warning == ("amp_dtype=bfloat16 on a CPU that emulates it: measured 55.0x the time of float32; "
                              "amp_dtype=auto (or --no-amp) trains in float32")


def test_without_amp_nothing_is_measured():
    chosen = precision.choose(False, "auto", "cpu", cpu_slowdown=lambda: pytest.fail("measured"))
    assert chosen.dtype is None and chosen.reason == "float32 (--amp is off)"


@pytest.mark.parametrize("supported, dtype, reason", [
    (True, torch.bfloat16, "bfloat16 autocast (this GPU supports it)"),
    (False, torch.float16, "float16 autocast with a loss scaler (this GPU has no bfloat16)")])
def test_auto_on_cuda_takes_bfloat16_where_the_gpu_supports_it(monkeypatch, supported, dtype, reason):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    chosen = precision.choose(True, "auto", "cuda")
    assert (chosen.dtype, chosen.reason, chosen.needs_scaler) == (dtype, reason, dtype == torch.float16)


def test_an_unknown_amp_dtype_is_refused():
    with pytest.raises(ValueError, match="amp_dtype='half' is not one of auto, float16, bfloat16"):
        precision.choose(True, "half", "cpu")


def test_the_probe_tells_emulated_bfloat16_from_native():
    """On any CPU, a process limited to AVX2 emulates bfloat16: the probe must see it."""
    code = "from util.precision import bfloat16_slowdown; print(bfloat16_slowdown())"
    emulated = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                              env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", **EMULATE_ON_THIS_CPU})
    assert float(emulated.stdout) > 4 * precision.NATIVE_AT_MOST


def _header(tmp_path, *extra, env=None):
    """The first lines main.py writes: --eval without weights stops right after them."""
    cmd = [sys.executable, "main.py", "-c", DEMO, "--coco_path", str(tmp_path / "data"), "--output_dir",
           str(tmp_path / "out"), "--eval", *extra, "--options", *TINY_OPTIONS]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", **(env or {})})
    assert "error: --eval needs weights" in proc.stderr, proc.stderr[-2000:]
    return (tmp_path / "out" / "info.txt").read_text()


def test_the_demo_on_a_cpu_that_emulates_bfloat16_says_it_trains_in_float32(tmp_path):
    header = _header(tmp_path, env=EMULATE_ON_THIS_CPU)
    assert "| precision: float32: this CPU emulates bfloat16 (measured " in header, header[:3000]
    assert "x the time of float32), so --amp is off" in header
    assert '"precision": "float32"' in header  # recorded in the environment, so a resume names a change
    assert "deterministic: on (" in header


def test_explicit_bfloat16_on_a_cpu_that_emulates_it_warns(tmp_path):
    header = _header(tmp_path, "--no-deterministic", "--options", "amp_dtype=bfloat16", env=EMULATE_ON_THIS_CPU)
    assert "| precision: bfloat16 autocast (amp_dtype=bfloat16), emulated by this CPU" in header, header[:3000]
    assert "amp_dtype=bfloat16 on a CPU that emulates it: measured " in header
    assert "deterministic: off (--no-deterministic): a resumed run continues from the exact saved state, but is " \
        "not bit-identical to an uninterrupted run" in header


@pytest.mark.skipif(precision.bfloat16_slowdown() > precision.NATIVE_AT_MOST,
                    reason="this CPU emulates bfloat16: the native case is checked with a simulated probe above")
def test_the_demo_on_a_cpu_with_native_bfloat16_says_so(tmp_path):
    header = _header(tmp_path)
    assert "| precision: bfloat16 autocast: this CPU runs it natively (measured " in header, header[:3000]


@pytest.mark.parametrize("device, deterministic, sparse", [("cpu", False, True), ("cpu", True, True),
                                                           ("cuda", True, True), ("cuda", False, False)])
def test_the_attention_core_is_deterministic_where_asked(device, deterministic, sparse):
    """On CUDA, grid_sample's backward accumulates with atomics: --deterministic takes the sparse core."""
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        assert ms_deform_attn.uses_sparse_core(torch.device(device)) == sparse
    finally:
        torch.use_deterministic_algorithms(before)


def test_a_training_step_on_cpu_needs_no_non_deterministic_kernel():
    """torch raises (mode without warn_only) at the first kernel that has no deterministic version."""
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args())
    images = nested_tensor_from_tensor_list([torch.randn(3, 64, 64), torch.randn(3, 48, 64)])
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        criterion.total_loss(criterion(model(images, targets), targets)).backward()
    finally:
        torch.use_deterministic_algorithms(before)
    assert all(p.grad is not None for p in model.transformer.parameters() if p.requires_grad)
