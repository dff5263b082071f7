"""Checkpoint conversion on disk, both ways (jaxvlm.conversion.{io, llava_io, converted, cli}).

Tiny random transformers models are written in every LLaVA key layout real checkpoints use, read
back one tensor at a time, and written out again: round trips are bit-exact, transformers loads the
exports with no missing/unexpected keys and identical logits, and bad input fails with a clear error.
"""
import importlib.util
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxvlm.conversion import llava_io
from jaxvlm.conversion.converted import load_converted, save_converted
from jaxvlm.conversion.io import SafetensorsReader, open_checkpoint, write_safetensors
from jaxvlm.conversion.table import ConversionError
from jaxvlm.models.llava import Llava
from jaxvlm.models.params import abstract_params, count_params
from parity_utils import rel_err, torch_state

TOL = 1e-5
IMG = 127
T_TEXT = 48          # text tokens after the image: positions run past the llama3 rope's original length


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tt():
    import torch
    import transformers
    torch.manual_seed(0)
    return torch, transformers


def _vision_cfg(transformers):
    return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32)


def _llama_kw(**kw):
    # llama3 rope with a short original length, so a wrong theta/scaling shows in the logits.
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=16))
    return {**base, **kw}


@pytest.fixture(scope="module")
def hf_llava(tt):
    torch, transformers = tt
    cfg = transformers.LlavaConfig(vision_config=_vision_cfg(transformers),
                                   text_config=transformers.LlamaConfig(**_llama_kw()), image_token_index=IMG,
                                   image_seq_length=16, vision_feature_layer=-2,
                                   vision_feature_select_strategy="default", projector_hidden_act="gelu")
    return transformers.LlavaForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    ids = np.concatenate([[1, 5, 6], np.full(16, IMG), rng.integers(3, IMG, T_TEXT)])[None].astype(np.int64)
    pix = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    return ids, pix


@pytest.fixture(scope="module")
def hf_logits(tt, hf_llava, inputs):
    torch, _ = tt
    with torch.no_grad():
        return hf_llava(input_ids=torch.tensor(inputs[0]), pixel_values=torch.tensor(inputs[1])).logits.numpy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, hf_llava):
    """transformers 5 `save_pretrained` output (layout 'hf_saved')."""
    d = tmp_path_factory.mktemp("hf_saved")
    hf_llava.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def imported(saved):
    return llava_io.import_llava(saved, progress=False)


_FWD = {}


def jax_logits(cfg, params, ids, pix):
    """One jitted forward per config (compiles dominate this file's runtime)."""
    if cfg not in _FWD:
        model = Llava(cfg)
        _FWD[cfg] = jax.jit(lambda p, i, x: model.apply({"params": p}, i, x).logits)
    return np.asarray(_FWD[cfg](params, jnp.asarray(ids), jnp.asarray(pix)))


def read_all(path) -> dict:
    with open_checkpoint(path) as r:
        return {k: np.array(r.get(k)) for k in r.keys()}


def assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, p
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), err_msg=str(p))


def to_hub(key: str) -> str:
    """transformers 5 saved name -> llava-hf hub name (written here by hand, not with jaxvlm's tables)."""
    return re.sub(r"^vision_tower\.", "vision_tower.vision_model.", key)


