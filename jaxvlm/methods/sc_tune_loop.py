"""SC-Tune's phase loop: one VLM tuned as describer (PPO) and locator (SFT) in turns.

The pieces (prompts, box parsing, IoU, advantages, the clipped loss, the locator's labels) live in
`jaxvlm.methods.sc_tune`; who plays the two roles (prompts, box text, batches) in
`jaxvlm.methods.sc_tune_roles`: Qwen-VL-Chat as the original (the default), or a chat-template
VLM such as LLaVA (`ChatRoles`). This module runs them as the original trainer does
(ivattyue/SC-Tune, ``transformers/trainer.py`` L549-566, L1955-2260, L755-777):

- **Describer phase** (`caption_steps` batches): the policy samples a caption of each box (top-k 100,
  top-p 0.3, temperature 1, 3-30 new tokens); the *snapshot* locates it greedily and the IoU with the
  box is the reward; the snapshot's own greedy describe-then-locate IoU is the baseline. Per-token
  log-probs of the caption under the policy and the snapshot (teacher-forced, no grad) give the KL
  penalty; then `ppo_epochs` clipped-surrogate updates, stopping early when the policy KL of an
  update exceeds `early_stop_kl`.
- **Locator phase** (`bbox_steps` batches): the snapshot describes each box greedily, and the policy
  is trained by cross-entropy to answer that caption with the ground-truth box. The policy's own
  locate IoU is computed for the log only.
- **At each switch** the snapshot becomes a copy of the policy (it is both the KL reference and the
  other half of the cycle), the optimizer state is cleared and the phase's constant learning rate set.
- AdamW (beta2 0.95, weight decay 0.1 on matrices, global-norm clip 1.0), constant learning rates
  5e-7 (describer) and 1e-6 (locator); the ViT is frozen except its resampler (`attn_pool`), as the
  original's ``fix_vit`` (a LLaVA's vision tower is frozen and its projector trains). Training stops
  once the global step exceeds `max_steps` (the original checks ``global_step > 2400`` after the
  increment, so it runs 2401 batches).

Quirks kept (Qwen-VL-Chat): the teacher-forced log-probs attend to the prompts' left padding (the
original passes an all-ones attention mask there; `attend_left_pads=False` masks it as generation
does; `ChatRoles` always masks it, as their positions skip it), they are
taken in eval mode and the PPO forward in train mode (no logn / dynamic NTK; inert below the
model's ``seq_length``), the reward sits on the last column of the padded generation, and rewards
and advantages are not normalised. Departures: the engine never emits image tokens (Qwen-VL's
`<img>`, `</img>`, `<imgpad>`, LLaVA's `<image>`: one sampled by a random or broken model would make
the next forward read a bogus image span; a trained model does not emit them); the KL averages the
original logs in the locator phase are not computed (they feed nothing); an unreadable image stops
the run with its path (the original silently swaps in a random record).

Sharding: params, the snapshot and the optimizer state are laid out by the logical-axis rules on
the mesh (`jaxvlm.train.sharding`), the update steps are `make_train_step` steps, and every batch
is split over the data-parallel axes, so the batch size must divide by them.

Example:
    >>> cfg, params = jaxvlm.conversion.qwen_vl.load_original("Qwen-VL-Chat/", dtype=np.float32)
    >>> tok = QwenTokenizer.from_dir("Qwen-VL-Chat/")
    >>> tuner = SCTune(QwenVL(cfg), params, tok, SCTuneConfig(max_steps=1200), batch_size=16)
    >>> summary = tuner.train(read_box_records("object365.json"), "images/", out_dir="out/sc_tune")
    >>> llava = SCTune(Llava(cfg), params, tok, roles=ChatRoles(Llava(cfg), tok, proc, "vicuna_v1"))
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxvlm.data.image_processing import load_image
from jaxvlm.generate import Engine, SamplerConfig
from jaxvlm.generate.engine import Generation
from jaxvlm.generate.hooks import Hooks
from jaxvlm.jsonio import read_json_or_jsonl
from jaxvlm.methods.sc_tune import caption_advantages, ppo_loss
from jaxvlm.methods.sc_tune_roles import QwenVLChatRoles
from jaxvlm.models.params import logical_axes
from jaxvlm.train import mesh as M
from jaxvlm.train import optim as O
from jaxvlm.train import sharding as S
from jaxvlm.train import state as ST
from jaxvlm.train.step import StepShardings, make_train_step, token_loss

Array = jax.Array
PROMPT_BUCKET = 32          # prompt / target widths are padded to multiples of this (one compile each)


@dataclasses.dataclass(frozen=True)
class SCTuneConfig:
    """The original's settings (`scripts/finetune_ds.sh`, `trainer.py`, `trainer_utils.py`)."""

    caption_steps: int = 200        # describer (PPO) batches per phase
    bbox_steps: int = 100           # locator (SFT) batches per phase
    max_steps: int = 2400           # stop once the global step exceeds this (2401 batches)
    caption_lr: float = 5e-7
    bbox_lr: float = 1e-6
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    kl_coef: float = 0.01
    gamma: float = 1.0
    ppo_epochs: int = 2
    clip_range: float = 0.2
    max_ratio: float = 10.0         # a batch whose mean ratio exceeds this is dropped (loss 0)
    early_stop_kl: float = 1.5      # stop the PPO epochs once an update's policy KL exceeds this
    caption_new_tokens: int = 30
    box_new_tokens: int = 20
    min_new_tokens: int = 3
    top_k: int = 100
    top_p: float = 0.3
    temperature: float = 1.0
    train_vit: bool = False         # False = the original's fix_vit: only the resampler of the ViT trains
    attend_left_pads: bool = True   # the original's all-ones mask in its teacher-forced log-probs
    seed: int = 0

    def __post_init__(self):
        for name in ("caption_steps", "bbox_steps", "ppo_epochs", "caption_new_tokens", "box_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")


