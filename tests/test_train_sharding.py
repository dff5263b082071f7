"""Sharded train step == single-device step (loss and updated parameters) on 8 simulated devices,
for data / fsdp / tensor / mixed meshes (one with gradient accumulation); parameters really are sharded;
NaN handling; checkpoint restore onto a different mesh."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.models.clip import CLIPVisionConfig
from jaxvlm.models.llama import LMConfig
from jaxvlm.models.llava import Llava, LlavaConfig
from jaxvlm.models.params import init_params, logical_axes
from jaxvlm.train import mesh as M
from jaxvlm.train import optim as O
from jaxvlm.train import sharding as S
from jaxvlm.train import state as ST
from jaxvlm.train.checkpoint import Checkpointer
from jaxvlm.train.sources import SyntheticConfig, synthetic_dataset
from jaxvlm.train.step import vlm_lm_loss

from sharding_utils import assert_no_replication_fallback, run_steps

TOL = 1e-5
# (mesh, accumulation steps): (2, 2, 2) also accumulates over 2 micro-batches, which must equal the
# full-batch step (micro losses are token-weighted), so one compile checks both.
MESHES = [((8, 1, 1), 1), ((2, 4, 1), 1), ((2, 2, 2), 2), ((1, 1, 8), 1)]


def rel(a, b, floor=1e-6) -> float:
    """max|a-b| / max|b|. The floor matters only for leaves that are exactly 0 in exact arithmetic:
    CLIP's k_proj bias gets a zero gradient (softmax ignores it), so it holds rounding noise
    (~1e-15) whose relative difference between two reduction orders is meaningless."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), floor))


@pytest.fixture(scope="module")
def setup():
    # dims divisible by 8 wherever fsdp/tensor shard them (64, 128, 32 = 4 kv heads x 8)
    cfg = LlavaConfig(text=LMConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                                    num_kv_heads=4),
                      vision=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                              image_size=32, patch_size=8), image_token_id=127)
    model = Llava(cfg)
    ex = (jnp.full((1, 16), 127, jnp.int32), jnp.zeros((1, 3, 32, 32)))
    params = jax.device_get(jax.jit(lambda k: init_params(model, k, *ex))(jax.random.key(0)))
    logical = logical_axes(model, *ex)
    abstract = jax.eval_shape(lambda p: p, params)
    # eps=1: Adam's first update is lr * g / (|g| + eps); with eps ~0 it is lr * sign(g), which turns
    # rounding noise of gradients that are exactly 0 in theory (CLIP's k_proj bias) into full-size
    # differences between two correct reductions orders. eps=1 keeps the update a smooth function of g.
    opt = O.make_optimizer(O.OptimConfig(default_lr=0.1, schedule="constant", eps=1.0, weight_decay=0.01),
                           abstract)
    batch = next(iter(synthetic_dataset(SyntheticConfig(), 8)))
    loss_fn = vlm_lm_loss(model)
    return dict(model=model, params=params, logical=logical, abstract=abstract, opt=opt, batch=batch,
                loss_fn=loss_fn)


@pytest.fixture(scope="module")
def reference(setup):
    return run_steps(setup, (1, 1, 1))


@pytest.fixture(scope="module")
def runs(setup):
    return {}


@pytest.mark.parametrize("shape,accum", MESHES)
def test_sharded_step_matches_single_device(setup, reference, runs, shape, accum, capfd):
    out = runs[shape] = run_steps(setup, shape, accum=accum)
    assert_no_replication_fallback(capfd.readouterr().err)
    for got, want in zip(out["losses"], reference["losses"]):
        assert abs(got - want) / abs(want) < TOL
    ref_p = jax.device_get(reference["state"].params)
    got_p = jax.device_get(out["state"].params)
    init = setup["params"]
    for (path, g), r, p0 in zip(jax.tree_util.tree_flatten_with_path(got_p)[0], jax.tree.leaves(ref_p),
                                jax.tree.leaves(init)):
        assert rel(g, r) < TOL, jax.tree_util.keystr(path)
        assert rel(g - p0, r - p0) < 1e-4, f"update of {jax.tree_util.keystr(path)}"   # the update itself
    # Really sharded: a device holds total / (shards) of a weight.
    k = out["state"].params["language_model"]["layers"]["mlp"]["gate_proj"]["kernel"]   # [L, embed, mlp]
    mesh = out["mesh"]
    shards = mesh.shape["fsdp"] * mesh.shape["tensor"]
    assert k.addressable_shards[0].data.nbytes == k.nbytes // shards
    mu = jax.tree.leaves(out["state"].opt_state)
    assert any(x.shape == k.shape and x.sharding.is_equivalent_to(k.sharding, k.ndim) for x in mu)


def test_non_finite_step_keeps_state(setup, runs):
    out = runs.get((2, 2, 2)) or run_steps(setup, (2, 2, 2), accum=2)
    bad = dict(setup["batch"], pixel_values=np.full_like(setup["batch"]["pixel_values"], np.nan))
    before = jax.device_get(out["state"])
    state = jax.device_put(before, out["st_sh"])
    state, m = out["step"](state, S.shard_batch(bad, out["mesh"]))
    assert not bool(m["finite"])
    after = jax.device_get(state)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)