def to_original(key: str) -> str | None:
    """llava-hf hub name -> original LLaVA repo name (None: CLIP weights, which live elsewhere)."""
    for a, b in [("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                 ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                 ("multi_modal_projector.linear_2.", "model.mm_projector.2.")]:
        if key.startswith(a):
            return b + key[len(a):]
    return None


def original_config(hf_cfg) -> dict:
    """What an original-LLaVA `config.json` looks like: Llama fields at the top + mm_* fields."""
    t = hf_cfg.text_config.to_dict()
    rope = dict(t.pop("rope_parameters"))
    theta = rope.pop("rope_theta")
    t.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"], rope_theta=theta, rope_scaling=rope,
             mm_vision_tower="openai/clip-vit-large-patch14-336", mm_vision_select_layer=-2,
             mm_vision_select_feature="patch", mm_projector_type="mlp2x_gelu", mm_hidden_size=32,
             mm_use_im_start_end=False)
    return t


# ----------------------------------------------------------------------------- import


def test_import_gives_hf_logits(imported, inputs, hf_logits):
    cfg, params = imported
    assert cfg.text.rope_scaling_dict["rope_type"] == "llama3" and cfg.text.rope_theta == 500000.0
    assert rel_err(jax_logits(cfg, params, *inputs), hf_logits) < TOL


def test_every_hf_layout_imports_identically(tmp_path, tt, hf_llava, saved, imported):
    _, ref = imported
    state = read_all(saved / "model.safetensors")
    layouts = {"hub": {to_hub(k): v for k, v in state.items()},
               "hf_memory": torch_state(hf_llava)}                      # v5 in-memory names
    for name, tensors in layouts.items():
        d = tmp_path / name
        d.mkdir()
        write_safetensors(d / "model.safetensors", tensors.items())
        (d / "config.json").write_text((saved / "config.json").read_text())
        _, params = llava_io.import_llava(d, progress=False)
        assert_trees_equal(params, ref)


def test_bin_checkpoint_imports(tmp_path, tt, hf_llava, saved, imported):
    torch, _ = tt
    torch.save(hf_llava.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    assert_trees_equal(llava_io.import_llava(tmp_path, progress=False)[1], imported[1])


def test_import_casts_to_bf16(saved, imported):
    cfg, params = llava_io.import_llava(saved, dtype="bfloat16", progress=False)
    assert cfg.text.param_dtype == "bfloat16" == cfg.vision.param_dtype
    assert_trees_equal(params, jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), imported[1]))


@pytest.fixture(scope="module")
def original_dirs(tmp_path_factory, tt, hf_llava, saved):
    """An original-LLaVA checkpoint without CLIP weights + a separate CLIPModel checkpoint."""
    torch, transformers = tt
    root = tmp_path_factory.mktemp("original")
    hub = {to_hub(k): v for k, v in read_all(saved / "model.safetensors").items()}
    ckpt, clip = root / "llava", root / "clip"
    ckpt.mkdir()
    # Split over two files with an index, as the real ones are.
    orig = {to_original(k): v for k, v in hub.items() if to_original(k)}
    keys = sorted(orig)
    files = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in files.items():
        write_safetensors(ckpt / name, [(k, orig[k]) for k in ks])
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in files.items() for k in ks}}))
    (ckpt / "config.json").write_text(json.dumps(original_config(hf_llava.config)))
    clip_model = transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=hf_llava.config.vision_config.to_dict(), text_config=dict(
            vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            bos_token_id=0, eos_token_id=1, pad_token_id=1)))
    clip_model.vision_model.load_state_dict(hf_llava.model.vision_tower.state_dict())
    clip_model.save_pretrained(clip)
    return ckpt, clip, hub


def test_original_layout_import_gives_hf_logits(original_dirs, inputs, hf_logits, imported):
    ckpt, clip, _ = original_dirs
    cfg, params = llava_io.import_llava(ckpt, vision_tower_dir=clip, progress=False)
    assert cfg.image_token_id == llava_io.IMAGE_TOKEN_INDEX
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.text == imported[0].text and cfg.vision == imported[0].vision
    assert_trees_equal(params, imported[1])
    ids = np.where(inputs[0] == IMG, llava_io.IMAGE_TOKEN_INDEX, inputs[0])   # the LLaVA repo's -200 slots
    assert rel_err(jax_logits(cfg, params, ids, inputs[1]), hf_logits) < TOL


