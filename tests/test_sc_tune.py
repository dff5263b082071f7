"""SC-Tune's pieces (jaxvlm.methods.sc_tune) against the rules of the original code
(../shared/specs/cos_sctune_judger.md §2): prompts, box parsing and IoU, the masks, and the describer's
PPO advantages and loss against a torch transcription of the original's loops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.methods import sc_tune as sc


def test_prompts_and_box_parsing():
    assert sc.describer_prompt([0.1, 0.2, 0.5, 0.6]) == \
        "<img>VG_100K_2/4.jpg</img><ref>This</ref><box>(99,199),(499,599)</box> is"
    assert sc.locator_prompt("a red car") == "<img>VG_100K_2/4.jpg</img><ref>a red car</ref><box>"
    assert sc.locator_prompt("a red car", [99, 199, 499, 599]).endswith("<box>(99,199),(499,599)</box><|endoftext|>")
    assert sc.box_to_qwen([0.0, 1.0, 0.5, 0.9999]) == [0, 999, 499, 998]
    text = sc.locator_prompt("a car") + "(12,34),(560,780)</box><box>(1,2),(3,4)</box>"
    assert sc.find_bbox(text) == [12, 34, 560, 780]                     # the first box
    assert sc.find_bbox("<box>(1, 2),(3,4)</box>") == [0, 0, 0, 0]      # no spaces allowed
    assert sc.find_bbox("(1,2),(3,4)</box>") == [0, 0, 0, 0]            # needs the <box> prefix ...
    assert sc.find_bbox("(1,2),(3,4)</box>", prefix=False) == [1, 2, 3, 4]


def test_box_iou_in_qwen_integer_space():
    a = np.array([[0, 0, 100, 100], [0, 0, 100, 100], [0, 0, 0, 0], [50, 50, 10, 10]])
    b = np.array([[50, 50, 150, 150], [0, 0, 100, 100], [10, 10, 20, 20], [0, 0, 100, 100]])
    iou = sc.box_iou(a, b)
    assert iou.shape == (4, 1)
    np.testing.assert_allclose(iou[:, 0], [2500 / 17500, 1.0, 0.0, 0.0], rtol=1e-6, atol=1e-6)
    # a reversed box has a positive "area" (-40 x -40) and no intersection: the formula's value, unclamped
    assert sc.box_iou(np.array([[50, 50, 10, 10]]), np.array([[60, 60, 70, 70]]))[0, 0] == 0.0


def test_token_mask_reaches_the_first_pad():
    ids = jnp.array([[5, 6, 0, 0], [5, 0, 0, 0], [5, 6, 7, 0], [5, 6, 7, 8]])
    np.testing.assert_array_equal(sc.token_mask(ids, pad_id=0),
                                  [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])


def torch_advantages_and_loss(kl, mask, rew, rew_base, lp_new, lp_old, coef=0.01, gamma=1.0):
    """The original's describer step, transcribed: masked KL penalty, IoU on the last column, backward
    discounted sums for both, advantage = difference masked; clipped surrogate over the mask."""
    import torch
    kl, mask = torch.tensor(kl, dtype=torch.float64), torch.tensor(mask, dtype=torch.float64)
    r = -coef * (kl * mask)
    r[:, [-1]] += torch.tensor(rew, dtype=torch.float64)[:, None]
    rb = torch.zeros_like(r)
    rb[:, [-1]] = torch.tensor(rew_base, dtype=torch.float64)[:, None]
    for i in range(r.shape[1] - 2, -1, -1):
        r[:, i] += gamma * r[:, i + 1]
        rb[:, i] += gamma * rb[:, i + 1]
    adv = (r - rb) * mask
    ratio = torch.exp(torch.tensor(lp_new, dtype=torch.float64) - torch.tensor(lp_old, dtype=torch.float64)) * mask
    l1, l2 = -adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2)
    loss = torch.max(l1, l2).sum() / mask.sum()
    if ratio.sum() / mask.sum() > 10.0:
        loss = loss * 0.0
    kl = ((torch.tensor(lp_old) - torch.tensor(lp_new)) * mask).sum() / mask.sum()
    clip_frac = torch.gt(l1, l2).double().sum() / mask.sum()
    return adv.numpy(), float(loss), float(kl), float(clip_frac)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_advantages_and_ppo_loss_match_the_original(gamma):
    rng = np.random.default_rng(0)
    b, t = 4, 9
    ids = rng.integers(1, 50, (b, t))
    for r, n in enumerate([9, 6, 3, 1]):
        ids[r, n:] = 0
    mask = np.asarray(sc.token_mask(jnp.asarray(ids), 0))
    kl = rng.normal(0, 0.3, (b, t))
    rew, base = rng.random(b), rng.random(b)
    lp_old = -rng.random((b, t)) * 3
    lp_new = lp_old + rng.normal(0, 0.3, (b, t))
    want_adv, want_loss, want_kl, want_clip = torch_advantages_and_loss(kl, mask, rew, base, lp_new, lp_old, gamma=gamma)
    adv = sc.caption_advantages(jnp.asarray(kl, jnp.float32), jnp.asarray(mask), jnp.asarray(rew, jnp.float32),
                                jnp.asarray(base, jnp.float32), gamma=gamma)
    np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-6)
    loss, stats = sc.ppo_loss(jnp.asarray(lp_new, jnp.float32), jnp.asarray(lp_old, jnp.float32), adv,
                              jnp.asarray(mask))
    assert float(loss) == pytest.approx(want_loss, rel=1e-5, abs=1e-7)
    assert float(stats["policy_kl"]) == pytest.approx(want_kl, rel=1e-5)
    assert float(stats["clip_frac"]) == pytest.approx(want_clip) and 0.0 < want_clip < 1.0
    # a differentiable objective: the gradient reaches only the unmasked tokens
    g = jax.grad(lambda lp: sc.ppo_loss(lp, jnp.asarray(lp_old, jnp.float32), adv, jnp.asarray(mask))[0])(
        jnp.asarray(lp_new, jnp.float32))
    assert np.all(np.asarray(g)[mask == 0] == 0) and np.any(np.asarray(g)[mask == 1] != 0)
    # a batch whose mean ratio exceeds 10 is dropped
    far = jnp.asarray(lp_old + 3.0, jnp.float32)
    assert float(sc.ppo_loss(far, jnp.asarray(lp_old, jnp.float32), adv, jnp.asarray(mask))[0]) == 0.0


def test_locator_labels_train_the_box_and_the_eos():
    box, pad = 151853, 151643
    ids = np.array([[7, 8, box, 11, 12, 13, pad, pad], [7, box, 11, 12, pad, pad, pad, pad]])
    np.testing.assert_array_equal(sc.locator_labels(ids, pad, box),
                                  [[-100, -100, -100, 11, 12, 13, pad, -100], [-100, -100, 11, 12, pad, -100, -100, -100]])
    with pytest.raises(ValueError, match="target 0 has 2 <box> tokens"):
        sc.locator_labels(np.array([[box, 1, box, pad]]), pad, box)
