"""Sine position encodings: of feature-map pixels (encoder) and of boxes (decoder queries)."""
import math

import torch
from torch import Tensor, nn

from util.misc import NestedTensor


def _sine(coords: Tensor, num_feats: int, temperature: float) -> Tensor:
    """coords (...,) already scaled to [0, 2π] -> (..., num_feats): sin on even features, cos on odd (DETR layout)."""
    index = torch.arange(num_feats, device=coords.device)
    dim_t = temperature ** (2 * torch.div(index, 2, rounding_mode="floor").float() / num_feats)
    angles = coords[..., None].float() / dim_t
    return torch.where(index % 2 == 0, angles.sin(), angles.cos())


class PositionEmbeddingSineHW(nn.Module):
    """Normalised sine encoding of (y, x) pixel positions with separate temperatures for H and W (DINO)."""

    def __init__(self, num_pos_feats: int = 128, temperature_h: float = 20, temperature_w: float = 20):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature_h = temperature_h
        self.temperature_w = temperature_w

    def forward(self, x: NestedTensor) -> Tensor:
        not_mask = ~x.mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * (2 * math.pi)
        x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * (2 * math.pi)
        pos_y = _sine(y_embed, self.num_pos_feats, self.temperature_h)
        pos_x = _sine(x_embed, self.num_pos_feats, self.temperature_w)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def box_sine_embedding(boxes: Tensor, num_feats_per_coord: int) -> Tensor:
    """(..., 2 or 4) normalised cx, cy[, w, h] -> (..., k * num_feats) in the order y, x, w, h (DINO's layout).

    DINO hard-codes 128 features per coordinate; deriving it from hidden_dim lets every width work.
    """
    scaled = boxes * (2 * math.pi)
    parts = [_sine(scaled[..., 1], num_feats_per_coord, 10000), _sine(scaled[..., 0], num_feats_per_coord, 10000)]
    if boxes.shape[-1] == 4:
        parts += [_sine(scaled[..., 2], num_feats_per_coord, 10000), _sine(scaled[..., 3], num_feats_per_coord, 10000)]
    return torch.cat(parts, dim=-1)
