"""Contrastive denoising (CDN): noised copies of the ground truth that the decoder learns to reconstruct or reject."""
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from util.misc import inverse_sigmoid


def prepare_for_cdn(targets: List[Dict[str, Tensor]], dn_number: int, label_noise_ratio: float,
                    box_noise_scale: float, num_classes: int, num_queries: int, hidden_dim: int,
                    label_enc: nn.Embedding) -> Optional[dict]:
    """Build the DN queries for a batch, or None when there is nothing to denoise.

    Each group holds one positive copy (small box noise, to reconstruct) and one negative copy (larger
    noise, to reject as "no object") of every ground-truth box, padded to the batch's largest box count.
    About 2 * dn_number DN queries in total: dn_number // max_boxes groups, at least one.
    """
    counts = [len(t["labels"]) for t in targets]
    max_boxes = max(counts, default=0)
    if dn_number <= 0 or max_boxes == 0:
        return None
    device = label_enc.weight.device
    groups = max(1, dn_number // max_boxes)
    copies = 2 * groups
    labels = torch.cat([t["labels"] for t in targets]).repeat(copies)
    boxes = torch.cat([t["boxes"] for t in targets]).repeat(copies, 1)
    num_gt = len(labels) // copies
    batch_idx = torch.cat([torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(counts)])
    within = torch.cat([torch.arange(n, device=device) for n in counts])
    copy_id = torch.arange(copies, device=device).repeat_interleave(num_gt)
    slot = copy_id * max_boxes + within.repeat(copies)
    is_negative = (copy_id % 2 == 1).to(boxes.dtype)[:, None]

    if label_noise_ratio > 0:
        flip = torch.rand(labels.shape, device=device) < label_noise_ratio * 0.5
        labels = torch.where(flip, torch.randint_like(labels, 0, num_classes), labels)
    if box_noise_scale > 0:
        corners = box_convert(boxes, "cxcywh", "xyxy")
        half_wh = boxes[:, 2:].repeat(1, 2) / 2
        sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
        magnitude = torch.rand_like(boxes) + is_negative
        corners = (corners + sign * magnitude * half_wh * box_noise_scale).clamp(0.0, 1.0)
        boxes = box_convert(corners, "xyxy", "cxcywh")

    pad_size = copies * max_boxes
    batch_size = len(targets)
    query_label = torch.zeros(batch_size, pad_size, hidden_dim, device=device)
    query_bbox = torch.zeros(batch_size, pad_size, 4, device=device)
    row = batch_idx.repeat(copies)
    query_label[row, slot] = label_enc(labels).to(query_label.dtype)
    query_bbox[row, slot] = inverse_sigmoid(boxes)
    return {
        "query_label": query_label,
        "query_bbox": query_bbox,
        "attn_mask": cdn_attention_mask(pad_size, 2 * max_boxes, num_queries, device),
        "dn_meta": {"pad_size": pad_size, "num_dn_group": groups},
    }


def cdn_attention_mask(pad_size: int, group_size: int, num_queries: int, device=None) -> Tensor:
    """True = may not attend. Matching queries never see DN queries (they would leak the answer), and DN
    groups never see each other; DN queries may look at the matching queries."""
    total = pad_size + num_queries
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[pad_size:, :pad_size] = True
    group = torch.arange(pad_size, device=device) // group_size
    mask[:pad_size, :pad_size] = group[:, None] != group[None, :]
    return mask
