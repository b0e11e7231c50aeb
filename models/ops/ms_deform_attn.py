"""Multi-scale deformable attention (Deformable DETR), in plain PyTorch: no compile step, CPU and CUDA."""
import math
from typing import List, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Shapes = Union[Tensor, Sequence[Sequence[int]]]


def _as_list(spatial_shapes: Shapes) -> List[List[int]]:
    return spatial_shapes.tolist() if isinstance(spatial_shapes, Tensor) else [list(s) for s in spatial_shapes]


def multi_scale_deformable_attn(value: Tensor, spatial_shapes: Shapes, sampling_locations: Tensor,
                                attention_weights: Tensor) -> Tensor:
    """Bilinearly sample every level at the given points and sum them with the attention weights.

    value (N, S, M, D), spatial_shapes (L, 2) as (H, W), sampling_locations (N, Lq, M, L, P, 2) as xy in [0, 1],
    attention_weights (N, Lq, M, L, P) -> (N, Lq, M * D). Same layouts as the official ms_deform_attn_core_pytorch;
    points outside the map read zeros (grid_sample, zero padding, align_corners=False).
    Half-precision inputs (autocast) are sampled and summed in float32, the output cast back to value's dtype:
    bilinear weights and the sum over levels and points in bfloat16 lose precision.
    """
    if any(t.dtype in (torch.float16, torch.bfloat16) for t in (value, sampling_locations, attention_weights)):
        with torch.autocast(value.device.type, enabled=False):
            return multi_scale_deformable_attn(value.float(), spatial_shapes, sampling_locations.float(),
                                               attention_weights.float()).to(value.dtype)
    n, _, m, d = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    shapes = _as_list(spatial_shapes)
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = (2 * sampling_locations - 1).permute(0, 2, 3, 1, 4, 5)  # N, M, L, Lq, P, 2
    weights = attention_weights.permute(0, 2, 3, 1, 4)  # N, M, L, Lq, P
    out = 0
    # Weighting and summing level by level never materialises all levels' samples at once: measured
    # faster than the reference's stack-multiply-sum and than one batched matmul (tools/benchmark.py).
    for lvl, (h, w) in enumerate(shapes):
        value_l = value_per_level[lvl].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        grid_l = grids[:, :, lvl].reshape(n * m, lq, points, 2)
        sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out + (sampled * weights[:, :, lvl].reshape(n * m, 1, lq, points)).sum(-1)
    return out.view(n, m * d, lq).transpose(1, 2).reshape(n, lq, m * d)


class MSDeformAttn(nn.Module):
    """Each query attends to n_points learned offsets around its reference point on each of n_levels maps."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        # Offsets start as one ray per head, the k-th point k steps out: a spread-out initial sampling pattern.
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor, spatial_shapes: Shapes,
                input_padding_mask: Tensor = None) -> Tensor:
        """query (N, Lq, C); reference_points (N, Lq, L, 2) as xy or (N, Lq, L, 4) as cxcywh, normalised;
        input_flatten (N, S, C); spatial_shapes (L, 2) as (H, W), best a list (a tensor costs a device sync);
        input_padding_mask (N, S), True = padding."""
        shapes = _as_list(spatial_shapes)
        n, lq, _ = query.shape
        s = input_flatten.shape[1]
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=offsets.dtype, device=offsets.device)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 or 4 values, got {reference_points.shape[-1]}")
        out = multi_scale_deformable_attn(value, shapes, locations, weights)
        return self.output_proj(out)
