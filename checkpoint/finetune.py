"""Fine-tuning from another run's weights: the class rows carried over by name, and the load plan that says
what loads, what starts fresh and why.

The official recipe drops the class heads (--finetune_ignore label_enc.weight class_embed), so every class
starts from random rows, even those the checkpoint already knows. Here, when the checkpoint and the dataset
both name their classes, the rows of each class-indexed tensor (class_embed of every decoder layer, the
encoder's output head, label_enc) are carried over for the classes they share, found by name; the dataset's
other classes start as the model initialises them. map_classes_by_name=False gives the official behaviour.
"""
import textwrap
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from checkpoint.format import CheckpointError
from datasets.coco import coco_class_names, label_names
from util.weights import LoadReport, load_model_weights, strip_module_prefix

# The heads whose rows are classes (label = row): the classifiers, and the denoising label embedding, whose
# extra last row stands for "no label" and is carried as it is.
CLASS_HEADS = ("class_embed", "label_enc.weight")
OFFICIAL_COCO_ROWS = 91  # official COCO checkpoints record no categories: their labels are COCO category ids


def is_class_tensor(key: str) -> bool:
    return any(head in key for head in CLASS_HEADS)


@dataclass
class ClassMap:
    """Which dataset label takes which checkpoint label's rows, found by class name."""
    carried: List[Tuple[int, int, str]] = field(default_factory=list)  # (dataset label, checkpoint label, name)
    fresh: List[Tuple[int, str]] = field(default_factory=list)  # dataset classes the checkpoint does not know
    dropped: List[str] = field(default_factory=list)  # checkpoint classes the dataset does not have
    source: str = "its recorded categories"

    def format(self) -> str:
        if not self.fresh and not self.dropped and all(new == old for new, old, _ in self.carried):
            return f"classes by name: the checkpoint's {len(self.carried)} classes, with the same labels"
        moved = [f"{name} ({old}->{new})" if old != new else name for new, old, name in self.carried]
        lines = [f"classes by name (from the checkpoint's {self.source}): {len(self.carried)} carried over, "
                 f"{len(self.fresh)} new, {len(self.dropped)} of the checkpoint's not in this dataset"]
        for what, names in (("carried", moved), ("new", [name for _, name in self.fresh]), ("dropped", self.dropped)):
            if names:
                lines.append(textwrap.fill(", ".join(names), width=110, initial_indent=f"  {what:<9}",
                                           subsequent_indent=" " * 11, break_on_hyphens=False))
        return "\n".join(lines)


def checkpoint_label_names(checkpoint: dict, rows: int) -> Tuple[Optional[List[Optional[str]]], str]:
    """(name of each of the checkpoint's `rows` labels, where the names come from); (None, '') when it names
    none."""
    saved = checkpoint.get("args") or {}
    if checkpoint.get("categories"):
        return label_names(checkpoint["categories"], rows, saved.get("contiguous_category_ids", False)), \
            "recorded categories"
    if rows == OFFICIAL_COCO_ROWS:
        return [None if name in ("N/A", "__background__") else name for name in coco_class_names()], \
            "COCO names (91 classes)"
    return None, ""


def map_classes(old: List[Optional[str]], new: List[Optional[str]], source: str) -> Optional[ClassMap]:
    """Dataset labels to checkpoint labels by name (case and surrounding spaces do not count); None when no
    name is shared, so that nothing is carried by accident."""
    def key(name):
        return name.strip().lower()
    old_labels = {key(name): label for label, name in enumerate(old) if name}
    shared = {key(name) for name in new if name} & set(old_labels)
    if not shared:
        return None
    mapping = ClassMap(source=source)
    for label, name in enumerate(new):
        if name and key(name) in shared:
            mapping.carried.append((label, old_labels[key(name)], name))
        elif name:
            mapping.fresh.append((label, name))
    mapping.dropped = [name for name in old if name and key(name) not in shared]
    return mapping


def carried_rows(model: torch.nn.Module, source: dict, mapping: ClassMap) -> Dict[str, torch.Tensor]:
    """The model's class-indexed tensors with the mapped rows taken from the checkpoint (the rest as the model
    initialised them): key -> tensor in the model's shape."""
    carried = {}
    for key, current in model.state_dict().items():
        if not is_class_tensor(key) or key not in source:
            continue
        old = source[key]
        if old.dim() != current.dim() or old.shape[1:] != current.shape[1:]:
            continue  # another width: nothing to carry, the load reports the mismatch
        rows = current.detach().clone()
        for new_label, old_label, _ in mapping.carried:
            if new_label < rows.shape[0] and old_label < old.shape[0]:
                rows[new_label] = old[old_label]
        if key.startswith("label_enc") and old.shape[0] > 0:  # the "no label" row, last in both
            rows[-1] = old[-1]
        carried[key] = rows
    return carried


def class_rows(state: dict) -> Optional[int]:
    """How many classes the checkpoint's classifier has."""
    weight = strip_module_prefix(state).get("class_embed.0.weight")
    return None if weight is None else weight.shape[0]


def load_weights(model: torch.nn.Module, path: str, checkpoint: dict, ignore=(), dataset_names=None):
    """Load what fits of the checkpoint's weights, class rows carried by name where both sides name their
    classes (dataset_names: the name of each of this model's labels; None: map nothing). Returns
    (LoadReport, ClassMap or None); a checkpoint of which nothing fits is an error."""
    source = strip_module_prefix(checkpoint["model"])
    old_names, where = checkpoint_label_names(checkpoint, class_rows(source) or 0)
    mapping = map_classes(old_names, dataset_names, where) if old_names and dataset_names else None
    carried = carried_rows(model, source, mapping) if mapping else None
    report = load_model_weights(model, source, ignore or (), by_name=carried)
    if not report.loaded:
        raise CheckpointError(f"none of the {len(source)} model tensors in {path} fit this model (other names or "
                              "shapes): check that -c and --options describe the checkpoint's architecture")
    return report, mapping


def check_shapes(report: LoadReport, path: str, differences: List[str]) -> None:
    """Tensors whose shape differs, and that neither --finetune_ignore nor the class mapping covers, are one
    error that names the first, both shapes and what fixes it. differences: the architecture settings of the
    checkpoint's args that differ from this run's (checkpoint.resume.architecture_differences)."""
    if not report.shape_mismatch:
        return
    key, saved, model = report.shape_mismatch[0]
    more = f" (and {len(report.shape_mismatch) - 1} more)" if len(report.shape_mismatch) > 1 else ""
    settings = [d for d in differences if not d.startswith(("num_classes", "dn_labelbook_size"))]
    if settings:
        fix = f"it was trained with another architecture ({'; '.join(settings)}): set -c/--options as it was"
    elif all(is_class_tensor(k) for k, _, _ in report.shape_mismatch):
        fix = ("add --finetune_ignore label_enc.weight class_embed to start the class heads fresh (rows are carried "
               "over by class name only when the checkpoint and the dataset name their classes)")
    else:
        fix = f"add --finetune_ignore {key.rsplit('.', 1)[0]} to start it fresh, or set -c/--options as the " \
              "checkpoint was trained"
    raise CheckpointError(f"{path}: {key} is {list(saved)} in the checkpoint but {list(model)} in this model{more}: "
                          f"{fix}")