# ----------------------------------------------------------------------------- data


def read_box_records(path: str | os.PathLike) -> list[dict]:
    """The original's ``object365.json``: a JSON list (or JSONL) of ``{"image_id": file under the image
    root, "bbox": [x1, y1, x2, y2]}`` with corners normalised to [0, 1] of the unpadded image."""
    records = read_json_or_jsonl(path, "SC-Tune data")
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty list of {{'image_id', 'bbox'}} records")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "image_id" not in r or "bbox" not in r:
            raise ValueError(f"{path}: record {i} needs 'image_id' and 'bbox', got {r!r}")
        b = r["bbox"]
        if (not isinstance(b, (list, tuple)) or len(b) != 4
                or not all(isinstance(v, (int, float)) for v in b)
                or not (0.0 <= b[0] < b[2] <= 1.0 and 0.0 <= b[1] < b[3] <= 1.0)):
            raise ValueError(f"{path}: record {i} ({r['image_id']}) has bbox {b!r}; expected [x1, y1, x2, y2] "
                             f"normalised to [0, 1] with x1 < x2 and y1 < y2")
    return records


def batches(records: Sequence[dict], batch_size: int, seed: int) -> Iterator[list[dict]]:
    """Shuffled batches, epoch after epoch (a short last batch is dropped, as the rows must divide the mesh)."""
    if len(records) < batch_size:
        raise ValueError(f"{len(records)} records cannot fill one batch of {batch_size}")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(records))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [records[j] for j in order[i:i + batch_size]]


# ----------------------------------------------------------------------------- jitted pieces


def _ban_tokens(ids: tuple[int, ...], state, out) -> Array:
    return out.logits.at[:, jnp.asarray(ids)].set(-jnp.inf)


@functools.lru_cache(maxsize=None)
def banning_hooks(ids: tuple[int, ...]) -> Hooks:
    """Hooks that never let the engine choose `ids` (one object per id set, so engines share compiles)."""
    return Hooks(rule=functools.partial(_ban_tokens, ids))


def teacher_forced_logprobs(model: Any, params: Any, batch: Mapping[str, Array], **model_kwargs) -> Array:
    """`[B, G]` log-probs of the generated tokens `input_ids[:, -G:]` (G = `gen_mask`'s width) given
    what precedes them (`model_kwargs`: the roles' `forward_kwargs`). Only the generated span goes
    through the LM head."""
    ids = batch["input_ids"]
    g = batch["gen_mask"].shape[1]
    out = model.apply({"params": params}, ids, batch["pixel_values"], attention_mask=batch["attention_mask"],
                      logits="none", **model_kwargs)
    h = out.final_hidden[:, -g - 1:-1]
    logits = model.apply({"params": params}, h, False, method="logit_lens").astype(jnp.float32)
    lp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(lp, ids[:, -g:, None], axis=-1)[..., 0]


