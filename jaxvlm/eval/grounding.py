"""REC (box IoU, Acc@0.5 from boxes parsed out of text) and RES (mask IoU, cIoU, gIoU).

Box text formats (all converted to absolute ``[x1, y1, x2, y2]`` pixels of the original image):

* ``llava``: ``[x1, y1, x2, y2]`` floats in [0, 1]. LLaVA-1.5 (and Chain-of-Spot) normalise to the
  *padded square* (side ``max(W, H)``, image centred), so with ``square_pad=True`` (default) the
  pad offset ``(max-min)//2`` is removed as LLaVA-style grounding evals do.
* ``qwen_vl``: ``<ref>..</ref><box>(x1,y1),(x2,y2)</box>`` on a 0-999 grid of the raw image;
  pixels = v / 999 * W (or H), as Qwen-VL's evaluate_grounding.py does. The bare continuation
  ``(x1,y1),(x2,y2)</box>`` (a prompt that already ends in ``<box>``, as SC-Tune's locator) parses too.
* ``qwen25_vl``: absolute pixels, JSON like ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}`` (also a
  list of them, possibly inside a ```json fence). Qwen2.5-VL answers in the pixels of the image *it
  saw*; when that differs from the original (smart-resize), give the annotation ``input_width`` /
  ``input_height`` and boxes are rescaled to the original size.
* ``auto``: ``<box>`` or ``</box>`` -> qwen_vl; ``bbox_2d`` -> qwen25_vl; a bracketed 4-list with every value
  <= 1 -> llava, otherwise pixels.

An answer with no parsable box scores IoU 0 (the original scripts substitute [0, 0, 0, 0]) and is
counted in ``parse_failures``. IoU uses continuous coordinates (no +1), like torchvision's box_iou.
"""
from __future__ import annotations

import json
import re
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from jaxvlm.eval.io import EvalInputError, Prediction, as_records, index_records, pair_by_id

BOX_FORMATS = ("auto", "llava", "qwen_vl", "qwen25_vl")

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_QWEN_BOX = re.compile(rf"<box>\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*</box>")
_QWEN_BOX_OPEN = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
_LIST4 = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def _floats(m: re.Match) -> list[float]:
    return [float(g) for g in m.groups()]


def _bbox_2d(text: str) -> list[float] | None:
    """First ``bbox_2d`` in a Qwen2.5-VL answer: JSON (fenced or not), else a regex fallback."""
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, ValueError):
        obj = None
    items = obj if isinstance(obj, list) else [obj]
    for it in items:
        if isinstance(it, Mapping) and isinstance(it.get("bbox_2d"), list) and len(it["bbox_2d"]) == 4:
            try:
                return [float(v) for v in it["bbox_2d"]]
            except (TypeError, ValueError):
                return None
    # Truncated or loosely formatted JSON: take the list after the first "bbox_2d".
    m = re.search(r'"?bbox_2d"?\s*:\s*' + _LIST4.pattern, text)
    return _floats(m) if m else None


def parse_box(text: str, box_format: str = "auto") -> tuple[str, list[float]] | None:
    """(resolved format, 4 raw numbers in that format's units) or None.

    Example:
        >>> parse_box("<ref>the dog</ref><box>(10,20),(500,999)</box>")
        ('qwen_vl', [10.0, 20.0, 500.0, 999.0])
        >>> parse_box('```json\\n[{"bbox_2d": [5, 6, 70, 80], "label": "dog"}]\\n```')
        ('qwen25_vl', [5.0, 6.0, 70.0, 80.0])
        >>> parse_box("[0.1, 0.2, 0.5, 0.6]")
        ('llava', [0.1, 0.2, 0.5, 0.6])
    """
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
    fmt = box_format
    if fmt == "auto":
        if "<box>" in text or "</box>" in text:  # SC-Tune's locator prompt ends in "<box>"
            fmt = "qwen_vl"
        elif "bbox_2d" in text:
            fmt = "qwen25_vl"
        else:
            m = _LIST4.search(text)
            if not m:
                return None
            vals = _floats(m)
            return ("llava" if max(abs(v) for v in vals) <= 1.0 else "qwen25_vl"), vals
    if fmt == "qwen_vl":
        m = _QWEN_BOX.search(text) or _QWEN_BOX_OPEN.search(text)
        return (fmt, _floats(m)) if m else None
    if fmt == "qwen25_vl":
        box = _bbox_2d(text)
        if box is None:
            m = _LIST4.search(text)
            box = _floats(m) if m else None
        return (fmt, box) if box is not None else None
    m = _LIST4.search(text)  # llava
    return (fmt, _floats(m)) if m else None


