"""LLaVA-family and Llama/Qwen2 LM checkpoints on disk, both ways, one tensor at a time.

Import accepts every LLaVA key layout in use (see `layouts.LLAVA_LAYOUTS`): llava-hf hub,
transformers 5 `save_pretrained`, transformers 5 in-memory names, and the original LLaVA repo
(`model_type: llava_llama`, used by REVERSE, Chain-of-Spot and LLaVA-MORE), whose CLIP weights
usually live in a separate checkpoint (`vision_tower_dir`).

Image token of original-layout checkpoints: the LLaVA repo marks image slots with
`IMAGE_TOKEN_INDEX = -200` in `input_ids` (outside the vocabulary). We keep that id in
`LlavaConfig.image_token_id`; `Llava.embed` clips ids into the vocabulary before the lookup and
the slots are overwritten by image features, so the original data pipeline's ids work as they are.
HF's `LlavaForConditionalGeneration` needs an in-vocab id, so exporting such a model asks for one
(`image_token_id=`, e.g. an added `<image>` token).

Example:
    >>> cfg, params = import_llava("llava-v1.5-7b/", vision_tower_dir="clip-vit-large-patch14-336/",
    ...                            dtype="bfloat16")
    >>> export_llava(cfg, params, "llava-v1.5-7b-hf/", image_token_id=32000)   # needs vocab > 32000
"""
from __future__ import annotations

import functools
import json
import logging
import pathlib
import re
import resource
import sys
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jaxvlm.conversion import layouts
from jaxvlm.conversion.io import (CheckpointReader, PathLike, atomic_output_dir, open_checkpoint,
                                  write_sharded_safetensors)
from jaxvlm.conversion.table import ConversionError, Rule, export_params, import_params, llava_rules, lm_rules
from jaxvlm.models.clip import CLIPVisionConfig
from jaxvlm.models.llama import DecoderLM, LMConfig, stack_layers
from jaxvlm.models.llava import Llava, LlavaConfig
from jaxvlm.models.params import abstract_params

log = logging.getLogger(__name__)

IMAGE_TOKEN_INDEX = -200          # the original LLaVA repo's image placeholder id
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30

# Buffers some checkpoints carry that no model parameter corresponds to.
_BUFFERS = re.compile(r"(rotary_emb\.inv_freq|\.position_ids|\.masked_bias|\.attn\.bias)$")

# HF CLIPVisionConfig defaults: old CLIP configs store only the fields that differ from these.
_HF_CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, image_size=224, patch_size=32, num_channels=3,
                                layer_norm_eps=1e-5, hidden_act="quick_gelu")

# HF LlamaConfig defaults, for the same reason (llava-1.5-7b-hf's text_config omits the layer sizes).
_HF_LLAMA_DEFAULTS = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                          num_hidden_layers=32, num_attention_heads=32, rms_norm_eps=1e-6,
                          max_position_embeddings=2048, rope_theta=10000.0, hidden_act="silu")

# Vision towers named by `mm_vision_tower` in original LLaVA configs, for when only the name is known.
KNOWN_VISION_TOWERS = {
    "openai/clip-vit-large-patch14-336": CLIPVisionConfig(),
    "openai/clip-vit-large-patch14": CLIPVisionConfig(image_size=224),
}

# Files of an HF checkpoint worth keeping next to converted weights (tokenizer, processor, ...).
HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                 "preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja")


# ----------------------------------------------------------------------------- configs


def _source_dir(source: PathLike | Sequence[PathLike]) -> pathlib.Path:
    first = pathlib.Path(source[0] if isinstance(source, (list, tuple)) else source)
    if not first.exists():
        raise FileNotFoundError(f"checkpoint not found: {first}")
    return first if first.is_dir() else first.parent


def read_hf_config(source: PathLike | Sequence[PathLike]) -> dict:
    """`config.json` of a checkpoint (directory, or the directory of its weight files)."""
    path = _source_dir(source) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json beside the weights in {path.parent}; pass config= explicitly")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def is_original_llava_config(d: Mapping) -> bool:
    return "text_config" not in d and ("mm_vision_tower" in d or "mm_projector_type" in d
                                       or str(d.get("model_type", "")).startswith("llava_"))


def clip_vision_config_from_hf(d: Mapping) -> CLIPVisionConfig:
    """From a CLIP `config.json` (full CLIPModel: uses `vision_config`) or a CLIPVisionModel one."""
    d = dict(d.get("vision_config") or d)
    return CLIPVisionConfig.from_hf({**_HF_CLIP_VISION_DEFAULTS, **{k: v for k, v in d.items() if v is not None}})


