"""Multi-scale deformable attention (Deformable DETR), in plain PyTorch: no compile step, CPU and CUDA."""
import itertools
import math
import warnings
from typing import List, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Both sparse products of the core's backward use CSR tensors, which torch marks as beta.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

Shapes = Union[Tensor, Sequence[Sequence[int]]]


def _as_list(spatial_shapes: Shapes) -> List[List[int]]:
    return spatial_shapes.tolist() if isinstance(spatial_shapes, Tensor) else [list(s) for s in spatial_shapes]


def multi_scale_deformable_attn(value: Tensor, spatial_shapes: Shapes, sampling_locations: Tensor,
                                attention_weights: Tensor) -> Tensor:
    """Bilinearly sample every level at the given points and sum them with the attention weights.

    value (N, S, M, D), spatial_shapes (L, 2) as (H, W), sampling_locations (N, Lq, M, L, P, 2) as xy in [0, 1],
    attention_weights (N, Lq, M, L, P) -> (N, Lq, M * D). Same layouts and results as the official
    ms_deform_attn_core_pytorch: points outside the map read zeros (grid_sample, zero padding,
    align_corners=False). Half-precision inputs (autocast) are sampled and summed in float32, the output cast
    back to value's dtype: bilinear weights and the sum over levels and points in bfloat16 lose precision.
    On CPU, and on CUDA under torch.use_deterministic_algorithms (main.py's --deterministic), the core is a
    sparse product (_SparseCore), whose backward sums in a fixed order; otherwise, and under exporters and
    compilers, grid_sample's kernels, whose CUDA backward accumulates with atomics (not run-to-run identical).
    """
    if any(t.dtype in (torch.float16, torch.bfloat16) for t in (value, sampling_locations, attention_weights)):
        with torch.autocast(value.device.type, enabled=False):
            return multi_scale_deformable_attn(value.float(), spatial_shapes, sampling_locations.float(),
                                               attention_weights.float()).to(value.dtype)
    shapes = _as_list(spatial_shapes)
    if uses_sparse_core(value.device) and not _tracing():
        return _SparseCore.apply(value, shapes, sampling_locations, attention_weights)
    return _grid_sample_core(value, shapes, sampling_locations, attention_weights)


def uses_sparse_core(device: torch.device) -> bool:
    return device.type == "cpu" or torch.are_deterministic_algorithms_enabled()


def _tracing() -> bool:
    """Exporters and compilers get the grid_sample core: ONNX has GridSample, and the sparse core's autograd
    Function keeps Python objects for its backward."""
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
            or torch.jit.is_tracing())


def _grid_sample_core(value: Tensor, shapes: List[List[int]], sampling_locations: Tensor,
                      attention_weights: Tensor) -> Tensor:
    """The core with one grid_sample per level, weighted and summed level by level (never all levels' samples
    at once): faster than the reference's stack-multiply-sum."""
    n, _, m, d = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = (2 * sampling_locations - 1).permute(0, 2, 3, 1, 4, 5)  # N, M, L, Lq, P, 2
    weights = attention_weights.permute(0, 2, 3, 1, 4)  # N, M, L, Lq, P
    out = 0
    for lvl, (h, w) in enumerate(shapes):
        value_l = value_per_level[lvl].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        grid_l = grids[:, :, lvl].reshape(n * m, lq, points, 2)
        sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out + (sampled * weights[:, :, lvl].reshape(n * m, 1, lq, points)).sum(-1)
    return out.view(n, m * d, lq).transpose(1, 2).reshape(n, lq, m * d)


class _Corners:
    """Where each sample's 4 bilinear corners are, in the order (left, top), (right, top), (left, bottom),
    (right, bottom): their rows in the (N * M * S, D) value table (int32: half the memory of int64), and per
    axis the two corner weights, zero for a corner off the map, and whether each corner lies on it. Computed
    on separate x and y tensors: broadcasting over a trailing (4, 2) corner layout made the forward 2.6x
    slower at the R50 encoder's shapes."""

    def __init__(self, locations: Tensor, shapes: List[List[int]], n: int, m: int, s: int):
        device = locations.device
        # Each level's size beside every sample: broadcasting a (L, 1) tensor over (..., L, P) is measured slow.
        widths, heights = torch.tensor([[w, h] for h, w in shapes], dtype=torch.int32, device=device).t()[:, :, None]
        widths = widths.expand(locations.shape[:-1]).contiguous()
        heights = heights.expand(locations.shape[:-1]).contiguous()
        self.sizes = (widths, heights)
        # align_corners=False: pixel centres sit at +0.5.
        x = locations[..., 0] * widths.to(locations.dtype) - 0.5
        y = locations[..., 1] * heights.to(locations.dtype) - 0.5
        left, top = x.floor(), y.floor()
        fx, fy = x - left, y - top
        left, top = left.int(), top.int()
        self.x_on = ((left >= 0) & (left < widths)).to(fx.dtype), ((left >= -1) & (left < widths - 1)).to(fx.dtype)
        self.y_on = ((top >= 0) & (top < heights)).to(fy.dtype), ((top >= -1) & (top < heights - 1)).to(fy.dtype)
        self.wx = (1 - fx) * self.x_on[0], fx * self.x_on[1]
        self.wy = (1 - fy) * self.y_on[0], fy * self.y_on[1]
        # Off-map corners read a row of their own level, with weight 0.
        columns = [torch.minimum((left + step).clamp(min=0), widths - 1) for step in (0, 1)]
        level_start = torch.tensor(list(itertools.accumulate([0] + [h * w for h, w in shapes[:-1]])),
                                   dtype=torch.int32, device=device)[:, None]
        head_start = torch.arange(0, n * m * s, s, dtype=torch.int32, device=device).view(n, 1, m, 1, 1)
        row_starts = [head_start + level_start + torch.minimum((top + step).clamp(min=0), heights - 1) * widths
                      for step in (0, 1)]
        self.rows = torch.stack([row_starts[0] + columns[0], row_starts[0] + columns[1],
                                 row_starts[1] + columns[0], row_starts[1] + columns[1]], -1)

    def bilinear(self) -> Tensor:
        """The 4 corner weights of each sample: (..., 4)."""
        (x0, x1), (y0, y1) = self.wx, self.wy
        return torch.stack([x0 * y0, x1 * y0, x0 * y1, x1 * y1], -1)

    def gradients(self, corner_values: Tensor):
        """Given a quantity per corner (..., 4), its bilinear sum and that sum's slopes along x and y in pixels."""
        v00, v10, v01, v11 = corner_values.unbind(-1)
        (x0, x1), (y0, y1) = self.wx, self.wy
        top, bottom = x0 * v00 + x1 * v10, x0 * v01 + x1 * v11
        along_x = (self.x_on[1] * (y0 * v10 + y1 * v11) - self.x_on[0] * (y0 * v00 + y1 * v01))
        along_y = self.y_on[1] * bottom - self.y_on[0] * top
        return y0 * top + y1 * bottom, along_x, along_y


