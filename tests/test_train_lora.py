"""LoRA: merged weights == base forward + LoRA branch; PEFT export loads in peft + transformers with
the same logits; import round trip; new-token rows match transformers' resize_token_embeddings."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.conversion.api import llava_from_torch
from jaxvlm.conversion.table import llava_rules
from jaxvlm.models import layers as L
from jaxvlm.train import lora as LO
from jaxvlm.train import tokens as TK

IMG = 127


@pytest.fixture(scope="module")
def hf_llava():
    import torch
    import transformers
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8)
    text = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMG, image_seq_length=16,
                                   vision_feature_layer=-2, vision_feature_select_strategy="default")
    hf = transformers.LlavaForConditionalGeneration(cfg).eval()
    jcfg, model, params = llava_from_torch(hf)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, IMG, size=(2, 40))
    ids[:, 3:19] = IMG
    pix = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    return torch, hf, jcfg, model, params, ids, pix


def trained_lora(params, spec):
    """A LoRA tree with non-zero B (as after training)."""
    lora = LO.init_lora(params, spec, jax.random.key(1))
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), lora)


def unmerged_forward(model, params, lora, spec, ids, pix):
    """Reference: base weights untouched, each targeted Linear adds scale * (x @ A) @ B to its output.
    A/B sit next to the kernel in the param tree, so nn.scan slices them per layer like the kernel."""
    def attach(p, l):
        out = dict(p)
        for k, v in l.items():
            out[k] = dict(p[k], **v) if "lora_a" in v else attach(p[k], v)
        return out

    def add_branch(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        mod = context.module
        if isinstance(mod, L.Linear) and context.method_name == "__call__" and "lora_a" in mod.variables["params"]:
            v = mod.variables["params"]
            y = y + spec.scale * (args[0] @ v["lora_a"]) @ v["lora_b"]
        return y

    with nn.intercept_methods(add_branch):
        return model.apply({"params": attach(params, lora)}, ids, pix).logits


def test_merge_equals_base_plus_lora(hf_llava):
    _, _, _, model, params, ids, pix = hf_llava
    spec = LO.LoraSpec(rank=4, alpha=8.0)
    lora = trained_lora(params, spec)
    assert set(LO.target_paths_of(lora)) == {f"language_model/layers/{m}" for m in (
        "self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj", "mlp/gate_proj",
        "mlp/up_proj", "mlp/down_proj")}     # all LM linears, not lm_head, not the vision tower
    assert lora["language_model"]["layers"]["self_attn"]["q_proj"]["lora_a"].shape == (2, 64, 4)
    logits = jax.jit(lambda p: model.apply({"params": p}, ids, pix).logits)     # one compile, three weight sets
    merged = logits(LO.merge_lora(params, lora, spec))
    ref = unmerged_forward(model, params, lora, spec, ids, pix)
    base = logits(params)
    err = float(jnp.max(jnp.abs(merged - ref)) / jnp.max(jnp.abs(ref)))
    assert err < 1e-6, err
    assert float(jnp.max(jnp.abs(base - ref))) > 1e-3      # the adapter really changes the output
    # B = 0 at init: the adapted model starts as the base model
    fresh = LO.init_lora(params, spec, jax.random.key(0))
    np.testing.assert_array_equal(logits(LO.merge_lora(params, fresh, spec)), base)


def test_peft_export_loads_in_peft(hf_llava, tmp_path):
    torch, hf, jcfg, model, params, ids, pix = hf_llava
    import copy

    import peft
    spec = LO.LoraSpec(rank=4, alpha=8.0)
    lora = trained_lora(params, spec)
    LO.export_peft(tmp_path / "adapter", lora, spec, llava_rules(jcfg))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "adapter").eval()
    n_lora = sum(1 for n, _ in pm.named_modules() if n.endswith("lora_A.default"))
    assert n_lora == 2 * 7                              # every exported module was wrapped
    with torch.no_grad():
        ref = pm(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix)).logits.numpy()
    ours = np.asarray(model.apply({"params": LO.merge_lora(params, lora, spec)}, ids, pix).logits)
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-5
    # round trip back into jaxvlm
    back, spec2 = LO.import_peft(tmp_path / "adapter", params, llava_rules(jcfg))
    assert spec2.scale == spec.scale
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(lora)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_new_token_rows_follow_transformers(hf_llava):
    torch, hf, jcfg, _, params, _, _ = hf_llava
    import copy
    m = copy.deepcopy(hf)
    m.resize_token_embeddings(136)        # v5 default: mean_resizing=True
    hf_emb = m.get_input_embeddings().weight.detach().numpy()
    hf_head = m.get_output_embeddings().weight.detach().numpy()
    cfg2, grown = TK.grow_llava_vocab(jcfg, jax.device_get(params), 130, jax.random.key(0), multiple_of=8)
    assert cfg2.text.vocab_size == 136
    emb = grown["language_model"]["embed_tokens"]["embedding"]
    head = grown["language_model"]["lm_head"]["kernel"]
    np.testing.assert_array_equal(emb[:128], params["language_model"]["embed_tokens"]["embedding"])
    # HF draws from N(mean, 1e-9 cov): rows differ from the mean by ~1e-6; so do ours.
    np.testing.assert_allclose(emb[128:], hf_emb[128:], atol=1e-5)
    np.testing.assert_allclose(head[:, 128:].T, hf_head[128:], atol=1e-5)
    assert np.std(emb[128:] - emb[:128].mean(0)) > 0      # sampled, not just the mean