def ppo_loss_fn(model: Any, roles: Any, clip_range: float, max_ratio: float):
    """`make_train_step` loss: the describer's clipped surrogate on a rollout batch."""
    def loss_fn(params, batch, rng):
        lp = teacher_forced_logprobs(model, params, batch, **roles.forward_kwargs(batch["positions"], train=True))
        return ppo_loss(lp, batch["logprob_old"], batch["advantages"], batch["gen_mask"], clip_range, max_ratio)
    return loss_fn


def sft_loss_fn(model: Any, roles: Any):
    """`make_train_step` loss: the locator's cross-entropy on right-padded caption -> box targets. Only
    the answer window goes through the LM head (`window_start [B]`: the position predicting each row's
    first target; `window_labels [B, K]`, -100 past a row's targets): the same loss as the full-sequence
    shifted cross-entropy, without `[B, T, vocab]` logits."""
    def loss_fn(params, batch, rng):
        out = model.apply({"params": params}, batch["input_ids"], batch["pixel_values"],
                          attention_mask=batch["attention_mask"], logits="none",
                          **roles.forward_kwargs(None, train=True))
        k = batch["window_labels"].shape[1]
        idx = batch["window_start"][:, None] + jnp.arange(k)[None]
        h = jnp.take_along_axis(out.final_hidden, jnp.minimum(idx, out.final_hidden.shape[1] - 1)[..., None], axis=1)
        return token_loss(model.apply({"params": params}, h, False, method="logit_lens"), batch["window_labels"])
    return loss_fn


