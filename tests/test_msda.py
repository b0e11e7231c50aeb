"""The attention core must reproduce the official pure-PyTorch reference, forward and backward."""
from pathlib import Path

import pytest
import torch

from models.ops import MSDeformAttn, multi_scale_deformable_attn

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "msda_vectors.pt"


def _cases():
    return torch.load(VECTORS, weights_only=True)["cases"]


@pytest.mark.parametrize("index", range(3))
def test_matches_official_reference_forward_and_backward(index):
    case = _cases()[index]
    value = case["value"].clone().requires_grad_(True)
    locations = case["sampling_locations"].clone().requires_grad_(True)
    weights = case["attention_weights"].clone().requires_grad_(True)
    out = multi_scale_deformable_attn(value, case["spatial_shapes"], locations, weights)
    torch.testing.assert_close(out, case["output"], atol=1e-5, rtol=0)
    out.backward(case["grad_output"])
    torch.testing.assert_close(value.grad, case["grad_value"], atol=1e-5, rtol=0)
    torch.testing.assert_close(locations.grad, case["grad_sampling_locations"], atol=1e-5, rtol=0)
    torch.testing.assert_close(weights.grad, case["grad_attention_weights"], atol=1e-5, rtol=0)


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
