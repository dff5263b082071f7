"""Two stand-ins for what a from-scratch VLM's LM lacks: a lookup circuit and word-like image tokens.

Real LLaVA starts from a pretrained LM. That LM already finds the item of its context that matches a
word of the question. Its stage-1 projector maps image patches near the words that describe them. A
4-layer LM trained from random on the shapes world learns neither in the demo's budget. "Is there a
star?" needs two hops: the answer position has to fetch the asked-for noun a few tokens back and match
it against the context. Neither hop gets a gradient before the other exists, so the loss sits at ln 2
for thousands of questions (docs/shapes_world_recipe.md, "what blocks the query tasks").

- `pretrain_lookup`: the LM alone, on text. "Objects: red circle, blue star. Is there a star in the
  image?" -> yes / no, one question per sample, large batches. The recipe's LM shape gets past the
  plateau in ~300-400 steps at batch 64.
- `align_projector`: with the tower frozen, regress each patch's image token onto the LM's embeddings
  of the colour word plus the category word of the object covering it (zero for background), from
  the dense-vision mask targets. Image tokens then look like the words the lookup learned to match.

Example:
    >>> lm_params, hist = pretrain_lookup(lc.text, tok, vocab.COLOUR_NAMES, vocab.CATEGORIES, steps=600)
    >>> proj, hist = align_projector(Llava(lc), params | {"language_model": lm_params}, targets, tok,
    ...                              vocab.COLOUR_NAMES, vocab.CATEGORIES)
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxvlm.models.llama import DecoderLM, LMConfig
from jaxvlm.models.params import init_params

PROMPT = "<s>USER: Objects: {objects}.\nIs there a {noun} in the image? ASSISTANT:"


def word_id(tokenizer: Any, word: str) -> int:
    """The one token of `" " + word`; a word the tokenizer splits is an error that names it."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{word!r} is {len(ids)} tokens with a leading space; the lookup stage needs one-token words")
    return int(ids[0])


def lookup_batch(tokenizer: Any, colours: Sequence[str], nouns: Sequence[str], rng: np.random.Generator,
                 batch: int, max_len: int, max_objects: int = 6) -> dict[str, np.ndarray]:
    """`batch` text questions: 1..`max_objects` distinct nouns with random colours, half asked about a
    listed noun (answer " yes"), half about an absent one (" no"), right-padded to `max_len`.
    Returns input_ids / attention_mask `[B, max_len]`, last (the answer position) and answer ids `[B]`."""
    if len(nouns) < 2:
        raise ValueError("the lookup stage needs at least two nouns (one listed, one absent)")
    yes, no = word_id(tokenizer, "yes"), word_id(tokenizer, "no")
    ids = np.zeros((batch, max_len), np.int32)
    mask = np.zeros((batch, max_len), np.int32)
    last, answer = np.zeros(batch, np.int32), np.zeros(batch, np.int32)
    for i in range(batch):
        n = int(rng.integers(1, min(max_objects, len(nouns) - 1) + 1))
        listed = rng.choice(len(nouns), size=n, replace=False)
        objects = ", ".join(f"{colours[rng.integers(len(colours))]} {nouns[j]}" for j in listed)
        if rng.random() < 0.5:
            noun, answer[i] = nouns[listed[rng.integers(n)]], yes
        else:
            absent = np.setdiff1d(np.arange(len(nouns)), listed)
            noun, answer[i] = nouns[absent[rng.integers(len(absent))]], no
        row = tokenizer(PROMPT.format(objects=objects, noun=noun), add_special_tokens=False)["input_ids"]
        if len(row) > max_len:
            raise ValueError(f"a lookup question is {len(row)} tokens, longer than max_len={max_len}")
        ids[i, :len(row)], mask[i, :len(row)], last[i] = row, 1, len(row) - 1
    return {"input_ids": ids, "attention_mask": mask, "last": last, "answer": answer}


def _answer_loss(logits: jax.Array, last: jax.Array, answer: jax.Array, yes: int, no: int):
    at = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]          # [B, V]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(at), answer[:, None], axis=1).mean()
    acc = ((at[:, yes] > at[:, no]) == (answer == yes)).mean()
    return nll, acc