def llava_config_from_original(d: Mapping, vision: CLIPVisionConfig | None = None) -> LlavaConfig:
    """An original-LLaVA `config.json` (top-level Llama fields + `mm_*`) -> LlavaConfig.

    vision: the tower's config (from `vision_tower_dir`); by default looked up by `mm_vision_tower`."""
    d = dict(d)
    tower = d.get("mm_vision_tower") or d.get("vision_tower")
    if vision is None:
        if tower not in KNOWN_VISION_TOWERS:
            raise ConversionError(f"config names vision tower {tower!r}, whose shape jaxvlm does not know; "
                                  "pass vision_tower_dir= (a directory with its config.json)")
        vision = KNOWN_VISION_TOWERS[tower]
    proj = d.get("mm_projector_type", "linear")
    m = re.fullmatch(r"mlp(\d+)x_gelu", proj)
    if not m or m.group(1) != "2":
        raise ConversionError(f"mm_projector_type {proj!r} is not supported (jaxvlm's LLaVA projector is "
                              "'mlp2x_gelu': linear -> GELU -> linear)")
    if d.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise ConversionError(f"config mm_hidden_size={d['mm_hidden_size']} but the vision tower has "
                              f"hidden_size={vision.hidden_size}")
    select = {"patch": "default", "cls_patch": "full"}.get(d.get("mm_vision_select_feature", "patch"))
    if select is None:
        raise ConversionError(f"mm_vision_select_feature {d['mm_vision_select_feature']!r} is not supported "
                              "(known: 'patch', 'cls_patch')")
    model_type = str(d.get("model_type", "llava_llama"))
    text = LMConfig.from_hf({**d, "model_type": "qwen2" if "qwen" in model_type else "llama"})
    return LlavaConfig(text=text, vision=vision, image_token_id=IMAGE_TOKEN_INDEX,
                       vision_feature_layer=d.get("mm_vision_select_layer", -2),
                       vision_feature_select_strategy=select, projector_hidden_act="gelu", projector_bias=True)


def llava_config_from_hf(d: Mapping, vision_tower_dir: PathLike | None = None) -> LlavaConfig:
    """Any LLaVA `config.json` (llava-hf or original) -> LlavaConfig."""
    if "text_config" in d and "vision_config" in d:
        vc, tc = dict(d["vision_config"] or {}), dict(d["text_config"] or {})
        if vc.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
            raise ConversionError(f"vision tower model_type {vc.get('model_type')!r} is not supported "
                                  "(jaxvlm's LLaVA uses CLIP)")
        if tc.get("model_type", "llama") == "llama":   # llava-hf configs store only non-default fields
            tc = {**_HF_LLAMA_DEFAULTS, **{k: v for k, v in tc.items() if v is not None}}
        vc = {**_HF_CLIP_VISION_DEFAULTS, **{k: v for k, v in vc.items() if v is not None}}
        return LlavaConfig.from_hf({**d, "text_config": tc, "vision_config": vc})
    if is_original_llava_config(d):
        vision = clip_vision_config_from_hf(read_hf_config(vision_tower_dir)) if vision_tower_dir else None
        return llava_config_from_original(d, vision)
    raise ConversionError(f"config.json (model_type {d.get('model_type')!r}) is not a LLaVA config: expected "
                          "'text_config' + 'vision_config' (llava-hf) or 'mm_vision_tower' (original LLaVA)")


# ----------------------------------------------------------------------------- import driver


def _layer_count(keys, pattern: str) -> int | None:
    rx = re.compile(pattern)
    idx = [int(m.group(1)) for k in keys if (m := rx.match(k))]
    return max(idx) + 1 if idx else None


def _check_layers(canon_keys, expect: Mapping[str, tuple[str, int]]) -> None:
    """Compare per-layer tensor counts with the config before reading anything."""
    for what, (pattern, n) in expect.items():
        have = _layer_count(canon_keys, pattern)
        if have is not None and have != n:
            raise ConversionError(f"config/weights mismatch: the config gives the {what} {n} layers but the "
                                  f"weights hold {have} (layers 0..{have - 1})")


