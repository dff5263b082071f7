"""UE, "Unleashing Region Understanding in Intermediate Layers" (NeurIPS 2024): layer-contrastive
decoding ("CYCD") and the cycle-consistency ranking that picks its layers.

Three parts, as the original code (Glupayy/unleash-eliminate) runs them:

- **Decoding** (`ue_hooks`, `contrast_scores`): at every step the final layer's next-token
  distribution is contrasted with an intermediate layer's logit lens (the LM head on that layer's
  hidden state, *without* the final norm): ``log p_final - log p_layer`` over the tokens the final
  layer finds plausible (DoLa's relative-top filter, alpha 0.1), then greedy. With several candidate
  layers the contrast layer is the one farthest from the final layer by Jensen-Shannon divergence,
  or, given a layer prior, a draw from ``softmax(softmax(JS) + prior)``.
- **Cycle-consistency ranking** (`cycle_rank`): each candidate caption of a region (one per layer)
  is segmented back by a referring-segmentation model; candidates are scored by their mask IoU's
  share of the candidates' total times the segmenter's own IoU prediction, and the best one is kept.
- **Layer prior** (`layer_prior`): each layer's share of the winning scores over a sample of
  regions; UE's PhD runs decode with it.

Layer indices follow transformers' ``hidden_states``: 0 is the embedding output, i the output of
decoder layer i. The engine's logit lens reads layers 0..n_layers all without the final norm (UE
uses 0..15 of Vicuna's 32); transformers' index n_layers is the post-norm state, so that one
index would differ. UE always takes the argmax of the contrasted scores, even when sampling is
on: decode with temperature 0 (the engine's default). Repetition penalty, if any, applies to the
contrasted scores, as in the original.

Differences from the original, both deliberate:
- the JS divergence, and so the layer choice, is per row; the original averages it over the batch
  and uses one layer for every row (identical at batch 1, which is how UE decodes);
- `mask_iou` counts pixels in int64; the original's histogram kept the ground-truth mask's uint8
  dtype and overflowed (its stored "iou" values run from 0.43 to 3745). `cycle_rank` takes any
  IoUs, so the stored values reproduce the released rankings exactly (tests/test_ue.py).

Example (the PhD setting: layers 0-7 with UE's prior, repetition penalty 1.05):
    >>> hooks = ue_hooks(range(8), prior=PHD_LAYER_PRIOR)
    >>> engine = Engine(model, batch_size=1, max_len=2048, hooks=hooks,
    ...                 sampler=SamplerConfig(repetition_penalty=1.05, eos_token_ids=(2,)))
    >>> out = engine.generate(params, batch, max_new_tokens=10)
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.generate.hooks import Hooks, StepOutputs

Array = jax.Array

#: The prior UE's PhD script decodes with (layers 0-7 of Osprey-7B; eval/run_with_prob/eval_phd.sh).
#: `layer_prior` on the released sampled captions (as the original calculate_prob.py does) gives these
#: to within 2e-5 (layer 4: 0.12349, layer 5: 0.12839; the rest equal to 5 decimals).
PHD_LAYER_PRIOR = (0.13899, 0.10750, 0.09652, 0.12360, 0.12347, 0.12838, 0.12860, 0.15291)


def js_divergence(final_logits: Array, layer_logits: Array) -> Array:
    """`[n, B]` the "Jensen-Shannon divergence" between the final distribution and each layer's, as
    DoLa and UE compute it with torch's ``kl_div(log p, m)``: ``0.5 * (KL(m || p) + KL(m || q))`` with
    ``m = (p + q) / 2`` (that argument order makes each term KL of the mixture *to* p), each term
    *averaged* over the vocabulary rather than summed, so values are ~1/V of a summed divergence.

    final_logits: `[B, V]`; layer_logits: `[n, B, V]`.
    """
    lf = jax.nn.log_softmax(final_logits.astype(jnp.float32), axis=-1)[None]
    lk = jax.nn.log_softmax(layer_logits.astype(jnp.float32), axis=-1)
    m = 0.5 * (jnp.exp(lf) + jnp.exp(lk))
    log_m = jnp.log(m)
    # torch's kl_div(input=log q, target=m) elementwise: m * (log m - log q), 0 where m == 0.
    kl = lambda lq: jnp.where(m > 0, m * (log_m - lq), 0.0).mean(-1)   # noqa: E731
    return 0.5 * (kl(lf) + kl(lk))


def relative_top_filter(final_logits: Array, base_logits: Array, relative_top: float = 0.1,
                        min_tokens_to_keep: int = 1) -> tuple[Array, Array]:
    """DoLa's plausibility filter. Both `[B, V]` -> log-softmaxed; where the final log-prob is under
    ``max + log(relative_top)`` (but never more than `min_tokens_to_keep` tokens' worth), the final
    score becomes -inf and the base score -1e-3."""
    lf = jax.nn.log_softmax(final_logits.astype(jnp.float32), axis=-1)
    lb = jax.nn.log_softmax(base_logits.astype(jnp.float32), axis=-1)
    kth = jax.lax.top_k(lf, min_tokens_to_keep)[0][..., -1]
    thresh = jnp.minimum(kth, lf.max(-1) + jnp.float32(np.log(relative_top)))[..., None]
    drop = lf < thresh
    return jnp.where(drop, -jnp.inf, lf), jnp.where(drop, jnp.float32(-1e-3), lb)


def layer_probabilities(js: Array, prior: Array) -> Array:
    """`[n, B]` UE's draw distribution over candidate layers: ``softmax(softmax(JS) + prior)`` over
    layers. At a real vocabulary the vocabulary-averaged JS is ~1e-5, the inner softmax ~uniform and the
    draw close to ``softmax(prior)``: nearly uniform, as in the original."""
    return jax.nn.softmax(jax.nn.softmax(js, axis=0) + prior[:, None], axis=0)


def contrast_scores(final_logits: Array, layer_logits: Array, *, prior: Array | None = None,
                    key: Array | None = None, relative_top: float = 0.1) -> tuple[Array, Array]:
    """One CYCD step. final_logits `[B, V]`, layer_logits `[n, B, V]` (the candidate layers' lens
    logits). Returns the contrasted scores `[B, V]` and the chosen candidate index `[B]`.

    One candidate: it is the contrast. Several: the one of largest JS divergence, or with `prior`
    (`[n]`) a draw from `layer_probabilities` using `key`.
    """
    n = layer_logits.shape[0]
    if n == 1:
        chosen = jnp.zeros(final_logits.shape[:1], jnp.int32)
    elif prior is None:
        chosen = jnp.argmax(js_divergence(final_logits, layer_logits), axis=0).astype(jnp.int32)
    else:
        if key is None:
            raise ValueError("a layer prior draws the contrast layer: pass a PRNG key")
        p = layer_probabilities(js_divergence(final_logits, layer_logits), jnp.asarray(prior, jnp.float32))
        chosen = jax.random.categorical(key, jnp.log(p), axis=0).astype(jnp.int32)
    base = jnp.take_along_axis(layer_logits, chosen[None, :, None], axis=0)[0]
    lf, lb = relative_top_filter(final_logits, base, relative_top)
    return lf - lb, chosen


def ue_hooks(layers: Iterable[int], *, prior: Sequence[float] | None = None, relative_top: float = 0.1) -> Hooks:
    """Engine hooks for UE decoding with these candidate layers (hidden-state indices, see above).

    prior: one weight per layer (UE's PhD prior: `PHD_LAYER_PRIOR` for layers 0-7), or None for the
    JS-argmax choice. Keep the engine's temperature at 0: UE decodes greedily.
    """
    layers = tuple(int(i) for i in layers)
    if not layers:
        raise ValueError("UE needs at least one candidate layer")
    if len(set(layers)) != len(layers):
        raise ValueError(f"candidate layers repeat: {layers}")
    if prior is not None:
        prior = tuple(float(p) for p in prior)
        if len(prior) != len(layers):
            raise ValueError(f"the layer prior has {len(prior)} weights for {len(layers)} candidate layers")
    if not 0.0 < relative_top <= 1.0:
        raise ValueError(f"relative_top must be in (0, 1], got {relative_top}")

    def rule(state, out: StepOutputs) -> Array:
        p = None if prior is None else jnp.asarray(prior, jnp.float32)
        return contrast_scores(out.logits, out.layer_logits, prior=p, key=out.rng, relative_top=relative_top)[0]

    return Hooks(lens_layers=layers, lens_norm=False, rule=rule)


def mask_iou(pred: np.ndarray, target: np.ndarray) -> float:
    """UE's region IoU: the mean of the background's and the foreground's IoU of two binary masks,
    each ``I / (U + 1e-5)``, and 1 for a class absent from both (``calculate_iou``)."""
    pred, target = np.asarray(pred).astype(bool), np.asarray(target).astype(bool)
    if pred.shape != target.shape:
        raise ValueError(f"mask shapes differ: predicted {pred.shape}, target {target.shape}")
    ious = []
    for p, t in ((~pred, ~target), (pred, target)):
        inter, union = np.count_nonzero(p & t), np.count_nonzero(p | t)
        ious.append(inter / (union + 1e-5) + (1.0 if union == 0 else 0.0))
    return float(np.mean(ious))


def cycle_rank(ious: np.ndarray, mask_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cycle-consistency scores of candidate captions. ious, mask_scores: `[N, k]` (N regions, k
    candidates each: the IoU of the mask segmented back from each caption with the region's, and the
    segmenter's predicted IoU). Returns the scores ``iou / sum(iou) * mask_score`` `[N, k]` and the
    best candidate of each region `[N]` (the first on ties, as Python's ``max``)."""
    ious, mask_scores = np.asarray(ious, np.float64), np.asarray(mask_scores, np.float64)
    if ious.shape != mask_scores.shape or ious.ndim != 2:
        raise ValueError(f"ious {ious.shape} and mask_scores {mask_scores.shape} must be the same [N, k]")
    scores = ious / ious.sum(-1, keepdims=True) * mask_scores
    return scores, scores.argmax(-1)


def layer_prior(candidates: Sequence[Mapping], group: int = 4, layers: Sequence[int] | None = None) -> dict[int, float]:
    """UE's layer prior from ranked candidates (``calculate_prob.py``): rows in consecutive groups of
    `group` (one region's candidates), each row with ``layer``, ``iou`` and ``sam_score``; each region's
    winner (`cycle_rank`) adds its score to its layer's; the prior is each layer's share of the total.
    Layers that never win get 0 when listed in `layers`, else are absent (as in the original)."""
    if len(candidates) % group:
        raise ValueError(f"{len(candidates)} candidates do not split into groups of {group}")
    rows = [candidates[i:i + group] for i in range(0, len(candidates), group)]
    scores, best = cycle_rank([[r["iou"] for r in g] for g in rows], [[r["sam_score"] for r in g] for g in rows])
    totals: dict[int, float] = {int(i): 0.0 for i in (layers or ())}
    for g, s, b in zip(rows, scores, best):
        layer = int(g[b]["layer"])
        totals[layer] = totals.get(layer, 0.0) + float(s[b])
    whole = sum(totals.values())
    return {k: v / whole for k, v in sorted(totals.items())}
