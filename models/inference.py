"""Use a trained DINO on images: `load_detector(checkpoint).predict(images)`.

A training checkpoint is enough on its own: its 'args' say how to build the model and how evaluation
resizes images, its 'categories' name the labels. Official DINO zoo files lack some of our keys and
the categories: pass the config they were trained with, and labels are named as COCO category ids.
"""
import argparse
import logging
import os
import random
from typing import List, Sequence, Union

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import to_pil_image

from datasets.coco import coco_class_names, label_names
from datasets.transforms import make_coco_transforms
from checkpoint.format import load_checkpoint
from checkpoint.resume import ARCHITECTURE_KEYS
from util.weights import load_model_weights, strip_module_prefix
from util.config import load_config
from util.misc import nested_tensor_from_tensor_list
from . import build_model

logger = logging.getLogger("dino.inference")

WEIGHT_CHOICES = ("auto", "regular", "ema")
ImageInput = Union[str, os.PathLike, Image.Image, Tensor]


class Detector:
    """A model in eval mode with its preprocessing, postprocessing and label names.

    class_names[label] and category_ids[label] name each label and give the dataset's category id
    (they differ when the model was trained with contiguous_category_ids=True).
    """

    def __init__(self, model, postprocess, transform, class_names: List[str], category_ids: List[int],
                 weights: str, args: argparse.Namespace, device):
        self.model, self.postprocess, self.transform = model, postprocess, transform
        self.class_names, self.category_ids = class_names, category_ids
        self.weights, self.args, self.device = weights, args, torch.device(device)

    def preprocess(self, image: Image.Image) -> Tensor:
        """The evaluation transform: resize to the validation size, ImageNet-normalise."""
        no_boxes = {"boxes": torch.zeros(0, 4)}
        return self.transform(image, no_boxes, random.Random(0))[0]

    @torch.no_grad()
    def predict(self, images: Union[ImageInput, Sequence[ImageInput]], threshold: float = 0.3, batch_size: int = 4):
        """Detections with score > threshold for one image (a dict) or several (a list of dicts).

        An image is a file path, a PIL image or a CHW float tensor in [0, 1] (quantised to 8 bits, as a file
        would be); a 4-D tensor is a list of images. Each dict holds 'boxes' (N, 4) xyxy in the original
        image's pixels, 'scores', 'labels' and 'names', highest score first, on the CPU.
        """
        single = not isinstance(images, (list, tuple)) and not (isinstance(images, Tensor) and images.dim() == 4)
        items = [images] if single else list(images)
        results = []
        for start in range(0, len(items), batch_size):
            pil_images = [as_pil_image(item) for item in items[start:start + batch_size]]
            batch = nested_tensor_from_tensor_list([self.preprocess(im).to(self.device) for im in pil_images])
            sizes = torch.tensor([[im.height, im.width] for im in pil_images], device=self.device)
            for detections in self.postprocess(self.model(batch), sizes):
                keep = detections["scores"] > threshold
                kept = {k: v[keep].cpu() for k, v in detections.items()}
                kept["names"] = [self.class_names[label] for label in kept["labels"].tolist()]
                results.append(kept)
        return results[0] if single else results


def as_pil_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a path, a PIL image or a CHW tensor in [0, 1]; ValueError names what is wrong."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] not in (1, 3) or not image.is_floating_point():
            raise ValueError(f"an image tensor must be a float CHW tensor with 1 or 3 channels in [0, 1]; "
                             f"got {image.dtype} of shape {tuple(image.shape)}")
        return to_pil_image(image.detach().cpu().clamp(0, 1)).convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                return opened.convert("RGB")
        except OSError as e:  # missing, unreadable, not an image, truncated
            raise ValueError(f"cannot read image {os.fspath(image)}: {e}") from None
    raise ValueError(f"an image must be a path, a PIL image or a tensor; got {type(image).__name__}")


