"""Scene sampling and compositing: a textured background plus 1-N occluding shapes.

Objects are drawn in list order, later ones on top.  A placement is rejected if it would leave any
earlier object less than ``min_visible`` visible, so every annotated object is clearly recognisable
and each visible-pixel mask is exactly the pixels showing that object's colour.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from . import vocab
from .shapes import shape_mask

MAX_PLACEMENT_TRIES = 30
MIN_VISIBLE_PIXELS = 12
SAME_COLOUR_GAP = 2  # pixels kept between shapes of one colour


@dataclass(frozen=True)
class ObjectInfo:
    """What language and evaluation need to know about one object (no pixels)."""

    ann_id: int
    category: str
    colour: str
    size: str
    bbox: tuple[int, int, int, int]  # COCO [x, y, w, h] of the visible pixels

    @property
    def cx(self) -> float:
        return self.bbox[0] + self.bbox[2] / 2.0

    @property
    def cy(self) -> float:
        return self.bbox[1] + self.bbox[3] / 2.0


@dataclass
class PlacedShape:
    category: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float
    rotation: float
    rgb: tuple[int, int, int]
    full: np.ndarray      # (H, W) bool, the whole shape
    visible: np.ndarray   # (H, W) bool, the part not covered by later shapes


@dataclass
class Scene:
    image: np.ndarray          # (H, W, 3) uint8
    background: str
    theme: str
    shapes: list[PlacedShape]  # drawing order (later on top)


def tight_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """COCO [x, y, w, h] in whole pixels, the convention pycocotools.mask.toBbox uses."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    return (x0, y0, x1 - x0 + 1, y1 - y0 + 1)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Square-element binary dilation by ``r`` pixels (numpy only)."""
    padded = np.pad(mask, r)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def _muted(rng: np.random.Generator) -> np.ndarray:
    h, s, v = rng.random(), rng.uniform(0.05, 0.2), rng.uniform(0.35, 0.7)
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0


def render_background(style: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float background; low saturation so object colours stay unambiguous."""
    base, alt = _muted(rng), _muted(rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = rng.uniform(0, np.pi)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    period = size * rng.uniform(0.05, 0.14)
    if style == "plain":
        img = np.broadcast_to(base, (size, size, 3)) + rng.normal(0, 2.0, (size, size, 1))
    elif style == "noisy":
        img = np.broadcast_to(base, (size, size, 3)) + rng.normal(0, 14.0, (size, size, 1))
    elif style == "striped":
        t = (np.floor(along / period) % 2)[..., None]
        img = base * (1 - t) + alt * t
    elif style == "checkered":
        t = ((np.floor(xx / period) + np.floor(yy / period)) % 2)[..., None]
        img = base * (1 - t) + alt * t
    elif style == "gradient":
        t = ((along - along.min()) / max(np.ptp(along), 1e-6))[..., None]
        img = base * (1 - t) + alt * t
    elif style == "dotted":
        step = max(4, int(round(period)))
        dots = ((xx % step == step // 2) & (yy % step == step // 2))[..., None]
        img = np.where(dots, alt, base)
    else:
        raise ValueError(f"unknown background style {style!r}")
    return np.asarray(img, dtype=np.float64)


def _sample_category(rng: np.random.Generator, theme: str) -> str:
    if rng.random() < vocab.THEME_PROB:
        members = vocab.THEMES[theme]
        return members[int(rng.integers(len(members)))]
    w = np.array([vocab.CATEGORY_WEIGHTS[c] for c in vocab.CATEGORIES], dtype=np.float64)
    return vocab.CATEGORIES[int(rng.choice(len(w), p=w / w.sum()))]


def _sample_colour(rng: np.random.Generator, category: str) -> str:
    if rng.random() < vocab.TYPICAL_COLOUR_PROB:
        return vocab.TYPICAL_COLOUR[category]
    return vocab.COLOUR_NAMES[int(rng.integers(len(vocab.COLOUR_NAMES)))]


def sample_scene(rng: np.random.Generator, image_size: int = 112, max_objects: int = 8,
                 min_visible: float = 0.6) -> Scene:
    """Sample and render one scene; consumes ``rng`` in a fixed order (determinism)."""
    background = vocab.BACKGROUNDS[int(rng.integers(len(vocab.BACKGROUNDS)))]
    theme = vocab.THEME_NAMES[int(rng.integers(len(vocab.THEME_NAMES)))]
    canvas = render_background(background, image_size, rng)
    n_target = int(rng.integers(1, max_objects + 1))
    shapes: list[PlacedShape] = []
    for _ in range(n_target):
        category = _sample_category(rng, theme)
        colour = _sample_colour(rng, category)
        size = vocab.SIZE_NAMES[int(rng.integers(len(vocab.SIZE_NAMES)))]
        radius = vocab.SIZES[size] * image_size * (1 + rng.uniform(-vocab.SIZE_JITTER,
                                                                  vocab.SIZE_JITTER))
        rotation = float(rng.uniform(-20.0, 20.0))
        rgb = tuple(int(np.clip(v + rng.integers(-12, 13), 0, 255))
                    for v in vocab.COLOURS[colour])
        lo, hi = radius + 1.0, image_size - 1.0 - radius
        for _try in range(MAX_PLACEMENT_TRIES):
            cx, cy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
            full = shape_mask(category, cx, cy, radius, rotation, image_size)
            if full.sum() < MIN_VISIBLE_PIXELS:
                continue
            # Same-coloured shapes that touch merge into one blob, making counts unseeable.
            if any(s.colour == colour for s in shapes):
                halo = _dilate(full, SAME_COLOUR_GAP)
                if any(s.colour == colour and (s.full & halo).any() for s in shapes):
                    continue
            # Would this placement hide too much of anything already drawn?
            if all(((s.visible & ~full).sum() >= max(min_visible * s.full.sum(),
                                                     MIN_VISIBLE_PIXELS)) for s in shapes):
                for s in shapes:
                    s.visible = s.visible & ~full
                shapes.append(PlacedShape(category, colour, size, cx, cy, radius, rotation,
                                          rgb, full, full.copy()))  # type: ignore[arg-type]
                break
    for s in shapes:
        canvas[s.full] = s.rgb
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Scene(image=image, background=background, theme=theme, shapes=shapes)
