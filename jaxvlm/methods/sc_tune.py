"""SC-Tune (Yue et al., CVPR 2024): self-consistency tuning of Qwen-VL-Chat. One network plays a
describer (box -> caption of that region) and a locator (caption -> box); the describer is trained by
PPO with the locator's IoU as reward, the locator by SFT on the describer's captions, alternating in
phases. This module holds the pieces as the original code has them (ivattyue/SC-Tune,
``transformers/trainer_utils.py`` and ``transformers/trainer.py``):

- prompts in Qwen-VL's raw grounding format (`describer_prompt`, `locator_prompt`; boxes as
  ``int(v * 999)`` of the unpadded image), `find_bbox` (the first ``<box>(x1,y1),(x2,y2)</box>``, else
  ``[0, 0, 0, 0]``) and `box_iou` (in that integer space, epsilon 1e-7, no clamping of areas);
- the describer's PPO step: `token_mask` (answer tokens plus the first EOS, since Qwen-VL pads with its
  EOS), `caption_advantages` (per-token KL penalty to the phase-start snapshot, the IoU reward on the
  last column, gamma-discounted returns minus a self-critical baseline: the snapshot's own greedy
  describe-then-locate IoU; no value head, no whitening) and `ppo_loss` (clipped surrogate, clip 0.2,
  mean over unmasked tokens, zeroed when the mean ratio exceeds 10);
- the locator's SFT targets: `locator_labels`.

The phase loop (200 describer steps, 100 locator steps, a fresh snapshot and optimizer state at each
switch, 2400 steps) is `jaxvlm.methods.sc_tune_loop` (`jaxvlm sc-tune`).

Example:
    >>> prompt = describer_prompt([0.1, 0.2, 0.5, 0.6])    # '...<ref>This</ref><box>(99,199),(499,599)</box> is'
    >>> adv = caption_advantages(kl, mask, reward, baseline)
    >>> loss, stats = ppo_loss(logprob_new, logprob_old, adv, mask)
"""
from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

IMAGE_PLACEHOLDER = "VG_100K_2/4.jpg"          # the original's <img> path; the real image is passed beside it
BOX_PATTERN = r"\((\d+),(\d+)\),\((\d+),(\d+)\)</box>"


def box_to_qwen(box: Sequence[float]) -> list[int]:
    """A box normalised to [0, 1] (x1, y1, x2, y2 of the unpadded image) -> Qwen-VL's integers."""
    return [int(v * 999) for v in box]


def describer_prompt(box: Sequence[float], image: str = IMAGE_PLACEHOLDER) -> str:
    """The describer's raw prompt (no chat template): the model continues "... is" with the region's caption."""
    x1, y1, x2, y2 = box_to_qwen(box)
    return f"<img>{image}</img><ref>This</ref><box>({x1},{y1}),({x2},{y2})</box> is"


def locator_prompt(caption: str, box: Sequence[int] | None = None, image: str = IMAGE_PLACEHOLDER) -> str:
    """The locator's raw prompt for `caption`; with `box` (Qwen integers), the SFT target sequence."""
    text = f"<img>{image}</img><ref>{caption}</ref><box>"
    if box is not None:
        text += "({},{}),({},{})</box><|endoftext|>".format(*box)
    return text


def find_bbox(text: str, prefix: bool = True) -> list[int]:
    """The first ``<box>(x1,y1),(x2,y2)</box>`` in `text` (decoded with special tokens kept), else
    ``[0, 0, 0, 0]`` (IoU 0), as the original scores an unparsable answer."""
    m = re.search(("<box>" if prefix else "") + BOX_PATTERN, text)
    return [int(v) for v in m.groups()] if m else [0, 0, 0, 0]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`[B, 1]` IoU of boxes `[B, 4]` (x1, y1, x2, y2). The areas are not clamped, so a reversed predicted
    box gives what the original's formula gives."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return (inter / (union + np.float32(1e-7)))[:, None]


