"""Atomic, byte-deterministic file writing and COCO encoding helpers."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a sibling temp file + os.replace, so a reader never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def json_bytes(obj: Any, indent: int | None = None) -> bytes:
    # Insertion-ordered dicts and fixed separators: same objects, same bytes.
    sep = (",", ": ") if indent else (",", ":")
    return (json.dumps(obj, ensure_ascii=False, indent=indent, separators=sep) + "\n").encode()


def jsonl_bytes(rows: Iterable[dict]) -> bytes:
    return b"".join(json_bytes(r) for r in rows)


def pickle_bytes(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=4)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    pil.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a boolean (H, W) mask, JSON-ready (counts as str)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    counts = rle["counts"]
    raw = {"size": rle["size"], "counts": counts.encode("ascii") if isinstance(counts, str)
           else counts}
    return mask_utils.decode(raw).astype(bool)
