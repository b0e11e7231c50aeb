"""Detect objects in images with a trained checkpoint: one annotated PNG per image and a detections.json.

    python tools/predict.py --checkpoint runs/demo/checkpoint_best_regular.pth --images data/synthetic/val2017 --out preds
    python tools/predict.py --checkpoint dino_r50.pth --config config/DINO/DINO_4scale.py --images 'photos/*.jpg' --out preds

detections.json is a COCO results list: {image_id, file_name, category_id, bbox [x, y, w, h], score} per box,
in original-image pixels. image_id is the number a file is named after (COCO's 000000000139.jpg -> 139)
when every file is named so, else the image's position (from 1) in the sorted input list.
"""
import argparse
import colorsys
import glob
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from tqdm import tqdm  # noqa: E402

from models.inference import WEIGHT_CHOICES, as_pil_image, load_detector  # noqa: E402
from checkpoint.format import CheckpointError  # noqa: E402


def find_images(spec: str) -> list:
    """A file, every image in a directory, or every file a glob pattern matches, sorted."""
    if os.path.isdir(spec):
        extensions = set(Image.registered_extensions())
        paths = [os.path.join(spec, name) for name in os.listdir(spec) if os.path.splitext(name)[1].lower() in extensions]
    else:
        paths = glob.glob(spec, recursive=True)
    return sorted(p for p in paths if os.path.isfile(p))


def image_ids(paths: list) -> list:
    stems = [Path(p).stem for p in paths]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(paths) + 1))


def output_names(paths: list) -> list:
    """<stem>.png, with _1, _2, ... added when two inputs share a stem."""
    names, seen = [], set()
    for path in paths:
        stem, name, n = Path(path).stem, f"{Path(path).stem}.png", 0
        while name in seen:
            n += 1
            name = f"{stem}_{n}.png"
        seen.add(name)
        names.append(name)
    return names


def class_colour(label: int) -> tuple:
    """Well-separated hues (golden-ratio steps), saturated enough to read on photos."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: Image.Image, detections: dict) -> Image.Image:
    """Boxes (corners rounded to whole pixels) with 'name score' on a filled label above each box."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    width, height = image.size
    line = max(1, round(min(width, height) / 200))
    font = ImageFont.load_default(size=max(10, round(min(width, height) / 40)))
    for box, score, label, name in zip(detections["boxes"].tolist(), detections["scores"].tolist(),
                                       detections["labels"].tolist(), detections["names"]):
        x0, y0, x1, y1 = box_pixels(box, width, height)
        colour = class_colour(label)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=line)
        text = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        text_w, text_h = right - left + 4, bottom - top + 2
        tx = min(x0, max(0, width - text_w))
        ty = y0 - text_h if y0 - text_h >= 0 else y0  # above the box, or inside it at the image's top
        draw.rectangle([tx, ty, tx + text_w - 1, ty + text_h - 1], fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((tx + 2 - left, ty + 1 - top), text, font=font, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255))
    return image


def box_pixels(box, width: int, height: int) -> tuple:
    """xyxy box -> whole-pixel corners inside the image, as drawn."""
    x0, y0, x1, y1 = (round(v) for v in box)
    return (min(max(x0, 0), width - 1), min(max(y0, 0), height - 1),
            min(max(x1, 0), width - 1), min(max(y1, 0), height - 1))


def coco_results(result: dict, image_id: int, file_name: str, category_ids: list) -> list:
    return [{"image_id": image_id, "file_name": file_name, "category_id": category_ids[label],
             "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score}
            for (x0, y0, x1, y1), score, label in zip(result["boxes"].tolist(), result["scores"].tolist(),
                                                      result["labels"].tolist())]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint or an official DINO file")
    parser.add_argument("--images", required=True, help="an image file, a directory of images, or a glob pattern")
    parser.add_argument("--out", required=True, help="directory for the annotated PNGs and detections.json")
    parser.add_argument("--threshold", type=float, default=0.3, help="keep detections scoring above this")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--config", help="config file for keys the checkpoint lacks (needed for official DINO files)")
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto",
                        help="auto: of the regular and EMA weights the checkpoint holds, those that evaluated better "
                             "in the run (the EMA when that is not recorded)")
    parser.add_argument("--batch_size", type=int, default=4)
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    paths = find_images(opts.images)
    try:
        if not paths:
            raise ValueError(f"no image files match {opts.images!r}")
        detector = load_detector(opts.checkpoint, opts.config, opts.weights, opts.device)
        os.makedirs(opts.out, exist_ok=True)
        detections = []
        ids, names = image_ids(paths), output_names(paths)
        with tqdm(total=len(paths), unit="image") as progress:
            for start in range(0, len(paths), opts.batch_size):
                chunk = range(start, min(start + opts.batch_size, len(paths)))
                images = [as_pil_image(paths[i]) for i in chunk]
                for i, image, result in zip(chunk, images, detector.predict(images, opts.threshold, opts.batch_size)):
                    draw_detections(image, result).save(os.path.join(opts.out, names[i]))
                    detections += coco_results(result, ids[i], paths[i], detector.category_ids)
                progress.update(len(chunk))
    except (CheckpointError, ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(opts.out, "detections.json"), "w") as f:
        json.dump(detections, f)
    print(f"{len(detections)} detections in {len(paths)} images written to {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