class _Source:
    """Canonical key -> (reader, source key), built from readers + key mappers."""

    def __init__(self):
        self.where: dict[str, tuple[CheckpointReader, str]] = {}
        self.unmapped: list[str] = []

    def add(self, reader: CheckpointReader, mapper: Callable[[str], str | None],
            skip: Callable[[str], bool] = lambda k: False) -> None:
        for k in reader.keys():
            if _BUFFERS.search(k) or skip(k):
                continue
            c = mapper(k)
            if c is None:
                self.unmapped.append(k)
            else:
                self.where.setdefault(c, (reader, k))


def _run_import(rules: list[Rule], src: _Source, expected, dtype, ignore: Callable[[str], bool],
                progress: bool, desc: str) -> dict:
    """Drive `import_params`: read (and cast) one tensor at a time, drop its file pages once copied."""
    if src.unmapped:
        raise ConversionError(f"{len(src.unmapped)} tensor(s) fit no known key of this layout: "
                              f"{sorted(src.unmapped)[:8]}")
    wanted = {k for r in rules for k in r.hf_keys()}
    total = sum(reader.nbytes(k) for c, (reader, k) in src.where.items() if c in wanted)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr)
    np_dtype = np.dtype(dtype) if dtype is not None else None

    def get(canon: str) -> np.ndarray:
        reader, key = src.where[canon]
        view = reader.get(key)
        # An owned copy (cast on the way, so bf16 output never holds an fp32 copy of the model).
        x = view.astype(np_dtype) if np_dtype is not None else np.array(view)
        reader.release(key)
        if bar is not None:
            bar.update(reader.nbytes(key))
        return x

    try:
        params = import_params(rules, get, src.where.keys(), expected, None, ignore)
    finally:
        if bar is not None:
            bar.close()
    if progress:
        log.info("%s: peak RSS %.2f GiB", desc, peak_rss_bytes() / 2**30)
    return params


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


@functools.lru_cache(maxsize=8)
def _abstract_llava(cfg: LlavaConfig):
    ids = jnp.full((1, cfg.tokens_per_image), cfg.image_token_id, jnp.int32)
    pix = jnp.zeros((1, cfg.vision.num_channels, cfg.vision.image_size, cfg.vision.image_size), jnp.float32)
    return abstract_params(Llava(cfg), ids, pix)


@functools.lru_cache(maxsize=8)
def _abstract_lm(cfg: LMConfig):
    return abstract_params(DecoderLM(cfg), jnp.zeros((1, 4), jnp.int32))


def _with_context(fn, what: str):
    try:
        return fn()
    except ConversionError as e:
        raise ConversionError(f"{what}: {e}") from None


# ----------------------------------------------------------------------------- import


def import_llava(source: PathLike | Sequence[PathLike], vision_tower_dir: PathLike | None = None,
                 dtype: Any = None, *, config: Mapping | LlavaConfig | None = None, layout: str | None = None,
                 progress: bool = True) -> tuple[LlavaConfig, dict]:
    """A LLaVA checkpoint on disk -> (LlavaConfig, params as numpy arrays).

    source: a checkpoint directory (config.json + safetensors / .bin, sharded or not), or weight
      file(s) with a config.json beside them (or `config=`).
    vision_tower_dir: a CLIP checkpoint (e.g. openai/clip-vit-large-patch14-336) for original-layout
      checkpoints that do not hold the tower's weights; its `text_model.*` is ignored.
    dtype: cast every tensor on the way in (e.g. "bfloat16"; the config's compute and param dtypes
      follow); None keeps the file's dtype (recorded as the config's param_dtype).
    layout: force a key layout ("hub", "hf_saved", "hf_memory", "original"); detected by default.
    """
    where = f"{source}"
    if isinstance(config, LlavaConfig):
        cfg, raw = config, {}
    else:
        raw = dict(config) if config is not None else read_hf_config(source)
        cfg = llava_config_from_hf(raw, vision_tower_dir)
    if dtype is not None:
        cfg = cfg.with_dtype(str(np.dtype(dtype)))
    reader = open_checkpoint(source)
    vreader = None
    try:
        layout = layout or _with_context(lambda: layouts.detect_llava_layout(reader.keys()), where)
        src = _Source()
        src.add(reader, layouts.key_mapper(layout))
        has_vision = any(k.startswith("vision_tower.") for k in src.where)
        if not has_vision:
            if vision_tower_dir is None:
                tower = raw.get("mm_vision_tower", "the CLIP tower")
                raise ConversionError(f"{where} holds no vision-tower weights (original LLaVA checkpoints keep "
                                      f"CLIP separate; config names {tower!r}): pass vision_tower_dir= "
                                      "(--vision-tower) with a local copy of it")
            vreader = open_checkpoint(vision_tower_dir)
            src.add(vreader, _clip_mapper, skip=lambda k: k.startswith(("text_model.", "text_projection.",
                                                                        "visual_projection.", "logit_scale")))
        elif vision_tower_dir is not None:
            log.warning("%s holds vision-tower weights; using those (vision_tower_dir=%s supplies only the "
                        "tower's config)", where, vision_tower_dir)
        _check_layers(src.where.keys(), {
            "language model": (r"^language_model\.model\.layers\.(\d+)\.", cfg.text.num_layers),
            "vision tower": (r"^vision_tower\.vision_model\.encoder\.layers\.(\d+)\.", cfg.vision.num_layers)})
        rules = llava_rules(cfg)
        tied = cfg.text.tie_word_embeddings
        params = _with_context(lambda: _run_import(
            rules, src, _abstract_llava(cfg), dtype,
            ignore=lambda k: tied and k == "language_model.lm_head.weight", progress=progress,
            desc=f"import {pathlib.Path(where).name}"), f"{where} (layout {layout!r})")
    finally:
        reader.close()
        if vreader is not None:
            vreader.close()
    kept = _uniform_dtype(params)
    if dtype is None and kept is not None:   # the config says what the params are (e.g. fp16 originals)
        cfg = cfg.replace(text=cfg.text.replace(param_dtype=kept), vision=cfg.vision.replace(param_dtype=kept))
    return cfg, params