def pretrain_lookup(cfg: LMConfig, tokenizer: Any, colours: Sequence[str], nouns: Sequence[str], *,
                    steps: int = 600, batch: int = 64, lr: float = 1e-3, warmup: int = 50, max_len: int = 40,
                    seed: int = 0, eval_every: int = 100, progress: bool = True) -> tuple[dict, list[dict]]:
    """Train a fresh `DecoderLM(cfg)` on text lookup questions (answer token only).

    Returns (LM params, history of {step, loss, heldout_acc} every `eval_every` steps, on 512 held-out
    questions). The params drop into a `Llava` tree as `language_model`."""
    yes, no = word_id(tokenizer, "yes"), word_id(tokenizer, "no")
    model = DecoderLM(cfg)
    rng = np.random.default_rng(seed)
    held = {k: jnp.asarray(v) for k, v in lookup_batch(tokenizer, colours, nouns, np.random.default_rng(seed + 1),
                                                        512, max_len).items()}
    params = jax.jit(lambda k: init_params(model, k, held["input_ids"][:1]))(jax.random.key(seed))
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.05), weight_decay=0.01))
    state = opt.init(params)

    def loss_fn(p, b):
        logits = model.apply({"params": p}, b["input_ids"], attention_mask=b["attention_mask"]).logits
        return _answer_loss(logits, b["last"], b["answer"], yes, no)

    @jax.jit
    def step(p, s, b):
        (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(p, b)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    evaluate = jax.jit(loss_fn)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, desc="lookup pretrain", dynamic_ncols=True)
    history, t0, losses = [], time.time(), []
    for i in range(1, steps + 1):
        b = {k: jnp.asarray(v) for k, v in lookup_batch(tokenizer, colours, nouns, rng, batch, max_len).items()}
        params, state, loss = step(params, state, b)
        losses.append(loss)
        if i % eval_every == 0 or i == steps:
            _, acc = evaluate(params, held)
            history.append({"step": i, "loss": float(np.mean(jax.device_get(losses))), "heldout_acc": float(acc),
                            "seconds": round(time.time() - t0, 1)})
            losses = []
            if bar:
                bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", acc=f"{history[-1]['heldout_acc']:.2f}")
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return jax.device_get(params), history


def align_projector(model: Any, params: dict, targets: Any, tokenizer: Any, colours: Sequence[str],
                    nouns: Sequence[str], *, steps: int = 400, batch: int = 64, lr: float = 1e-3,
                    seed: int = 0) -> tuple[dict, list[dict]]:
    """Fit `params["multi_modal_projector"]` so each patch's image token approximates the LM's input
    embedding of " <colour>" + " <noun>" of the object covering it (zero for background).

    model: a `Llava` module; params: its tree with the trained tower and LM (only the projector moves);
    targets: `dense_vision.DenseTargets` whose category / colour indices follow `nouns` / `colours`
    (index len(...) = background). Returns (projector params, history with the mean squared error and
    the targets' mean energy, whose ratio is the share left unexplained)."""
    if (targets.num_categories, targets.num_colours) != (len(nouns), len(colours)):
        raise ValueError(f"targets index {targets.num_categories} categories and {targets.num_colours} colours, but "
                         f"{len(nouns)} nouns and {len(colours)} colours were given: the word rows would not line up")
    emb = np.asarray(params["language_model"]["embed_tokens"]["embedding"], np.float32)
    zero = np.zeros((1, emb.shape[1]), np.float32)
    noun_rows = np.concatenate([emb[[word_id(tokenizer, w) for w in nouns]], zero])
    colour_rows = np.concatenate([emb[[word_id(tokenizer, w) for w in colours]], zero])
    want = noun_rows[targets.category] + colour_rows[targets.colour]                 # [N, P, D]
    if want.shape[1] != model.cfg.tokens_per_image:
        raise ValueError(f"targets have {want.shape[1]} patches per image, the model {model.cfg.tokens_per_image} "
                         "image tokens")
    frozen = {k: v for k, v in params.items() if k != "multi_modal_projector"}
    opt = optax.adam(lr)
    proj = params["multi_modal_projector"]
    state = opt.init(proj)

    def loss_fn(p, pixels, tgt):
        feats, _ = model.apply({"params": {**frozen, "multi_modal_projector": p}}, pixels, method="encode_images")
        return jnp.mean(jnp.sum((feats - tgt) ** 2, -1))

    @jax.jit
    def step(p, s, pixels, tgt):
        loss, g = jax.value_and_grad(loss_fn)(p, pixels, tgt)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    rng = np.random.default_rng(seed)
    energy = float(np.mean(np.sum(want ** 2, -1)))
    probe = rng.integers(0, len(want), min(batch, len(want)))
    history = [{"step": 0, "mse": float(jax.jit(loss_fn)(proj, jnp.asarray(targets.pixels[probe]),
                                                          jnp.asarray(want[probe]))), "target_energy": energy}]
    for i in range(1, steps + 1):
        idx = rng.integers(0, len(want), min(batch, len(want)))
        proj, state, loss = step(proj, state, jnp.asarray(targets.pixels[idx]), jnp.asarray(want[idx]))
        if i % 100 == 0 or i == steps:
            history.append({"step": i, "mse": float(loss), "target_energy": energy})
    return jax.device_get(proj), history
