"""PNG pictures researchers would rather look at than print: attention over the image, logit lens.

Example:
    >>> save_attention_overlay(image_hwc_uint8, attn_over_patches, (24, 24), "attn.png")
    >>> save_logit_lens_heatmap(lens_logits, token_strings, "lens.png", decode=tok.convert_ids_to_tokens)
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_attention_overlay(image: np.ndarray, attn: np.ndarray, grid: tuple[int, int], path: str,
                           title: str = "attention to image patches",
                           box: Sequence[float] | None = None) -> str:
    """image `[H, W, 3]` uint8; attn: `[gh*gw]` weights over the image patches (row-major); box: an
    optional (x1, y1, x2, y2) in image pixels drawn on the overlay (e.g. JUDGER's crop)."""
    plt = _plt()
    gh, gw = grid
    a = np.asarray(attn, np.float64).reshape(gh, gw)
    a = (a - a.min()) / max(a.max() - a.min(), 1e-12)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(image)
    axes[1].imshow(a, cmap="jet", alpha=0.5, extent=(0, image.shape[1], image.shape[0], 0), interpolation="bilinear")
    if box is not None:
        x1, y1, x2, y2 = box
        axes[1].add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white", linewidth=2))
    axes[1].set_title(title)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_logit_lens_heatmap(layer_logits: np.ndarray, tokens: Sequence[str], path: str,
                            decode: Callable[[Sequence[int]], Sequence[str]] | None = None,
                            title: str = "logit lens: top-1 probability per layer") -> str:
    """layer_logits: `[L+1, T, V]` (one row per layer). Cells show the top-1 token (if `decode`)
    coloured by its probability; columns are the input positions labelled with `tokens`."""
    plt = _plt()
    x = np.asarray(layer_logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(-1, keepdims=True)
    top, conf = p.argmax(-1), p.max(-1)
    n_layers, t = conf.shape
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * t), max(4, 0.4 * n_layers)))
    im = ax.imshow(conf, aspect="auto", cmap="viridis", origin="lower", vmin=0, vmax=1)
    if decode is not None:
        for li in range(n_layers):
            words = decode(list(top[li]))
            for ti in range(t):
                ax.text(ti, li, str(words[ti])[:8], ha="center", va="center", fontsize=6, color="white")
    ax.set_xticks(range(t))
    ax.set_xticklabels([str(s)[:10] for s in tokens], rotation=60, fontsize=7)
    ax.set_ylabel("layer (0 = embeddings)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