def token_mask(ids: Array, pad_id: int) -> Array:
    """`[B, T]` 1 on generated tokens that are not padding, plus the first padding position of each row
    that has one (Qwen-VL's EOS is its pad, so that is the EOS the model chose)."""
    mask = (ids != pad_id).astype(jnp.int32)
    first = jnp.argmin(mask, axis=1)
    has_pad = mask.sum(1) < mask.shape[1]
    return mask.at[jnp.arange(mask.shape[0]), first].max(has_pad.astype(jnp.int32))


def caption_advantages(kl: Array, mask: Array, reward: Array, reward_baseline: Array, kl_coef: float = 0.01,
                       gamma: float = 1.0) -> Array:
    """Per-token advantages `[B, T]` of the describer's sampled captions.

    kl: `[B, T]` log pi(current) - log pi(phase-start snapshot) of each caption token; mask: `token_mask`;
    reward, reward_baseline: `[B]` or `[B, 1]` IoUs of the sampled caption and of the snapshot's greedy one.
    Rewards are ``-kl_coef * kl`` (masked) with the IoU added on the last column; advantages are the
    discounted returns minus the baseline's returns, masked."""
    mask = mask.astype(jnp.float32)
    b, t = kl.shape
    last = jnp.zeros((b, t)).at[:, -1].set(1.0)
    rew = -kl_coef * kl * mask + jnp.reshape(reward, (b, 1)) * last
    base = jnp.reshape(reward_baseline, (b, 1)) * last
    discount = gamma ** jnp.maximum(jnp.arange(t)[None, :] - jnp.arange(t)[:, None], 0)   # [t, t'] for t' >= t
    upper = jnp.triu(jnp.ones((t, t)))
    returns = lambda r: r @ (upper * discount).T                                            # noqa: E731
    return (returns(rew) - returns(base)) * mask


def ppo_loss(logprob: Array, logprob_old: Array, advantages: Array, mask: Array, clip_range: float = 0.2,
             max_ratio: float = 10.0) -> tuple[Array, dict[str, Array]]:
    """The describer's clipped surrogate: mean over unmasked tokens of ``max(-A r, -A clip(r, 1 - c, 1 + c))``
    with ``r = exp(logprob - logprob_old)`` (masked); 0 when the mean ratio exceeds `max_ratio` (the batch
    is dropped). Returns (loss, {policy_kl, clip_frac, ratio}); all inputs `[B, T]`."""
    mask = mask.astype(jnp.float32)
    n = mask.sum()
    ratio = jnp.exp(logprob - logprob_old) * mask
    loss1 = -advantages * ratio
    loss2 = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = jnp.maximum(loss1, loss2).sum() / n
    mean_ratio = jax.lax.stop_gradient(ratio.sum() / n)
    stats = {"policy_kl": jax.lax.stop_gradient(((logprob_old - logprob) * mask).sum() / n),
             "clip_frac": jax.lax.stop_gradient((loss1 > loss2).astype(jnp.float32).sum() / n),
             "ratio": mean_ratio}
    return jnp.where(mean_ratio > max_ratio, 0.0, loss), stats


def locator_labels(ids: np.ndarray, pad_id: int, box_id: int) -> np.ndarray:
    """SFT labels `[B, T]` of right-padded `locator_prompt(caption, box)` sequences: -100 on the prompt up
    to and including its ``<box>`` and on padding after the first pad (the EOS)."""
    ids = np.asarray(ids)
    labels = np.where(np.asarray(token_mask(jnp.asarray(ids), pad_id)) > 0, ids, -100)
    for r, row in enumerate(ids):
        at = np.flatnonzero(row == box_id)
        if len(at) != 1:
            raise ValueError(f"locator target {r} has {len(at)} <box> tokens; the prompt ends at exactly one")
        labels[r, :at[0] + 1] = -100
    return labels
