"""Export a trained detector to ONNX, postprocessing included, and check the file against PyTorch with onnxruntime.

    python tools/export_onnx.py --checkpoint runs/demo/checkpoint_best_regular.pth --out demo.onnx
    python tools/export_onnx.py --checkpoint CKPT --out model.onnx --size 800 1216 --dynamic --image photo.jpg

The graph's input `images` is a float32 (B, 3, H, W) batch of whole images (no padding, so no mask), each resized to
H x W and normalised with ImageNet's mean and std. Its outputs are the top num_select (query, class) pairs per
image, best first, as PostProcess selects them: `boxes` (B, K, 4) xyxy normalised to [0, 1] (multiply by the
original image's width and height: resizing does not move relative coordinates), `scores` (B, K) and `labels`
(B, K) int64 (names and category ids: load_detector(CKPT).class_names / .category_ids). No NMS is applied.
Without --dynamic the graph takes exactly (1, 3, H, W); with it any batch size, height and width.

It uses torch.onnx.export's default exporter (dynamo=True: torch.export, then onnxscript): it traces sizes
symbolically, so --dynamic graphs compute every size-dependent value (reference points, sampling normalisers)
from the input, where the TorchScript exporter would freeze the traced sizes as constants.
"""
import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torchvision.transforms.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from models.dino.postprocess import PostProcess  # noqa: E402

from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from models.inference import WEIGHT_CHOICES, as_pil_image, load_detector  # noqa: E402
from checkpoint.format import CheckpointError  # noqa: E402
from util.misc import NestedTensor  # noqa: E402

logger = logging.getLogger("dino.export_onnx")
BOX_TOLERANCE = 1e-3
SCORE_MATCH = 1e-4  # detections whose scores differ by less may swap places between runtimes
UNMATCHED_SHARE = 0.01  # of the detections may lack a twin closer than BOX_TOLERANCE (see check)


class ExportableDetector(nn.Module):
    """DINO on an unpadded normalised batch -> (boxes xyxy in [0, 1], scores, labels) of the top num_select:
    PostProcess's batched selection, without its per-image scaling and NMS."""

    def __init__(self, model: nn.Module, num_select: int):
        super().__init__()
        self.model, self.num_select, self.select = model, num_select, PostProcess(num_select).select

    def forward(self, images: Tensor):
        no_padding = torch.zeros_like(images[:, 0], dtype=torch.bool)
        scores, labels, boxes = self.select(self.model(NestedTensor(images, no_padding)))
        return boxes, scores, labels


def coarsest_stride(model) -> int:
    """Stride of the smallest feature map: the extra levels each halve the backbone's last one."""
    strides = model.backbone.strides
    return strides[-1] * 2 ** (model.num_feature_levels - len(strides))


def sample_batch(image, batch: int, height: int, width: int) -> Tensor:
    """The image resized to height x width and normalised, then flipped variants so that no two are equal."""
    tensor = F.normalize(F.to_tensor(image.resize((width, height))), IMAGENET_MEAN, IMAGENET_STD)
    variants = [tensor, tensor.flip(-1), tensor.flip(-2), tensor.flip(-1, -2)]
    return torch.stack([variants[i % len(variants)] for i in range(batch)])


