"""A small shapes dataset in real COCO layout, for smoke tests and CPU-sized training runs.

Four classes (ellipse, rectangle, triangle, cross) of saturated colours over a cluttered gradient
background. Sizes run from about 9% to 60% of the image side, aspect ratios up to 3, and overlaps are
limited so every object stays mostly visible: hard enough that AP is meaningful (small objects, clutter,
occlusion), easy enough for a tiny DINO to learn on a CPU. Each image is drawn from its own generator
seeded by (seed, split, index), and written as PNG, so the files are the same bytes on every run.
"""
import json
import math
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = ("ellipse", "rectangle", "triangle", "cross")
MARKER = "synthetic_dataset.json"  # the generation parameters, written last: its presence means "complete"
MIN_SIZE, MAX_SIZE = 0.094, 0.6  # object scale sqrt(w * h), uniform in this range of the image side:
# at 128 px that is 12 to 77 px, and about 40% of objects are COCO "small" (area < 32 * 32)
MAX_IOU = 0.3  # a new box may not overlap an earlier one more than this
MIN_VISIBLE = 0.6  # and must leave each earlier object at least this fraction visible
EMPTY_FRACTION = 0.05  # images with no object at all


def _hsv_to_rgb(h, s, v):
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb) * 255


def _background(rng, size):
    """A smooth gradient between two muted colours, plus a few thin lines and specks much smaller than objects."""
    c0, c1 = (_hsv_to_rgb(rng.random(), rng.uniform(0, 0.35), rng.uniform(0.2, 0.9)) for _ in range(2))
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    ramp = xx * math.cos(angle) + yy * math.sin(angle)
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    image = Image.fromarray((c0 + (c1 - c0) * ramp[..., None]).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(1, 5)):
        colour = tuple(int(c) for c in _hsv_to_rgb(rng.random(), rng.uniform(0, 0.5), rng.uniform(0.2, 1)))
        draw.line([tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(2)], fill=colour, width=1)
    for _ in range(rng.integers(2, 9)):
        colour = tuple(int(c) for c in _hsv_to_rgb(rng.random(), rng.uniform(0, 0.8), rng.uniform(0.2, 1)))
        x, y = rng.integers(0, size, 2)
        r = rng.integers(0, max(2, size // 64))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    return np.asarray(image).astype(np.float64)


def _shape_mask(kind, x0, y0, w, h, rng, size):
    """Rasterise a shape filling the box (x0, y0, w, h) at pixel centres; returns (mask, (left, top))."""
    left, top = int(x0), int(y0)
    right, bottom = min(size, int(math.ceil(x0 + w))), min(size, int(math.ceil(y0 + h)))
    yy, xx = np.mgrid[top:bottom, left:right] + 0.5
    u, v = (xx - x0) / w, (yy - y0) / h  # position inside the box, in [0, 1]
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if kind == "ellipse":
        mask = (2 * u - 1) ** 2 + (2 * v - 1) ** 2 <= 1
    elif kind == "rectangle":
        mask = inside
    elif kind == "triangle":
        # Apex somewhere on one side of the box, base along the opposite side.
        t = rng.uniform(0, 1)
        side = rng.integers(4)
        a, b = (u, v) if side < 2 else (v, u)
        if side % 2:
            b = 1 - b
        mask = inside & (a >= t * (1 - b)) & (a <= t + (1 - t) * b)
    else:  # cross
        thickness = rng.uniform(0.28, 0.4) / 2
        mask = inside & ((np.abs(u - 0.5) <= thickness) | (np.abs(v - 0.5) <= thickness))
    return mask, (left, top)


def _iou(a, b):
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _contrasting_colour(rng, avoid, tries=20):
    """A saturated colour at least 100 (RGB distance) away from every colour in `avoid`, or None."""
    for _ in range(tries):
        colour = _hsv_to_rgb(rng.random(), rng.uniform(0.65, 1), rng.uniform(0.6, 1))
        if all(np.linalg.norm(colour - c) >= 100 for c in avoid):
            return colour
    return None


def _draw_image(rng, size):
    """One image (uint8 HWC) and its objects as (category index, tight xyxy box, pixel area)."""
    canvas = _background(rng, size)
    owner = np.full((size, size), -1)  # index of the object on top at each pixel
    objects, visible, colours = [], [], []
    count = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(1, 6))
    scales = sorted(size * (MIN_SIZE + (MAX_SIZE - MIN_SIZE) * rng.random(count)), reverse=True)
    for scale in scales:  # larger first, so smaller objects are drawn over them and stay whole
        kind = int(rng.integers(len(CATEGORIES)))
        max_aspect = 1.5 if CATEGORIES[kind] == "cross" else 3.0
        aspect = math.exp(rng.uniform(-1, 1) * math.log(max_aspect))
        w, h = min(scale * math.sqrt(aspect), 0.95 * size), min(scale / math.sqrt(aspect), 0.95 * size)
        for _ in range(30):
            x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
            mask, (left, top) = _shape_mask(CATEGORIES[kind], x0, y0, w, h, rng, size)
            ys, xs = np.nonzero(mask)
            if len(xs) == 0:
                continue
            box = (left + xs.min(), top + ys.min(), left + xs.max() + 1, top + ys.max() + 1)
            if any(_iou(box, other[1]) > MAX_IOU for other in objects):
                continue
            under = owner[top:top + mask.shape[0], left:left + mask.shape[1]][mask]
            covered = np.bincount(under + 1, minlength=len(objects) + 1)[1:]
            if any(vis - c < MIN_VISIBLE * obj[2] for obj, vis, c in zip(objects, visible, covered)):
                continue
            region = canvas[top:top + mask.shape[0], left:left + mask.shape[1]]
            touching = [c for other, c in zip(objects, colours) if _iou(box, other[1]) > 0]
            colour = _contrasting_colour(rng, [region[mask].mean(0)] + touching)
            if colour is None:
                continue
            region[mask] = colour
            owner[top:top + mask.shape[0], left:left + mask.shape[1]][mask] = len(objects)
            visible = [vis - c for vis, c in zip(visible, covered)] + [len(xs)]
            objects.append((kind, tuple(int(v) for v in box), len(xs)))
            colours.append(colour)
            break
    canvas += rng.normal(0, 4, canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), objects


def _write_split(root, split, split_index, num_images, size, seed):
    os.makedirs(os.path.join(root, split))
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, split_index, index])
        pixels, objects = _draw_image(rng, size)
        image_id = index + 1
        file_name = f"{image_id:012d}.png"
        Image.fromarray(pixels).save(os.path.join(root, split, file_name), format="PNG")
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for kind, (x0, y0, x1, y1), area in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": kind + 1,
                                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                                "area": float(area), "iscrowd": 0})
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES)]
    dataset = {"info": {"description": f"synthetic shapes, seed {seed}"}, "images": images,
               "annotations": annotations, "categories": categories}
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(dataset, f)


