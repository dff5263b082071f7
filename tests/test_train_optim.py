"""Optimizer groups by path regex: per-group learning rates, frozen params without optimizer state,
frozen embedding rows (new tokens) that neither gradients nor weight decay move."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxvlm.train import optim as O
from jaxvlm.train import tokens as TK


def toy_params():
    k = jax.random.key(0)
    return {
        "base": {"vision_tower": {"layers": {"fc1": {"kernel": jax.random.normal(k, (2, 8, 16))}}},
                 "multi_modal_projector": {"linear_1": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros((8,))}},
                 "language_model": {"embed_tokens": {"embedding": jnp.ones((12, 8))},
                                    "lm_head": {"kernel": jnp.ones((8, 12))}}},
        "lora": {"language_model": {"layers": {"q_proj": {"lora_a": jnp.ones((2, 8, 4)),
                                                          "lora_b": jnp.zeros((2, 4, 8))}}}},
    }


def test_reverse_style_groups():
    params = toy_params()
    cfg = O.OptimConfig(groups=(O.Group("lora", r"lora/.*", 2e-4), O.Group("projector", r"base/multi_modal_projector/.*", 2e-5)),
                        default_lr=None, schedule="constant")
    opt = O.make_optimizer(cfg, params)
    labels = opt.labels
    assert labels["lora"]["language_model"]["layers"]["q_proj"]["lora_a"] == "lora"
    assert labels["base"]["multi_modal_projector"]["linear_1"]["bias"] == "projector"
    assert labels["base"]["language_model"]["embed_tokens"]["embedding"] == O.FROZEN
    state = opt.tx.init(params)
    # Adam moments (mu, nu) exist only for the 4 trainable tensors; frozen ones hold none.
    sizes = sorted(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    trainable_sizes = sorted([64, 64, 64, 8] * 2)      # lora_a, lora_b, projector kernel, bias
    assert sizes == trainable_sizes
    grads = jax.tree.map(jnp.ones_like, params)
    upd, _ = opt.tx.update(grads, state, params)
    assert float(jnp.abs(upd["base"]["vision_tower"]["layers"]["fc1"]["kernel"]).max()) == 0
    lr_l = float(jnp.abs(upd["lora"]["language_model"]["layers"]["q_proj"]["lora_b"]).max())
    lr_p = float(jnp.abs(upd["base"]["multi_modal_projector"]["linear_1"]["kernel"]).max())
    assert lr_l == pytest.approx(2e-4, rel=1e-3) and lr_p == pytest.approx(2e-5, rel=1e-3)


@pytest.mark.parametrize("lr", [None, 1e-3])
def test_group_matching_no_parameter_is_a_clear_error(lr):
    # "vision_tower/.*" misses the "base/" prefix: the tower would silently keep the default lr
    cfg = O.OptimConfig(groups=(O.Group("tower", r"vision_tower/.*", lr),), default_lr=1e-4, schedule="constant")
    with pytest.raises(ValueError, match=r"\[\('tower', 'vision_tower/\.\*'\)\] match no parameter.*'base/"):
        O.make_optimizer(cfg, toy_params())
    # shadowed: every projector tensor is taken by the first group
    groups = (O.Group("all", r"base/.*", lr), O.Group("projector", r"base/multi_modal_projector/.*", 1e-3))
    cfg = O.OptimConfig(groups=groups, default_lr=1e-4, schedule="constant")
    with pytest.raises(ValueError, match=r"\[\('projector', .*an earlier group takes"):
        O.make_optimizer(cfg, toy_params())


def test_schedules():
    cfg = O.OptimConfig(default_lr=1.0, warmup_steps=10, total_steps=110, end_lr_ratio=0.1)
    s = O.make_schedule(cfg, 1.0)
    assert float(s(0)) == 0 and float(s(10)) == pytest.approx(1.0) and float(s(110)) == pytest.approx(0.1)
    assert float(s(60)) == pytest.approx(0.55, rel=1e-3)     # cosine midpoint
    c = O.make_schedule(O.OptimConfig(schedule="constant"), 3e-5)
    assert float(c(0)) == float(c(1000)) == pytest.approx(3e-5)
    # warmup-stable-decay: ramp over 10 steps, hold the peak, decay linearly over the last 20 of 110.
    w = O.make_schedule(O.OptimConfig(schedule="warmup_stable_decay", warmup_steps=10, total_steps=110,
                                      end_lr_ratio=0.1, decay_fraction=20 / 110), 2.0)
    lr = [float(w(i)) for i in range(115)]
    assert lr[0] == 0 and lr[5] == pytest.approx(1.0) and lr[10] == pytest.approx(2.0)
    assert all(x == pytest.approx(2.0) for x in lr[10:91])                  # held through step 90
    assert lr[100] == pytest.approx(1.1) and lr[110] == lr[114] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(lr[90:], lr[91:]))                     # the decay only goes down
    # no warmup: the peak from step 0; a decay longer than the run after warmup is cut to fit
    n = O.make_schedule(O.OptimConfig(schedule="warmup_stable_decay", total_steps=50, decay_fraction=0.2), 1.0)
    assert float(n(0)) == float(n(40)) == 1.0 and float(n(45)) == pytest.approx(0.5) and float(n(50)) == 0.0
    cut = O.make_schedule(O.OptimConfig(schedule="warmup_stable_decay", warmup_steps=40, total_steps=50,
                                        decay_fraction=1.0), 1.0)
    assert float(cut(40)) == pytest.approx(1.0) and float(cut(45)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown schedule 'wsd'; known: warmup_cosine, warmup_stable_decay"):
        O.OptimConfig(schedule="wsd")
    with pytest.raises(ValueError, match="decay_fraction must be in"):
        O.OptimConfig(schedule="warmup_stable_decay", decay_fraction=0.0)


def test_frozen_new_token_rows():
    params = toy_params()
    new_ids = [10, 11]
    cfg = O.OptimConfig(default_lr=1e-2, weight_decay=0.1, schedule="constant",
                        frozen_rows=TK.frozen_rows_rule(new_ids, "base/"))
    opt = O.make_optimizer(cfg, params)
    state = opt.tx.init(params)
    p = params
    for i in range(3):
        g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(i), x.shape), p)
        upd, state = opt.tx.update(g, state, p)
        p = optax.apply_updates(p, upd)
    emb0 = params["base"]["language_model"]["embed_tokens"]["embedding"]
    emb = p["base"]["language_model"]["embed_tokens"]["embedding"]
    head = p["base"]["language_model"]["lm_head"]["kernel"]
    np.testing.assert_array_equal(emb[10:], emb0[10:])
    np.testing.assert_array_equal(head[:, 10:], params["base"]["language_model"]["lm_head"]["kernel"][:, 10:])
    assert np.all(np.abs(emb[:10] - emb0[:10]) > 0)


def test_all_frozen_is_an_error():
    with pytest.raises(ValueError, match="every parameter is frozen"):
        O.make_optimizer(O.OptimConfig(default_lr=None), toy_params())


def test_train_config_optim_section_reaches_the_optimizer():
    """Every key of the train config's `optim` section arrives in OptimConfig under its own name (a key the
    loop dropped would silently fall back to OptimConfig's default)."""
    from jaxvlm.train.config import apply_overrides, train_defaults
    from jaxvlm.train.loop import optim_config
    sets = {"default_lr": 3e-4, "schedule": "warmup_stable_decay", "warmup_steps": 7, "total_steps": 90,
            "end_lr_ratio": 0.05, "decay_fraction": 0.25, "b1": 0.8, "b2": 0.95, "eps": 1e-6, "weight_decay": 0.01,
            "clip_norm": 0.5}
    cfg = train_defaults()
    assert set(sets) | {"groups"} == set(cfg.optim)           # this test sets every key but the groups
    cfg = apply_overrides(cfg, [f"optim.{k}={v}" for k, v in sets.items()])
    cfg.optim["groups"] = [dict(name="tower", pattern="vision_tower/.*", lr=None)]
    oc = optim_config(cfg, frozen_rows=(("x", 0, (1,)),))
    assert {k: getattr(oc, k) for k in sets} == sets
    assert oc.groups == (O.Group("tower", "vision_tower/.*", None),) and oc.frozen_rows == (("x", 0, (1,)),)
    cfg = apply_overrides(cfg, ["optim.total_steps=0", "train.steps=123"])
    assert optim_config(cfg).total_steps == 123                  # 0 means train.steps
    cfg.optim["momentum"] = 0.9                                  # a config file can add keys; they must not vanish
    with pytest.raises(ValueError, match=r"unknown optim keys \['momentum'\]"):
        optim_config(cfg)
