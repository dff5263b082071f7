"""Qwen2-VL / Qwen2.5-VL preprocessing: HF's image processor (smart_resize, patch order) + the chatml
template + placeholder expansion, then padding to the static shapes the jitted model wants.

The image side is transformers' `Qwen2VLImageProcessorPil` (works without torchvision), so token
counts and patch order match HF exactly. The stock `Qwen2_5_VLProcessor` cannot be constructed
without torchvision (its video processor needs it); `ImageOnlyQwen2VLProcessor` is the same
processor minus the video processor, for users who want the HF processor object itself.

Example:
    >>> pre = QwenVLPreprocessor(tokenizer, make_image_processor(min_pixels=28 * 28 * 4, max_pixels=56 * 56 * 4))
    >>> msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    >>> sample = pre(msgs, images=[pil_image])      # input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw
    >>> batch = pad_batch([sample, other], seq_len=1024, n_patches=4096, n_images=4)
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import transformers

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"

# The chatml template Qwen2-VL / Qwen2.5-VL Instruct ship (images and videos as placeholders).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_image_processor(min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280, patch_size: int = 14,
                         temporal_patch_size: int = 2, merge_size: int = 2, **kwargs):
    """HF's `Qwen2VLImageProcessorPil` (the same processor serves Qwen2.5-VL)."""
    return transformers.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size,
                                                 temporal_patch_size=temporal_patch_size, merge_size=merge_size,
                                                 **kwargs)


class ImageOnlyQwen2VLProcessor(transformers.Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without the video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_PAD
        self.video_token = getattr(tokenizer, "video_token", None) or VIDEO_PAD
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        transformers.ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def _image_size(image) -> tuple[int, int]:
    if hasattr(image, "size") and not isinstance(image, np.ndarray):      # PIL: (w, h)
        w, h = image.size
        return h, w
    a = np.asarray(image)
    return (a.shape[-2], a.shape[-1]) if a.ndim == 3 and a.shape[0] in (1, 3) else a.shape[:2]


class QwenVLPreprocessor:
    """Chat messages (or a prompt string with `<|image_pad|>` placeholders) + images -> model inputs.

    Each placeholder is expanded to `grid.prod() / merge_size^2` copies, as HF's processor does.
    Images smaller than one merged patch (patch_size * merge_size pixels) on either side are
    rejected: HF would silently upscale them, which is rarely what a caller meant.
    """

    def __init__(self, tokenizer, image_processor=None, chat_template: str = CHAT_TEMPLATE):
        self.tokenizer = tokenizer
        self.image_processor = image_processor or make_image_processor()
        self.chat_template = chat_template
        self.merge = int(self.image_processor.merge_size)
        self.min_side = int(self.image_processor.patch_size) * self.merge
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_PAD, VIDEO_PAD)}
        if any(i is None or i == tokenizer.unk_token_id for i in ids.values()):
            raise ValueError(f"the tokenizer lacks the placeholder tokens {IMAGE_PAD} / {VIDEO_PAD}")
        self.image_token_id, self.video_token_id = ids[IMAGE_PAD], ids[VIDEO_PAD]

    def prompt(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(list(messages), chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, messages: str | Sequence[dict], images: Sequence[Any] = (),
                 add_generation_prompt: bool = True) -> dict[str, np.ndarray]:
        """-> dict of numpy arrays: input_ids/attention_mask/mm_token_type_ids `[T]`, pixel_values
        `[N, C*T*P*P]` float32, image_grid_thw `[n_images, 3]`."""
        text = messages if isinstance(messages, str) else self.prompt(messages, add_generation_prompt)
        images = list(images)
        if text.count(IMAGE_PAD) != len(images):
            raise ValueError(f"the prompt has {text.count(IMAGE_PAD)} image placeholders but {len(images)} "
                             "image(s) were given")
        for i, im in enumerate(images):
            h, w = _image_size(im)
            if min(h, w) < self.min_side:
                raise ValueError(f"image {i} is {h}x{w} px, smaller than one merged patch "
                                 f"({self.min_side}x{self.min_side} px = patch_size x merge_size)")
        ip = self.image_processor
        d = 3 * ip.temporal_patch_size * ip.patch_size ** 2
        pixel_values, grid = np.zeros((0, d), np.float32), np.zeros((0, 3), np.int64)
        if images:
            out = self.image_processor(images=images, return_tensors="np")
            pixel_values = np.asarray(out["pixel_values"], np.float32)
            grid = np.asarray(out["image_grid_thw"], np.int64)
            pieces = text.split(IMAGE_PAD)
            counts = grid.prod(-1) // self.merge ** 2
            text = pieces[0] + "".join(IMAGE_PAD * int(n) + p for n, p in zip(counts, pieces[1:]))
        ids = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], np.int64)
        types = np.where(ids == self.image_token_id, 1, np.where(ids == self.video_token_id, 2, 0))
        return dict(input_ids=ids, attention_mask=np.ones_like(ids), mm_token_type_ids=types,
                    pixel_values=pixel_values, image_grid_thw=grid)


def pad_batch(samples: Sequence[dict], seq_len: int, n_patches: int, n_images: int, pad_id: int = 0,
              pad_side: str = "left") -> dict[str, np.ndarray]:
    """Stack samples into static shapes: tokens `[B, seq_len]` (padded on `pad_side`), all images'
    patches packed into `[n_patches, D]` (zero rows after), grids `[n_images, 3]` (zero rows after).
    The same shapes for every batch => one compilation."""
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    b = len(samples)
    out = {k: np.full((b, seq_len), pad_id if k == "input_ids" else 0, np.int64)
           for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        if n > seq_len:
            raise ValueError(f"sample {i} has {n} tokens, more than seq_len={seq_len}")
        sl = slice(seq_len - n, seq_len) if pad_side == "left" else slice(0, n)
        for k in out:
            out[k][i, sl] = s[k]
    pix = np.concatenate([s["pixel_values"] for s in samples], axis=0)
    grid = np.concatenate([s["image_grid_thw"] for s in samples], axis=0)
    if len(pix) > n_patches:
        raise ValueError(f"the batch has {len(pix)} patches, more than n_patches={n_patches}")
    if len(grid) > n_images:
        raise ValueError(f"the batch has {len(grid)} images, more than n_images={n_images}")
    out["pixel_values"] = np.concatenate([pix, np.zeros((n_patches - len(pix), pix.shape[1]), pix.dtype)])
    out["image_grid_thw"] = np.concatenate([grid, np.zeros((n_images - len(grid), 3), grid.dtype)])
    return out
