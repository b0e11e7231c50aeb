"""Hungarian matching of predictions to ground truth with focal, L1 and GIoU costs."""
from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou


class HungarianMatcher(nn.Module):
    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        """One cost matrix for the whole batch (a few big ops), then one assignment per image."""
        bs, num_queries = outputs["pred_logits"].shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in targets]
        prob = outputs["pred_logits"].flatten(0, 1).float().sigmoid()
        out_bbox = outputs["pred_boxes"].flatten(0, 1).float()
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_bbox = torch.cat([t["boxes"] for t in targets]).float()

        p = prob[:, tgt_ids]
        neg_cost = (1 - self.alpha) * p ** self.gamma * -(1 - p + 1e-8).log()
        pos_cost = self.alpha * (1 - p) ** self.gamma * -(p + 1e-8).log()
        cost = (self.cost_class * (pos_cost - neg_cost)
                + self.cost_bbox * torch.cdist(out_bbox, tgt_bbox, p=1)
                - self.cost_giou * generalized_box_iou(box_convert(out_bbox, "cxcywh", "xyxy"),
                                                       box_convert(tgt_bbox, "cxcywh", "xyxy")))
        # NaN/inf predictions still get a (meaningless) assignment so the loss, which the engine checks and
        # reports term by term, becomes non-finite instead of scipy failing with an opaque error.
        cost = cost.view(bs, num_queries, -1).nan_to_num(nan=1e8, posinf=1e8, neginf=-1e8).cpu()
        indices = [linear_sum_assignment(c[i]) for i, c in enumerate(cost.split(sizes, -1))]
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]
