"""The promise on a GPU: deterministic CUDA training, bit-exact resume, the precision auto picks. Skipped
without CUDA (CI has none); tools/gpu_checks.sh runs them, with the GPU figures, on a machine that has one, and
without one refuses in one line (the test that runs everywhere)."""
import os
import signal
import subprocess

import pytest
import torch

from models.ops import multi_scale_deformable_attn
from models.ops.ms_deform_attn import _grid_sample_core, uses_sparse_core
from runner import ROOT, assert_same_training, popen_main, run_main, wait_for_event
from util import determinism

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = ("--device", "cuda")
# popen_main starts main.py with a bare environment: these say which GPU, and where its libraries are
GPU_ENV = {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH") if k in os.environ}


@pytest.fixture(scope="module")
def cuda_reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda_reference")
    proc = run_main(data, out, *CUDA)
    assert "deterministic: on" in proc.stdout
    return out


@needs_gpu
def test_two_uninterrupted_cuda_runs_are_bit_identical(data, cuda_reference, tmp_path):
    run_main(data, tmp_path, *CUDA)
    assert_same_training(cuda_reference, tmp_path)


@needs_gpu
def test_sigterm_mid_epoch_on_cuda_resumes_bit_exactly(data, cuda_reference, tmp_path):
    proc = popen_main(data, tmp_path, *CUDA, env=GPU_ENV)
    wait_for_event(proc, tmp_path, "step", epoch=0, iteration=3)
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 3, rest
    run_main(data, tmp_path, *CUDA)
    assert_same_training(cuda_reference, tmp_path)


def _core_grads(core, value, shapes, locations, weights, grad):
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, locations, weights)]
    core(leaves[0], shapes, leaves[1], leaves[2]).backward(grad)
    return [t.grad for t in leaves]


@needs_gpu
def test_the_deterministic_attention_core_on_cuda_repeats_its_bits_and_matches_grid_sample():
    """Under --deterministic the core's backward is the sparse product, the same bits on every run; it computes
    what grid_sample's core (atomics) computes."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [[32, 40], [16, 20], [8, 10], [4, 5]]
    tokens = sum(h * w for h, w in shapes)
    value = torch.randn(2, tokens, 8, 32, device="cuda", generator=gen)
    locations = torch.rand(2, 900, 8, 4, 4, 2, device="cuda", generator=gen)
    weights = torch.rand(2, 900, 8, 4, 4, device="cuda", generator=gen).softmax(-1)
    grad = torch.randn(2, 900, 8 * 32, device="cuda", generator=gen)
    inputs = (value, shapes, locations, weights, grad)
    try:
        determinism.configure(True)
        assert uses_sparse_core(value.device)
        first = _core_grads(multi_scale_deformable_attn, *inputs)
        again = _core_grads(multi_scale_deformable_attn, *inputs)
    finally:
        determinism.configure(False)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    for ours, sampled in zip(first, _core_grads(_grid_sample_core, *inputs)):
        torch.testing.assert_close(ours, sampled, atol=1e-3, rtol=1e-3)


@needs_gpu
def test_amp_auto_on_this_gpu_names_its_precision(data, tmp_path):
    proc = run_main(data, tmp_path, *CUDA, "--amp", precision=(), options=["epochs=1"])
    expected = "bfloat16 autocast (this GPU supports it)" if torch.cuda.is_bf16_supported() else \
        "float16 autocast with a loss scaler (this GPU has no bfloat16)"
    assert f"precision: {expected}" in proc.stdout


@needs_gpu
def test_float16_with_its_scaler_resumes_bit_exactly_on_cuda(data, tmp_path):
    reference = tmp_path / "reference"
    run_main(data, reference, *CUDA, precision=(), options=["amp_dtype=float16"])
    out = tmp_path / "run"
    proc = popen_main(data, out, *CUDA, "--amp", options=["amp_dtype=float16"], env=GPU_ENV)
    wait_for_event(proc, out, "step", epoch=0, iteration=3)
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 3, rest
    run_main(data, out, *CUDA, precision=(), options=["amp_dtype=float16"])
    assert_same_training(reference, out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_checks_without_a_gpu_say_so_in_one_line(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_checks.sh"), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert not (tmp_path / "out").exists()
    assert proc.stderr.strip() == "error: tools/gpu_checks.sh needs a CUDA GPU, and torch sees none on this machine"