def to_pixels(fmt: str, box: Sequence[float], width: float, height: float, square_pad: bool = True,
              input_size: tuple[float, float] | None = None) -> list[float]:
    """Raw parsed numbers -> absolute xyxy pixels of the original ``width`` x ``height`` image."""
    x1, y1, x2, y2 = box
    if fmt == "qwen_vl":
        return [x1 / 999 * width, y1 / 999 * height, x2 / 999 * width, y2 / 999 * height]
    if fmt == "llava":
        if not square_pad:
            return [x1 * width, y1 * height, x2 * width, y2 * height]
        side = max(width, height)
        dx = (side - width) // 2
        dy = (side - height) // 2
        return [x1 * side - dx, y1 * side - dy, x2 * side - dx, y2 * side - dy]
    if fmt == "qwen25_vl":
        if input_size:
            sx, sy = width / input_size[0], height / input_size[1]
            return [x1 * sx, y1 * sy, x2 * sx, y2 * sy]
        return [x1, y1, x2, y2]
    raise ValueError(f"unknown box format {fmt!r}")


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two xyxy boxes; inverted or empty boxes have zero area.

    Example:
        >>> box_iou([0, 0, 2, 2], [1, 1, 3, 3])  # overlap 1, union 4 + 4 - 1
        0.14285714285714285
    """
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def rec_aggregate(records: Sequence[Mapping], threshold: float = 0.5) -> dict[str, float]:
    n = len(records)
    if not n:
        return {"acc@0.5": 0.0, "mean_iou": 0.0, "parse_failures": 0.0}
    return {f"acc@{threshold:g}": sum(r["iou"] >= threshold for r in records) / n,
            "mean_iou": sum(r["iou"] for r in records) / n,
            "parse_failures": sum(r["pred_box"] is None for r in records) / n}


def score_rec(
    predictions: Sequence[Prediction],
    annotations: Any,
    box_format: str = "auto",
    square_pad: bool = True,
    gt_format: str = "xyxy",
    threshold: float = 0.5,
    allow_missing: bool = False,
) -> dict:
    """REC Acc@threshold (IoU >= threshold, as Qwen-VL's eval) and mean IoU.

    ``annotations``: ``{"question_id", "bbox": [x1, y1, x2, y2] pixels (or x, y, w, h with
    gt_format="xywh"), "width", "height", ["input_width", "input_height"]}``.
    """
    if gt_format not in ("xyxy", "xywh"):
        raise ValueError(f"gt_format must be 'xyxy' or 'xywh', got {gt_format!r}")
    anns = index_records(as_records(annotations, "REC annotations"), what="REC annotations")
    records = []
    for p, ann in pair_by_id(predictions, anns, allow_missing, "REC annotations"):
        try:
            gt = [float(v) for v in ann["bbox"]]
            w, h = float(ann["width"]), float(ann["height"])
        except (KeyError, TypeError, ValueError):
            raise EvalInputError(f"REC annotations: question {p.id!r} needs 'bbox' (4 numbers), 'width' and "
                                 "'height'") from None
        if len(gt) != 4:
            raise EvalInputError(f"REC annotations: question {p.id!r} 'bbox' must have 4 numbers")
        if gt_format == "xywh":
            gt = [gt[0], gt[1], gt[0] + gt[2], gt[1] + gt[3]]
        parsed = parse_box(p.text, box_format)
        pred = None
        if parsed is not None:
            insz = (float(ann["input_width"]), float(ann["input_height"])) if "input_width" in ann else None
            pred = to_pixels(parsed[0], parsed[1], w, h, square_pad, insz)
        records.append({"id": p.id, "pred_box": pred, "gt_box": gt,
                        "iou": box_iou(pred, gt) if pred is not None else 0.0})
    return {"scores": rec_aggregate(records, threshold), "per_sample": records}


# ---------------------------------------------------------------------------------------------
# RES: masks

def encode_mask(mask: np.ndarray) -> dict:
    """Binary (H, W) mask -> COCO RLE with a str ``counts`` (JSON-ready).

    pycocotools needs a Fortran-ordered uint8 array; a C-ordered one raises.
    """
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask) > 0, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_mask(obj: Any, height: int | None = None, width: int | None = None) -> np.ndarray:
    """A boolean mask from COCO RLE (compressed or not) or COCO polygons (need height/width)."""
    from pycocotools import mask as mask_utils

    if isinstance(obj, Mapping) and "counts" in obj:
        rle = dict(obj)
        if isinstance(rle["counts"], list):  # uncompressed RLE
            h, w = rle["size"]
            rle = mask_utils.frPyObjects(rle, h, w)
        with warnings.catch_warnings():  # pycocotools 2.0.11 + numpy 2: a harmless __array__ copy warning
            warnings.simplefilter("ignore", DeprecationWarning)
            return mask_utils.decode(rle).astype(bool)
    if isinstance(obj, list):  # polygons: [[x1, y1, x2, y2, ...], ...]
        if height is None or width is None:
            raise EvalInputError("polygon segmentation needs 'height' and 'width'")
        rles = mask_utils.frPyObjects(obj, int(height), int(width))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return mask_utils.decode(mask_utils.merge(rles)).astype(bool)
    raise EvalInputError(f"cannot read a mask from {type(obj).__name__}")


def res_aggregate(records: Sequence[Mapping]) -> dict[str, float]:
    inter = sum(r["intersection"] for r in records)
    union = sum(r["union"] for r in records)
    n = len(records)
    return {"cIoU": inter / union if union else 0.0,
            "gIoU": sum(r["iou"] for r in records) / n if n else 0.0,
            "acc@0.5": sum(r["iou"] >= 0.5 for r in records) / n if n else 0.0}


def mask_stats(pred: np.ndarray, gt: np.ndarray) -> dict:
    """Intersection, union and IoU of two masks; two empty masks have IoU 1 (LISA/GLaMM convention)."""
    if pred.shape != gt.shape:
        raise EvalInputError(f"mask shapes differ: prediction {pred.shape} vs ground truth {gt.shape}")
    i = int(np.logical_and(pred, gt).sum())
    u = int(np.logical_or(pred, gt).sum())
    return {"intersection": i, "union": u, "iou": i / u if u else 1.0}


def score_res(predictions: Sequence[Prediction], annotations: Any, mask_key: str = "mask",
              allow_missing: bool = False) -> dict:
    """RES cIoU (sum I / sum U), gIoU (mean per-sample IoU) and Acc@0.5.

    Predictions carry ``mask`` (COCO RLE); annotations ``{"question_id", "segmentation"|"mask":
    RLE or polygons, ["height", "width"]}``. A prediction without a mask counts as an empty mask.
    """
    anns = index_records(as_records(annotations, "RES annotations"), what="RES annotations")
    records = []
    for p, ann in pair_by_id(predictions, anns, allow_missing, "RES annotations"):
        seg = ann.get("segmentation", ann.get("mask"))
        if seg is None:
            raise EvalInputError(f"RES annotations: question {p.id!r} has no 'segmentation' / 'mask'")
        gt = decode_mask(seg, ann.get("height"), ann.get("width"))
        raw = p.record.get(mask_key)
        pred = decode_mask(raw, *gt.shape) if raw is not None else np.zeros_like(gt)
        records.append({"id": p.id, **mask_stats(pred, gt)})
    return {"scores": res_aggregate(records), "per_sample": records,
            "notes": ["RES: an empty prediction on an empty ground truth scores IoU 1"]}