def _uniform_dtype(params) -> str | None:
    dtypes = {str(x.dtype) for x in _leaves(params)}
    return dtypes.pop() if len(dtypes) == 1 else None


def _leaves(tree):
    for v in tree.values():
        yield from (_leaves(v) if isinstance(v, Mapping) else (v,))


def _clip_mapper(key: str) -> str | None:
    """A CLIP checkpoint's vision keys (`vision_model.*`, or bare in v5 CLIPVisionModel saves)."""
    for prefix in ("vision_tower.vision_model.", "vision_model.", "model.vision_model."):
        if key.startswith(prefix):
            return "vision_tower.vision_model." + key[len(prefix):]
    if key.startswith(("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")):
        return "vision_tower.vision_model." + key
    return None


def import_lm(source: PathLike | Sequence[PathLike], dtype: Any = None, *, config: Mapping | LMConfig | None = None,
              progress: bool = True) -> tuple[LMConfig, dict]:
    """A `LlamaForCausalLM` / `Qwen2ForCausalLM` checkpoint (Vicuna, Llama-3.1, Qwen2) -> (LMConfig, params)."""
    cfg = config if isinstance(config, LMConfig) else LMConfig.from_hf(
        dict(config) if config is not None else read_hf_config(source))
    if dtype is not None:
        cfg = cfg.replace(dtype=str(np.dtype(dtype)), param_dtype=str(np.dtype(dtype)))
    reader = open_checkpoint(source)
    try:
        src = _Source()
        src.add(reader, lambda k: k if k.startswith(("model.", "lm_head.")) else None)
        if not any(k.startswith("model.layers.") for k in src.where):
            raise ConversionError(f"{source}: unknown LM layout: expected keys 'model.layers.{{i}}.*', "
                                  f"got e.g. {sorted(reader.keys())[:5]}")
        _check_layers(src.where.keys(), {"language model": (r"^model\.layers\.(\d+)\.", cfg.num_layers)})
        tied = cfg.tie_word_embeddings
        params = _with_context(lambda: _run_import(
            lm_rules(cfg), src, _abstract_lm(cfg), dtype, ignore=lambda k: tied and k == "lm_head.weight",
            progress=progress, desc=f"import {pathlib.Path(str(source)).name}"), str(source))
    finally:
        reader.close()
    kept = _uniform_dtype(params)
    if dtype is None and kept is not None:
        cfg = cfg.replace(param_dtype=kept)
    return cfg, params