def answer_window(labels: np.ndarray, multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(`window_start [B]`, `window_labels [B, K]`) of `[B, T]` labels whose supervised tokens form one
    run per row: K is the longest run rounded up to `multiple` (one compile per size)."""
    valid = labels >= 0
    if not valid.any(axis=1).all():
        raise ValueError("every row needs at least one supervised token")
    first = valid.argmax(axis=1)
    count = valid.sum(axis=1)
    k = -(-int(count.max()) // multiple) * multiple
    window = np.full((labels.shape[0], k), -100, np.int32)
    for r, (a, n) in enumerate(zip(first, count)):
        if not valid[r, a:a + n].all():
            raise ValueError(f"row {r}'s supervised tokens are not one contiguous run")
        window[r, :n] = labels[r, a:a + n]
    return (first - 1).astype(np.int32), window


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class Rollout:
    """One describe -> locate pass: captions (text), their tokens `[B, n]` (pad after EOS), the
    located boxes (in the roles' box space: Qwen integers, a LLaVA's fractions) and IoU `[B]` with
    the input boxes."""

    captions: list[str]
    caption_tokens: np.ndarray
    boxes: list[list[float]]
    iou: np.ndarray


class SCTune:
    """The phase loop over one model. `params` may be host arrays; they are placed on the mesh.

    roles: who plays describer and locator (`jaxvlm.methods.sc_tune_roles`); default the original's
        Qwen-VL-Chat roles for a `QwenVL` and its `QwenTokenizer`.
    batch_size: rows per global step (the original: 16 per GPU x 8); must divide by the mesh's
        data-parallel size. mesh: default all devices on the fsdp axis.
    max_len: decode cache slots: a prompt (the image tokens, the box or the caption) plus its answer.
    """

    def __init__(self, model: Any, params: Any, tokenizer: Any, cfg: SCTuneConfig = SCTuneConfig(), *,
                 roles: Any = None, batch_size: int = 16, mesh: Mesh | None = None, rules: S.Rules | None = None,
                 max_len: int = 512, compiler_options: dict | None = None):
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.roles = roles = roles if roles is not None else QwenVLChatRoles(model, tokenizer)
        self.mesh = mesh if mesh is not None else M.make_mesh(M.MeshConfig())
        self.rules = rules if rules is not None else S.make_rules("fsdp_tp")
        dp = M.data_parallel_size(self.mesh)
        if batch_size % dp:
            raise ValueError(f"batch_size={batch_size} is not divisible by the mesh's data-parallel size {dp} "
                             f"(data={self.mesh.shape['data']} x fsdp={self.mesh.shape['fsdp']})")
        self.batch_size, self.max_len = int(batch_size), int(max_len)
        sampler = SamplerConfig(top_k=cfg.top_k, top_p=cfg.top_p, min_new_tokens=cfg.min_new_tokens,
                                eos_token_ids=tuple(roles.eos_ids), pad_token_id=roles.pad_id)
        # Greedy rows skip the warpers, so one engine serves the sampled describer and the greedy roles.
        self.engine = Engine(model, batch_size=self.batch_size, max_len=self.max_len, sampler=sampler,
                             hooks=banning_hooks(tuple(roles.ban_ids)), positions=roles.engine_positions,
                             buckets=tuple(range(PROMPT_BUCKET, self.max_len + 1, PROMPT_BUCKET)))

        logical = logical_axes(model, *roles.example_inputs)
        abstract = jax.eval_shape(lambda p: p, params)
        pattern = roles.frozen(cfg.train_vit)
        frozen = () if pattern is None else (O.Group("fixed_vit", pattern, None),)
        self.optimizers = {
            phase: O.make_optimizer(O.OptimConfig(groups=frozen, default_lr=lr, schedule="constant", b1=cfg.b1,
                                                  b2=cfg.b2, weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm),
                                    abstract)
            for phase, lr in (("caption", cfg.caption_lr), ("bbox", cfg.bbox_lr))}
        self.param_sh = S.param_shardings(logical, abstract, self.mesh, self.rules)
        self.state_sh = ST.state_shardings(self.param_sh, abstract, self.optimizers["caption"], self.mesh)
        shardings = StepShardings(self.mesh, self.rules, self.state_sh)
        self.steps = {
            "caption": make_train_step(ppo_loss_fn(model, roles, cfg.clip_range, cfg.max_ratio),
                                       self.optimizers["caption"], shardings, compiler_options=compiler_options),
            "bbox": make_train_step(sft_loss_fn(model, roles), self.optimizers["bbox"], shardings,
                                    compiler_options=compiler_options)}
        self._new_state = {phase: jax.jit(lambda p, o=opt: ST.create_train_state(p, o, jax.random.key(cfg.seed)),
                                          out_shardings=self.state_sh) for phase, opt in self.optimizers.items()}
        self._copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=self.param_sh)
        self._logprobs = jax.jit(
            lambda p, b, n: teacher_forced_logprobs(model, p, b, **roles.forward_kwargs(b["positions"], train=False,
                                                                                        ntk_seq_len=n)),
            compiler_options=compiler_options)
        self.restart(params)

    def restart(self, params: Any, phase: str = "caption", global_step: int = 0) -> None:
        """Start (again) from `params` at the beginning of `phase`: fresh optimizer, snapshot = params."""
        if phase not in self._new_state:
            raise ValueError(f"phase must be 'caption' or 'bbox', got {phase!r}")
        self.phase, self.phase_step, self.global_step = phase, 0, int(global_step)
        self.state = self._new_state[phase](jax.device_put(params, self.param_sh))
        self.snapshot = self._copy(self.state.params)

    # --------------------------------------------------------------- rollouts

    def _shard(self, batch: Mapping[str, np.ndarray]) -> dict:
        return S.shard_batch(dict(batch), self.mesh)

    def generate(self, params, batch: Mapping[str, np.ndarray], max_new: int, temperature: float,
                 rng: int) -> Generation:
        """`tokens [B, n]`: new tokens (EOS-padded after the first EOS; n = the longest answer, as HF's)."""
        with S.sharding_context(self.mesh, self.rules):
            return self.engine.generate(params, batch, max_new_tokens=max_new, temperature=temperature, rng=rng)

    def describe(self, params, images, boxes, *, sample: bool, rng: int = 0) -> tuple[dict, Generation, list[str]]:
        """(prompt batch, generation, captions) of each box (normalised corners) on its image."""
        batch = self.roles.describe_batch(images, boxes)
        gen = self.generate(params, batch, self.cfg.caption_new_tokens,
                            self.cfg.temperature if sample else 0.0, rng)
        return batch, gen, [self.roles.caption(row) for row in gen.tokens.tolist()]

    def locate(self, params, images, captions: Sequence[str]) -> list[list[float]]:
        """Greedy boxes (the roles' box space) for the captions; `[0, 0, 0, 0]` where none parses."""
        batch = self.roles.locate_batch(images, captions)
        return self.roles.found_boxes(batch, self.generate(params, batch, self.cfg.box_new_tokens, 0.0, 0).tokens)

    def cycle(self, describer, locator, images, boxes, *, sample: bool, rng: int = 0) -> tuple[dict, Rollout]:
        """describe with `describer` -> locate with `locator` -> IoU with the input boxes."""
        batch, gen, caps = self.describe(describer, images, boxes, sample=sample, rng=rng)
        found = self.locate(locator, images, caps)
        return batch, Rollout(caps, gen.tokens, found, self.roles.iou(found, boxes, images))

    def rollout_batch(self, prompt: Mapping[str, np.ndarray], tokens: np.ndarray) -> tuple[dict, int]:
        """Prompt + generated tokens laid out for teacher forcing: `[B, Pb + G]` with the prompt
        left-padded to a bucket (the extra columns masked and not counted in the positions) and the
        tokens right-padded with the roles' pad (EOS) to G = `caption_new_tokens`. Positions are
        the engine's: Qwen-VL-Chat's count the prompt's own left pads, a chat model's only real
        tokens. Returns (batch, original width)."""
        ids, mask = np.asarray(prompt["input_ids"]), np.asarray(prompt["attention_mask"])
        b, p = ids.shape
        w, g = tokens.shape[1], self.cfg.caption_new_tokens
        pb = -(-p // PROMPT_BUCKET) * PROMPT_BUCKET
        pad = self.roles.pad_id
        full = np.full((b, pb + g), pad, np.int32)
        full[:, pb - p:pb] = ids
        full[:, pb:pb + w] = tokens
        att = np.zeros((b, pb + g), np.int32)
        slots = self.roles.engine_positions == "slots"
        att[:, pb - p:pb] = 1 if slots and self.cfg.attend_left_pads else mask
        att[:, pb:pb + w] = 1
        if slots:
            positions = np.broadcast_to(np.arange(pb + g, dtype=np.int32) - (pb - p), (b, pb + g)).copy()
        else:
            positions = np.maximum(np.cumsum(att, axis=1, dtype=np.int32) - 1, 0)
        gen = np.full((b, g), pad, np.int32)
        gen[:, :w] = tokens
        return dict(input_ids=full, attention_mask=att, positions=positions,
                    pixel_values=np.asarray(prompt["pixel_values"]), gen_mask=self.roles.gen_mask(gen)), p + w

    # --------------------------------------------------------------- the two phases

    def describer_step(self, images, boxes, rng: int) -> dict:
        cfg = self.cfg
        policy = self.state.params
        prompt, roll = self.cycle(policy, self.snapshot, images, boxes, sample=True, rng=rng)
        _, base = self.cycle(self.snapshot, self.snapshot, images, boxes, sample=False)
        tf, width = self.rollout_batch(prompt, roll.caption_tokens)
        sharded = self._shard(tf)
        n = jnp.asarray(width, jnp.int32)
        lp_old = np.asarray(self._logprobs(policy, sharded, n))
        lp_ref = np.asarray(self._logprobs(self.snapshot, sharded, n))
        mask = tf["gen_mask"].astype(np.float32)
        kl = (lp_old - lp_ref) * mask
        w = roll.caption_tokens.shape[1]
        # the reward goes on the last column of the padded generation (width w, as the original's)
        adv = np.zeros_like(kl)
        adv[:, :w] = np.asarray(caption_advantages(jnp.asarray(kl[:, :w]), jnp.asarray(mask[:, :w]),
                                                   jnp.asarray(roll.iou), jnp.asarray(base.iou),
                                                   cfg.kl_coef, cfg.gamma))
        tf.update(logprob_old=lp_old.astype(np.float32), advantages=adv.astype(np.float32))
        out = dict(reward=float(roll.iou.mean()), baseline=float(base.iou.mean()),
                   caption_kl=float(kl.sum() / max(mask.sum(), 1.0)), ppo_updates=0)
        for epoch in range(cfg.ppo_epochs):
            self.state, m = self.steps["caption"](self.state, self._shard(tf))
            self._check_finite(m)
            out.update(ppo_updates=epoch + 1, loss=float(m["loss"]), policy_kl=float(m["policy_kl"]),
                       clip_frac=float(m["clip_frac"]), ratio=float(m["ratio"]), grad_norm=float(m["grad_norm"]))
            if out["policy_kl"] > cfg.early_stop_kl:
                break
        out["captions"] = roll.captions
        return out

    def locator_step(self, images, boxes) -> dict:
        _, _, caps = self.describe(self.snapshot, images, boxes, sample=False)
        # the policy's own locate IoU, for the log (the original computes it the same way)
        iou = self.roles.iou(self.locate(self.state.params, images, caps), boxes, images)
        batch = self.locator_batch(caps, boxes, images)
        self.state, m = self.steps["bbox"](self.state, self._shard(batch))
        self._check_finite(m)
        return dict(reward=float(iou.mean()), loss=float(m["loss"]), grad_norm=float(m["grad_norm"]),
                    captions=caps)

    def locator_batch(self, captions: Sequence[str], boxes, images) -> dict:
        """Right-padded `caption -> ground-truth box` targets (width bucketed) with their labels."""
        batch = self.roles.locator_batch(captions, boxes, images, PROMPT_BUCKET)
        start, window = answer_window(batch["labels"])
        return dict(batch, window_start=start, window_labels=window)

    def _check_finite(self, m) -> None:
        if not bool(m["finite"]):
            raise FloatingPointError(f"non-finite loss or gradient at SC-Tune step {self.global_step + 1} "
                                     f"({self.phase} phase); the update was not applied")

    def resume(self, params: Any, global_step: int) -> None:
        """Continue a run from the params saved after `global_step` steps. Exact only at a phase start
        (e.g. every 300 steps with 200 + 100), where the original too starts a fresh snapshot and
        optimizer; elsewhere they would differ from the interrupted run's, so that is refused."""
        cycle = self.cfg.caption_steps + self.cfg.bbox_steps
        pos = global_step % cycle
        if pos not in (0, self.cfg.caption_steps):
            raise ValueError(f"step {global_step} is inside a phase; resume from a phase start: a multiple of {cycle} "
                             f"(describer) or one plus {self.cfg.caption_steps} (locator)")
        self.restart(params, "caption" if pos == 0 else "bbox", global_step)

    def switch_phase(self) -> None:
        """Swap roles: fresh optimizer state at the new phase's learning rate, snapshot <- policy."""
        self.restart(self.state.params, "bbox" if self.phase == "caption" else "caption", self.global_step)

    def step(self, records: Sequence[dict], image_root: str | os.PathLike) -> dict:
        """One global step on a batch of records; switches phase when the phase's steps are done."""
        if len(records) != self.batch_size:
            raise ValueError(f"a step takes {self.batch_size} records, got {len(records)}")
        images = [load_image(os.path.join(image_root, r["image_id"]), r["image_id"]) for r in records]
        boxes = [list(map(float, r["bbox"])) for r in records]
        phase = self.phase
        if phase == "caption":
            out = self.describer_step(images, boxes, rng=self.cfg.seed * 1_000_003 + self.global_step)
        else:
            out = self.locator_step(images, boxes)
        self.global_step += 1
        self.phase_step += 1
        out.update(step=self.global_step, phase=phase)
        limit = self.cfg.caption_steps if phase == "caption" else self.cfg.bbox_steps
        if self.phase_step == limit:
            self.switch_phase()
        return out

    # --------------------------------------------------------------- the run

    def train(self, records: Sequence[dict], image_root: str | os.PathLike, *, out_dir: str | os.PathLike | None = None,
              save_every: int = 300, export=None, progress: bool = True) -> dict:
        """Run until the global step exceeds `max_steps`. Writes `metrics.jsonl` (one line per step) to
        `out_dir`, and calls `export(params, step)` every `save_every` steps and at the end."""
        total = self.cfg.max_steps + 1
        it = batches(records, self.batch_size, self.cfg.seed)
        for _ in range(self.global_step):      # a resumed run continues the same batch order
            next(it)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total, initial=self.global_step, desc="sc-tune", dynamic_ncols=True)
        log = None
        if out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
            log = open(os.path.join(out_dir, "metrics.jsonl"), "a")
        t0, last = time.time(), {}
        try:
            while self.global_step < total:
                last = self.step(next(it), image_root)
                last["seconds"] = round(time.time() - t0, 3)
                if log:
                    log.write(json.dumps({k: v for k, v in last.items() if k != "captions"}) + "\n")
                    log.flush()
                if bar is not None:
                    bar.set_postfix(phase=last["phase"], iou=f"{last['reward']:.3f}", loss=f"{last['loss']:.4f}")
                    bar.update(1)
                if export is not None and (self.global_step % save_every == 0 or self.global_step == total):
                    export(jax.device_get(self.state.params), self.global_step)
        finally:
            if bar is not None:
                bar.close()
            if log:
                log.close()
        return dict(steps=self.global_step, seconds=time.time() - t0, phase=self.phase,
                    last={k: v for k, v in last.items() if k != "captions"})
