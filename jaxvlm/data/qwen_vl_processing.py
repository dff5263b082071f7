"""Qwen-VL(-Chat) inputs: the image transform of the original (`visual.py`: Resize((448, 448),
BICUBIC) on the PIL image, ToTensor, Normalize with CLIP mean/std, all in fp32) and left-padded
raw-prompt batches (SC-Tune's describer/locator path: `<img>path</img>` spans, no chat template).

Example:
    >>> pix = preprocess_images([Image.open("cat.jpg")])                  # [1, 3, 448, 448] float32
    >>> batch = raw_prompt_batch(tok, ["<img>a.jpg</img><ref>This</ref><box>(1,2),(3,4)</box> is"], [[img]])
    >>> batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

CLIP_MEAN = np.asarray((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.asarray((0.26862954, 0.26130258, 0.27577711), np.float32)
IMAGE_SIZE = 448


def preprocess_image(image: Image.Image | np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image (PIL, or HWC uint8 array) -> `[3, size, size]` float32, as the original transform:
    RGB, squash-resize (no crop, aspect ratio not kept) with PIL bicubic, /255, (x - mean) / std."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(f"array images must be HxWxC uint8, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    x = np.asarray(image, np.uint8).astype(np.float32) / np.float32(255)
    return ((x - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1).copy()


def preprocess_images(images: Sequence[Image.Image | np.ndarray], size: int = IMAGE_SIZE) -> np.ndarray:
    """`[N, 3, size, size]` float32 in the given order (the order of the `<img>` spans)."""
    if not images:
        return np.zeros((0, 3, size, size), np.float32)
    return np.stack([preprocess_image(im, size) for im in images])


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, side: str = "left",
              length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token rows -> (`input_ids [B, T]` int32, `attention_mask [B, T]` int32), padded on `side`."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    t = max(len(r) for r in rows) if length is None else length
    if any(len(r) > t for r in rows):
        raise ValueError(f"a row of {max(len(r) for r in rows)} tokens does not fit length={t}")
    ids = np.full((len(rows), t), pad_id, np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for b, r in enumerate(rows):
        sl = slice(t - len(r), t) if side == "left" else slice(0, len(r))
        ids[b, sl], mask[b, sl] = r, 1
    return ids, mask


def raw_prompt_batch(tokenizer, prompts: Sequence[str], images: Sequence[Sequence[Image.Image | np.ndarray]],
                     size: int = IMAGE_SIZE, side: str = "left", length: int | None = None) -> dict[str, np.ndarray]:
    """Raw (no template) prompts with their images -> model inputs; left-padded with `<|endoftext|>`
    as SC-Tune does. `images[b]` are prompt b's images in the order of its `<img>` spans."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    rows = [tokenizer.raw_prompt(p) for p in prompts]
    for b, (row, ims) in enumerate(zip(rows, images)):
        n = sum(t == tokenizer.img_start_id for t in row)
        if n != len(ims):
            raise ValueError(f"prompt {b} has {n} <img> span(s) but {len(ims)} image(s) were given")
    ids, mask = pad_batch(rows, tokenizer.pad_id, side, length)
    return {"input_ids": ids, "attention_mask": mask,
            "pixel_values": preprocess_images([im for ims in images for im in ims], size)}
