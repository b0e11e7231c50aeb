"""DINO's losses: focal classification, L1 and GIoU boxes, for every decoder layer, the encoder and the DN queries.

cls_loss "varifocal" replaces the focal term by an IoU-aware one (VarifocalNet; RT-DETR's default): a matched
query learns its box's IoU with the ground truth as its score, so scores rank boxes by how well they fit.

Losses and matching always run in float32, also under autocast: focal terms and box differences of
half-precision predictions would round away most of their signal."""
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import box_convert, box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from util import distributed as dist_utils

LOSS_TERMS = ("loss_ce", "loss_bbox", "loss_giou")
CLS_LOSSES = ("focal", "varifocal")


def varifocal_loss(logits: Tensor, target_scores: Tensor, alpha: float = 0.75, gamma: float = 2.0) -> Tensor:
    """Summed binary cross-entropy towards target_scores (a positive's IoU, 0 elsewhere), positives weighted by
    their target and negatives by alpha * p ** gamma, as in VarifocalNet."""
    positive = (target_scores > 0).to(logits.dtype)
    weight = alpha * logits.sigmoid().detach().pow(gamma) * (1 - positive) + target_scores
    return F.binary_cross_entropy_with_logits(logits, target_scores, weight=weight, reduction="sum")


def build_weight_dict(cls_coef: float, bbox_coef: float, giou_coef: float, interm_coef: float,
                      num_decoder_layers: int, use_dn: bool) -> Dict[str, float]:
    base = {"loss_ce": cls_coef, "loss_bbox": bbox_coef, "loss_giou": giou_coef}
    suffixes = [""] + [f"_{i}" for i in range(num_decoder_layers - 1)]
    weights = {k + s: v for s in suffixes for k, v in base.items()}
    if use_dn:
        weights.update({k + "_dn" + s: v for s in suffixes for k, v in base.items()})
    weights.update({k + "_interm": v * interm_coef for k, v in base.items()})
    return weights


class SetCriterion(nn.Module):
    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: Dict[str, float], focal_alpha: float,
                 num_decoder_layers: int, cls_loss: str = "focal"):
        super().__init__()
        if cls_loss not in CLS_LOSSES:
            raise ValueError(f"cls_loss must be one of {', '.join(CLS_LOSSES)}, got {cls_loss!r}")
        self.num_classes, self.matcher, self.weight_dict = num_classes, matcher, weight_dict
        self.focal_alpha, self.num_decoder_layers, self.cls_loss = focal_alpha, num_decoder_layers, cls_loss

    def single_output_losses(self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]],
                             indices: List[Tuple[Tensor, Tensor]], num_boxes: float) -> Dict[str, Tensor]:
        logits = outputs["pred_logits"].float()
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(logits.device)
        src_idx = torch.cat([src for src, _ in indices]).to(logits.device)
        target_classes = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        src_boxes = outputs["pred_boxes"][batch_idx, src_idx].float()
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
        src_xyxy, tgt_xyxy = box_convert(src_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
        target_scores = torch.zeros_like(logits)
        if self.cls_loss == "focal":
            target_scores[batch_idx, src_idx, target_classes] = 1.0
            loss_ce = sigmoid_focal_loss(logits, target_scores, alpha=self.focal_alpha, gamma=2.0, reduction="sum")
        else:
            ious = box_iou(src_xyxy.detach(), tgt_xyxy).diagonal()
            target_scores[batch_idx, src_idx, target_classes] = ious.clamp(min=1e-6)  # a positive stays positive
            loss_ce = varifocal_loss(logits, target_scores)
        loss_ce = loss_ce / num_boxes
        loss_bbox = (src_boxes - tgt_boxes).abs().sum() / num_boxes
        loss_giou = generalized_box_iou_loss(src_xyxy, tgt_xyxy, reduction="sum") / num_boxes
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def _matched(self, outputs, targets, num_boxes, suffix: str) -> Dict[str, Tensor]:
        losses = self.single_output_losses(outputs, targets, self.matcher(outputs, targets), num_boxes)
        return {k + suffix: v for k, v in losses.items()}

    @staticmethod
    def dn_indices(targets: List[Dict[str, Tensor]], dn_meta: dict) -> List[Tuple[Tensor, Tensor]]:
        """The positive query of group g for box j sits at g * 2 * max_boxes + j (see prepare_for_cdn)."""
        group_size = dn_meta["pad_size"] // dn_meta["num_dn_group"]
        offsets = torch.arange(dn_meta["num_dn_group"]) * group_size
        indices = []
        for t in targets:
            j = torch.arange(len(t["labels"]))
            indices.append(((offsets[:, None] + j).flatten(), j.repeat(dn_meta["num_dn_group"])))
        return indices

    @staticmethod
    def average_num_boxes(targets: List[Dict[str, Tensor]], device) -> float:
        """The losses' normaliser: the boxes of `targets` per process, averaged over processes (at least 1).
        Given the targets of several micro-batches, it normalises each of them as part of one large batch."""
        num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        return (dist_utils.all_reduce_sum(num_boxes) / dist_utils.get_world_size()).clamp(min=1).item()

    def forward(self, outputs: Dict, targets: List[Dict[str, Tensor]],
                num_boxes: Optional[float] = None) -> Dict[str, Tensor]:
        """num_boxes: the normaliser (default: average_num_boxes of these targets, a collective under DDP)."""
        device = outputs["pred_logits"].device
        if num_boxes is None:
            num_boxes = self.average_num_boxes(targets, device)
        with torch.autocast(device.type, enabled=False):
            return self._losses(outputs, targets, num_boxes)

    def _losses(self, outputs: Dict, targets: List[Dict[str, Tensor]], num_boxes: float) -> Dict[str, Tensor]:
        layers = [outputs] + outputs.get("aux_outputs", [])
        suffixes = [""] + [f"_{i}" for i in range(len(layers) - 1)]
        losses = {}
        for layer_out, suffix in zip(layers, suffixes):
            losses.update(self._matched(layer_out, targets, num_boxes, suffix))
        if "interm_outputs" in outputs:
            losses.update(self._matched(outputs["interm_outputs"], targets, num_boxes, "_interm"))
        if "dn_meta" in outputs:
            dn_meta = outputs["dn_meta"]
            known = dn_meta["output_known_lbs_bboxes"]
            indices = self.dn_indices(targets, dn_meta)
            dn_boxes = num_boxes * dn_meta["num_dn_group"]
            for layer_out, suffix in zip([known] + known["aux_outputs"], suffixes):
                losses.update({k + "_dn" + suffix: v for k, v in
                               self.single_output_losses(layer_out, targets, indices, dn_boxes).items()})
        elif any(k.endswith("_dn") for k in self.weight_dict):
            # No DN this step (no boxes): zeros keep the logged keys identical on every step and rank.
            zero = outputs["pred_logits"].float().sum() * 0.0
            losses.update({k + "_dn" + s: zero for s in suffixes for k in LOSS_TERMS})
        return losses

    def total_loss(self, losses: Dict[str, Tensor]) -> Tensor:
        return sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)