def test_original_layout_with_tower_inside(tmp_path, original_dirs, imported):
    """Fine-tuned original checkpoints can carry the tower as model.vision_tower.vision_tower.*."""
    ckpt, clip, hub = original_dirs
    tensors = read_all(ckpt)
    tensors.update({"model.vision_tower.vision_tower." + k[len("vision_tower."):]: v
                    for k, v in hub.items() if k.startswith("vision_tower.")})
    write_safetensors(tmp_path / "model.safetensors", tensors.items())
    cfg_json = json.loads((ckpt / "config.json").read_text())
    # The tiny tower's shape is not in the config: vision_tower_dir supplies its config.json only.
    _, params = llava_io.import_llava(tmp_path / "model.safetensors", vision_tower_dir=clip, config=cfg_json,
                                      progress=False)
    assert_trees_equal(params, imported[1])


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_roundtrip_bit_exact_and_transformers_loads(tmp_path, tt, hf_llava, saved, inputs, dtype):
    torch, transformers = tt
    src = saved
    if dtype == "bfloat16":
        bf16 = transformers.LlavaForConditionalGeneration(hf_llava.config).eval()
        bf16.load_state_dict(hf_llava.state_dict())
        src = tmp_path / "src"
        bf16.to(torch.bfloat16).save_pretrained(src)
    # The reference is the source checkpoint loaded the same way (a model cast with `.to(bf16)`
    # also casts its rotary buffer, which from_pretrained keeps in fp32).
    ref_model = transformers.LlavaForConditionalGeneration.from_pretrained(src, dtype=getattr(torch, dtype)).eval()
    cfg, params = llava_io.import_llava(src, progress=False)
    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {dtype} == {cfg.text.param_dtype}
    save_converted(tmp_path / "jax", cfg, params)
    cfg2, params2 = load_converted(tmp_path / "jax")
    assert cfg2 == cfg
    assert_trees_equal(params2, params)

    out = llava_io.export_llava(cfg2, params2, tmp_path / "hf", max_shard_bytes=100_000, progress=False)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 1
    ours, theirs = read_all(out), {to_hub(k): v for k, v in read_all(src / "model.safetensors").items()}
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        np.testing.assert_array_equal(ours[k].view(np.uint8), theirs[k].view(np.uint8), err_msg=k)

    loaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        out, output_loading_info=True, dtype=getattr(torch, dtype))
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    loaded.eval()
    with torch.no_grad():
        a = loaded(input_ids=torch.tensor(inputs[0]), pixel_values=torch.tensor(inputs[1]).to(loaded.dtype)).logits
        b = ref_model(input_ids=torch.tensor(inputs[0]), pixel_values=torch.tensor(inputs[1]).to(loaded.dtype)).logits
    assert torch.equal(a, b)


def test_unrolled_layers_export_like_scanned(tmp_path, imported):
    """A scan_layers=False model's params (`layers_0 ..`, as the demo checkpoint saves them) export to the
    same HF tensors as the scanned ones (they once failed with "params have no ...layers/..."), through
    the CLI too."""
    import dataclasses

    from jaxvlm.cli import main
    from jaxvlm.models.llama import unstack_layers
    cfg, params = imported
    unrolled = unstack_layers(params)
    assert "layers" not in unrolled["language_model"] and "layers_1" in unrolled["language_model"]
    a = read_all(llava_io.export_llava(cfg, params, tmp_path / "scanned", progress=False))
    b = read_all(llava_io.export_llava(cfg, unrolled, tmp_path / "unrolled", progress=False))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ucfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, scan_layers=False))
    save_converted(tmp_path / "jax_unrolled", ucfg, unrolled)
    assert main(["convert", "to-hf", str(tmp_path / "jax_unrolled"), str(tmp_path / "cli"), "--no-progress"]) == 0
    c = read_all(tmp_path / "cli")
    assert sorted(c) == sorted(a) and all(np.array_equal(c[k], a[k]) for k in a)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lm_roundtrip(tmp_path, tt, family):
    torch, transformers = tt
    if family == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_llama_kw())).eval()
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})).eval()
    hf.save_pretrained(tmp_path / "src")
    cfg, params = llava_io.import_lm(tmp_path / "src", progress=False)
    out = llava_io.export_lm(cfg, params, tmp_path / "out", progress=False)
    ours, theirs = read_all(out), read_all(tmp_path / "src")
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    # Both RoPE schemas: transformers 4.x reads only rope_theta/rope_scaling, 5.x rope_parameters.
    written = json.loads((out / "config.json").read_text())
    theta = hf.config.rope_parameters["rope_theta"]
    assert written["rope_theta"] == theta == written["rope_parameters"]["rope_theta"]
    if family == "llama":
        assert written["rope_scaling"] == {k: v for k, v in hf.config.rope_parameters.items() if k != "rope_theta"}
    else:
        assert written["rope_scaling"] is None and written["rope_parameters"]["rope_type"] == "default"
    cls = type(hf)
    loaded, info = cls.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert loaded.config.rope_parameters == hf.config.rope_parameters
    ids = torch.tensor(np.random.default_rng(2).integers(0, 128, (1, 64)))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids).logits, hf(input_ids=ids).logits)


