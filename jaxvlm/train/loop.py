"""The train loop: config -> mesh -> model/params (+ new tokens, + LoRA) -> optimizer groups ->
sharded state (restored if a checkpoint exists) -> steps with metrics, checkpoints, NaN stop.

Example:
    >>> from jaxvlm.train.config import load_config, apply_overrides
    >>> cfg = apply_overrides(load_config("configs/train_tiny.py"), ["train.steps=20"])
    >>> summary = train(cfg)          # {"step": 20, "loss": ..., "workdir": ...}
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

import flax.linen as nn

from jaxvlm.models.clip import CLIPVisionConfig
from jaxvlm.models.llama import LMConfig
from jaxvlm.models.llava import Llava, LlavaConfig
from jaxvlm.models.qwen2_vl import Qwen2VL, Qwen2VLConfig, QwenVisionConfig
from jaxvlm.models.params import init_params, load_param_tree, logical_axes
from jaxvlm.train import lora as LO
from jaxvlm.train import mesh as M
from jaxvlm.train import multihost as MH
from jaxvlm.train import optim as O
from jaxvlm.train import sharding as S
from jaxvlm.train import sources
from jaxvlm.train import state as ST
from jaxvlm.train import tokens as TK
from jaxvlm.train.checkpoint import Checkpointer
from jaxvlm.train.config import Config
from jaxvlm.train.step import StepShardings, make_train_step, vlm_lm_loss

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Loss or gradient became NaN/inf; the state was not updated and no checkpoint was written."""


# ----------------------------------------------------------------------------- pieces


#: `model.family` values: LLaVA (CLIP tower + projector) and Qwen2/2.5-VL (patch tower with merger, M-RoPE).
FAMILIES = ("llava", "qwen2_vl")
#: Where each family keeps its vision tower in the param tree (optimizer group patterns use it too).
TOWER = {"llava": "vision_tower", "qwen2_vl": "visual"}

ModelConfig = LlavaConfig | Qwen2VLConfig


def family_of(cfg: Config) -> str:
    family = cfg.model.get("family", "llava")
    if family not in FAMILIES:
        raise ValueError(f"unknown model.family {family!r}; known: {', '.join(FAMILIES)}")
    return family


def _from_checkpoint_or(cfg: Config, family_cls, build: Callable[[], ModelConfig]) -> ModelConfig:
    """`model.init_from`'s config.json when given, else `build()`; then the run's dtypes and remat."""
    m = cfg.model
    if m.get("init_from"):
        mc = _init_from_config(m.init_from, family_cls)
    else:
        mc = build()
    mc = mc.with_dtype(m.dtype, m.param_dtype)
    return mc.replace(text=mc.text.replace(remat=m.text_remat), vision=mc.vision.replace(remat=m.vision_remat))


def _is_converted(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "jaxvlm_config.json"))


def _init_from_config(path: str, family_cls) -> ModelConfig:
    """The model config of `model.init_from`: a converted jaxvlm checkpoint (`jaxvlm convert`, `train.export`)
    or a Hugging Face folder (config.json)."""
    if _is_converted(path):
        from jaxvlm.conversion.converted import read_converted_config
        mc = read_converted_config(path)
        if not isinstance(mc, family_cls):
            raise ValueError(f"model.init_from={path!r} holds a {type(mc).__name__}, not the {family_cls.__name__} "
                             f"that model.family asks for")
        return mc
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model.init_from={path!r}: neither a jaxvlm checkpoint (jaxvlm_config.json) nor a "
                                f"Hugging Face folder (config.json)")
    with open(os.path.join(path, "config.json")) as f:
        return family_cls.from_hf(json.load(f))


def llava_config(cfg: Config) -> LlavaConfig:
    m = cfg.model
    return _from_checkpoint_or(cfg, LlavaConfig, lambda: LlavaConfig(
        text=LMConfig(**m.text), vision=CLIPVisionConfig(**m.vision), image_token_id=m.image_token_id))