def import_checkpoint(source, vision_tower_dir=None, dtype=None, **kw) -> tuple[Any, dict]:
    """Dispatch on `config.json`: LLaVA (either layout) or a Llama/Qwen2 LM."""
    d = read_hf_config(source)
    if "text_config" in d or is_original_llava_config(d):
        return import_llava(source, vision_tower_dir, dtype, config=d, **kw)
    if d.get("model_type") in ("llama", "qwen2"):
        if kw.pop("layout", None):
            raise ConversionError("--layout applies to LLaVA checkpoints only")
        return import_lm(source, dtype, config=d, **kw)
    raise ConversionError(f"{source}: model_type {d.get('model_type')!r} has no converter (known: llava, "
                          "llava_llama (original LLaVA), llama, qwen2)")


def hf_side_files(source: PathLike | Sequence[PathLike]) -> list[pathlib.Path]:
    """Tokenizer / processor / config files of an HF checkpoint directory (to keep with converted weights)."""
    d = _source_dir(source)
    return [d / n for n in HF_SIDE_FILES if (d / n).is_file()]


# ----------------------------------------------------------------------------- export


def _dtype_name(dtype) -> str:
    return str(np.dtype(dtype)) if dtype is not None else "float32"


def _rope_fields(cfg: LMConfig) -> dict:
    """Both RoPE schemas: `rope_theta` + `rope_scaling` (transformers 4.x reads only these; writing
    only the v5 key makes it silently fall back to theta 10000) and `rope_parameters` (5.x)."""
    scaling = cfg.rope_scaling_dict
    params = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if scaling:
        scaling = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}
        params = {**scaling, "rope_theta": cfg.rope_theta}
    return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling, "rope_parameters": params}


def hf_text_config(cfg: LMConfig, dtype=None) -> dict:
    """A transformers `LlamaConfig` / `Qwen2Config` dict for an LMConfig."""
    if cfg.mrope_section is not None or getattr(cfg, "logn_attn_len", None) or getattr(cfg, "rope_ntk_len", None):
        raise ConversionError("this LM (M-RoPE / QWen logn attention) has no LlamaForCausalLM/Qwen2ForCausalLM "
                              "equivalent; export it with its VLM family's exporter")
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                  max_position_embeddings=cfg.max_position_embeddings, hidden_act=cfg.hidden_act,
                  tie_word_embeddings=cfg.tie_word_embeddings, **_rope_fields(cfg))
    if cfg.family == "qwen2":
        if not cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
            raise ConversionError("Qwen2 has q/k/v biases and no o_proj/MLP biases; this config differs "
                                  f"(qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}, mlp_bias={cfg.mlp_bias})")
        out = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=False, **common)
    else:
        if cfg.qkv_bias != cfg.o_bias:
            raise ConversionError(f"Llama's attention_bias covers q/k/v and o together; this config has "
                                  f"qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}")
        out = dict(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=cfg.qkv_bias,
                   mlp_bias=cfg.mlp_bias, **common)
    out.update(dtype=_dtype_name(dtype), torch_dtype=_dtype_name(dtype))
    return out


def hf_clip_vision_config(cfg: CLIPVisionConfig) -> dict:
    return dict(model_type="clip_vision_model", hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, image_size=cfg.image_size,
                patch_size=cfg.patch_size, num_channels=cfg.num_channels, layer_norm_eps=cfg.layer_norm_eps,
                hidden_act=cfg.hidden_act, projection_dim=768)


def hf_llava_config(cfg: LlavaConfig, dtype=None, image_token_id: int | None = None) -> dict:
    """A transformers `LlavaConfig` dict (read by 4.4x and 5.x)."""
    tok = cfg.image_token_id if image_token_id is None else image_token_id
    if not 0 <= tok < cfg.text.vocab_size:
        raise ConversionError(
            f"image token id {tok} is outside the vocabulary [0, {cfg.text.vocab_size}); transformers' LLaVA looks "
            "it up in the embedding table. Original-LLaVA checkpoints use -200: pass image_token_id= "
            "(--image-token-id) naming an in-vocab token to use as the image placeholder")
    return dict(architectures=["LlavaForConditionalGeneration"], model_type="llava", image_token_index=tok,
                image_seq_length=cfg.tokens_per_image, projector_hidden_act=cfg.projector_hidden_act,
                multimodal_projector_bias=cfg.projector_bias,
                vision_feature_layer=list(cfg.vision_feature_layer) if isinstance(cfg.vision_feature_layer, tuple)
                else cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                tie_word_embeddings=cfg.text.tie_word_embeddings, text_config=hf_text_config(cfg.text, dtype),
                vision_config=hf_clip_vision_config(cfg.vision), dtype=_dtype_name(dtype),
                torch_dtype=_dtype_name(dtype))


