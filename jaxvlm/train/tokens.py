"""Special tokens: add them to a tokenizer and grow the embedding / lm_head rows in the params.

New rows follow transformers 5's `resize_token_embeddings` default (`mean_resizing=True`): sampled
from N(mean, 1e-9 * covariance) of the existing rows (the mean alone when that covariance is not
positive definite). Same distribution as HF, not the same random draws. `init="normal"` gives
N(0, 0.02) rows instead. Whether the new rows train is an optimizer matter: `frozen_rows_rule`
gives the `OptimConfig.frozen_rows` entries that keep them fixed (REVERSE freezes them in LoRA runs).

Example:
    >>> new_ids = add_tokens(tokenizer, ["<SPAN>", "</CN>", "</UN>"])
    >>> cfg, params = grow_llava_vocab(cfg, params, len(tokenizer), jax.random.key(0), multiple_of=8)
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np

EMBED_PATH = "language_model/embed_tokens/embedding"     # [V, D]
HEAD_PATH = "language_model/lm_head/kernel"              # [D, V]


def add_tokens(tokenizer, tokens: Sequence[str], special: bool = True) -> list[int]:
    """Add tokens to a transformers tokenizer (no-op for ones already present); returns their ids."""
    tokenizer.add_tokens(list(tokens), special_tokens=special)
    return [int(tokenizer.convert_tokens_to_ids(t)) for t in tokens]


def new_rows(old_rows: np.ndarray, n_new: int, rng: jax.Array, init: str = "mean_cov") -> np.ndarray:
    """`[n_new, D]` rows for a table whose existing rows are `old_rows [V, D]`."""
    old = np.asarray(old_rows, np.float64)
    if init == "normal":
        return (0.02 * np.asarray(jax.random.normal(rng, (n_new, old.shape[1])))).astype(old_rows.dtype)
    if init != "mean_cov":
        raise ValueError(f"unknown new-token init {init!r}; known: mean_cov (HF default), normal")
    mean = old.mean(0)
    centered = old - mean
    cov = 1e-9 * (centered.T @ centered) / old.shape[0]
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:       # not positive definite (e.g. fewer rows than dims): HF uses the mean
        return np.repeat(mean[None], n_new, 0).astype(old_rows.dtype)
    z = np.asarray(jax.random.normal(rng, (n_new, old.shape[1])), np.float64)
    return (mean + z @ chol.T).astype(old_rows.dtype)


def grow_vocab(params: dict, new_vocab: int, rng: jax.Array, init: str = "mean_cov",
               embed_path: str = EMBED_PATH, head_path: str | None = HEAD_PATH) -> dict:
    """Params with the embedding (and untied lm_head) grown to `new_vocab` rows (a new tree)."""
    def get(path):
        node = params
        for p in path.split("/"):
            node = node[p]
        return node

    def put(tree, path, value):
        parts = path.split("/")
        tree = dict(tree)
        node = tree
        for p in parts[:-1]:
            node[p] = dict(node[p])
            node = node[p]
        node[parts[-1]] = value
        return tree

    emb = np.asarray(get(embed_path))
    n_new = new_vocab - emb.shape[0]
    if n_new < 0:
        raise ValueError(f"new vocab size {new_vocab} is smaller than the current {emb.shape[0]}")
    if n_new == 0:
        return params
    k1, k2 = jax.random.split(rng)
    out = put(params, embed_path, np.concatenate([emb, new_rows(emb, n_new, k1, init)], 0))
    if head_path is not None:
        try:
            head = np.asarray(get(head_path))
        except KeyError:
            head = None   # tied embeddings
        if head is not None:
            out = put(out, head_path, np.concatenate([head, new_rows(head.T, n_new, k2, init).T], 1))
    return out


def grow_llava_vocab(cfg, params: dict, n_tokens: int, rng: jax.Array, init: str = "mean_cov",
                     multiple_of: int = 1):
    """LLaVA config + params grown to hold `n_tokens` (rounded up to `multiple_of`, e.g. the tensor-
    parallel size so the vocab axis still shards)."""
    new_vocab = max(cfg.text.vocab_size, int(math.ceil(n_tokens / multiple_of) * multiple_of))
    params = grow_vocab(params, new_vocab, rng, init, head_path=None if cfg.text.tie_word_embeddings else HEAD_PATH)
    return cfg.replace(text=cfg.text.replace(vocab_size=new_vocab)), params


def frozen_rows_rule(token_ids: Sequence[int], prefix: str = "") -> tuple:
    """`OptimConfig.frozen_rows` entries that keep the given embedding / lm_head rows fixed.
    prefix: where the LLaVA params sit in the trainable tree (e.g. "base/" with LoRA)."""
    ids = tuple(int(i) for i in token_ids)
    return ((prefix + EMBED_PATH, 0, ids), (prefix + HEAD_PATH, 1, ids))
