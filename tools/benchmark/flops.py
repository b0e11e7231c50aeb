"""The attention core's reference formula, and FLOP counting: FlopCounterMode plus the core's sampling, which it
does not see."""
import contextlib

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

def reference_core(value, shapes, locations, weights):
    """The attention core written as the official pure-PyTorch formula (stack, multiply, sum): the baseline."""
    n, _, m, d = value.shape
    _, lq, _, levels, points, _ = locations.shape
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = values[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    w_ = weights.transpose(1, 2).reshape(n * m, 1, lq, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * w_).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


def sampling_flops(value_shape, locations_shape) -> int:
    """Forward FLOPs of one attention core call, which FlopCounterMode does not see (grid_sample, elementwise).

    Per query, head, level, point and channel: bilinear interpolation reads 4 corners and takes 4 multiplies
    + 3 adds = 7 FLOPs, the attention weighting 1 multiply + 1 add = 2: 9 * N * Lq * M * L * P * D in all
    (the corner weights, computed once per point for all D channels, are left out)."""
    n, lq, m, levels, points, _ = locations_shape
    return 9 * n * lq * m * levels * points * value_shape[-1]


@contextlib.contextmanager
def attention_core(wrap):
    """Route every MSDeformAttn of the model through wrap(core), the module's own core function."""
    from models.ops import ms_deform_attn
    core = ms_deform_attn.multi_scale_deformable_attn
    ms_deform_attn.multi_scale_deformable_attn = wrap(core)
    try:
        yield
    finally:
        ms_deform_attn.multi_scale_deformable_attn = core


def count_flops(fn):
    """(FlopCounterMode's FLOPs, [(value shape, spatial shapes, locations shape)] of the core calls) of fn()."""
    calls = []

    def recording(core):
        # The reference formula runs instead of our core: FlopCounterMode would count the core's sparse
        # sampled matmul as a dense one over the whole value table.
        def record(value, shapes, locations, weights):
            shapes = [tuple(int(x) for x in s) for s in shapes]
            calls.append((tuple(value.shape), shapes, tuple(locations.shape)))
            return reference_core(value, shapes, locations, weights)
        return record
    with attention_core(recording), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops(), calls


def encoder_core_inputs(call, device):
    """Random inputs of the recorded encoder call's shapes; about 1 in 5 points falls outside the map."""
    value_shape, shapes, locations_shape = call
    gen = torch.Generator().manual_seed(0)
    value = torch.randn(value_shape, generator=gen)
    locations = torch.rand(locations_shape, generator=gen) * 1.3 - 0.15
    weights = torch.rand(locations_shape[:-1], generator=gen).flatten(-2).softmax(-1).view(locations_shape[:-1])
    grad = torch.randn(value_shape[0], locations_shape[1], value_shape[2] * value_shape[3], generator=gen)
    return [t.to(device) for t in (value, locations, weights, grad)]


def core_errors(core, shapes, value, locations, weights, grad) -> dict:
    """Largest |float32 result - exact result| over the output and the three input gradients, of our core and of
    the reference formula, the exact result being the reference computed in float64. The location gradients sum
    differences of neighbouring values times the map size, so any float32 formulation is off by ~1e-4 there;
    ours against the reference alone would show their rounding differences, not which one is right."""
    def results(fn, dtype):
        inputs = [t.detach().to(dtype).requires_grad_(True) for t in (value, locations, weights)]
        out = fn(inputs[0], shapes, inputs[1], inputs[2])
        out.backward(grad.to(dtype))
        return [out.detach()] + [t.grad for t in inputs]
    exact = results(reference_core, torch.float64)
    return {name: max((a.double() - b).abs().max().item() for a, b in zip(results(fn, torch.float32), exact))
            for name, fn in (("ours", core), ("reference", reference_core))}
