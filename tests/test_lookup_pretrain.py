"""Lookup pretraining (text questions over listed objects) and projector alignment: the questions are
right, the LM learns to answer with yes/no and drops into a Llava tree, the projector fit lowers its
error, and bad input is refused by name."""
import jax
import numpy as np
import pytest

from jaxvlm.data.image_processing import LlavaImageProcessor
from jaxvlm.data.shapes_tokenizer import build_tokenizer
from jaxvlm.data.shapes_world import generate_world, vocab
from jaxvlm.models.clip import CLIPVisionConfig
from jaxvlm.models.llama import LMConfig
from jaxvlm.models.llava import Llava, LlavaConfig
from jaxvlm.models.params import init_params
from jaxvlm.train import dense_vision as DV
from jaxvlm.train import lookup_pretrain as LP
from jaxvlm.train.loop import example_inputs

COLOURS, NOUNS = list(vocab.COLOUR_NAMES), list(vocab.CATEGORIES)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("lookup_world"), seed=5, n_train=8, n_val=1, n_test=1,
                          progress=False)


@pytest.fixture(scope="module")
def tok(world):
    return build_tokenizer(world)


@pytest.fixture(scope="module")
def lm_cfg(tok):
    return LMConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                    num_kv_heads=1, max_position_embeddings=128, scan_layers=False)


def test_lookup_questions_are_answered_by_the_listed_objects(tok):
    b = LP.lookup_batch(tok, COLOURS, NOUNS, np.random.default_rng(0), 64, 48)
    yes, no = LP.word_id(tok, "yes"), LP.word_id(tok, "no")
    assert set(b["answer"]) == {yes, no}
    for ids, mask, last, ans in zip(b["input_ids"], b["attention_mask"], b["last"], b["answer"]):
        n = int(mask.sum())
        assert last == n - 1 and not mask[n:].any()
        text = tok.decode(ids[:n])
        listed = text.split("Objects:")[1].split(".")[0]
        noun = text.split("Is there a ")[1].split(" in the image")[0]
        present = noun in [w.split()[-1] for w in listed.split(",")]
        assert (ans == yes) == present, text
        assert text.rstrip().endswith("ASSISTANT:")


def test_bad_lookup_settings_are_clear_errors(tok):
    with pytest.raises(ValueError, match="longer than max_len=8"):
        LP.lookup_batch(tok, COLOURS, NOUNS, np.random.default_rng(0), 2, 8)
    with pytest.raises(ValueError, match="at least two nouns"):
        LP.lookup_batch(tok, COLOURS, NOUNS[:1], np.random.default_rng(0), 2, 48)
    with pytest.raises(ValueError, match="'zyxwvut'"):
        LP.word_id(tok, "zyxwvut")


def test_lookup_pretraining_learns_the_answer_format_and_fits_a_llava_tree(tok, lm_cfg):
    params, hist = LP.pretrain_lookup(lm_cfg, tok, COLOURS, NOUNS, steps=100, batch=16, lr=1e-2, warmup=5,
                                      eval_every=25, progress=False)
    assert [h["step"] for h in hist] == [25, 50, 75, 100]
    # from ~ln(vocab) to near ln 2: the model answers yes/no (the lookup itself needs ~100x more steps)
    assert hist[0]["loss"] > 2.0 and hist[-1]["loss"] < 1.0, hist
    lc = LlavaConfig(vision=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                                             image_size=112, patch_size=16), text=lm_cfg, image_token_id=4)
    ref = jax.eval_shape(lambda: init_params(Llava(lc), jax.random.key(0), *example_inputs(lc)))
    assert jax.tree.structure(ref["language_model"]) == jax.tree.structure(params)
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(ref["language_model"]), jax.tree.leaves(params)))


