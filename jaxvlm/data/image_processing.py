"""Per-family image preprocessing into fixed-shape numpy arrays, via transformers' image processors.

* LLaVA-1.5 / LLaVA-MORE: `LlavaImageProcessor` wraps `CLIPImageProcessorPil` (torchvision is absent here, so the
  PIL backend). ``aspect="pad"`` is LLaVA's ``image_aspect_ratio='pad'`` (train.py ``expand2square``): the image is
  centred on a square canvas filled with the mean colour ``tuple(int(x*255) for x in image_mean)`` before the
  processor's resize + centre crop. ``aspect="crop"`` leaves the processor's shortest-edge resize + centre crop.
  One image -> ``[3, H, W]`` float32 and ``tokens_per_image`` image tokens.
* Qwen2/2.5-VL: `Qwen2VLImageProcessor` wraps `Qwen2VLImageProcessorPil` (``smart_resize`` to multiples of
  ``patch_size * merge_size``, patches flattened to rows of ``C*T*P*P``). For static shapes each image slot holds
  ``max_patches = max_pixels // patch_size**2`` rows, zero-padded after the image's ``t*h*w`` rows, plus its
  ``image_grid_thw`` ``[3]`` int32 (``[0, 0, 0]`` for an empty slot); ``t*h*w // merge_size**2`` image tokens.

Example:
    >>> proc = LlavaImageProcessor.for_llava(llava_cfg)          # 336 px, CLIP mean/std, pad to square
    >>> out = proc(load_image("coco/000000033471.jpg", record_id="33471"))
    >>> out.pixel_values.shape, out.num_tokens                    # (3, 336, 336), 576
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Protocol

import numpy as np
from PIL import Image

from jaxvlm.data.conversation import BadRecordError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ProcessedImage:
    """One image slot. ``fields`` are extra per-slot arrays (e.g. ``image_grid_thw``)."""

    pixel_values: np.ndarray
    num_tokens: int
    fields: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


class ImageProcessor(Protocol):
    """What the pipeline needs from a per-family processor."""

    def __call__(self, image: Image.Image) -> ProcessedImage: ...

    def empty(self) -> ProcessedImage:
        """Zero-filled slot with the same shapes (``num_tokens`` 0) for slots with no image."""
        ...


def _size_field(size: Any, key: str) -> Any:
    """A field of an HF size spec (a dict or transformers' SizeDict)."""
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def load_image(path: str | os.PathLike, record_id: str = "?") -> Image.Image:
    """Open and fully decode an image as RGB; `BadRecordError` naming the record and path otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BadRecordError(record_id, "missing_image", f"record {record_id!r}: image file {path} does not exist")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")   # convert() forces the decode, so truncated files fail here
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadRecordError(record_id, "bad_image",
                             f"record {record_id!r}: image file {path} cannot be decoded: {e}") from e


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre `image` on a square canvas of its longer side, filled with `fill` (LLaVA's expand2square)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


class LlavaImageProcessor:
    """CLIP preprocessing for LLaVA-family models; output ``[3, S, S]`` float32."""

    def __init__(self, hf_processor: Any = None, *, image_size: int = 336, tokens_per_image: int = 576,
                 aspect: str = "pad"):
        if aspect not in ("pad", "crop"):
            raise ValueError(f"aspect must be 'pad' (LLaVA-1.5 image_aspect_ratio='pad') or 'crop', got {aspect!r}")
        if hf_processor is None:
            from transformers import CLIPImageProcessorPil
            hf_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                                 crop_size={"height": image_size, "width": image_size},
                                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
        self.hf = hf_processor
        crop = getattr(hf_processor, "crop_size", None)
        self.image_size = (int(_size_field(crop, "height") or image_size),
                           int(_size_field(crop, "width") or image_size))
        self.tokens_per_image = int(tokens_per_image)
        self.aspect = aspect
        self.fill = tuple(int(x * 255) for x in hf_processor.image_mean)

    @classmethod
    def for_llava(cls, cfg: Any, hf_processor: Any = None, aspect: str = "pad") -> "LlavaImageProcessor":
        """From a `jaxvlm.models.llava.LlavaConfig` (image size and image-token count must agree with the model)."""
        return cls(hf_processor, image_size=cfg.vision.image_size, tokens_per_image=cfg.tokens_per_image,
                   aspect=aspect)

    def __call__(self, image: Image.Image) -> ProcessedImage:
        if self.aspect == "pad":
            image = expand_to_square(image, self.fill)
        pv = np.asarray(self.hf(image, return_tensors="np")["pixel_values"][0], np.float32)
        return ProcessedImage(pv, self.tokens_per_image)

    def empty(self) -> ProcessedImage:
        return ProcessedImage(np.zeros((3, *self.image_size), np.float32), 0)


class Qwen2VLImageProcessor:
    """Qwen2/2.5-VL patches, zero-padded to a fixed ``[max_patches, C*T*P*P]`` per image slot."""

    def __init__(self, hf_processor: Any = None, *, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280,
                 patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2):
        if hf_processor is None:
            from transformers import Qwen2VLImageProcessorPil
            hf_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels,
                                                    patch_size=patch_size, temporal_patch_size=temporal_patch_size,
                                                    merge_size=merge_size)
        self.hf = hf_processor
        self.patch_size, self.merge_size = int(hf_processor.patch_size), int(hf_processor.merge_size)
        self.temporal_patch_size = int(hf_processor.temporal_patch_size)
        longest = _size_field(hf_processor.size, "longest_edge") or getattr(hf_processor, "max_pixels", None)
        self.max_patches = int(longest) // self.patch_size ** 2
        self.patch_dim = 3 * self.temporal_patch_size * self.patch_size ** 2

    def __call__(self, image: Image.Image) -> ProcessedImage:
        out = self.hf(image, return_tensors="np")
        rows = np.asarray(out["pixel_values"], np.float32)
        grid = np.asarray(out["image_grid_thw"][0], np.int32)
        pv = np.zeros((self.max_patches, self.patch_dim), np.float32)
        pv[: rows.shape[0]] = rows
        return ProcessedImage(pv, int(np.prod(grid)) // self.merge_size ** 2, {"image_grid_thw": grid})

    def empty(self) -> ProcessedImage:
        return ProcessedImage(np.zeros((self.max_patches, self.patch_dim), np.float32), 0,
                              {"image_grid_thw": np.zeros(3, np.int32)})