def qwen2_vl_config(cfg: Config) -> Qwen2VLConfig:
    m = cfg.model

    def build() -> Qwen2VLConfig:
        ids = {k: m.get(k) for k in ("video_token_id", "vision_start_token_id", "vision_end_token_id")}
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise ValueError(f"model.family='qwen2_vl' from a random init needs the tokenizer's ids: set "
                             f"{', '.join('model.' + k for k in missing)}")
        text = {"family": "qwen2", "qkv_bias": True, **m.text}
        if text.get("mrope_section") is not None:
            text["mrope_section"] = tuple(text["mrope_section"])
        return Qwen2VLConfig(text=LMConfig(**text), vision=QwenVisionConfig(**m.vision),
                             image_token_id=m.image_token_id, **ids)
    return _from_checkpoint_or(cfg, Qwen2VLConfig, build)


def model_config(cfg: Config) -> ModelConfig:
    """The model config a train config describes (`model.family` picks the family)."""
    return qwen2_vl_config(cfg) if family_of(cfg) == "qwen2_vl" else llava_config(cfg)


def build_model(mc: ModelConfig) -> nn.Module:
    return Qwen2VL(mc) if isinstance(mc, Qwen2VLConfig) else Llava(mc)


def example_inputs(mc: ModelConfig):
    """Smallest inputs that touch every parameter (for init and logical axes)."""
    if isinstance(mc, Qwen2VLConfig):
        from jaxvlm.models import qwen2_vl
        return qwen2_vl.example_inputs(mc)
    ids = jnp.full((1, mc.tokens_per_image), mc.image_token_id, jnp.int32)
    pix = jnp.zeros((1, mc.vision.num_channels, mc.vision.image_size, mc.vision.image_size), jnp.float32)
    return ids, pix


def image_processor(mc: ModelConfig, data: Config | None = None):
    """The family's image processor (`jaxvlm.data.image_processing`). Qwen2/2.5-VL: smart_resize bounds
    from `data.min_pixels` / `data.max_pixels` (the slot holds `max_pixels / patch_size^2` patch rows)."""
    from jaxvlm.data.image_processing import LlavaImageProcessor, Qwen2VLImageProcessor
    if isinstance(mc, Qwen2VLConfig):
        v = mc.vision
        bounds = {k: int(data[k]) for k in ("min_pixels", "max_pixels") if data is not None and data.get(k)}
        return Qwen2VLImageProcessor(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                                     merge_size=v.spatial_merge_size, **bounds)
    return LlavaImageProcessor.for_llava(mc)


def load_init_params(path: str, mc: ModelConfig) -> dict:
    """A Hugging Face LLaVA or Qwen2/2.5-VL directory (config.json + *.safetensors), or a converted jaxvlm
    checkpoint, -> jaxvlm params on the host."""
    import glob
    if _is_converted(path):
        from jaxvlm.conversion.converted import load_converted
        return jax.tree.map(lambda x: np.asarray(x, np.dtype(mc.text.param_dtype)), load_converted(path)[1])

    from safetensors import safe_open

    from jaxvlm.conversion.api import llava_params_from_state
    from jaxvlm.conversion.qwen2_vl import qwen2_vl_params_from_state
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    handles = [safe_open(f, framework="flax") for f in files]

    class Lazy(dict):          # reads one tensor at a time
        def __getitem__(self, k):
            return np.asarray(dict.__getitem__(self, k).get_tensor(k))
    state = Lazy({k: h for h in handles for k in h.keys()})
    convert = qwen2_vl_params_from_state if isinstance(mc, Qwen2VLConfig) else llava_params_from_state
    return convert(state, mc, dtype=np.dtype(mc.text.param_dtype))


