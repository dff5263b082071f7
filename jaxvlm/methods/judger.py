"""JUDGER's inference-time perception (liangjing910/JUDGER, after ViCrop, "MLLMs Know Where to Look"):
where a LLaVA-1.5 model looks for a question, relative to where it looks for a generic description,
chooses a square crop that the model then sees beside the full image.

- `relative_attention`: the attention of the prompt's last token to the 24 x 24 image tokens at one LM
  layer (15th decoder layer, index 14, in the original), averaged over heads, for the question and for
  "Write a general description of the image."; their element-wise ratio. The prompts are raw
  (``<s><image>\\n{text}``, no chat template), as the original builds them.
- `crop_box`: the adaptive sliding window over that map: for crop sides of 1-2x the model's input
  resolution (in original-image pixels), the window of attention cells with the largest sum, scored by
  how much it stands out from its (up to four) one-cell-shifted neighbours; the sharpest side wins and
  the square box is centred on its window, kept inside the image.
- `answer_messages`: the answer prompt, ``<image><image>\\n{question}`` in the llava_v1 template, the
  full image first and the crop second (the crop is preprocessed without padding to a square).

The map covers the model's input (the padded square under LLaVA-1.5's ``pad``), while the box is laid
on the unpadded image, as in the original; for non-square images that offsets the box (kept for
fidelity). The judgment-enhanced training has no released code, so it is not here.

Example:
    >>> q_ids = raw_prompt_ids(tok, question, cfg.image_token_id, 576)
    >>> g_ids = raw_prompt_ids(tok, GENERAL_PROMPT, cfg.image_token_id, 576)
    >>> a_rel = relative_attention(model, params, q_ids, g_ids, pixels, layer=14)    # [24, 24]
    >>> box = crop_box(np.asarray(a_rel), image.size, 336)
    >>> crop = image.crop(box)
    >>> a_rel, box = question_crop(model, params, tok, question, pixels, image.size, layer=14)   # the same
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

GENERAL_PROMPT = "Write a general description of the image."
ATTENTION_LAYER = 14                # HF's attentions[14]: the 15th decoder layer of Vicuna-7B
RATIOS = (1, 1.2, 1.4, 1.6, 1.8, 2)


@functools.lru_cache(maxsize=8)
def _last_token_attention(model, layer: int):
    """Jitted `[B, H, T]` attention of each row's last token at `layer`, for left-padded rows (one compile
    per model, layer and padded length)."""
    def fn(params, input_ids, attention_mask, positions, pixel_values):
        out = model.apply({"params": params}, input_ids, pixel_values, attention_mask=attention_mask,
                          positions=positions, attn_layers=(layer,), logits="none")
        return out.attentions[0][:, :, -1]
    return jax.jit(fn)


def layer_index(layer: int, num_layers: int) -> int:
    """`layer` as a 0-based LM layer index; a negative one counts from the last (-1), as Python indexes.
    ValueError (naming both) where the LM has no such layer."""
    if not -num_layers <= layer < num_layers:
        raise ValueError(f"{layer} is outside the LM's {num_layers} layers")
    return layer % num_layers


def raw_prompt_ids(tokenizer, text: str, image_token_id: int, num_image_tokens: int) -> np.ndarray:
    """`[T]` ids of the original's raw attention prompt ``"<image>\n" + text`` without a chat template, as
    LLaVA's ``tokenizer_image_token`` builds it: BOS, the image tokens, then the rest tokenized on its own
    with its BOS dropped."""
    head = tokenizer("").input_ids
    tail = tokenizer("\n" + text).input_ids[len(head):]
    return np.asarray(head + [image_token_id] * num_image_tokens + tail, np.int64)


def relative_attention(model, params, question_ids: np.ndarray, general_ids: np.ndarray, pixel_values: np.ndarray,
                       layer: int = ATTENTION_LAYER, image_token_id: int | None = None, bucket: int = 32) -> np.ndarray:
    """`[g, g]` question attention over general-description attention (no epsilon, as the original): the
    last token's attention to the g x g image tokens at LM `layer` (0-based, as transformers'
    ``attentions[layer]``), averaged over heads. ids: `[T]` raw prompts (BOS, the image tokens, "\n", the
    text; `raw_prompt_ids`); pixel_values: `[1, 3, H, W]`, the image both prompts see.

    Both prompts run as one batch of 2, left-padded to a multiple of `bucket` tokens (the padding is masked
    and positions start at each prompt's first token), so questions of similar length share one compile."""
    image_token_id = model.cfg.image_token_id if image_token_id is None else image_token_id
    rows = [np.asarray(question_ids, np.int64), np.asarray(general_ids, np.int64)]
    n = int((rows[0] == image_token_id).sum())
    side = int(round(n ** 0.5))
    if side * side != n or int((rows[1] == image_token_id).sum()) != n:
        raise ValueError(f"the prompts have {n} and {int((rows[1] == image_token_id).sum())} image tokens; "
                         f"both need the same square grid")
    t = -(-max(len(r) for r in rows) // bucket) * bucket
    pad = 0 if image_token_id != 0 else 1          # any id but the image's: the padding is masked out
    ids = np.full((2, t), pad, np.int64)
    mask = np.zeros((2, t), np.int32)
    for i, r in enumerate(rows):
        ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
    positions = np.where(mask > 0, np.cumsum(mask, -1) - 1, 0)
    probs = _last_token_attention(model, layer)(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions),
                                                jnp.asarray(np.repeat(pixel_values, 2, axis=0)))
    probs = np.asarray(probs, np.float64)                                   # [2, H, T]
    maps = [probs[i][:, ids[i] == image_token_id].mean(0).reshape(side, side) for i in range(2)]
    return maps[0] / maps[1]


def crop_box(att: np.ndarray, image_size: Sequence[int], bbox_size: int = 336,
             ratios: Sequence[float] = RATIOS) -> tuple:
    """The square crop `(x1, y1, x2, y2)` in original-image pixels (PIL's box order) chosen from an
    attention map `att` `[rows, cols]` over an image of `image_size` (width, height); `bbox_size` is the
    model's input resolution. An image whose whole map fits the smallest window is not cropped: the box is
    the whole image. Coordinates are ints, or floats for the non-integer sides 1.2-1.8x (as the original)."""
    att = np.asarray(att, np.float64)
    rows, cols = att.shape
    w, h = image_size
    cell_w, cell_h = w / cols, h / rows
    best = None                                   # (sharpness, ratio, (x, y), (nx, ny)); first max wins
    for r in ratios:
        # at least one cell: a crop side under one cell (a small --judger-crop-size) would leave no window
        nx = max(1, min(int(bbox_size * r / cell_w), cols))
        ny = max(1, min(int(bbox_size * r / cell_h), rows))
        if cols - nx < 1 and rows - ny < 1:       # the window would be the whole map
            if r == ratios[0]:
                return 0, 0, w, h
            continue
        sums = np.lib.stride_tricks.sliding_window_view(att, (ny, nx)).sum(axis=(-2, -1))    # [y, x]
        # the first maximum scanning x-major (x outer, y inner), as the original's loops
        x, y = divmod(int(np.argmax(sums.T)), sums.shape[0])
        neighbours = [sums[y, x + dx] for dx in (-1, 1) if 0 <= x + dx < sums.shape[1]]
        neighbours += [sums[y + dy, x] for dy in (-1, 1) if 0 <= y + dy < sums.shape[0]]
        sharp = (sums[y, x] - np.mean(neighbours)) / (nx * ny)
        if best is None or sharp > best[0]:
            best = (sharp, r, (x, y), (nx, ny))
    _, r, (x, y), (nx, ny) = best
    side = bbox_size * r
    half = side // 2
    cx = int(x * cell_w + cell_w * nx / 2)
    cy = int(y * cell_h + cell_h * ny / 2)
    cx = w - half if max(cx, half) > w - half else max(cx, half)
    cy = h - half if max(cy, half) > h - half else max(cy, half)
    return max(0, cx - half), max(0, cy - half), min(w, cx + half), min(h, cy + half)


def question_crop(model, params, tokenizer, question: str, pixel_values: np.ndarray, image_size: Sequence[int], *,
                  layer: int = ATTENTION_LAYER, bbox_size: int = 336,
                  general_ids: np.ndarray | None = None) -> tuple[np.ndarray, tuple]:
    """JUDGER's perception for one question: (`relative_attention` `[g, g]`, `crop_box` in the pixels of
    an image of `image_size` (width, height)). pixel_values: `[1, 3, H, W]`, the image as the model sees
    it; general_ids: the general prompt's ids, when the caller has them already."""
    cfg = model.cfg
    if general_ids is None:
        general_ids = raw_prompt_ids(tokenizer, GENERAL_PROMPT, cfg.image_token_id, cfg.tokens_per_image)
    a_rel = relative_attention(model, params, raw_prompt_ids(tokenizer, question, cfg.image_token_id,
                                                             cfg.tokens_per_image),
                               general_ids, pixel_values, layer=layer)
    return a_rel, crop_box(a_rel, image_size, bbox_size)


def answer_messages(question: str) -> list[dict]:
    """The answer turn: both images, then the question (template llava_v1); images [full, crop]."""
    return [{"role": "user", "content": "<image><image>\n" + question}]
