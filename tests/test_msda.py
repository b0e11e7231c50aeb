"""The attention core must reproduce the official pure-PyTorch reference, forward and backward."""
from pathlib import Path

import pytest
import torch

from models.ops import MSDeformAttn, multi_scale_deformable_attn
from models.ops import ms_deform_attn
from models.ops.ms_deform_attn import _as_list, _grid_sample_core, index_dtype

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "msda_vectors.pt"


def _cases():
    return torch.load(VECTORS, weights_only=True)["cases"]


def _forward_backward(core, case, dtype):
    inputs = [case[k].to(dtype).clone().requires_grad_(True)
              for k in ("value", "sampling_locations", "attention_weights")]
    out = core(inputs[0], case["spatial_shapes"], inputs[1], inputs[2])
    out.backward(case["grad_output"].to(dtype))
    return [out.detach()] + [t.grad for t in inputs]


@pytest.mark.parametrize("index", range(3))
def test_matches_official_reference_forward_and_backward(index):
    """Output and value gradient within 1e-5 of the official float32 numbers. The location and attention-weight
    gradients sum differences of neighbouring values (scaled by the map size), so float32 rounding differs with
    the order of operations: they must be as close to the exact (float64) gradients as the official float32
    ones are, within 1e-6 plus 50%, and within 1e-4 of the official numbers."""
    case = _cases()[index]
    out, grad_value, grad_locations, grad_weights = _forward_backward(multi_scale_deformable_attn, case, torch.float32)
    torch.testing.assert_close(out, case["output"], atol=1e-5, rtol=0)
    torch.testing.assert_close(grad_value, case["grad_value"], atol=1e-5, rtol=0)
    exact = _forward_backward(_grid_sample_core_of(case), case, torch.float64)
    for ours, official, truth in ((grad_locations, case["grad_sampling_locations"], exact[2]),
                                  (grad_weights, case["grad_attention_weights"], exact[3])):
        official_error = (official.double() - truth).abs().max().item()
        assert (ours.double() - truth).abs().max().item() <= 1.5 * official_error + 1e-6
        torch.testing.assert_close(ours, official, atol=1e-4, rtol=0)


def _grid_sample_core_of(case):
    """The grid_sample formulation (CUDA's path), the float64 reference of the gradients."""
    return lambda value, shapes, locations, weights: _grid_sample_core(value, _as_list(shapes), locations, weights)


@pytest.mark.parametrize("index", range(3))
def test_sparse_and_grid_sample_cores_agree_exactly_in_float64(index):
    """The CPU sparse core and the grid_sample core compute the same function: outputs and all three gradients
    agree to 1e-10 in float64, with points on the map's edges, on integer pixel centres and off the map."""
    case = dict(_cases()[index])
    locations = case["sampling_locations"].clone()
    locations.view(-1)[::7] = torch.tensor([-0.3, 0.0, 1.0, 1.2, 0.5])[torch.arange(locations.numel())[::7] % 5]
    case["sampling_locations"] = locations
    gathered = _forward_backward(multi_scale_deformable_attn, case, torch.float64)
    sampled = _forward_backward(_grid_sample_core_of(case), case, torch.float64)
    for a, b in zip(gathered, sampled):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("index", range(3))
def test_matches_official_reference_in_float64(index):
    case = _cases()[index]
    out = multi_scale_deformable_attn(case["value"].double(), case["spatial_shapes"],
                                      case["sampling_locations"].double(), case["attention_weights"].double())
    torch.testing.assert_close(out, case["output_float64_inputs"].to(out.dtype), atol=1e-10, rtol=0)


def test_module_initialisation_and_reference_point_kinds():
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # head 0 points along +x, k-th point k units out, identical on every level
    torch.testing.assert_close(bias[0, 0, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(bias[:, 0], bias[:, 1])
    assert attn.attention_weights.weight.abs().sum() == 0
    shapes = torch.tensor([[6, 8], [3, 4]])
    memory = torch.randn(2, 6 * 8 + 3 * 4, 32)
    query = torch.randn(2, 5, 32)
    for ref in (torch.rand(2, 5, 2, 2), torch.rand(2, 5, 2, 4)):
        assert attn(query, ref, memory, shapes).shape == (2, 5, 32)
    with pytest.raises(ValueError, match="2 or 4"):
        attn(query, torch.rand(2, 5, 2, 3), memory, shapes)


def test_cpu_core_gives_bit_identical_results_on_every_run():
    """Exact resume needs a deterministic core: its backward sums through a sort and sparse products."""
    case = _cases()[0]
    first = _forward_backward(multi_scale_deformable_attn, case, torch.float32)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            again = _forward_backward(multi_scale_deformable_attn, case, torch.float32)
            assert all(torch.equal(a, b) for a, b in zip(first, again))
    finally:
        torch.set_num_threads(threads)


def test_sparse_indices_widen_where_the_corner_count_passes_int32():
    """The backward's indices count sample corners: N * Lq * heads * levels * points * 4. The 5-scale encoder
    (strides 4 to 64) at 800x1333 passes 2**31 - 1 from batch 38; the 4-scale one at 1333x1333 from batch 113."""
    def corners(batch, size, strides):
        queries = sum(-(-size[0] // s) * -(-size[1] // s) for s in strides)
        return batch * queries * 8 * len(strides) * 4 * 4
    five, four = (4, 8, 16, 32, 64), (8, 16, 32, 64)
    assert index_dtype(corners(37, (800, 1333), five)) == torch.int32
    assert index_dtype(corners(38, (800, 1333), five)) == torch.int64
    assert index_dtype(corners(112, (1333, 1333), four)) == torch.int32
    assert index_dtype(corners(113, (1333, 1333), four)) == torch.int64
    assert index_dtype(2 ** 31 - 1) == torch.int32 and index_dtype(2 ** 31) == torch.int64


def test_the_core_with_int64_indices_gives_the_same_bits(monkeypatch):
    case = _cases()[0]
    narrow = _forward_backward(multi_scale_deformable_attn, case, torch.float32)
    monkeypatch.setattr(ms_deform_attn, "index_dtype", lambda corners: torch.int64)
    wide = _forward_backward(multi_scale_deformable_attn, case, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(narrow, wide))