def tokenizer_dir(cfg: Config) -> str | None:
    """Where the run's tokenizer files are: `tokens.tokenizer`, else `data.tokenizer`, else `model.init_from`
    (a converted checkpoint keeps them in its `hf_files/`)."""
    init = cfg.model.get("init_from")
    if init and _is_converted(init):
        init = os.path.join(init, "hf_files")
    return cfg.tokens.tokenizer or cfg.data.tokenizer or init


def run_tokenizer(cfg: Config, path: str | None = None):
    """The run's tokenizer: `path` (default `tokens.tokenizer`, else `data.tokenizer`, else `model.init_from`)
    with `tokens.add` added, so the data and the grown vocabulary use the same ids."""
    from transformers import AutoTokenizer
    path = path or tokenizer_dir(cfg)
    if not path:
        raise ValueError("no tokenizer to load: set data.tokenizer (or tokens.tokenizer, or model.init_from)")
    tok = AutoTokenizer.from_pretrained(path)
    if cfg.tokens.add:
        TK.add_tokens(tok, list(cfg.tokens.add))
    return tok


def make_data(cfg: Config, lc: ModelConfig, local_batch: int):
    d = cfg.data
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    if d.pack and d.kind != "pipeline":
        raise ValueError(f"data.pack packs the record pipeline's samples; data.kind={d.kind!r} makes its own rows")
    if d.kind == "synthetic":
        if isinstance(lc, Qwen2VLConfig):
            raise ValueError("data.kind='synthetic' makes LLaVA batches; train model.family='qwen2_vl' on "
                             "data.kind='pipeline' (LLaVA-format records, template 'chatml')")
        sc = sources.SyntheticConfig(seq_len=d.seq_len, vocab_size=lc.text.vocab_size,
                                     image_token_id=lc.image_token_id, tokens_per_image=lc.tokens_per_image,
                                     image_size=lc.vision.image_size, images_per_sample=d.images_per_sample)
        return sources.synthetic_dataset(sc, local_batch, seed=d.seed, **shard)
    if d.kind == "npz":
        return sources.array_dataset(d.path, local_batch, seed=d.seed, **shard)
    if d.kind == "pipeline":   # LLaVA-format records -> chat template -> tokens + images (jaxvlm.data)
        from transformers import AutoTokenizer

        from jaxvlm.data.pipeline import make_dataset
        if not d.path or not os.path.isfile(d.path):
            raise FileNotFoundError(f"data file not found: {d.path}")
        tok = run_tokenizer(cfg, d.tokenizer)
        transform = None
        if d.reverse_labels:      # the tokenizer (with tokens.add) must hold <SPAN>, </CN>, </UN> (tag_ids says if not)
            from jaxvlm.methods.reverse import dehallucination_labels, tag_ids
            transform = functools.partial(dehallucination_labels, tags=tag_ids(tok))
        return make_dataset(d.path, d.image_root, tok, d.template, image_processor(lc, d),
                            max_len=d.seq_len, images_per_sample=d.images_per_sample, batch_size=local_batch,
                            seed=d.seed, image_token_id=lc.image_token_id,
                            curriculum=d.curriculum or (), curriculum_key=d.curriculum_key,
                            label_transform=transform, pack=d.pack, pack_bins=d.pack_bins,
                            images_per_row=_images_per_row(d, lc) if d.pack else None, **shard)
    raise ValueError(f"unknown data.kind {d.kind!r}; known: synthetic, npz, pipeline")


