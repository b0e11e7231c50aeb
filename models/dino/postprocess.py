"""Turn raw predictions into scored boxes in original-image pixels, ready for COCO evaluation."""
from typing import Dict, List

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_convert


class PostProcess(nn.Module):
    def __init__(self, num_select: int = 300, nms_iou_threshold: float = -1.0):
        super().__init__()
        self.num_select, self.nms_iou_threshold = num_select, nms_iou_threshold

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], target_sizes: Tensor) -> List[Dict[str, Tensor]]:
        """Top num_select (query, class) pairs per image; target_sizes (B, 2) holds each original (h, w)."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        bs, num_queries, num_classes = logits.shape
        k = min(self.num_select, num_queries * num_classes)
        scores, flat = torch.topk(logits.sigmoid().view(bs, -1), k, dim=1)
        labels = flat % num_classes
        boxes = torch.gather(box_convert(boxes, "cxcywh", "xyxy"), 1,
                             torch.div(flat, num_classes, rounding_mode="floor")[..., None].expand(-1, -1, 4))
        h, w = target_sizes.unbind(1)
        boxes = boxes * torch.stack([w, h, w, h], 1)[:, None, :].to(boxes.dtype)
        results = []
        for s, l, b in zip(scores, labels, boxes):
            if self.nms_iou_threshold > 0:
                keep = batched_nms(b, s, l, self.nms_iou_threshold)
                s, l, b = s[keep], l[keep], b[keep]
            results.append({"scores": s, "labels": l, "boxes": b})
        return results
