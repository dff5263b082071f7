"""In-memory conversion entry points (file IO lives in `jaxvlm.conversion.io`).

Example:
    >>> cfg, model, params = llava_from_torch(hf_model)       # a transformers LlavaForConditionalGeneration
"""
from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np

from jaxvlm.conversion import layouts
from jaxvlm.conversion.table import import_params, llava_rules, lm_rules
from jaxvlm.models.llama import DecoderLM, LMConfig
from jaxvlm.models.llava import Llava, LlavaConfig
from jaxvlm.models.params import abstract_params


def llava_example_inputs(cfg: LlavaConfig):
    """Smallest inputs that touch every parameter (used for abstract init)."""
    ids = jnp.full((1, cfg.tokens_per_image), cfg.image_token_id, jnp.int32)
    pix = jnp.zeros((1, cfg.vision.num_channels, cfg.vision.image_size, cfg.vision.image_size), jnp.float32)
    return ids, pix


def llava_params_from_state(state: Mapping[str, np.ndarray], cfg: LlavaConfig, layout: str | None = None,
                            dtype=None) -> dict:
    """A LLaVA state dict in any supported layout -> jaxvlm params (checked against the model's shapes)."""
    layout = layout or layouts.detect_llava_layout(state.keys())
    mapper = layouts.key_mapper(layout)
    canon = {}
    for k in state:
        c = mapper(k)
        if c is not None:
            canon[c] = k
    expected = abstract_params(Llava(cfg), *llava_example_inputs(cfg))
    return import_params(llava_rules(cfg), lambda k: np.asarray(state[canon[k]]), canon.keys(), expected, dtype)


def lm_params_from_state(state: Mapping[str, np.ndarray], cfg: LMConfig, dtype=None) -> dict:
    """A `LlamaForCausalLM` / `Qwen2ForCausalLM` state dict -> jaxvlm DecoderLM params."""
    expected = abstract_params(DecoderLM(cfg), jnp.zeros((1, 4), jnp.int32))
    keys = [k for k in state if not k.endswith("rotary_emb.inv_freq")]
    return import_params(lm_rules(cfg), lambda k: np.asarray(state[k]), keys, expected, dtype)


def torch_state(model) -> dict[str, np.ndarray]:
    """A torch module's state dict as numpy arrays (bf16 kept, via ml_dtypes)."""
    import ml_dtypes
    import torch
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        out[k] = v.view(torch.uint16).numpy().view(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 else v.numpy()
    return out


def llava_from_torch(hf_model, dtype=None):
    """(config, module, params) from an instantiated transformers `LlavaForConditionalGeneration`."""
    cfg = LlavaConfig.from_hf(hf_model.config)
    return cfg, Llava(cfg), llava_params_from_state(torch_state(hf_model), cfg, dtype=dtype)


def lm_from_torch(hf_model, dtype=None):
    """(config, module, params) from a transformers `LlamaForCausalLM` / `Qwen2ForCausalLM`."""
    cfg = LMConfig.from_hf(hf_model.config)
    return cfg, DecoderLM(cfg), lm_params_from_state(torch_state(hf_model), cfg, dtype=dtype)