def test_original_layout_exports_with_in_vocab_image_token(tmp_path, tt, original_dirs, inputs, hf_logits):
    torch, transformers = tt
    ckpt, clip, _ = original_dirs
    cfg, params = llava_io.import_llava(ckpt, vision_tower_dir=clip, progress=False)
    with pytest.raises(ConversionError, match="image token id -200 is outside the vocabulary"):
        llava_io.export_llava(cfg, params, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
    out = llava_io.export_llava(cfg, params, tmp_path / "hf", image_token_id=IMG, progress=False)
    loaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        logits = loaded.eval()(input_ids=torch.tensor(inputs[0]), pixel_values=torch.tensor(inputs[1])).logits
    np.testing.assert_array_equal(logits.numpy(), hf_logits)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture()
def copy_of(tmp_path, saved):
    def make(mutate=None, config=None):
        d = tmp_path / "ckpt"
        d.mkdir()
        tensors = read_all(saved / "model.safetensors")
        if mutate:
            tensors = mutate(tensors)
        write_safetensors(d / "model.safetensors", tensors.items())
        c = json.loads((saved / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(config(c) if config else c))
        return d
    return make


def _drop(key):
    return lambda t: {k: v for k, v in t.items() if k != key}


def test_error_wrong_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope"):
        llava_io.import_llava(tmp_path / "nope", progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        open_checkpoint(tmp_path / "empty")


def test_error_missing_tensor(copy_of):
    d = copy_of(_drop("language_model.model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ConversionError, match=r"missing 1 tensor.*layers\.1\.mlp\.up_proj\.weight"):
        llava_io.import_llava(d, progress=False)


def test_error_shape_mismatch(copy_of):
    key = "multi_modal_projector.linear_2.weight"
    d = copy_of(lambda t: {**t, key: np.zeros((64, 32), np.float32)})
    with pytest.raises(ConversionError, match=re.escape(f"{key}: checkpoint gives (32, 64)") + ".*expects \\(64, 64\\)"):
        llava_io.import_llava(d, progress=False)


def test_error_unknown_layout(copy_of):
    d = copy_of(lambda t: {"transformer." + k: v for k, v in t.items()})
    with pytest.raises(ValueError, match="unknown LLaVA checkpoint layout"):
        llava_io.import_llava(d, progress=False)


def test_error_unexpected_tensor(copy_of):
    d = copy_of(lambda t: {**t, "language_model.model.layers.0.self_attn.rotary_extra": np.zeros(3, np.float32)})
    with pytest.raises(ConversionError, match="does not use.*rotary_extra"):
        llava_io.import_llava(d, progress=False)


def test_error_corrupt_files(tmp_path, saved):
    good = (saved / "model.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(ConversionError, match="trunc.safetensors.*(truncated|corrupt)"):
        open_checkpoint(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ConversionError, match="junk.safetensors: corrupt safetensors header"):
        SafetensorsReader(tmp_path / "junk.safetensors")
    (tmp_path / "junk.bin").write_bytes(b"garbage" * 10)
    with pytest.raises(ConversionError, match="junk.bin: unreadable PyTorch checkpoint"):
        open_checkpoint(tmp_path / "junk.bin")


def test_error_config_weights_mismatch(copy_of):
    def three_layers(c):
        c["text_config"]["num_hidden_layers"] = 3
        return c
    with pytest.raises(ConversionError, match="config gives the language model 3 layers but the weights hold 2"):
        llava_io.import_llava(copy_of(config=three_layers), progress=False)


def test_error_original_layout_without_tower(original_dirs):
    ckpt, _, _ = original_dirs
    cfg_json = json.loads((ckpt / "config.json").read_text())
    # Without vision_tower_dir the tower's shape comes from its name (CLIP-L/336), not the tiny one.
    with pytest.raises(ConversionError, match="mm_hidden_size=32 but the vision tower has hidden_size=1024"):
        llava_io.import_llava(ckpt, progress=False)
    del cfg_json["mm_hidden_size"]
    with pytest.raises(ConversionError, match="holds no vision-tower weights.*clip-vit-large.*vision_tower_dir"):
        llava_io.import_llava(ckpt, config=cfg_json, progress=False)


def test_existing_output_is_never_corrupted(tmp_path, imported):
    cfg, params = imported
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists"):
        save_converted(out, cfg, params)
    with pytest.raises(FileExistsError, match="already exists"):
        llava_io.export_llava(cfg, params, out, progress=False)
    # A failure part-way through an overwrite leaves the old directory as it was, and no temp dirs.
    broken = {**params, "multi_modal_projector": {}}
    with pytest.raises(ConversionError, match="multi_modal_projector"):
        llava_io.export_llava(cfg, broken, out, overwrite=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    save_converted(out, cfg, params, overwrite=True)
    assert not (out / "precious.txt").exists() and load_converted(out)[0] == cfg


def test_load_converted_onto_a_mesh(tmp_path, imported):
    """What `jaxvlm generate --checkpoint` does: restore straight into shardings (and a dtype)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    cfg, params = imported
    save_converted(tmp_path / "ck", cfg, params)
    mesh = Mesh(np.array(jax.devices()).reshape(-1, 1), ("fsdp", "tensor"))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=NamedSharding(
        mesh, P("fsdp") if x.shape[0] % mesh.size == 0 else P())), params)
    _, restored = load_converted(tmp_path / "ck", target)
    emb = restored["language_model"]["embed_tokens"]["embedding"]
    assert emb.dtype == jnp.bfloat16 and emb.sharding.spec == P("fsdp")
    np.testing.assert_array_equal(np.asarray(emb), params["language_model"]["embed_tokens"]["embedding"]
                                  .astype(ml_dtypes.bfloat16))


# ----------------------------------------------------------------------------- CLI


def test_cli_both_ways(tmp_path, saved, imported):
    from jaxvlm.cli import main
    assert main(["convert", "to-jaxvlm", str(saved), str(tmp_path / "jax"), "--no-progress"]) == 0
    cfg, params = load_converted(tmp_path / "jax")
    assert cfg == imported[0]
    assert_trees_equal(params, imported[1])
    assert main(["convert", "to-hf", str(tmp_path / "jax"), str(tmp_path / "hf"), "--dtype", "bfloat16",
                 "--no-progress"]) == 0
    back = read_all(tmp_path / "hf")
    assert back["language_model.lm_head.weight"].dtype == ml_dtypes.bfloat16
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]["dtype"] == "bfloat16"
    assert (tmp_path / "hf" / "generation_config.json").is_file()     # side files travel along


# ----------------------------------------------------------------------------- real-checkpoint configs


def _models_module():
    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "models.py"
    spec = importlib.util.spec_from_file_location("jaxvlm_configs_models", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _llama_count(vocab, d, ffn, layers, heads, kv_heads):
    """Published-architecture formula: embed + untied head + per layer (q,o: d*d; k,v: d*d*kv/h;
    gate/up/down: 3*d*ffn; two RMSNorms) + final norm."""
    head_dim = d // heads
    attn = 2 * d * d + 2 * d * kv_heads * head_dim
    return 2 * vocab * d + layers * (attn + 3 * d * ffn + 2 * d) + d


def _clip_count(d=1024, ffn=4096, layers=24, image=336, patch=14):
    """CLIP ViT: patch conv (no bias) + CLS + positions (1 + patches) + pre-LN + blocks + post-LN."""
    n_pos = (image // patch) ** 2 + 1
    block = 4 * (d * d + d) + (d * ffn + ffn) + (ffn * d + d) + 2 * 2 * d
    return 3 * patch * patch * d + d + n_pos * d + 2 * d + layers * block + 2 * d


def _projector_count(dv, d):
    return dv * d + d + d * d + d


EXPECTED = {
    "vicuna-7b": _llama_count(32000, 4096, 11008, 32, 32, 32),                         # 6.74B
    "llama-3.1-8b": _llama_count(128256, 4096, 14336, 32, 32, 8),                      # 8.03B
    "llava-v1.5-7b": _llama_count(32064, 4096, 11008, 32, 32, 32) + _clip_count() + _projector_count(1024, 4096),
    "llava-v1.5-7b-original": _llama_count(32000, 4096, 11008, 32, 32, 32) + _clip_count()
    + _projector_count(1024, 4096),
    "llava-v1.5-13b": _llama_count(32064, 5120, 13824, 40, 40, 40) + _clip_count() + _projector_count(1024, 5120),
    "llava-more-8b": _llama_count(128256, 4096, 14336, 32, 32, 8) + _clip_count() + _projector_count(1024, 4096),
}


def test_real_configs_param_counts():
    from jaxvlm.models.config_io import config_from_dict, config_to_dict
    models = _models_module()
    assert _clip_count() == 303_507_456                     # CLIP-L/336 tower: 303.5M
    assert round(EXPECTED["llava-v1.5-7b"] / 1e9, 2) == 7.06
    assert round(EXPECTED["llama-3.1-8b"] / 1e9, 2) == 8.03
    assert round(EXPECTED["llava-v1.5-13b"] / 1e9, 2) == 13.35
    assert sorted(models.MODELS) == sorted(EXPECTED)
    for name, want in EXPECTED.items():
        cfg = models.get_config(name)
        assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg, name
        if hasattr(cfg, "vision"):
            shapes = llava_io._abstract_llava(cfg)
            assert count_params(shapes["vision_tower"]) == _clip_count(), name
        else:
            shapes = abstract_params(llava_io.DecoderLM(cfg), jnp.zeros((1, 4), jnp.int32))
        assert count_params(shapes) == want, name


def test_real_config_json_parse_to_our_configs():
    """config.json of the real checkpoints (as published; llava-hf stores only non-default fields)
    -> the same configs as configs/models.py."""
    models = _models_module()
    llava_hf = {
        "architectures": ["LlavaForConditionalGeneration"], "image_token_index": 32000, "model_type": "llava",
        "pad_token_id": 32001, "projector_hidden_act": "gelu", "tie_word_embeddings": False, "vocab_size": 32064,
        "text_config": {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096, "model_type": "llama",
                        "rms_norm_eps": 1e-05, "torch_dtype": "float16", "vocab_size": 32064},
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                          "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}
    assert llava_io.llava_config_from_hf(llava_hf) == models.get_config("llava-v1.5-7b")
    original = {   # liuhaotian/llava-v1.5-7b (its model_type is plain "llava")
        "architectures": ["LlavaLlamaForCausalLM"], "hidden_act": "silu", "hidden_size": 4096,
        "intermediate_size": 11008, "max_position_embeddings": 4096, "mm_hidden_size": 1024,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "model_type": "llava", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "tie_word_embeddings": False, "torch_dtype": "float16", "vocab_size": 32000}
    assert llava_io.llava_config_from_hf(original) == models.get_config("llava-v1.5-7b-original")
    more = {**original, "model_type": "llava_llama", "hidden_size": 4096, "intermediate_size": 14336,
            "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    assert llava_io.llava_config_from_hf(more) == models.get_config("llava-more-8b")
