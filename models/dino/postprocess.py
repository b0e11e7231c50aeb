"""Turn raw predictions into scored boxes in original-image pixels, ready for COCO evaluation."""
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_convert


class PostProcess(nn.Module):
    def __init__(self, num_select: int = 300, nms_iou_threshold: float = -1.0):
        super().__init__()
        self.num_select, self.nms_iou_threshold = num_select, nms_iou_threshold

    def select(self, outputs: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """The top num_select (query, class) pairs of every image, batched (an exported graph needs that):
        (B, K) scores, (B, K) labels and (B, K, 4) xyxy boxes normalised to [0, 1]."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        num_classes = logits.shape[-1]
        scores, flat = logits.sigmoid().flatten(1).topk(min(self.num_select, logits.shape[1] * num_classes), dim=1)
        queries = torch.div(flat, num_classes, rounding_mode="floor")
        boxes = box_convert(boxes, "cxcywh", "xyxy").gather(1, queries[..., None].expand(-1, -1, 4))
        return scores, flat % num_classes, boxes

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], target_sizes: Tensor) -> List[Dict[str, Tensor]]:
        """Top num_select (query, class) pairs per image; target_sizes (B, 2) holds each original (h, w)."""
        scores, labels, boxes = self.select(outputs)
        h, w = target_sizes.unbind(1)
        boxes = boxes * torch.stack([w, h, w, h], 1)[:, None, :].to(boxes.dtype)
        results = []
        for s, l, b in zip(scores, labels, boxes):
            if self.nms_iou_threshold > 0:
                keep = batched_nms(b, s, l, self.nms_iou_threshold)
                s, l, b = s[keep], l[keep], b[keep]
            results.append({"scores": s, "labels": l, "boxes": b})
        return results