def default_image(height: int, width: int):
    """A smooth, deterministic colour field: something with structure when no --image is given."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, max(2, height // 16), max(2, width // 16), generator=generator)
    return F.to_pil_image(torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")[0])


def compare(onnx_outputs, reference) -> dict:
    """How far ONNX is from PyTorch. Each ONNX box is matched to the closest PyTorch detection of the same label
    whose score is within SCORE_MATCH (near-equal scores may swap places); the reference holds more than
    num_select detections, so one that swapped in at the cut-off is found too."""
    boxes, scores, labels = (torch.as_tensor(o) for o in onnx_outputs)
    ref_boxes, ref_scores, ref_labels = reference
    candidates = ((scores[:, :, None] - ref_scores[:, None, :]).abs() <= SCORE_MATCH) & \
                 (labels[:, :, None] == ref_labels[:, None, :])
    distance = (boxes[:, :, None, :] - ref_boxes[:, None, :, :]).abs().amax(-1)
    matched = distance.masked_fill(~candidates, float("inf")).amin(-1)
    within = matched <= BOX_TOLERANCE
    return {"boxes": matched[within].max().item() if within.any() else float("inf"),
            "unmatched": int((~within).sum()), "detections": within.numel(),
            "scores": (scores - ref_scores[:, :scores.shape[1]]).abs().max().item()}


def check(session, wrapper: ExportableDetector, image, batch: int, height: int, width: int) -> bool:
    """Run both on a batch; True when at most UNMATCHED_SHARE of the ONNX detections lack a PyTorch twin.

    A few may: when two of the encoder's proposals score nearly alike, rounding decides which becomes a query,
    in PyTorch alone too (a randomly initialised DINO-4scale R50 at 3x360x504: 2 of 900 boxes, and as many
    between PyTorch's own batch sizes). A wrong export moves nearly every box."""
    images = sample_batch(image, batch, height, width)
    with torch.no_grad():
        reference = ExportableDetector(wrapper.model, wrapper.num_select + 100)(images)
    diff = compare(session.run(None, {"images": images.numpy()}), reference)
    print(f"onnxruntime vs PyTorch at {batch}x3x{height}x{width}: max |boxes diff| {diff['boxes']:.2e} "
          f"(over {diff['detections'] - diff['unmatched']} of {diff['detections']} detections; "
          f"{diff['unmatched']} without a PyTorch twin), max |scores diff| {diff['scores']:.2e}")
    return diff["unmatched"] <= UNMATCHED_SHARE * diff["detections"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True, help="the .onnx file (weights included)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="input height and width (default: the evaluation size, square)")
    parser.add_argument("--dynamic", action="store_true", help="any batch size, height and width")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto")
    parser.add_argument("--config", help="config file for keys the checkpoint lacks (needed for official DINO files)")
    parser.add_argument("--image", help="image to compare ONNX and PyTorch on (default: a generated one)")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        import onnxruntime
    except ImportError:
        print("error: export_onnx needs onnx, onnxscript and onnxruntime: pip install -r requirements-extra.txt",
              file=sys.stderr)
        return 2
    try:
        detector = load_detector(opts.checkpoint, opts.config, opts.weights)
        size = opts.size or [detector.args.data_aug_val_size or max(detector.args.data_aug_scales)] * 2
        image = as_pil_image(opts.image) if opts.image else default_image(*size)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if detector.args.nms_iou_threshold > 0:
        logger.warning("warning: the checkpoint's config applies NMS (nms_iou_threshold=%s); the ONNX graph does not",
                       detector.args.nms_iou_threshold)
    wrapper = ExportableDetector(detector.model, detector.args.num_select).eval()
    height, width = size
    dynamic_shapes = None
    if opts.dynamic:
        # torch.export fixes any dimension that is 1 in the example: trace with 2 images and feature maps >= 2.
        least = 2 * coarsest_stride(detector.model)
        trace_size = [max(height, least), max(width, least)]
        example = sample_batch(image, 2, *trace_size)
        dynamic_shapes = ({0: "batch", 2: "height", 3: "width"},)
    else:
        example = sample_batch(image, 1, height, width)
    logger.info("exporting with torch.onnx.export (dynamo) at %s%s", "x".join(map(str, example.shape)),
                ", dynamic batch, height and width" if opts.dynamic else "")
    torch.onnx.export(wrapper, (example,), opts.out, input_names=["images"], output_names=["boxes", "scores", "labels"],
                      dynamic_shapes=dynamic_shapes, opset_version=opts.opset, external_data=False,
                      # onnxscript 0.7's optimizer fuses inverse_sigmoid's successive clamps into an invalid
                      # graph; onnxruntime optimises the graph itself when it loads it.
                      optimize=False, verbose=False)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: not its notes on the nodes it cannot constant-fold
    session = onnxruntime.InferenceSession(opts.out, options, providers=["CPUExecutionProvider"])
    checks = [(1, height, width)] + ([(3, height + 40, width + 24)] if opts.dynamic else [])
    if not all([check(session, wrapper, image, *shape) for shape in checks]):
        print(f"error: {opts.out} computes boxes that differ from PyTorch by more than {BOX_TOLERANCE} (more than "
              f"{UNMATCHED_SHARE:.0%} of them): the export is wrong; the file is left for inspection", file=sys.stderr)
        return 1
    print(f"wrote {opts.out} ({os.path.getsize(opts.out) / 2 ** 20:.1f} MiB): outputs match PyTorch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