def _read_marker(out_dir):
    path = os.path.join(out_dir, MARKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _is_empty(out_dir):
    return not os.path.exists(out_dir) or (os.path.isdir(out_dir) and not os.listdir(out_dir))


def generate_synthetic_coco(out_dir, num_train=2000, num_val=200, image_size=128, seed=0) -> None:
    """Write the dataset to out_dir atomically: built in a temporary folder beside it, then renamed into place.

    A no-op when out_dir already holds the same dataset. Concurrent callers (torchrun ranks) are safe:
    whoever renames first wins and the others, finding the same dataset there, discard their copy.
    """
    params = {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed}
    if _read_marker(out_dir) == params:
        return
    if not _is_empty(out_dir):
        raise FileExistsError(f"{out_dir} exists and does not hold this synthetic dataset ({params}): "
                              "delete it or choose another output folder")
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp", dir=parent)
    try:
        os.chmod(tmp, 0o755)
        os.makedirs(os.path.join(tmp, "annotations"))
        for split_index, (split, count) in enumerate((("train2017", num_train), ("val2017", num_val))):
            _write_split(tmp, split, split_index, count, image_size, seed)
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(params, f)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if _read_marker(out_dir) != params:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_synthetic_coco(out_dir, num_train, num_val, image_size, seed) -> None:
    """Generate the dataset on first use; afterwards check that out_dir holds the one asked for."""
    params = {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed}
    found = _read_marker(out_dir)
    if found is None and not _is_empty(out_dir):
        raise ValueError(f"{out_dir} is not empty and holds no generated synthetic dataset ({MARKER} is missing): "
                         "delete the folder or choose another --coco_path")
    if found is not None and found != params:
        raise ValueError(f"{out_dir} holds a synthetic dataset generated with {found}, but {params} was asked for: "
                         "delete the folder or choose another --coco_path")
    generate_synthetic_coco(out_dir, num_train, num_val, image_size, seed)
