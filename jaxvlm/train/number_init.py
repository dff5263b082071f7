"""Smooth initial embeddings for number tokens (box coordinates).

The shapes tokenizer gives every box coordinate " 0.00".." 1.00" its own token, so a freshly
initialised LM sees 101 unrelated vectors: that 0.41 is next to 0.42 must be learned value by value
from a few thousand boxes. Here each such token's input embedding and `lm_head` column start as a
fixed Fourier code of its value, `[cos(w_k v), sin(w_k v)]` at a few octave-spaced frequencies,
spread over the hidden size by one random orthonormal map and scaled to the init std. Then
neighbouring values share structure from step 0, and a hidden state proportional to code(v0) gives
`lm_head` logits that peak at v0 and fall off smoothly around it (a Dirichlet-like kernel), so a
coarse position estimate already ranks nearby coordinates first.

A small share of the random row is kept so that spellings of one value (" 0.42" and "0.42") stay
distinguishable.

Example:
    >>> ids, values = number_tokens(tok)                      # every "0.00".."1.00" that is one token
    >>> params = init_number_rows(params, ids, values, jax.random.key(0))
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def number_tokens(tokenizer: Any, decimals: int = 2, lo: float = 0.0, hi: float = 1.0) -> tuple[list[int], list[float]]:
    """Ids and values of every number `lo..hi` in steps of `10**-decimals`, with and without a leading
    space, that the tokenizer encodes as exactly one token."""
    ids, values = [], []
    n = round((hi - lo) * 10 ** decimals)
    for k in range(n + 1):
        v = lo + k / 10 ** decimals
        for text in (f"{v:.{decimals}f}", f" {v:.{decimals}f}"):
            enc = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(enc) == 1:
                ids.append(int(enc[0]))
                values.append(v)
    return ids, values


def fourier_code(values: np.ndarray, dim: int, key: jax.Array, octaves: int = 6) -> np.ndarray:
    """`[n]` values in [0, 1] -> `[n, dim]` codes with unit-variance entries (on average).

    Frequencies pi * 2**j, j < octaves: the lowest separates the ends of [0, 1], the highest turns
    by ~1 rad between neighbours 0.01 apart."""
    values = np.asarray(values, np.float64)
    w = np.pi * 2.0 ** np.arange(octaves)
    feats = np.concatenate([np.cos(values[:, None] * w), np.sin(values[:, None] * w)], axis=1)  # [n, 2F]
    if dim < feats.shape[1]:
        raise ValueError(f"hidden size {dim} is smaller than the {feats.shape[1]} Fourier features")
    q, _ = np.linalg.qr(np.asarray(jax.random.normal(key, (dim, feats.shape[1])), np.float64))  # [dim, 2F]
    code = feats @ q.T                                  # rows have norm sqrt(octaves)
    return (code * np.sqrt(dim / octaves)).astype(np.float32)


def init_number_rows(params: dict, ids: Sequence[int], values: Sequence[float], key: jax.Array,
                     keep_random: float = 0.3, octaves: int = 6) -> dict:
    """Overwrite the number tokens' rows of a Llava (or DecoderLM under `language_model`) param tree:
    `embed_tokens.embedding[id]` and, when untied, `lm_head.kernel[:, id]` become
    `std * (code(value) + keep_random * current_row / std)`, std = the matrix's own std."""
    if len(ids) != len(values):
        raise ValueError(f"need one value per id, got {len(ids)} ids and {len(values)} values")
    if not len(ids):
        raise ValueError("no number tokens: the tokenizer encodes none of '0.00'..'1.00' as a single token "
                         "(number_init is for tokenizers like jaxvlm.data.shapes_tokenizer's)")
    lm = params["language_model"] if "language_model" in params else params
    ids_a = np.asarray(ids)
    emb = np.array(lm["embed_tokens"]["embedding"])
    if ids_a.max() >= emb.shape[0]:
        raise ValueError(f"number token id {ids_a.max()} is outside the vocabulary ({emb.shape[0]})")
    code = fourier_code(np.asarray(values), emb.shape[1], key, octaves)
    std = emb.std()
    emb[ids_a] = std * code + keep_random * emb[ids_a]
    new_lm = dict(lm, embed_tokens=dict(lm["embed_tokens"], embedding=jnp.asarray(emb)))
    if "lm_head" in lm:
        kern = np.array(lm["lm_head"]["kernel"])        # [D, V]
        std = kern.std()
        kern[:, ids_a] = (std * code + keep_random * kern[:, ids_a].T).T
        new_lm["lm_head"] = dict(lm["lm_head"], kernel=jnp.asarray(kern))
    return dict(params, language_model=new_lm) if "language_model" in params else new_lm
