"""Pascal VOC, YOLO and COCO datasets read, checked and written in the layout that main.py --coco_path reads:
DST/{train,val}2017/ (links to the source images; test2017/ when the source has a test split) and
DST/annotations/instances_{split}2017.json.

A reader per format (voc, yolo, coco) turns a source into samples and categories through common's add_box, so
every box is checked and clipped alike; layout splits off val where the source has none and writes the result.
Each module states its own conventions; category ids follow each format, names are always kept.
"""
import os

from ..validate import DatasetError
from .common import CLIP_PX, Report, Source
from .coco import read_coco
from .layout import DEFAULT_VAL_FRACTION, check_out, final_splits, summary, write_coco_layout
from .voc import DIFFICULT, read_voc
from .yolo import read_yolo

__all__ = ["CLIP_PX", "DEFAULT_VAL_FRACTION", "DIFFICULT", "Report", "check_out", "final_splits", "read_source",
           "summary", "write_coco_layout"]


def read_source(fmt: str, src: str, report: Report, classes: str = None, difficult: str = "ignore") -> Source:
    """The source's samples and categories; structural mistakes raise DatasetError, the rest goes to report."""
    if not os.path.exists(src):
        raise DatasetError(f"source {src} not found: give the dataset's folder")
    if fmt == "voc":
        return read_voc(src, report, classes, difficult)
    if fmt == "yolo":
        return read_yolo(src, report, classes)
    return read_coco(src, report)
