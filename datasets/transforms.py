"""Box-aware image transforms in DETR's style.

Every random transform draws from an explicit `rng` (a random.Random) instead of global state, so a
sample's augmentation is a pure function of whatever seeded the rng: worker count and resume point
cannot change it. Targets carry absolute xyxy 'boxes' until Normalize turns them into normalised cxcywh.
"""
import random
from typing import List, Optional

import torch
import torchvision.transforms.functional as F
from torchvision.ops import box_convert

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
_PER_BOX_FIELDS = ("boxes", "labels", "area", "iscrowd")


def crop(image, target, region):
    """Crop to region (top, left, height, width); boxes are clipped and those left empty are dropped."""
    top, left, h, w = region
    image = F.crop(image, top, left, h, w)
    target = dict(target, size=torch.tensor([h, w]))
    boxes = target["boxes"] - torch.as_tensor([left, top, left, top], dtype=torch.float32)
    boxes = torch.min(boxes.reshape(-1, 2, 2), torch.as_tensor([w, h], dtype=torch.float32)).clamp(min=0)
    keep = (boxes[:, 1, :] > boxes[:, 0, :]).all(dim=1)
    target["boxes"] = boxes.reshape(-1, 4)
    target["area"] = (boxes[:, 1, :] - boxes[:, 0, :]).prod(dim=1)
    for field in _PER_BOX_FIELDS:
        if field in target:
            target[field] = target[field][keep]
    return image, target


def hflip(image, target):
    w, _ = image.size
    boxes = target["boxes"][:, [2, 1, 0, 3]] * torch.as_tensor([-1, 1, -1, 1]) + torch.as_tensor([w, 0, w, 0])
    target = dict(target, boxes=boxes)
    return F.hflip(image), target


class ImageTooThin(ValueError):
    """Resizing would leave an image side of 0 pixels (an extreme aspect ratio against max_size)."""


def _size_for(image_size, size: int, max_size: Optional[int]):
    """(h, w) with the shorter side at `size`, shrunk so the longer side stays within max_size."""
    w, h = image_size
    if max_size is not None:
        short, long = min(w, h), max(w, h)
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if w <= h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize(image, target, size: int, max_size: Optional[int] = None):
    new_h, new_w = _size_for(image.size, size, max_size)
    if min(new_h, new_w) < 1:
        raise ImageTooThin(f"resizing to shorter side {size} with max_size {max_size} gives {new_w}x{new_h}")
    ratio_w, ratio_h = new_w / image.size[0], new_h / image.size[1]
    image = F.resize(image, [new_h, new_w])
    target = dict(target, size=torch.tensor([new_h, new_w]))
    target["boxes"] = target["boxes"] * torch.as_tensor([ratio_w, ratio_h, ratio_w, ratio_h], dtype=torch.float32)
    if "area" in target:
        target["area"] = target["area"] * (ratio_w * ratio_h)
    return image, target


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image, target, rng: random.Random):
        for t in self.transforms:
            image, target = t(image, target, rng)
        return image, target


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target, rng: random.Random):
        if rng.random() < self.p:
            return hflip(image, target)
        return image, target


class RandomResize:
    """Shorter side to one of `sizes`, longer side capped at max_size."""

    def __init__(self, sizes: List[int], max_size: Optional[int] = None):
        self.sizes, self.max_size = list(sizes), max_size

    def __call__(self, image, target, rng: random.Random):
        return resize(image, target, rng.choice(self.sizes), self.max_size)


class RandomSizeCrop:
    """A random crop whose sides lie in [min_size, max_size] (and within the image)."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target, rng: random.Random):
        img_w, img_h = image.size
        w = rng.randint(min(self.min_size, img_w), min(img_w, self.max_size))
        h = rng.randint(min(self.min_size, img_h), min(img_h, self.max_size))
        top, left = rng.randint(0, img_h - h), rng.randint(0, img_w - w)
        return crop(image, target, (top, left, h, w))


class RandomSelect:
    """Apply t1 with probability p, otherwise t2."""

    def __init__(self, t1, t2, p: float = 0.5):
        self.t1, self.t2, self.p = t1, t2, p

    def __call__(self, image, target, rng: random.Random):
        if rng.random() < self.p:
            return self.t1(image, target, rng)
        return self.t2(image, target, rng)


class ToTensor:
    def __call__(self, image, target, rng: random.Random):
        return F.to_tensor(image), target


class Normalize:
    """ImageNet-normalise the image and turn boxes into cxcywh relative to the image size."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean, self.std = mean, std

    def __call__(self, image, target, rng: random.Random):
        image = F.normalize(image, mean=self.mean, std=self.std)
        h, w = image.shape[-2:]
        boxes = box_convert(target["boxes"], "xyxy", "cxcywh")
        target = dict(target, boxes=boxes / torch.tensor([w, h, w, h], dtype=torch.float32))
        return image, target


def make_coco_transforms(image_set: str, args):
    """DINO's COCO augmentation, with the sizes from the config (data_aug_*, defaults in coco_transformer.py)."""
    scales, max_size = list(args.data_aug_scales), args.data_aug_max_size
    scales2_resize, scales2_crop = args.data_aug_scales2_resize, args.data_aug_scales2_crop
    val_size = args.data_aug_val_size or max(scales)
    normalize = Compose([ToTensor(), Normalize()])

    if image_set == "train":
        resize_only = RandomResize(scales, max_size=max_size)
        if scales2_resize is None:
            scale = resize_only
        else:
            scale = RandomSelect(resize_only, Compose([RandomResize(scales2_resize), RandomSizeCrop(*scales2_crop),
                                                       RandomResize(scales, max_size=max_size)]))
        flip = [RandomHorizontalFlip()] if args.data_aug_hflip else []
        return Compose(flip + [scale, normalize])
    if image_set == "val":
        return Compose([RandomResize([val_size], max_size=max_size), normalize])
    raise ValueError(f"unknown image_set {image_set!r}: expected 'train' or 'val'")