def test_restore_onto_other_mesh(setup, runs, tmp_path):
    src = runs.get((8, 1, 1)) or run_steps(setup, (8, 1, 1))
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2, every=1)
    ckpt.save(2, src["state"], data_state={"next_index": 7}, meta={"note": "x"})
    ckpt.close()
    mesh = M.make_mesh((1, 2, 4))
    rules = S.make_rules("fsdp_tp")
    p_sh = S.param_shardings(setup["logical"], setup["abstract"], mesh, rules)
    st_sh = ST.state_shardings(p_sh, setup["abstract"], setup["opt"], mesh)
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2, every=1)
    state, data_state, meta = ckpt.restore(ckpt.latest_step(), ST.abstract_state(st_sh, setup["abstract"], setup["opt"]))
    ckpt.close()
    assert data_state == {"next_index": 7} and meta == {"note": "x"}
    k = state.params["language_model"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert k.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert k.addressable_shards[0].data.shape == (2, 32, 32)
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(src["state"]))):
        np.testing.assert_array_equal(a, b)


def test_replicated_large_params_are_reported(setup):
    mesh = M.make_mesh((1, 8, 1))
    rules = S.make_rules("fsdp_tp", {"embed": None, "vocab": None})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        S.param_shardings(setup["logical"], setup["abstract"], mesh, rules, warn_replicated_bytes=16 << 10)
    msg = " ".join(str(x.message) for x in w)
    assert "language_model/embed_tokens/embedding" in msg and "lm_head" in msg


def test_bad_batch_and_mesh():
    with pytest.raises(ValueError, match="needs 16 devices but only 8"):
        M.make_mesh((16, 1, 1))
    mesh = M.make_mesh((8, 1, 1))
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 8"):
        S.shard_batch({"input_ids": np.zeros((6, 4), np.int32)}, mesh)


def test_optimizer_groups_state_shardings(setup):
    """Several optimizer groups (masked inner states full of MaskedNodes, weight-decay masks, a
    frozen group): every Adam moment still follows its parameter's sharding."""
    groups = (O.Group("vision", r"vision_tower/.*", lr=0.2, weight_decay=0.0), O.Group("proj", r".*projector.*", lr=0.05))
    opt = O.make_optimizer(O.OptimConfig(default_lr=0.1, schedule="constant", weight_decay=0.01, groups=groups),
                           setup["abstract"])
    mesh = M.make_mesh((2, 4, 1), jax.devices()[:8])
    p_sh = S.param_shardings(setup["logical"], setup["abstract"], mesh, S.make_rules("fsdp_tp"))
    st_sh = S.opt_state_shardings(opt.tx, setup["abstract"], p_sh, mesh)
    state = jax.eval_shape(opt.tx.init, setup["abstract"])
    assert jax.tree.structure(st_sh) == jax.tree.structure(state)
    flat_p = {jax.tree_util.keystr(k): (v.shape, s) for (k, v), s in
              zip(jax.tree_util.tree_flatten_with_path(setup["abstract"])[0], jax.tree.leaves(p_sh))}
    followed = 0
    for (path, leaf), s in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(st_sh)):
        key = jax.tree_util.keystr(path)
        match = [ps for name, (shape, ps) in flat_p.items() if key.endswith(name) and shape == leaf.shape]
        if match and (".mu" in key or ".nu" in key):
            assert s == match[0], key
            followed += 1
        elif not match:
            assert s.spec == jax.sharding.PartitionSpec(), key
    n_params = len(flat_p)
    assert followed == 2 * n_params          # mu and nu of every parameter, in whichever group


@pytest.mark.parametrize("shape,process_of,ok", [
    ((4, 2, 1), lambda d: d.id // 4, True),       # data x fsdp across the two hosts
    ((2, 2, 2), lambda d: d.id // 4, True),       # tensor pairs within a host
    ((2, 2, 2), lambda d: d.id % 2, False),       # each tensor pair spans both hosts: both hold every row
    ((1, 1, 8), lambda d: d.id // 4, False),      # the batch replicated over a tensor axis across hosts
])
def test_each_host_must_hold_its_own_rows(shape, process_of, ok):
    """Multi-host: each process feeds batch/processes rows of its own, so the mesh must give each host's
    devices exactly that many distinct rows (`check_process_batches` turns the rest into an error)."""
    mesh = M.make_mesh(M.MeshConfig.from_shape(shape))
    owner = {d: process_of(d) for d in mesh.devices.flat}
    held = S.process_batch_rows(S.batch_sharding(mesh).devices_indices_map((8,)), owner, 8)
    assert sorted(held) == [0, 1] and (all(len(r) == 4 for r in held.values()) and not held[0] & held[1]) == ok
    if ok:
        S.check_process_batches(mesh, 8, owner)
    else:
        with pytest.raises(ValueError, match=r"gives the 2 processes \[\(0, 8\), \(1, 8\)\] \(process, rows\) of the "
                                             r"global batch of 8, but each process reads 4 rows of its own"):
            S.check_process_batches(mesh, 8, owner)
    S.check_process_batches(mesh, 8)          # one real process: nothing to check