class _SparseCore(torch.autograd.Function):
    """The core as a sparse matrix A (one row per query and head, one entry per sample corner, holding bilinear
    weight x attention weight) times the value table V: out = A V. The forward is one embedding_bag; the
    backward is two sparse products, dV = A^T dOut (A^T built by one sort of the corner rows) and
    dA = dOut V^T sampled at A's entries, from which the location and attention-weight gradients follow.
    Forward and backward measured 3x faster than the official formula at the R50 encoder's shapes
    (tools/benchmark/)."""

    @staticmethod
    def forward(ctx, value: Tensor, shapes: List[List[int]], locations: Tensor, attention_weights: Tensor):
        n, s, m, d = value.shape
        lq = locations.shape[1]
        table = value.transpose(1, 2).reshape(n * m * s, d)
        corners = _Corners(locations, shapes, n, m, s)
        weights = corners.bilinear() * attention_weights.unsqueeze(-1)
        bags = n * lq * m
        out = F.embedding_bag(corners.rows.view(bags, -1), table, per_sample_weights=weights.view(bags, -1),
                              mode="sum")
        ctx.save_for_backward(table, attention_weights, weights)
        ctx.corners, ctx.value_shape = corners, value.shape
        return out.view(n, lq, m * d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        table, attention_weights, weights = ctx.saved_tensors
        corners = ctx.corners
        n, s, m, d = ctx.value_shape
        grad = grad_out.reshape(-1, d)  # one row per (query, head): a row of A
        rows = corners.rows.view(-1)
        per_row = rows.numel() // grad.shape[0]
        grad_value = grad_locations = grad_weights = None
        index = index_dtype(rows.numel())  # of positions in the list of corners
        if ctx.needs_input_grad[0]:
            order = rows.argsort(stable=True).to(index)  # stable: the same summation order on every run
            ends = torch.bincount(rows, minlength=table.shape[0]).cumsum(0).to(index)
            starts = torch.cat([ends.new_zeros(1), ends])
            a_transposed = _csr(starts, order // per_row, weights.view(-1).index_select(0, order),
                                (table.shape[0], grad.shape[0]))
            grad_value = (a_transposed @ grad).view(n, m, s, d).transpose(1, 2)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            starts = torch.arange(0, rows.numel() + 1, per_row, dtype=index, device=rows.device)
            pattern = _csr(starts, rows.to(index), torch.ones_like(weights.view(-1)), (grad.shape[0], table.shape[0]))
            # dOut . V[corner] for every corner of every sample.
            dots = torch.sparse.sampled_addmm(pattern, grad, table.t(), beta=0).values().view(weights.shape)
            grad_weights, along_x, along_y = corners.gradients(dots)
            widths, heights = corners.sizes
            grad_locations = torch.stack([along_x * widths, along_y * heights], -1) * attention_weights.unsqueeze(-1)
        return grad_value, None, grad_locations, grad_weights


def index_dtype(corners: int) -> torch.dtype:
    """The dtype of the backward's sparse indices, which count up to the number of sample corners
    (N * Lq * heads * levels * points * 4): int32, half the memory, until that passes 2**31 - 1 (the 5-scale
    encoder at 800x1333 from batch 38), then int64."""
    return torch.int32 if corners < 2 ** 31 else torch.int64


def _csr(row_starts: Tensor, columns: Tensor, values: Tensor, size) -> Tensor:
    """A sparse CSR matrix whose rows may repeat a column (both products sum the repeats): built without the
    invariant checks, which require sorted, distinct columns."""
    return torch.sparse_csr_tensor(row_starts, columns, values, size=size, check_invariants=False)


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
