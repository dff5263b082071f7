"""Dense vision pretraining: the stand-in for CLIP pretraining when a VLM starts from scratch.

Real LLaVA starts from a pretrained CLIP tower. A tower trained from random through captions and
answers alone learns colour but not shape or position on the shapes world within a CPU budget: a
caption's gradient reaches a patch only through the language model's attention. Where every pixel
is annotated (COCO instances with masks), each patch can be told directly what covers it. This
stage trains the tower's feature layer (the one LLaVA feeds its projector, `vision_feature_layer`)
with three linear heads per patch: the category of the object covering it (or background), its
colour (or background), and that object's box. The heads are dropped; the tower seeds the VLM
(`model.vision_init` of a train config).

Example:
    >>> targets = patch_targets(world.instances["train"], world.image_dir("train"), proc, patch=16,
    ...                         colours=vocab.COLOUR_NAMES)
    >>> vision_params, history = pretrain_vision(lc.vision, -2, targets, steps=1000)
    >>> save_vision_params("out/vision.msgpack", vision_params)
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxvlm.models.clip import CLIPVision, CLIPVisionConfig
from jaxvlm.models.params import load_param_tree, save_param_tree
from jaxvlm.models.qwen2_vl import QwenVisionConfig, QwenVisionTower, slot_layout

VisionConfig = CLIPVisionConfig | QwenVisionConfig

#: A patch is labelled with an object when the object's visible pixels cover this share of it.
MIN_COVER = 0.15


@dataclasses.dataclass(frozen=True)
class DenseTargets:
    pixels: np.ndarray      # [N, C, S, S] float32 (LLaVA) or [N, P, C*T*p*p] patch rows (Qwen2/2.5-VL), as
                            # the VLM's image processor makes them; targets follow the rows' patch order
    category: np.ndarray    # [N, P] int32: category index, or num_categories for background
    colour: np.ndarray      # [N, P] int32: colour index, or num_colours for background
    box: np.ndarray         # [N, P, 4] float32: covering object's (x0, y0, x1, y1) / image side
    num_categories: int
    num_colours: int


def patch_targets(instances_path: str | os.PathLike, image_dir: str | os.PathLike, processor: Any, patch: int,
                  colours: Sequence[str], limit: int | None = None) -> DenseTargets:
    """Per-patch targets from a COCO instances file whose annotations carry visible-pixel masks
    (`segmentation`) and `attributes.colour` (the shapes world's files).

    processor: the VLM's image processor (`LlavaImageProcessor`, or `Qwen2VLImageProcessor`, whose
    patch rows come in merge-block order: the targets are permuted to match); images must already be
    its size, so that masks and patches line up (a resize would blur the labels).
    """
    from PIL import Image
    from pycocotools.coco import COCO

    from jaxvlm.data.image_processing import load_image
    coco = COCO(os.fspath(instances_path))
    cat_ids = sorted(coco.getCatIds())
    cat_index = {c: i for i, c in enumerate(cat_ids)}
    colour_index = {c: i for i, c in enumerate(colours)}
    img_ids = sorted(coco.getImgIds())[:limit]
    pixels, cats, cols, boxes = [], [], [], []
    for img_id in img_ids:
        info = coco.imgs[img_id]
        side = info["width"]
        if info["height"] != side or side % patch:
            raise ValueError(f"image {info['file_name']} is {info['width']}x{info['height']}: dense targets need "
                             f"square images whose side is a multiple of the patch ({patch})")
        image: Image.Image = load_image(os.path.join(image_dir, info["file_name"]), str(img_id))
        g = side // patch
        out = processor(image)
        px = np.asarray(out.pixel_values, np.float32)
        order = np.arange(g * g)
        if "image_grid_thw" in out.fields:      # Qwen2/2.5-VL: patch rows, not an image
            grid = tuple(int(x) for x in out.fields["image_grid_thw"])
            if grid != (1, g, g):
                raise ValueError(f"the image processor makes a {grid} (t, h, w) patch grid of {side} px images; "
                                 f"dense targets need (1, {g}, {g}): no resize, patch {patch}")
            px, order = px[: g * g], processor_patch_order(g, processor.merge_size)
        elif px.shape[-1] != side:
            raise ValueError(f"the image processor resizes {side} px images to {px.shape[-1]} px; dense targets "
                             f"need the world's image size to equal the tower's image_size")
        cover = np.zeros((g * g,), np.float32)
        cat = np.full((g * g,), len(cat_ids), np.int32)
        col = np.full((g * g,), len(colours), np.int32)
        box = np.zeros((g * g, 4), np.float32)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img_id])):
            frac = coco.annToMask(ann).reshape(g, patch, g, patch).sum((1, 3)).reshape(-1) / patch ** 2
            take = (frac >= MIN_COVER) & (frac > cover)
            x, y, w, h = ann["bbox"]
            cover[take] = frac[take]
            cat[take] = cat_index[ann["category_id"]]
            col[take] = colour_index[ann["attributes"]["colour"]]
            box[take] = np.array([x, y, x + w, y + h], np.float32) / side
        pixels.append(px)
        cats.append(cat[order])
        cols.append(col[order])
        boxes.append(box[order])
    return DenseTargets(np.stack(pixels), np.stack(cats), np.stack(cols), np.stack(boxes),
                        len(cat_ids), len(colours))


def processor_patch_order(g: int, merge: int) -> np.ndarray:
    """Raster index (row * g + column) of each patch row of a `g` x `g` image, in the Qwen2-VL
    processor's order: merge blocks row-major, the `merge` x `merge` patches of a block row-major."""
    i = np.arange(g * g)
    block, within = i // (merge * merge), i % (merge * merge)
    bh, bw = block // (g // merge), block % (g // merge)
    return (bh * merge + within // merge) * g + bw * merge + within % merge


def tower_name(cfg: VisionConfig) -> str:
    """Where the VLM keeps this tower: `Llava`'s `vision_tower`, `Qwen2VL`'s `visual`."""
    return "visual" if isinstance(cfg, QwenVisionConfig) else "vision_tower"


class DenseHeads(nn.Module):
    """The tower (named as in the VLM: `tower_name`) and linear per-patch heads on one layer.

    CLIP: pixel_values `[N, C, S, S]`, CLS dropped. Qwen2/2.5-VL: pixel_values `[N, P, C*T*p*p]`, the
    patch rows of N square single-frame images, one tower row each; the heads read the blocks'
    per-patch states (the merger's input), in the rows' order."""

    cfg: VisionConfig
    feature_layer: int
    num_categories: int
    num_colours: int
    box_bins: int = 0     # > 0: each box coordinate is classified into this many bins, else regressed

    @nn.compact
    def __call__(self, pixel_values):
        if isinstance(self.cfg, QwenVisionConfig):
            # One tower row per image: a packed call over all N images would build an [N*P, N*P]
            # frame mask for the full-attention blocks.
            n, p = pixel_values.shape[:2]
            g = int(round(p ** 0.5))
            layout = slot_layout(jnp.tile(jnp.asarray([[1, g, g]], jnp.int32), (n, 1)), p, self.cfg)
            tower = QwenVisionTower(self.cfg, name=tower_name(self.cfg))
            h = tower(pixel_values, layout, output_hidden_states=True).hidden_states[self.feature_layer]  # [N, P, D]
        else:
            h = CLIPVision(self.cfg, name="vision_tower")(pixel_values, output_hidden_states=True)
            h = h.hidden_states[self.feature_layer][:, 1:]            # patches, CLS dropped: [N, P, D]
        box = nn.Dense(4 * max(self.box_bins, 1), name="box")(h)
        if self.box_bins:
            box = box.reshape(*box.shape[:-1], 4, self.box_bins)   # [N, P, 4, bins]
        return (nn.Dense(self.num_categories + 1, name="category")(h),
                nn.Dense(self.num_colours + 1, name="colour")(h), box)


def box_bin(t_box, bins: int):
    """Box coordinates in [0, 1] -> bin indices in [0, bins)."""
    return jnp.clip(jnp.floor(t_box * bins), 0, bins - 1).astype(jnp.int32)


def box_estimate(box_pred, bins: int):
    """The head's box: regressed values, or the centres of the most likely bins."""
    return (box_pred.argmax(-1) + 0.5) / bins if bins else box_pred


def dense_loss(logits_cat, logits_col, box_pred, t_cat, t_col, t_box, num_categories: int,
               object_weight: float = 1.0, box_bins: int = 0, box_weight: float = 1.0):
    """Cross-entropy on category and colour (background included); on object patches, L1 on the box
    or, with `box_bins`, cross-entropy on each coordinate's bin (summed over the 4), times `box_weight`.

    object_weight: an object patch's cross-entropy weight relative to a background patch's (the
    weights are normalised to mean 1 per batch). Most patches are background, and telling background
    from object is easy; shape is what the tower has to learn.
    """
    obj = (t_cat < num_categories).astype(jnp.float32)
    w = 1.0 + (object_weight - 1.0) * obj
    w = w / w.mean()
    ce_cat = (optax.softmax_cross_entropy_with_integer_labels(logits_cat, t_cat) * w).mean()
    ce_col = (optax.softmax_cross_entropy_with_integer_labels(logits_col, t_col) * w).mean()
    if box_bins:
        per_patch = optax.softmax_cross_entropy_with_integer_labels(box_pred, box_bin(t_box, box_bins)).sum(-1)
        name = "box_ce"
    else:
        per_patch, name = jnp.abs(box_pred - t_box).sum(-1), "box_l1"
    box = (per_patch * obj).sum() / jnp.maximum(obj.sum(), 1.0)
    return ce_cat + ce_col + box_weight * box, dict(category_ce=ce_cat, colour_ce=ce_col, **{name: box})


def pretrain_vision(cfg: VisionConfig, feature_layer: int, targets: DenseTargets, *, steps: int = 1000,
                    batch: int = 32, lr: float = 1e-3, warmup: int = 100, weight_decay: float = 0.01,
                    object_weight: float = 1.0, box_bins: int = 0, box_weight: float = 1.0, seed: int = 0,
                    eval_every: int = 200, holdout: int = 200, progress: bool = True) -> tuple[dict, list[dict]]:
    """Train the tower on `targets`; returns (the tower's params: `Llava`'s `vision_tower` or
    `Qwen2VL`'s `visual`, merger included at its init), history).

    object_weight, box_bins, box_weight: see `dense_loss`. The last `holdout` images (at most a fifth)
    are held out; history rows give the held-out per-object-patch category and colour accuracy and mean box
    error (fraction of the image side) every `eval_every`.
    """
    if not object_weight > 0:
        raise ValueError(f"object_weight must be > 0 (an object patch's weight relative to background), "
                         f"got {object_weight}")
    if not box_weight >= 0:
        raise ValueError(f"box_weight must be >= 0 (the box loss's weight), got {box_weight}")
    if box_bins < 0 or box_bins == 1:
        raise ValueError(f"box_bins must be 0 (regress the box) or >= 2 (classify each coordinate), got {box_bins}")
    n = len(targets.pixels)
    holdout = min(holdout, n // 5)
    if holdout < 1:
        raise ValueError(f"dense vision pretraining needs at least 5 images (one held out per five), got {n}")
    model = DenseHeads(cfg, feature_layer, targets.num_categories, targets.num_colours, box_bins)
    arrays = (targets.pixels, targets.category, targets.colour, targets.box)
    train_arrays, held = tuple(a[:n - holdout] for a in arrays), tuple(jnp.asarray(a[n - holdout:]) for a in arrays)
    params = nn.unbox(model.init(jax.random.key(seed), jnp.asarray(targets.pixels[:1])))["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))
    state = opt.init(params)
    nc = targets.num_categories

    @jax.jit
    def step(p, s, px, c, co, b):
        def loss(p):
            return dense_loss(*model.apply({"params": p}, px), c, co, b, nc, object_weight, box_bins, box_weight)
        (_, parts), g = jax.value_and_grad(loss, has_aux=True)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, parts

    @jax.jit
    def evaluate(p, px, c, co, b):
        lc, lco, lb = model.apply({"params": p}, px)
        obj = c < nc
        k = jnp.maximum(obj.sum(), 1)
        return dict(category_acc=((lc.argmax(-1) == c) & obj).sum() / k,
                    colour_acc=((lco.argmax(-1) == co) & obj).sum() / k,
                    box_err=(jnp.abs(box_estimate(lb, box_bins) - b).mean(-1) * obj).sum() / k)

    rng = np.random.default_rng(seed)
    history: list[dict] = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, desc="vision pretrain", dynamic_ncols=True)
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        idx = rng.integers(0, n - holdout, batch)
        params, state, parts = step(params, state, *(jnp.asarray(a[idx]) for a in train_arrays))
        if bar is not None:
            bar.update(1)
        if i % eval_every == 0 or i == steps:
            row = {"step": i, "seconds": round(time.perf_counter() - t0, 1),
                   **{k: round(float(v), 4) for k, v in parts.items()},
                   **{f"heldout_{k}": round(float(v), 4) for k, v in evaluate(params, *held).items()}}
            history.append(row)
            if bar is not None:
                bar.set_postfix(cat=row["heldout_category_acc"], box=row["heldout_box_err"])
    if bar is not None:
        bar.close()
    return jax.device_get(params[tower_name(cfg)]), history


def save_vision_params(path: str | os.PathLike, params: dict) -> str:
    """Write the tower's params (msgpack), atomically: a failed write leaves no partial file."""
    return save_param_tree(path, params)


def load_vision_params(path: str | os.PathLike, like: dict) -> dict:
    """Read `save_vision_params`'s file; every array must match `like` (a tower tree) in
    path and shape, else a ValueError names the first mismatch."""
    return load_param_tree(path, like, "vision")
