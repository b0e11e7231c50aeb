"""ResNet (torchvision) or timm backbones returning padded multi-level features, as DINO's `backbone.0`."""
import os
from typing import List, Optional
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

from util.misc import NestedTensor

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

    def __init__(self, name: str, body: nn.Module, num_channels: List[int], strides: List[int]):
        super().__init__()
        self.name = name
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


def build_resnet(name: str, return_interm_indices: List[int], freeze_at: int, norm: str, dilation: bool) -> Backbone:
    """A randomly initialised ResNet; load_pretrained_backbone fills it when training starts from scratch."""
    resnet = getattr(torchvision.models, name)(weights=None, norm_layer=_norm_layer(norm),
                                               replace_stride_with_dilation=[False, False, dilation])
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
    return Backbone(name, body, num_channels, strides)


def build_timm(name: str, return_interm_indices: List[int]) -> Backbone:
    import timm

    body = timm.create_model(name, pretrained=False, features_only=True, out_indices=tuple(return_interm_indices))
    info = body.feature_info
    return Backbone(f"timm:{name}", body, list(info.channels()), list(info.reduction()))


def load_pretrained_backbone(model: nn.Module, spec: Optional[str]) -> Optional[str]:
    """Fill the detector's backbone (model.backbone[0]) before training from scratch; a checkpoint would
    replace these weights, so it is not called then. spec: None keeps the random initialisation, "imagenet"
    takes torchvision's IMAGENET1K_V1 weights for the ResNet (as the official DINO; downloaded once into the
    torch hub cache under $TORCH_HOME), anything else is the path of a torchvision-format state_dict.
    Returns a line for the log, or None."""
    if not spec:
        return None
    backbone = model.backbone[0]
    if spec == "imagenet":
        state_dict, source = _imagenet_state_dict(backbone.name)
    else:
        from checkpoint.format import load_checkpoint

        state_dict, source = load_checkpoint(spec)["model"], spec
    count = _load_into(backbone.body, state_dict, source)
    return f"Loaded backbone weights from {source} ({count} tensors)"


def _imagenet_state_dict(name: str):
    if not name.startswith("resnet"):
        raise ValueError(f"backbone_weights=imagenet is available for torchvision's resnet18/34/50/101, not {name}; "
                         "set backbone_weights=/path/to/file.pth or None")
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))
    existed = os.path.exists(cached)
    try:
        state_dict = weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as e:  # no network (URLError), a failed hash check, an unwritable cache, a damaged file...
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
        problem = (f"could not be read from {cached} ({cause}); delete that file to download it again"
                   if existed else f"could not be downloaded ({cause}); put the file at {cached}")
        raise ValueError(f"backbone_weights=imagenet: the {weights} weights {problem} "
                         "or set backbone_weights=/path/to/file.pth") from None
    return state_dict, f"{cached} ({weights})"


def _load_into(body: nn.Module, state_dict: dict, source: str) -> int:
    """Load a whole-network state_dict into the feature extractor. Modules it does not run (fc, stages after
    the last returned one) and BatchNorm counters that frozen BN lacks are skipped; anything else that does
    not fit is an error. Returns the number of tensors loaded."""
    from util.weights import load_model_weights, strip_module_prefix

    own = body.state_dict()
    children = {name for name, _ in body.named_children()}
    kept = {k: v for k, v in strip_module_prefix(state_dict).items()
            if k.split(".")[0] in children and (k in own or not k.endswith("num_batches_tracked"))}
    report = load_model_weights(body, kept)
    if report.missing or report.shape_mismatch or report.unexpected:
        raise ValueError(f"backbone_weights {source} does not fit the backbone:\n{report.format()}")
    return len(report.loaded)


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
        backbone = build_resnet(args.backbone, indices, args.backbone_freeze_at, args.backbone_norm, args.dilation)
    else:
        raise ValueError(f"unknown backbone {args.backbone!r}: use resnet18/34/50/101 or timm:<model name>")
    if args.position_embedding != "sine":
        raise ValueError(f"position_embedding must be 'sine' (DINO's normalised sine HW); got {args.position_embedding!r}")
    position = PositionEmbeddingSineHW(args.hidden_dim // 2, args.pe_temperatureH, args.pe_temperatureW)
    return Joiner(backbone, position)