def _export(rules: list[Rule], params: Mapping, hf_config: dict, out_dir: PathLike, dtype, max_shard_bytes: int,
            overwrite: bool, extra_files: Sequence[PathLike], progress: bool) -> pathlib.Path:
    params = stack_layers(params)       # the tables name the scanned `layers` (a scan_layers=False model unrolls them)
    leaves = [_leaf(params, r.path) for r in rules]     # numpy or jax arrays; only shapes/dtypes read here
    src_dtypes = {str(np.dtype(x.dtype)) for x in leaves}
    if dtype is None and len(src_dtypes) == 1:
        dtype_name = src_dtypes.pop()
        hf_config = {**hf_config, "dtype": dtype_name, "torch_dtype": dtype_name}
        if "text_config" in hf_config:
            hf_config["text_config"] = {**hf_config["text_config"], "dtype": dtype_name, "torch_dtype": dtype_name}
    np_dtype = np.dtype(dtype) if dtype is not None else None
    # Every HF tensor's size is known before any is built (transforms keep the element count), so
    # shards are planned up front and each tensor streams to disk as soon as it is made.
    plan = []
    for rule, x in zip(rules, leaves):
        per_key = int(np.prod(x.shape)) // max(rule.num_layers, 1) * (np_dtype or np.dtype(x.dtype)).itemsize
        plan += [(key, per_key) for key in rule.hf_keys()]
    total = sum(b for _, b in plan)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="export", file=sys.stderr)

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for key, x in export_params(rules, params, np_dtype):
            if bar is not None:
                bar.update(x.nbytes)
            yield key, x

    try:
        with atomic_output_dir(out_dir, overwrite) as tmp:
            for f in extra_files:
                f = pathlib.Path(f)
                if f.name not in ("config.json", "source_config.json"):
                    (tmp / f.name).write_bytes(f.read_bytes())
            write_sharded_safetensors(tmp, plan, tensors(), max_shard_bytes)
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    finally:
        if bar is not None:
            bar.close()
    return pathlib.Path(out_dir)


def _leaf(tree: Mapping, path: str):
    node = tree
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            raise ConversionError(f"params have no {path!r} (stopped at {part!r}); do they belong to this config?")
        node = node[part]
    return node


def export_llava(cfg: LlavaConfig, params: Mapping, out_dir: PathLike, dtype: Any = None, *,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, image_token_id: int | None = None,
                 overwrite: bool = False, extra_files: Sequence[PathLike] = (), progress: bool = True) -> pathlib.Path:
    """jaxvlm LLaVA params -> an HF checkpoint `LlavaForConditionalGeneration.from_pretrained` loads:
    llava-hf layout safetensors (sharded + `model.safetensors.index.json` above `max_shard_bytes`)
    and config.json. `extra_files` (tokenizer, processor) are copied alongside."""
    return _export(llava_rules(cfg), params, hf_llava_config(cfg, dtype, image_token_id), out_dir, dtype,
                   max_shard_bytes, overwrite, extra_files, progress)


def export_lm(cfg: LMConfig, params: Mapping, out_dir: PathLike, dtype: Any = None, *,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
              extra_files: Sequence[PathLike] = (), progress: bool = True) -> pathlib.Path:
    """jaxvlm DecoderLM params -> an HF `LlamaForCausalLM` / `Qwen2ForCausalLM` checkpoint."""
    return _export(lm_rules(cfg), params, hf_text_config(cfg, dtype), out_dir, dtype, max_shard_bytes, overwrite,
                   extra_files, progress)


def export_checkpoint(cfg, params, out_dir, dtype=None, **kw) -> pathlib.Path:
    """Dispatch on the config type (LlavaConfig or LMConfig)."""
    if isinstance(cfg, LlavaConfig):
        return export_llava(cfg, params, out_dir, dtype, **kw)
    if isinstance(cfg, LMConfig):
        kw.pop("image_token_id", None)
        return export_lm(cfg, params, out_dir, dtype, **kw)
    raise ConversionError(f"no HF exporter for {type(cfg).__name__}")


__all__ = ["import_llava", "import_lm", "import_checkpoint", "export_llava", "export_lm", "export_checkpoint",
           "hf_llava_config", "hf_text_config", "llava_config_from_hf", "llava_config_from_original",
           "IMAGE_TOKEN_INDEX", "peak_rss_bytes", "hf_side_files", "read_hf_config"]