def _images_per_row(d, lc: ModelConfig) -> int:
    """Image slots of a packed row: `data.images_per_row`, else as many LLaVA images as fit in `seq_len`
    (Qwen2/2.5-VL's images vary in tokens: 4 x `images_per_sample`)."""
    if not d.images_per_sample:
        return 0
    if d.images_per_row:
        return d.images_per_row
    if isinstance(lc, Qwen2VLConfig):
        return 4 * d.images_per_sample
    return max(d.images_per_sample, d.seq_len // lc.tokens_per_image)


class MetricsWriter:
    """JSONL always; TensorBoard too when tensorboardX (or tensorboard) is importable."""

    def __init__(self, workdir: str):
        self.file = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self.tb = None
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tb"))
        except ImportError:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:
                pass

    def write(self, step: int, record: dict) -> None:
        self.file.write(json.dumps(dict(step=step, **record)) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _scalar(x) -> float | int:
    x = np.asarray(x)
    return x.item()


def _is_tokenizer_file(name: str) -> bool:
    """A file of a tokenizer folder to carry into an export, not the weights or model configs beside it when the
    tokenizer folder is `model.init_from` (the image processor's config is written for the run's own)."""
    return not (name.endswith((".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".index.json"))
                or name in ("config.json", "source_config.json", "jaxvlm_config.json", "preprocessor_config.json",
                            "generation_config.json"))


def export_converted(cfg: Config, lc: ModelConfig, trained: Any, spec: "LO.LoraSpec | None") -> str:
    """Final params (LoRA merged) -> a converted checkpoint with the tokenizer files beside it (and,
    for Qwen2/2.5-VL, the image processor's `preprocessor_config.json`, so `jaxvlm generate` resizes
    images as training did). A collective with several processes: all gather the params, process 0 writes."""
    import tempfile

    from jaxvlm.conversion.converted import save_converted
    params = MH.host_tree(LO.merge_lora(trained["base"], trained["lora"], spec) if spec is not None else trained)
    if jax.process_index() != 0:      # every process gathers (a collective); process 0 writes
        return cfg.train.export
    tok_dir = tokenizer_dir(cfg)
    if cfg.tokens.add:       # the grown tokenizer the run saved, so the exported ids match its vocabulary
        tok_dir = os.path.join(os.path.abspath(cfg.train.workdir), "tokenizer")
    hf_files = []
    if tok_dir and os.path.isdir(tok_dir):
        hf_files = [os.path.join(tok_dir, f) for f in sorted(os.listdir(tok_dir))
                    if os.path.isfile(os.path.join(tok_dir, f)) and _is_tokenizer_file(f)]
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(lc, Qwen2VLConfig):
            image_processor(lc, cfg.data).hf.save_pretrained(tmp)
            hf_files.append(os.path.join(tmp, "preprocessor_config.json"))
        save_converted(cfg.train.export, lc, params, hf_files=hf_files, source="jaxvlm train",
                       overwrite=True)
    return cfg.train.export


# ----------------------------------------------------------------------------- the loop

#: What a resumed run may change: where and on what it runs, how long, what it logs, saves and exports.
#: Everything else (model, data, optimizer, LoRA, tokens, seed) must be the run's own, or the restored state
#: and data position would silently continue another experiment.
RESUMABLE_CHANGES = ("mesh.", "sharding.", "checkpoint.", "train.steps", "train.log_every", "train.workdir",
                     "train.export", "train.fast_compile", "train.accum_steps", "model.text_remat",
                     "model.vision_remat")
RUN_CONFIG = "run_config.json"


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def check_run_config(workdir: str, cfg: Config, resuming: bool) -> None:
    """A fresh run records its config in `workdir/run_config.json` (process 0); a resumed one must match it
    outside `RESUMABLE_CHANGES`, else a ValueError names every differing key, before anything is written.
    A workdir from before this check (no record) resumes as it did."""
    path = os.path.join(workdir, RUN_CONFIG)
    now = json.loads(json.dumps(_flat(cfg.to_dict()), default=str))
    if resuming and os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        changed = sorted(k for k in set(saved) | set(now)
                         if not k.startswith(RESUMABLE_CHANGES) and saved.get(k) != now.get(k))
        if changed:
            diff = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
            raise ValueError(f"train.workdir={workdir} holds a run with another config ({diff}"
                             f"{'; ...' if len(changed) > 6 else ''}); resume it with its own settings (only "
                             f"{', '.join(k.rstrip('.') for k in RESUMABLE_CHANGES)} may change) or use a new workdir")
    elif jax.process_index() == 0:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(now, f, indent=1, sort_keys=True)
        os.replace(tmp, path)



def optim_config(cfg: Config, frozen_rows: tuple = ()) -> O.OptimConfig:
    """The train config's `optim` section as an `OptimConfig` (every key passed through by name;
    `total_steps=0` means `train.steps`)."""
    o = dict(cfg.optim)
    known = [f.name for f in dataclasses.fields(O.OptimConfig) if f.name != "frozen_rows"]   # the loop's own
    unknown = sorted(set(o) - set(known))
    if unknown:
        raise ValueError(f"unknown optim keys {unknown} (a config file added them); OptimConfig takes {known}")
    o["groups"] = tuple(O.Group(**g) for g in o["groups"])
    o["total_steps"] = o["total_steps"] or cfg.train.steps
    return O.OptimConfig(**o, frozen_rows=frozen_rows)


def train(cfg: Config, hooks: Iterable[Callable[[int, dict], None]] = (), progress: bool = True) -> dict:
    """Run (or resume) training as configured; returns a summary dict. `hooks(step, metrics)` run
    after every step (host side)."""
    t_setup = time.time()
    for key in ("workdir", "export"):
        if "://" in str(cfg.train.get(key) or ""):
            raise ValueError(f"train.{key}={cfg.train[key]!r}: a URL; give a local path every host sees (for a bucket, "
                             f"mount it, e.g. with gcsfuse)")
    workdir = os.path.abspath(cfg.train.workdir)
    os.makedirs(workdir, exist_ok=True)
    mesh = M.make_mesh(M.MeshConfig(**cfg.mesh))
    dp = M.data_parallel_size(mesh)
    gbs = int(cfg.data.batch_size)
    if gbs % dp:
        raise ValueError(f"data.batch_size={gbs} is not divisible by the data-parallel size {dp} "
                         f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")
    if gbs % cfg.train.accum_steps or (gbs // cfg.train.accum_steps) % dp:
        raise ValueError(f"data.batch_size={gbs} / train.accum_steps={cfg.train.accum_steps} must be a multiple "
                         f"of the data-parallel size {dp}")
    if gbs % jax.process_count():
        raise ValueError(f"data.batch_size={gbs} is not divisible by the {jax.process_count()} processes")
    S.check_process_batches(mesh, gbs)
    # A resume must be the run's own experiment: checked before anything is read or written (tokens.add saves
    # the grown tokenizer into the workdir, which the old run's export reads).
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.checkpoint.keep, every=cfg.checkpoint.every,
                        async_save=cfg.checkpoint.async_save)
    resumed_from = ckpt.latest_step()
    check_run_config(workdir, cfg, resuming=resumed_from is not None)
    rules = S.make_rules(cfg.sharding.preset, cfg.sharding.overrides)
    family = family_of(cfg)
    lc = model_config(cfg)
    key = jax.random.key(cfg.train.seed)
    k_init, k_tok, k_lora, k_state = jax.random.split(key, 4)

    # Data first: an unreadable file should fail before any compilation.
    dataset = make_data(cfg, lc, gbs // jax.process_count())

    # --- params: init or HF checkpoint, then new tokens, then LoRA
    if cfg.model.get("init_from"):
        for key in ("vision_init", "number_init", "lm_init", "projector_init"):
            if cfg.model.get(key):
                raise ValueError(f"model.{key} applies to a random init only; it cannot be combined with "
                                 f"model.init_from={cfg.model.init_from!r}")
        params = load_init_params(cfg.model.init_from, lc)
    else:
        if cfg.model.get("number_init") and cfg.model.get("lm_init"):
            # number_init rewrites rows of a random LM's embedding and head; lm_init gives the whole LM
            raise ValueError(f"model.number_init applies to a random LM only; model.lm_init={cfg.model.lm_init!r} "
                             f"gives the LM (set model.number_init=False)")
        if family == "qwen2_vl" and cfg.model.get("projector_init"):
            raise ValueError("model.projector_init is LLaVA's projector; Qwen2/2.5-VL's merger is part of the "
                             "vision tower (model.vision_init)")
        params = jax.jit(lambda k: init_params(build_model(lc), k, *example_inputs(lc)))(k_init)
        # Parts trained by an earlier stage replace their random init: the tower (dense_vision), the LM
        # (lookup_pretrain.pretrain_lookup), the projector (lookup_pretrain.align_projector).
        for key, part, what in (("vision_init", TOWER[family], "vision"), ("lm_init", "language_model", "LM"),
                                ("projector_init", "multi_modal_projector", "projector")):
            if cfg.model.get(key):
                params = dict(params, **{part: jax.tree.map(
                    jnp.asarray, load_param_tree(cfg.model[key], params[part], what))})
        if cfg.model.get("number_init"):     # box coordinates start as a smooth code of their value
            from transformers import AutoTokenizer

            from jaxvlm.train.number_init import init_number_rows, number_tokens
            ids, values = number_tokens(AutoTokenizer.from_pretrained(cfg.data.tokenizer))
            params = init_number_rows(jax.device_get(params), ids, values, k_tok)
    new_ids: list[int] = []
    if cfg.tokens.add or cfg.tokens.num_new:
        old_vocab = lc.text.vocab_size
        if cfg.tokens.add:
            tok = run_tokenizer(cfg)
            n_tokens = len(tok)
            if jax.process_index() == 0:     # one writer on a shared filesystem; process 0 exports with it
                tok.save_pretrained(os.path.join(workdir, "tokenizer"))
        else:
            n_tokens = old_vocab + int(cfg.tokens.num_new)
        lc, params = TK.grow_llava_vocab(lc, jax.device_get(params), n_tokens, k_tok, cfg.tokens.init,
                                         multiple_of=cfg.tokens.multiple_of)
        new_ids = list(range(old_vocab, lc.text.vocab_size))
    model = build_model(lc)
    logical = logical_axes(model, *example_inputs(lc))
    spec = None
    if cfg.lora.enabled:
        spec = LO.LoraSpec(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                           targets=tuple(cfg.lora.targets), exclude=tuple(cfg.lora.exclude))
        lora = LO.init_lora(params, spec, k_lora)
        trainable = {"base": params, "lora": lora}
        logical = {"base": logical, "lora": S.lora_logical_axes(logical, lora)}
        loss_fn = vlm_lm_loss(model, lambda t, rng: LO.merge_lora(t["base"], t["lora"], spec, rng))
    else:
        trainable = params
        loss_fn = vlm_lm_loss(model)

    # --- optimizer groups
    frozen_rows = ()
    if new_ids and not cfg.tokens.trainable:
        frozen_rows = TK.frozen_rows_rule(new_ids, "base/" if spec else "")
    ocfg = optim_config(cfg, frozen_rows)
    abstract = jax.eval_shape(lambda t: t, trainable)
    opt = O.make_optimizer(ocfg, abstract)
    log.info("optimizer groups:\n%s", O.describe(opt, abstract))
    tower_labels = jax.tree.leaves(opt.labels.get(TOWER[family], {}) if isinstance(opt.labels, dict) else {})
    if (tower_labels and all(l == O.FROZEN for l in tower_labels) and not cfg.model.get("init_from")
            and not cfg.model.get("vision_init")):
        log.warning("the vision tower is frozen at its random init (no model.init_from / model.vision_init): "
                    "it will never learn; give a pretrained tower or a learning rate for it")

    # --- sharded state (restored when a checkpoint exists)
    p_sh = S.param_shardings(logical, abstract, mesh, rules,
                             warn_replicated_bytes=int(cfg.sharding.warn_replicated_mib * 2**20))
    st_sh = ST.state_shardings(p_sh, abstract, opt, mesh)
    it = iter(dataset)
    if resumed_from is not None:
        del trainable, params
        state, data_state, _ = ckpt.restore(resumed_from, ST.abstract_state(st_sh, abstract, opt))
        if data_state is not None:
            it.set_state(data_state)
    else:
        trainable = jax.device_put(trainable, p_sh)
        state = jax.jit(lambda t: ST.create_train_state(t, opt, k_state), out_shardings=st_sh)(trainable)
        del trainable, params
    step_fn = make_train_step(loss_fn, opt, StepShardings(mesh, rules, st_sh), accum_steps=cfg.train.accum_steps,
                              compiler_options={"xla_backend_optimization_level": 0} if cfg.train.fast_compile
                              else None)

    # --- loop
    writer = MetricsWriter(workdir) if jax.process_index() == 0 else None
    start = int(jax.device_get(state.step))
    total = int(cfg.train.steps)
    if writer:
        writer.write(start, {"event": "start", "resumed_from": resumed_from, "setup_s": time.time() - t_setup,
                             "mesh": dict(mesh.shape), "devices": jax.device_count(),
                             "tensorboard": writer.tb is not None})
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
    meta = {"config": cfg.to_dict(), "vocab_size": lc.text.vocab_size, "new_token_ids": new_ids}
    last: dict = {}
    truncated = getattr(dataset, "truncated", None)
    t_last, tokens_since, step = time.time(), 0, start
    try:
        for step in range(start + 1, total + 1):
            batch = next(it)
            tokens_since += int(np.prod(batch["input_ids"].shape)) * jax.process_count()
            t_step = time.time()
            state, metrics = step_fn(state, S.shard_batch(batch, mesh))
            if step == start + 1 and writer:
                jax.block_until_ready(metrics)
                writer.write(step, {"event": "first_step", "compile_and_run_s": time.time() - t_step})
            if not bool(metrics["finite"]):
                ckpt.wait()
                raise NonFiniteError(
                    f"non-finite loss/gradient at step {step} (loss={float(metrics['loss'])}, grad_norm="
                    f"{float(metrics['grad_norm'])}); stopped without applying the update. Last good checkpoint: "
                    f"step {ckpt.latest_step()} in {ckpt.directory}")
            ckpt.save(step, state, data_state=it.get_state(), meta=meta, force=step == total)
            if step % cfg.train.log_every == 0 or step == total:
                jax.block_until_ready(metrics)
                now = time.time()
                last = {k: _scalar(v) for k, v in metrics.items() if k != "finite"}
                last["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
                if truncated is not None:   # samples cut to data.seq_len so far (this process, read-ahead included)
                    last["data_truncated"] = truncated.records
                t_last, tokens_since = now, 0
                if writer:
                    writer.write(step, last)
                if bar:
                    bar.set_postfix(loss=f"{last['loss']:.4f}", gnorm=f"{last['grad_norm']:.3f}")
            if bar:
                bar.update(1)
            for h in hooks:
                h(step, metrics)
        # Exports: every process gathers (the shards live on all hosts), process 0 writes, the rest wait.
        if spec is not None:
            from jaxvlm.conversion.qwen2_vl import qwen2_vl_rules
            from jaxvlm.conversion.table import llava_rules
            lora = MH.host_tree(state.params["lora"])
            if jax.process_index() == 0:
                LO.export_peft(os.path.join(workdir, "adapter"), lora, spec,
                               qwen2_vl_rules(lc) if family == "qwen2_vl" else llava_rules(lc))
        if cfg.train.get("export"):
            export_converted(cfg, lc, state.params, spec)
        MH.barrier("jaxvlm train: exports written")
    finally:
        if bar:
            bar.close()
        ckpt.close()
        if writer:
            writer.close()
    return {"step": step, "workdir": workdir, "resumed_from": resumed_from, **last}
