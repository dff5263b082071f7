"""Dense vision pretraining (the stand-in for a pretrained CLIP): per-patch targets agree with the
masks, training lowers the loss, the tower file round-trips and rejects a mismatched tower."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.data.image_processing import LlavaImageProcessor
from jaxvlm.data.shapes_world import generate_world, vocab
from jaxvlm.models.clip import CLIPVision, CLIPVisionConfig
from jaxvlm.train import dense_vision as DV

PATCH = 16
TOWER = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=112,
                         patch_size=PATCH)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("dense_world"), seed=3, n_train=10, n_val=1, n_test=1,
                          progress=False)


@pytest.fixture(scope="module")
def targets(world):
    proc = LlavaImageProcessor(image_size=112, tokens_per_image=49)
    return DV.patch_targets(world.instances["train"], world.image_dir("train"), proc, PATCH, vocab.COLOUR_NAMES)


def test_patch_targets_agree_with_masks(world, targets):
    from pycocotools.coco import COCO
    coco = COCO(str(world.instances["train"]))
    g = 112 // PATCH
    assert targets.pixels.shape == (10, 3, 112, 112) and targets.category.shape == (10, g * g)
    assert targets.num_categories == len(vocab.CATEGORIES)
    labelled = 0
    for n, img_id in enumerate(sorted(coco.getImgIds())):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
        cover = np.stack([coco.annToMask(a).reshape(g, PATCH, g, PATCH).sum((1, 3)).reshape(-1) / PATCH ** 2
                          for a in anns])                                     # [objects, patches]
        best = cover.argmax(0)
        for p in range(g * g):
            if cover[best[p], p] < DV.MIN_COVER:
                assert targets.category[n, p] == targets.num_categories and targets.colour[n, p] == len(vocab.COLOUR_NAMES)
                continue
            a = anns[best[p]]
            labelled += 1
            assert targets.category[n, p] == sorted(coco.getCatIds()).index(a["category_id"])
            assert vocab.COLOUR_NAMES[targets.colour[n, p]] == a["attributes"]["colour"]
            x, y, w, h = a["bbox"]
            np.testing.assert_allclose(targets.box[n, p], np.array([x, y, x + w, y + h]) / 112, rtol=1e-6)
            # the patch overlaps the box it is labelled with
            px, py = (p % g) * PATCH, (p // g) * PATCH
            assert px < x + w and x < px + PATCH and py < y + h and y < py + PATCH
    assert labelled > 20


def test_pretraining_learns_and_tower_file_round_trips(tmp_path, targets):
    params, history = DV.pretrain_vision(TOWER, -2, targets, steps=40, batch=8, lr=3e-3, warmup=5,
                                         eval_every=10, progress=False)
    assert [h["step"] for h in history] == [10, 20, 30, 40]
    assert history[-1]["colour_ce"] < 0.7 * history[0]["colour_ce"], history
    assert history[-1]["box_l1"] < history[0]["box_l1"], history
    assert set(params) >= {"embeddings", "layers", "pre_layrnorm"}       # the tower alone, heads dropped
    path = DV.save_vision_params(tmp_path / "v" / "tower.msgpack", params)
    back = DV.load_vision_params(path, params)
    for (k, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(back)):
        assert np.array_equal(np.asarray(a), b), jax.tree_util.keystr(k)
    # a tower of another width is refused by name and shape; a missing file by path
    wide = nn.unbox(CLIPVision(TOWER.replace(hidden_size=48)).init(jax.random.key(0), jnp.zeros((1, 3, 112, 112))))
    with pytest.raises(ValueError, match=r"vision tensor .* has shape .* the model expects"):
        DV.load_vision_params(path, wide["params"])
    with pytest.raises(FileNotFoundError, match="vision params file not found"):
        DV.load_vision_params(tmp_path / "nope.msgpack", params)


def test_too_few_images_is_a_clear_error(targets):
    few = DV.DenseTargets(targets.pixels[:3], targets.category[:3], targets.colour[:3], targets.box[:3],
                          targets.num_categories, targets.num_colours)
    with pytest.raises(ValueError, match="at least 5 images"):
        DV.pretrain_vision(TOWER, -2, few, steps=1, progress=False)


@pytest.mark.parametrize("bad, match", [(dict(object_weight=0.0), "object_weight must be > 0"),
                                        (dict(box_bins=1), "box_bins must be 0"),
                                        (dict(box_bins=-3), "box_bins must be 0"),
                                        (dict(box_weight=-0.5), "box_weight must be >= 0")])
def test_bad_loss_settings_are_clear_errors(targets, bad, match):
    with pytest.raises(ValueError, match=match):
        DV.pretrain_vision(TOWER, -2, targets, steps=1, progress=False, **bad)


def log_softmax(x):
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_object_weight_reweights_object_patches_against_background():
    rng = np.random.default_rng(0)
    nc, nco = 3, 2
    lc, lco, box = rng.normal(size=(2, 5, nc + 1)), rng.normal(size=(2, 5, nco + 1)), rng.uniform(size=(2, 5, 4))
    t_cat = np.array([[0, 3, 3, 1, 3], [3, 3, 2, 3, 3]])                   # 3 = background
    t_col = np.array([[1, 2, 2, 0, 2], [2, 2, 1, 2, 2]])
    t_box = rng.uniform(size=(2, 5, 4))

    def ce(logits, t):
        return -np.take_along_axis(log_softmax(logits), t[..., None], -1)[..., 0]

    obj = t_cat < nc
    for w in (1.0, 5.0):
        weights = np.where(obj, w, 1.0)
        weights = weights / weights.mean()
        want = (ce(lc, t_cat) * weights).mean() + (ce(lco, t_col) * weights).mean() + \
            np.abs(box - t_box).sum(-1)[obj].mean()
        got, parts = DV.dense_loss(lc, lco, box, t_cat, t_col, t_box, nc, object_weight=w)
        np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # weight 5: an object patch's cross-entropy counts 5x a background patch's
    assert not np.isclose(float(DV.dense_loss(lc, lco, box, t_cat, t_col, t_box, nc, object_weight=5.0)[0]),
                          float(DV.dense_loss(lc, lco, box, t_cat, t_col, t_box, nc)[0]))


def test_box_bins_classify_each_coordinate():
    rng = np.random.default_rng(1)
    nc, bins = 3, 7
    t_cat = np.array([[0, 3, 2, 3]])
    t_col = np.array([[0, 2, 1, 2]])
    t_box = np.array([[[0.0, 0.5, 0.99, 1.0]] * 4])
    np.testing.assert_array_equal(DV.box_bin(t_box[0, 0], bins), [0, 3, 6, 6])     # 1.0 falls in the last bin
    logits = rng.normal(size=(1, 4, 4, bins))
    lc, lco = rng.normal(size=(1, 4, nc + 1)), rng.normal(size=(1, 4, 3))
    total, parts = DV.dense_loss(lc, lco, logits, t_cat, t_col, t_box, nc, box_bins=bins)
    per_patch = -log_softmax(logits)[0, :, np.arange(4), [0, 3, 6, 6]].T.sum(-1)                   # [patches]
    np.testing.assert_allclose(float(parts["box_ce"]), per_patch[[0, 2]].mean(), rtol=1e-5)  # object patches only
    np.testing.assert_allclose(float(total), float(parts["category_ce"] + parts["colour_ce"] + parts["box_ce"]),
                               rtol=1e-6)
    # box_weight scales the box term only; the reported box_ce stays unweighted
    total_w, parts_w = DV.dense_loss(lc, lco, logits, t_cat, t_col, t_box, nc, box_bins=bins, box_weight=0.25)
    np.testing.assert_allclose(float(parts_w["box_ce"]), float(parts["box_ce"]), rtol=1e-6)
    np.testing.assert_allclose(float(total_w), float(parts["category_ce"] + parts["colour_ce"]
                                                     + 0.25 * parts["box_ce"]), rtol=1e-6)
    # the estimate is the centre of the most likely bin
    np.testing.assert_allclose(DV.box_estimate(logits, bins), (logits.argmax(-1) + 0.5) / bins)


def test_pretraining_with_box_bins_learns_boxes(targets):
    _, history = DV.pretrain_vision(TOWER, -2, targets, steps=40, batch=8, lr=3e-3, warmup=5, box_bins=8,
                                    eval_every=20, progress=False)
    assert history[-1]["box_ce"] < history[0]["box_ce"], history
    assert history[-1]["box_ce"] < 0.6 * 4 * np.log(8), history           # well under a uniform guess
    assert 0 < history[-1]["heldout_box_err"] < 0.5, history              # bin centres, in image sides
