"""The DINO detector: backbone -> input projections -> deformable transformer -> shared prediction heads."""
import copy
import math
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util.misc import NestedTensor, inverse_sigmoid, nested_tensor_from_tensor_list
from .denoising import prepare_for_cdn
from .layers import MLP


class DINO(nn.Module):
    def __init__(self, backbone: nn.Module, transformer: nn.Module, num_classes: int, num_queries: int,
                 num_feature_levels: int, dn_number: int = 100, dn_label_noise_ratio: float = 0.5,
                 dn_box_noise_scale: float = 1.0, dn_labelbook_size: int = 91):
        super().__init__()
        hidden = transformer.d_model
        if dn_labelbook_size < num_classes:
            raise ValueError(f"dn_labelbook_size ({dn_labelbook_size}) must be >= num_classes ({num_classes})")
        self.num_classes, self.num_queries, self.hidden_dim = num_classes, num_queries, hidden
        self.num_feature_levels = num_feature_levels
        self.dn_number, self.dn_label_noise_ratio, self.dn_box_noise_scale = (
            dn_number, dn_label_noise_ratio, dn_box_noise_scale)
        # Registration order = the official one (transformer, label_enc, input_proj, backbone, heads): the
        # state_dict and named_parameters() list the same keys in the same order, so positional optimizer
        # states (param groups built from named_parameters()) line up with the official model's.
        self.transformer = transformer
        self.label_enc = nn.Embedding(dn_labelbook_size + 1, hidden)
        self.input_proj = self._input_projections(backbone.num_channels, hidden, num_feature_levels)
        self.backbone = backbone

        class_embed = nn.Linear(hidden, num_classes)
        bbox_embed = MLP(hidden, hidden, 4, 3)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))  # prior probability 0.01
        nn.init.constant_(bbox_embed.layers[-1].weight, 0.0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0.0)
        num_layers = len(transformer.decoder.layers)
        # One head shared by every decoder layer, registered under each layer's name as in the official model.
        self.bbox_embed = nn.ModuleList([bbox_embed] * num_layers)
        self.class_embed = nn.ModuleList([class_embed] * num_layers)
        transformer.decoder.bbox_embed = self.bbox_embed
        transformer.decoder.class_embed = self.class_embed
        transformer.enc_out_bbox_embed = copy.deepcopy(bbox_embed)
        transformer.enc_out_class_embed = copy.deepcopy(class_embed)

    @staticmethod
    def _input_projections(in_channels: List[int], hidden: int, num_levels: int) -> nn.ModuleList:
        groups = math.gcd(32, hidden // 2)  # 32 as official for 256; always >= 2 channels per group
        projections = [nn.Sequential(nn.Conv2d(c, hidden, 1), nn.GroupNorm(groups, hidden)) for c in in_channels]
        channels = in_channels[-1]
        for _ in range(num_levels - len(in_channels)):
            projections.append(nn.Sequential(nn.Conv2d(channels, hidden, 3, stride=2, padding=1),
                                             nn.GroupNorm(groups, hidden)))
            channels = hidden
        for proj in projections:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        return nn.ModuleList(projections)

    def _multi_level_inputs(self, samples: NestedTensor):
        features, positions = self.backbone(samples)
        srcs = [proj(f.tensors) for proj, f in zip(self.input_proj, features)]
        masks = [f.mask for f in features]
        for lvl in range(len(features), self.num_feature_levels):
            src = self.input_proj[lvl](features[-1].tensors if lvl == len(features) else srcs[-1])
            mask = F.interpolate(samples.mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            srcs.append(src)
            masks.append(mask)
            positions.append(self.backbone[1](NestedTensor(src, mask)).to(src.dtype))
        return srcs, masks, positions

    def forward(self, samples: Union[NestedTensor, Tensor, Sequence[Tensor]],
                targets: Optional[List[Dict[str, Tensor]]] = None):
        """samples: a NestedTensor, a batch (B, 3, H, W) or one image (3, H, W) without padding, or a list of
        (3, H, W) images of any sizes (padded here), as the official model accepts."""
        srcs, masks, positions = self._multi_level_inputs(as_nested_tensor(samples))
        dn = None
        if self.training and targets is not None:
            dn = prepare_for_cdn(targets, self.dn_number, self.dn_label_noise_ratio, self.dn_box_noise_scale,
                                 self.num_classes, self.num_queries, self.hidden_dim, self.label_enc)
        hs, references, enc_tgt, enc_boxes = self.transformer(
            srcs, masks, positions, *((dn["query_label"], dn["query_bbox"], dn["attn_mask"]) if dn else ()))
        # Keeps label_enc in the graph when no DN ran (eval, or no boxes on this rank): DDP needs every
        # parameter to receive a gradient on every rank or it hangs.
        hs[0] = hs[0] + self.label_enc.weight[0, 0] * 0.0

        boxes = torch.stack([(head(h) + inverse_sigmoid(ref)).sigmoid()
                             for head, h, ref in zip(self.bbox_embed, hs, references)])
        logits = torch.stack([head(h) for head, h in zip(self.class_embed, hs)])
        out = {}
        if dn is not None:
            pad = dn["dn_meta"]["pad_size"]
            out["dn_meta"] = dict(dn["dn_meta"], output_known_lbs_bboxes=self._pack(logits[:, :, :pad],
                                                                                   boxes[:, :, :pad]))
            logits, boxes = logits[:, :, pad:], boxes[:, :, pad:]
        out.update(self._pack(logits, boxes))
        out["interm_outputs"] = {"pred_logits": self.transformer.enc_out_class_embed(enc_tgt),
                                 "pred_boxes": enc_boxes}
        return out

    @staticmethod
    def _pack(logits: Tensor, boxes: Tensor) -> dict:
        """Per-layer predictions -> the last layer's, with the earlier ones as aux_outputs."""
        return {"pred_logits": logits[-1], "pred_boxes": boxes[-1],
                "aux_outputs": [{"pred_logits": c, "pred_boxes": b} for c, b in zip(logits[:-1], boxes[:-1])]}


def as_nested_tensor(samples: Union[NestedTensor, Tensor, Sequence[Tensor]]) -> NestedTensor:
    """Images in any of the forms DINO.forward accepts -> a NestedTensor (mask True = padding)."""
    if isinstance(samples, NestedTensor):
        return samples
    if isinstance(samples, Tensor):
        if samples.dim() == 3:
            samples = samples[None]
        if samples.dim() != 4:
            raise ValueError(f"images must be (3, H, W) or (B, 3, H, W); got shape {tuple(samples.shape)}")
        b, _, h, w = samples.shape
        return NestedTensor(samples, torch.zeros(b, h, w, dtype=torch.bool, device=samples.device))
    return nested_tensor_from_tensor_list(list(samples))