def test_projector_alignment_lowers_its_error_and_checks_the_patch_count(world, tok, lm_cfg):
    lc = LlavaConfig(vision=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                                             image_size=112, patch_size=16), text=lm_cfg, image_token_id=4)
    model = Llava(lc)
    params = init_params(model, jax.random.key(0), *example_inputs(lc))
    # word embeddings at unit scale, as a trained LM's are, so the target is not ~0
    params["language_model"]["embed_tokens"]["embedding"] = jax.random.normal(
        jax.random.key(1), params["language_model"]["embed_tokens"]["embedding"].shape)
    targets = DV.patch_targets(world.instances["train"], world.image_dir("train"),
                               LlavaImageProcessor(image_size=112, tokens_per_image=49), 16, COLOURS)
    before = jax.tree.map(np.asarray, params)
    proj, hist = LP.align_projector(model, params, targets, tok, COLOURS, NOUNS, steps=150, batch=8, lr=3e-3)
    assert [h["step"] for h in hist] == [0, 100, 150]
    assert hist[-1]["mse"] < 0.8 * hist[0]["mse"], hist
    assert jax.tree.structure(proj) == jax.tree.structure(params["multi_modal_projector"])
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params)):      # the input tree is not modified
        assert np.array_equal(a, np.asarray(b))
    small = DV.DenseTargets(targets.pixels, targets.category[:, :10], targets.colour[:, :10], targets.box[:, :10],
                            targets.num_categories, targets.num_colours)
    with pytest.raises(ValueError, match="10 patches per image, the model 49"):
        LP.align_projector(model, params, small, tok, COLOURS, NOUNS, steps=1)
    with pytest.raises(ValueError, match="12 categories and 8 colours, but 11 nouns"):
        LP.align_projector(model, params, targets, tok, COLOURS, NOUNS[:-1], steps=1)


def test_train_loop_starts_from_given_lm_and_projector_trees(tmp_path, world, tok):
    """`model.lm_init` / `model.projector_init` replace the random init (lr 0: the export is the files,
    bit for bit); a tree of another shape is refused by name."""
    from jaxvlm import demo as D
    from jaxvlm.conversion.converted import load_converted
    from jaxvlm.models.params import save_param_tree
    from jaxvlm.train.config import apply_overrides
    from jaxvlm.train.loop import llava_config, train
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    tiny = ["model.text.hidden_size=32", "model.text.intermediate_size=64", "model.text.num_layers=2",
            "model.text.num_heads=2", "model.text.num_kv_heads=1", "model.vision.hidden_size=32",
            "model.vision.intermediate_size=64", "model.vision.num_layers=2", "model.vision.num_heads=2",
            "data.batch_size=8", "optim.default_lr=0.0", "optim.weight_decay=0.0", "checkpoint.async_save=False",
            "model.number_init=False"]   # the recipe's number_init rewrites a random LM; lm_init gives the LM
    cfg, _ = D.recipe(tmp_path, world, tok_dir, steps=1, overrides=tuple(tiny), vision=dict(steps=0))
    lc = llava_config(cfg)
    ref = init_params(Llava(lc), jax.random.key(7), *example_inputs(lc))
    lm = save_param_tree(tmp_path / "lm.msgpack", ref["language_model"])
    proj = save_param_tree(tmp_path / "proj.msgpack", ref["multi_modal_projector"])
    with pytest.raises(ValueError, match="model.number_init applies to a random LM only"):
        train(apply_overrides(cfg, [f"model.lm_init={lm}", "model.number_init=True"]), progress=False)
    train(apply_overrides(cfg, [f"model.lm_init={lm}", f"model.projector_init={proj}"]), progress=False)
    _, params = load_converted(tmp_path / "checkpoint")
    for part in ("language_model", "multi_modal_projector"):
        for a, b in zip(jax.tree.leaves(params[part]), jax.tree.leaves(ref[part])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    wide = apply_overrides(cfg, ["model.text.hidden_size=48", "model.text.num_heads=3", f"model.lm_init={lm}",
                                 f"train.workdir={tmp_path / 'wide'}"])
    with pytest.raises(ValueError, match=r"LM tensor .* has shape .* the model expects"):
        train(wide, progress=False)


def test_param_tree_files_round_trip_and_a_failed_write_keeps_the_old_file(tmp_path):
    from jaxvlm.models.params import load_param_tree, save_param_tree
    tree = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": np.ones(4, np.float32)}
    path = save_param_tree(tmp_path / "t.msgpack", tree)
    before = open(path, "rb").read()
    back = load_param_tree(path, tree, "toy")
    assert np.array_equal(back["a"]["kernel"], tree["a"]["kernel"]) and np.array_equal(back["b"], tree["b"])
    with pytest.raises(Exception):
        save_param_tree(path, {"a": object()})                          # not serialisable
    assert open(path, "rb").read() == before and not (tmp_path / "t.msgpack.tmp").exists()
    with pytest.raises(ValueError, match=r"missing toy tensor \['c'\]"):
        load_param_tree(path, {**tree, "c": np.zeros(1, np.float32)}, "toy")
