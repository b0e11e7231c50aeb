"""ResNet (torchvision) or timm backbones returning padded multi-level features, as DINO's `backbone.0`."""
import logging
from typing import List, Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

from util.misc import NestedTensor

logger = logging.getLogger("dino.models")

RESNET_STAGES = ["conv1", "layer1", "layer2", "layer3", "layer4"]  # stage k is frozen when backbone_freeze_at > k


def _norm_layer(kind: str):
    if kind == "frozen_bn":
        return FrozenBatchNorm2d
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "gn":
        return lambda channels: nn.GroupNorm(32 if channels % 32 == 0 else 8, channels)
    raise ValueError(f"backbone_norm must be one of frozen_bn, bn, gn; got {kind!r}")


class Backbone(nn.Module):
    """Runs `body` and returns one NestedTensor per selected level, with the image mask resized to it."""

    def __init__(self, body: nn.Module, num_channels: List[int], strides: List[int]):
        super().__init__()
        self.body = body
        self.num_channels = num_channels
        self.strides = strides

    def forward(self, samples: NestedTensor) -> List[NestedTensor]:
        features = self.body(samples.tensors)
        feature_list = list(features.values()) if isinstance(features, dict) else list(features)
        out = []
        for x in feature_list:
            mask = F.interpolate(samples.mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
            out.append(NestedTensor(x, mask))
        return out


def build_resnet(name: str, return_interm_indices: List[int], freeze_at: int, norm: str, dilation: bool,
                 weights_path: Optional[str]) -> Backbone:
    resnet = getattr(torchvision.models, name)(weights=None, norm_layer=_norm_layer(norm),
                                               replace_stride_with_dilation=[False, False, dilation])
    if weights_path:
        _load_backbone_weights(resnet, weights_path)
    frozen = tuple(RESNET_STAGES[:freeze_at]) + (("bn1",) if freeze_at >= 1 else ())
    for param_name, param in resnet.named_parameters():
        if param_name.split(".")[0] in frozen:
            param.requires_grad_(False)
    return_layers = {f"layer{i + 1}": str(n) for n, i in enumerate(return_interm_indices)}
    body = IntermediateLayerGetter(resnet, return_layers=return_layers)
    expansion = 4 if name in ("resnet50", "resnet101", "resnet152") else 1
    num_channels = [64 * 2 ** i * expansion for i in return_interm_indices]
    strides = [4 * 2 ** i for i in return_interm_indices]
    if dilation:
        strides[-1] //= 2
    return Backbone(body, num_channels, strides)


def build_timm(name: str, return_interm_indices: List[int]) -> Backbone:
    import timm

    body = timm.create_model(name, pretrained=False, features_only=True, out_indices=tuple(return_interm_indices))
    info = body.feature_info
    return Backbone(body, list(info.channels()), list(info.reduction()))


def _load_backbone_weights(resnet: nn.Module, path: str) -> None:
    """Load a local torchvision-format ResNet state_dict; nothing is ever downloaded."""
    from util.checkpoint import load_checkpoint
    from util.weights import load_model_weights

    report = load_model_weights(resnet, load_checkpoint(path)["model"], ignore_patterns=("fc.",))
    missing = [k for k in report.missing if not k.startswith("fc.")]
    if missing or report.shape_mismatch or report.unexpected:
        raise ValueError(f"backbone_weights {path} does not fit the backbone:\n{report.format()}")
    logger.info("Loaded backbone weights from %s (%d tensors)", path, len(report.loaded))


class Joiner(nn.Sequential):
    """backbone.0 is the feature extractor and backbone.1 the position encoding, as in DETR's state_dict."""

    def __init__(self, backbone: Backbone, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels
        self.strides = backbone.strides

    def forward(self, samples: NestedTensor):
        features = self[0](samples)
        return features, [self[1](f).to(f.tensors.dtype) for f in features]


def build_backbone(args) -> Joiner:
    from .position_encoding import PositionEmbeddingSineHW

    indices = list(args.return_interm_indices)
    if args.backbone.startswith("timm:"):
        backbone = build_timm(args.backbone[len("timm:"):], indices)
    elif args.backbone.startswith("resnet"):
        backbone = build_resnet(args.backbone, indices, args.backbone_freeze_at, args.backbone_norm,
                                args.dilation, args.backbone_weights)
    else:
        raise ValueError(f"unknown backbone {args.backbone!r}: use resnet18/34/50/101 or timm:<model name>")
    if args.position_embedding != "sine":
        raise ValueError(f"position_embedding must be 'sine' (DINO's normalised sine HW); got {args.position_embedding!r}")
    position = PositionEmbeddingSineHW(args.hidden_dim // 2, args.pe_temperatureH, args.pe_temperatureW)
    return Joiner(backbone, position)