def load_detector(checkpoint, config=None, weights: str = "auto", device="cpu") -> Detector:
    """Build the model a checkpoint was trained with and load its weights.

    config (a config file) fills keys the checkpoint does not record and overrides the others (e.g.
    num_select, data_aug_val_size), except the architecture, which the checkpoint's weights fix.
    weights: 'regular', 'ema' or 'auto' (see _auto_weights).
    """
    path = os.fspath(checkpoint)
    saved = load_checkpoint(path)
    args = _model_args(saved, path, config)
    state_dict, kind, why = _select_weights(saved, path, weights)
    try:
        model, _, postprocessors = build_model(args)
        transform = make_coco_transforms("val", args)
    except AttributeError as e:
        if getattr(e, "obj", None) is not args:
            raise
        raise ValueError(f"checkpoint {path} does not record how to build its model (no {e.name!r} in its args); "
                         "pass the config it was trained with (--config CONFIG, e.g. config/DINO/DINO_4scale.py "
                         "for an official DINO-4scale file)") from None
    report = load_model_weights(model, state_dict)
    if report.missing or report.unexpected or report.shape_mismatch:
        raise ValueError(f"the weights in {path} do not fit the model its args describe:\n{report.format()}")
    class_names, category_ids = _label_names(saved, args)
    how = f" (auto: {why})" if weights == "auto" else ""
    logger.info("Loaded %s: %s weights%s, %d classes, images resized to %s (max %s)", path, kind, how,
                args.num_classes, args.data_aug_val_size or max(args.data_aug_scales), args.data_aug_max_size)
    return Detector(model.to(device).eval(), postprocessors["bbox"], transform, class_names, category_ids,
                    kind, args, device)


def _model_args(checkpoint: dict, path: str, config) -> argparse.Namespace:
    saved = dict(checkpoint.get("args") or {})
    merged = dict(saved)
    if config is not None:
        cfg = load_config(config)
        cfg.pop("cli_defaults", None)
        for key, value in cfg.items():
            if key in ARCHITECTURE_KEYS and key in saved and saved[key] != value:
                logger.warning("%s is %r in %s but %r in %s: using the checkpoint's value, which its weights need",
                               key, saved[key], path, value, config)
                continue
            merged[key] = value
    merged["backbone_weights"] = None  # the checkpoint holds every weight, backbone included
    merged.setdefault("contiguous_category_ids", False)
    return argparse.Namespace(**merged)


def _auto_weights(checkpoint: dict):
    """('regular' or 'ema', why): of the weights a checkpoint holds, those whose best evaluation in the run scored
    higher (its `best` record); the EMA when the run recorded none for one of them. A use_ema run's
    checkpoint_best_regular.pth holds the EMA too, and gives its regular weights when they evaluated better."""
    if checkpoint.get("model_is_ema"):
        return "ema", "the checkpoint holds only EMA weights"
    if "ema_model" not in checkpoint:
        return "regular", "the checkpoint has no EMA weights"
    best = checkpoint.get("best") or {}
    regular, ema = (best.get(kind, {}).get("ap") for kind in ("regular", "ema"))
    if regular is None or ema is None:
        return "ema", "the checkpoint holds EMA weights"
    kind = "regular" if regular > ema else "ema"
    return kind, f"the run's best bbox AP was {regular:.4f} for the regular weights, {ema:.4f} for the EMA"


def _select_weights(checkpoint: dict, path: str, weights: str):
    """(state dict, 'regular' or 'ema', why auto chose it); 'ema' reads a use_ema checkpoint's AveragedModel or an
    EMA-only file."""
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}; got {weights!r}")
    ema_only, has_ema = bool(checkpoint.get("model_is_ema")), "ema_model" in checkpoint
    why = None
    if weights == "auto":
        weights, why = _auto_weights(checkpoint)
    if weights == "regular":
        if ema_only:
            raise ValueError(f"{path} holds only EMA weights: use weights 'ema' or 'auto'")
        return checkpoint["model"], weights, why
    if ema_only:
        return checkpoint["model"], weights, why
    if has_ema:
        averaged = strip_module_prefix(checkpoint["ema_model"])
        return {k: v for k, v in averaged.items() if k != "n_averaged"}, weights, why
    raise ValueError(f"{path} holds no EMA weights (it was trained without use_ema=True): use weights 'regular' "
                     "or 'auto'")


def _label_names(checkpoint: dict, args: argparse.Namespace):
    """(class_names, category_ids), both indexed by label."""
    labels = range(args.num_classes)
    categories = checkpoint.get("categories")
    if not categories:
        if args.num_classes == 91:
            logger.info("the checkpoint names no categories: labels are COCO category ids")
            return coco_class_names(), list(labels)
        logger.warning("the checkpoint names no categories: classes are named by their label")
        return [str(label) for label in labels], list(labels)
    names = label_names(categories, args.num_classes, args.contiguous_category_ids)
    names = [str(label) if name is None else name for label, name in zip(labels, names)]
    if args.contiguous_category_ids:
        ids = sorted(int(c["id"]) for c in categories)
        return names, [ids[i] if i < len(ids) else i for i in labels]
    return names, list(labels)
