"""Every numeric option's allowed values, in one table. main.py checks them right after reading the command line
and the config, before datasets, the model or output files are touched; `main.py --help` and docs/options.md
show this table (`python -m util.options` prints it in Markdown; a test keeps docs/options.md equal to it)."""
import math
from dataclasses import dataclass
from typing import Optional

INF = math.inf


@dataclass(frozen=True)
class Rule:
    meaning: str
    low: float = 0
    high: float = INF
    integer: bool = False
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False
    allow_none: bool = False

    def allows(self, value) -> bool:
        if value is None:
            return self.allow_none
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        if self.integer and not isinstance(value, int):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def allowed(self) -> str:
        """What the rule allows, in words: 'an integer >= 1', 'a number in [0, 1)'."""
        kind = "an integer" if self.integer else "a number"
        if self.high == INF:
            text = f"{kind} {'>' if self.low_open else '>='} {_number(self.low)}"
        else:
            text = (f"{kind} in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
                    f"{')' if self.high_open else ']'}")
        return text + (" or None" if self.allow_none else "")


def _number(x) -> str:
    return f"{x:g}"


def count(meaning: str, low: int = 0, high: float = INF, **kw) -> Rule:
    return Rule(meaning, low, high, integer=True, **kw)


def positive(meaning: str, high: float = INF, **kw) -> Rule:
    return Rule(meaning, 0, high, low_open=True, **kw)


def fraction(meaning: str, **kw) -> Rule:
    return Rule(meaning, 0, 1, **kw)


RULES = {
    # optimisation
    "lr": fraction("learning rate of the transformer and heads"),
    "lr_backbone": fraction("learning rate of the backbone (0 trains it not at all)"),
    "weight_decay": fraction("AdamW weight decay"),
    "batch_size": count("images per process and step", 1, 65536),
    "epochs": count("epochs the run trains in all", 1, 100000),
    "lr_drop": count("epochs between the step schedule's lr drops (x0.1)", 1),
    "lr_drop_list": count("the epochs at which the multistep schedule drops the lr (x0.1)", 1),
    "lr_warmup_iters": count("optimizer steps of linear lr warm-up; 0 = none"),
    "clip_max_norm": Rule("gradient norm clipping; 0 = none"),
    "early_stop_patience": count("epochs without a better bbox AP before training ends; 0 = off"),
    "accumulate_steps": count("batches accumulated per optimizer step", 1, 65536),
    "ema_decay": Rule("decay of the weights' EMA", 0, 1, high_open=True),
    "ema_warmup_iters": count("steps over which the EMA's decay warms up; 0 = fixed decay"),
    # saving
    "save_checkpoint_interval": count("epochs between numbered checkpoints", 1),
    "keep_checkpoints": count("numbered checkpoints kept; 0 keeps all"),
    "save_every_iters": count("optimizer steps between mid-epoch saves of checkpoint.pth; 0 = only at epoch ends"),
    # model
    "num_classes": count("classification outputs: the largest category id + 1", 1),
    "backbone_freeze_at": count("frozen backbone stages: 0 none, 1 stem, 2 stem + layer1, ...", 0, 5),
    "pe_temperatureH": positive("temperature of the sine position encoding along y"),
    "pe_temperatureW": positive("temperature of the sine position encoding along x"),
    "hidden_dim": count("transformer width", 1, 65536),
    "nheads": count("attention heads", 1, 1024),
    "num_queries": count("detection queries", 1, 100000),
    "enc_layers": count("encoder layers", 1, 1000),
    "dec_layers": count("decoder layers", 1, 1000),
    "dim_feedforward": count("feed-forward width", 1, 1 << 20),
    "dropout": Rule("dropout probability", 0, 1, high_open=True),
    "num_feature_levels": count("feature maps the transformer attends to", 1, 16),
    "enc_n_points": count("sampling points per level and head in the encoder", 1, 1024),
    "dec_n_points": count("sampling points per level and head in the decoder", 1, 1024),
    "dn_number": count("denoising queries per image (0 = no denoising)", 0, 100000),
    "dn_box_noise_scale": Rule("denoising box noise scale", 0, 100),
    "dn_label_noise_ratio": fraction("share of denoising labels flipped"),
    "dn_labelbook_size": count("size of the denoising label embedding", 1),
    "focal_alpha": fraction("focal loss alpha"),
    "set_cost_class": Rule("matching cost weight of the class"),
    "set_cost_bbox": Rule("matching cost weight of the L1 box distance"),
    "set_cost_giou": Rule("matching cost weight of the GIoU"),
    "cls_loss_coef": Rule("loss weight of the classification"),
    "bbox_loss_coef": Rule("loss weight of the L1 box loss"),
    "giou_loss_coef": Rule("loss weight of the GIoU loss"),
    "interm_loss_coef": Rule("loss weight of the encoder's proposals"),
    "num_select": count("detections kept per image", 1, 100000),
    "nms_iou_threshold": Rule("IoU of the NMS on the detections; -1 = no NMS", -1, 1),
    # data
    "data_aug_scales": count("training resize scales (shorter side, px)", 1, 100000),
    "data_aug_max_size": count("longest side after resizing (px)", 1, 100000),
    "data_aug_scales2_resize": count("scales of the resize before the random crop (px)", 1, 100000,
                                     allow_none=True),
    "data_aug_scales2_crop": count("the random crop's size range (px)", 1, 100000),
    "data_aug_val_size": count("validation resize scale (px); None: the largest training scale", 1, 100000,
                               allow_none=True),
    "synthetic_num_train": count("generated training images", 1, 10 ** 7),
    "synthetic_num_val": count("generated validation images", 1, 10 ** 7),
    "synthetic_image_size": count("generated image size (px)", 16, 8192),
    # command line
    "seed": count("random seed (each process adds its rank)", 0, 2 ** 63 - 1),
    "num_workers": count("data loading worker processes per process", 0, 1024),
}


def check(args) -> None:
    """The first value that breaks its rule, as one ValueError: '<key>=<value>: <what is allowed> (<meaning>)'.
    A list option's every element follows its rule."""
    for key, rule in RULES.items():
        value = getattr(args, key, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        if value is None and not hasattr(args, key):
            continue
        if isinstance(value, (list, tuple)) and not value:
            continue
        bad = next((v for v in values if not rule.allows(v)), _OK)
        if bad is not _OK:
            raise ValueError(f"{key}={_shown(value)}: {rule.allowed()} ({rule.meaning})")


_OK = object()


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else str(value).replace(" ", "")


def table(defaults: Optional[dict] = None) -> str:
    """The options table as Markdown: key, allowed values, meaning (and default, when given)."""
    head = "| key | allowed | meaning |" + (" default |" if defaults else "")
    rows = [head, "|---|---|---|" + ("---|" if defaults else "")]
    for key, rule in RULES.items():
        row = f"| `{key}` | {rule.allowed()} | {rule.meaning} |"
        if defaults:
            row += f" `{defaults.get(key)!r}` |"
        rows.append(row)
    return "\n".join(rows)


def help_text() -> str:
    """The table for `main.py --help`."""
    width = max(map(len, RULES))
    lines = ["numeric options (config keys, set with --options key=value; seed and num_workers: flags):"]
    lines += [f"  {key:<{width}}  {rule.allowed()}: {rule.meaning}" for key, rule in RULES.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
