"""A tiny DINO configuration for tests: the official config with small overrides."""
import argparse
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(backbone="resnet18", backbone_weights=None, backbone_norm="bn", backbone_freeze_at=0, hidden_dim=32,
            nheads=4, num_queries=20, enc_layers=1, dec_layers=2, dim_feedforward=64, num_classes=5,
            dn_labelbook_size=5, dn_number=6, num_select=30)


def official_args(**overrides) -> argparse.Namespace:
    cfg = {}
    for name in ("coco_transformer.py", "DINO_4scale.py"):
        cfg.update({k: v for k, v in runpy.run_path(str(ROOT / "config" / "DINO" / name)).items()
                    if not k.startswith("_")})
    cfg.update(overrides)
    return argparse.Namespace(**cfg)


def tiny_args(**overrides) -> argparse.Namespace:
    return official_args(**{**TINY, **overrides})
