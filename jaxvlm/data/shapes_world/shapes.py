"""Shape geometry and rasterisation.

Each category is a list of drawing ops in unit coordinates (radius 1 around the centre, y down).
Every point lies inside the unit disc, so any rotation keeps a shape placed at distance >= r from
the border inside the image.  Masks are drawn without anti-aliasing: the exact pixel set is what the
annotations describe, so boxes, areas and visibility are exact.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

Point = tuple[float, float]
# ("polygon", fill, points) or ("disc", fill, (cx, cy, radius)); fill 1 adds, 0 cuts a hole.
Op = tuple[Literal["polygon", "disc"], int, object]


def _regular(n: int, start_deg: float, radius: float = 1.0) -> list[Point]:
    return [(radius * math.cos(math.radians(start_deg + 360.0 * k / n)),
             radius * math.sin(math.radians(start_deg + 360.0 * k / n))) for k in range(n)]


def _star() -> list[Point]:
    pts = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else 0.45
        a = math.radians(-90.0 + 36.0 * k)
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _heart(n: int = 48) -> list[Point]:
    raw = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        raw.append((x, y))
    # Centre on the bounding box, then scale into the unit disc.
    xs, ys = [p[0] for p in raw], [p[1] for p in raw]
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    scale = max(math.hypot(x - cx, y - cy) for x, y in raw)
    return [((x - cx) / scale, (y - cy) / scale) for x, y in raw]


_W = 0.3  # half-width of the cross arms
SHAPE_OPS: dict[str, list[Op]] = {
    "circle": [("disc", 1, (0.0, 0.0, 1.0))],
    "square": [("polygon", 1, [(-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7)])],
    "triangle": [("polygon", 1, _regular(3, -90.0))],
    "star": [("polygon", 1, _star())],
    "heart": [("polygon", 1, _heart())],
    "cross": [("polygon", 1, [(-_W, -0.95), (_W, -0.95), (_W, -_W), (0.95, -_W), (0.95, _W),
                              (_W, _W), (_W, 0.95), (-_W, 0.95), (-_W, _W), (-0.95, _W),
                              (-0.95, -_W), (-_W, -_W)])],
    # Tall rhombus, so a jittered square can never pass for a diamond.
    "diamond": [("polygon", 1, [(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)])],
    "hexagon": [("polygon", 1, _regular(6, 0.0))],
    "ring": [("disc", 1, (0.0, 0.0, 1.0)), ("disc", 0, (0.0, 0.0, 0.55))],
    "arrow": [("polygon", 1, [(-0.95, -0.25), (0.15, -0.25), (0.15, -0.6), (0.95, 0.0),
                              (0.15, 0.6), (0.15, 0.25), (-0.95, 0.25)])],
    "moon": [("disc", 1, (0.0, 0.0, 1.0)), ("disc", 0, (0.45, -0.25, 0.85))],
    "pentagon": [("polygon", 1, _regular(5, -90.0))],
}


def shape_mask(category: str, cx: float, cy: float, radius: float, rotation_deg: float,
               image_size: int) -> np.ndarray:
    """Boolean (H, W) mask of one shape centred at (cx, cy) with the given radius and rotation."""
    canvas = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(canvas)
    c, s = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))

    def place(x: float, y: float) -> Point:
        return (cx + radius * (c * x - s * y), cy + radius * (s * x + c * y))

    for kind, fill, data in SHAPE_OPS[category]:
        if kind == "polygon":
            draw.polygon([place(x, y) for x, y in data], fill=fill)  # type: ignore[union-attr]
        else:
            ux, uy, ur = data  # type: ignore[misc]
            px, py = place(ux, uy)
            rr = ur * radius
            draw.ellipse([px - rr, py - rr, px + rr, py + rr], fill=fill)
    return np.asarray(canvas, dtype=bool)
