"""Language over a scene: captions, descriptions, referring expressions and spatial words.

Referring expressions follow a fixed grammar so they can be re-evaluated (by the tests, and by
grounding/REG metrics on model outputs) with :func:`resolve_referring_expression`::

    the [leftmost|rightmost|topmost|bottommost] [size] [colour] <category>
        [on the left|on the right|at the top|at the bottom]

The generator picks the smallest attribute set that singles out the target, falling back to a
spatial word only when attributes cannot (two identical stars, say).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from . import vocab
from .scene import ObjectInfo

#: Centres closer than this (fraction of the image side) are "not clearly" left/right/above.
SPATIAL_MARGIN = 0.1
#: Grid-region questions are skipped when the centre is this close to a third-line.
GRID_MARGIN = 0.04

ATTRIBUTE_SETS: tuple[tuple[str, ...], ...] = (
    ("category",), ("colour", "category"), ("size", "category"), ("size", "colour", "category"))
DIRECTIONS: dict[str, tuple[str, int]] = {
    "left": ("cx", -1), "right": ("cx", 1), "top": ("cy", -1), "bottom": ("cy", 1)}
LOCATION_PHRASES: dict[str, str] = {
    "left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
EXTREME_WORDS: dict[str, str] = {
    "left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "bottommost"}
RELATIONS: dict[str, tuple[str, int]] = {
    "to the left of": ("cx", -1), "to the right of": ("cx", 1),
    "above": ("cy", -1), "below": ("cy", 1)}
OPPOSITE_RELATION: dict[str, str] = {
    "to the left of": "to the right of", "to the right of": "to the left of",
    "above": "below", "below": "above"}
GRID_REGIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "center", "right",
                                 "bottom left", "bottom", "bottom right")


def _alt(words: Sequence[str]) -> str:
    return "|".join(sorted(words, key=len, reverse=True))


_RE_PATTERN = re.compile(
    rf"^(?:the\s+)?(?:(?P<extreme>{_alt(list(EXTREME_WORDS.values()))})\s+)?"
    rf"(?:(?P<size>{_alt(vocab.SIZE_NAMES)})\s+)?(?:(?P<colour>{_alt(vocab.COLOUR_NAMES)})\s+)?"
    rf"(?P<category>{_alt(vocab.CATEGORIES)})"
    rf"(?:\s+(?P<location>{_alt(list(LOCATION_PHRASES.values()))}))?$")


def noun_phrase(obj: ObjectInfo, attrs: Sequence[str]) -> str:
    """Attribute words in English order (size, colour, noun)."""
    return " ".join(getattr(obj, a) for a in ("size", "colour", "category") if a in attrs)


def _same(obj: ObjectInfo, target: ObjectInfo, attrs: Sequence[str]) -> bool:
    return all(getattr(obj, a) == getattr(target, a) for a in attrs)


def _is_clear_extreme(target: ObjectInfo, group: Sequence[ObjectInfo], direction: str,
                      margin: float) -> bool:
    key, sign = DIRECTIONS[direction]
    # sign * value grows toward the direction: "leftmost" has the largest -cx.
    tv = sign * getattr(target, key)
    return all(tv - sign * getattr(o, key) >= margin for o in group if o.ann_id != target.ann_id)


def referring_expression(target: ObjectInfo, objects: Sequence[ObjectInfo], image_size: int, *,
                         use_colour: bool = True, use_size: bool = True,
                         use_spatial: bool = True) -> str | None:
    """Shortest unambiguous expression for ``target`` among ``objects``, or None if none exists."""
    sets = [s for s in ATTRIBUTE_SETS
            if (use_colour or "colour" not in s) and (use_size or "size" not in s)]
    for attrs in sets:
        if sum(_same(o, target, attrs) for o in objects) == 1:
            return f"the {noun_phrase(target, attrs)}"
    if not use_spatial:
        return None
    margin = SPATIAL_MARGIN * image_size
    for attrs in sets:
        group = [o for o in objects if _same(o, target, attrs)]
        for direction in DIRECTIONS:
            if _is_clear_extreme(target, group, direction, margin):
                if len(group) == 2:
                    return f"the {noun_phrase(target, attrs)} {LOCATION_PHRASES[direction]}"
                return f"the {EXTREME_WORDS[direction]} {noun_phrase(target, attrs)}"
    return None


def parse_referring_expression(expr: str) -> dict[str, str] | None:
    """Grammar fields of an expression ("category" always present), or None if off-grammar."""
    m = _RE_PATTERN.match(" ".join(expr.lower().strip().rstrip(".").split()))
    return None if m is None else {k: v for k, v in m.groupdict().items() if v is not None}


def resolve_referring_expression(expr: str, objects: Sequence[ObjectInfo],
                                 image_size: int) -> list[ObjectInfo]:
    """All objects the expression can denote; a good expression yields exactly one."""
    parsed = parse_referring_expression(expr)
    if parsed is None:
        return []
    group = [o for o in objects
             if all(getattr(o, a) == parsed[a] for a in ("size", "colour", "category")
                    if a in parsed)]
    word = parsed.get("extreme") or parsed.get("location")
    if word is not None and group:
        direction = next(d for d in DIRECTIONS
                         if word in (EXTREME_WORDS[d], LOCATION_PHRASES[d]))
        key, sign = DIRECTIONS[direction]
        best = max(sign * getattr(o, key) for o in group)
        group = [o for o in group
                 if best - sign * getattr(o, key) < SPATIAL_MARGIN * image_size]
    return group


def relation_holds(a: ObjectInfo, b: ObjectInfo, relation: str, image_size: int) -> bool | None:
    """Whether ``a`` is <relation> ``b``; None when the centres are too close to tell."""
    key, sign = RELATIONS[relation]
    d = sign * (getattr(a, key) - getattr(b, key))
    margin = SPATIAL_MARGIN * image_size
    return True if d >= margin else False if d <= -margin else None


def grid_region(obj: ObjectInfo, image_size: int) -> str:
    """Which ninth of the image holds the object's box centre."""
    col = min(int(3 * obj.cx / image_size), 2)
    row = min(int(3 * obj.cy / image_size), 2)
    return GRID_REGIONS[3 * row + col]


def grid_region_is_clear(obj: ObjectInfo, image_size: int) -> bool:
    lines = (image_size / 3.0, 2.0 * image_size / 3.0)
    margin = GRID_MARGIN * image_size
    return all(abs(v - t) >= margin for v in (obj.cx, obj.cy) for t in lines)


def region_phrase(region: str) -> str:
    if region == "center":
        return "in the center"
    if " " in region:
        return f"in the {region} corner"
    return {"top": "at the top", "bottom": "at the bottom", "left": "on the left",
            "right": "on the right"}[region]


def join_phrases(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def count_phrase(n: int, noun: str = "shape") -> str:
    return f"{vocab.NUMBER_WORDS[n]} {noun if n == 1 else noun + 's'}"


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


CAPTION_TEMPLATES: tuple[str, ...] = (
    "{objects} on a {background} background",
    "a {background} background with {objects}",
    "an image of {objects} on a {background} background",
    "{count} on a {background} background: {objects}",
    "there {be} {objects} on a {background} background",
)


def make_captions(objects: Sequence[ObjectInfo], background: str, rng: np.random.Generator,
                  n: int = 3) -> list[str]:
    """``n`` short captions that mention every object (identical colour+category are grouped)."""
    templates = rng.permutation(len(CAPTION_TEMPLATES))[:n]
    captions = []
    for t in templates:
        order = [objects[int(i)] for i in rng.permutation(len(objects))]
        groups: dict[tuple[str, str], list[ObjectInfo]] = {}
        for o in order:  # insertion order = shuffled first occurrence
            groups.setdefault((o.colour, o.category), []).append(o)
        items = []
        for (colour, category), members in groups.items():
            if len(members) == 1:
                words = f"{members[0].size} {colour} {category}" if rng.random() < 0.5 \
                    else f"{colour} {category}"
                items.append(vocab.with_article(words))
            else:
                items.append(f"{vocab.NUMBER_WORDS[len(members)]} {colour} "
                             f"{vocab.PLURALS[category]}")
        first_single = len(next(iter(groups.values()))) == 1
        captions.append(_sentence(CAPTION_TEMPLATES[int(t)].format(
            objects=join_phrases(items), background=background,
            count=count_phrase(len(objects)), be="is" if first_single else "are")))
    return captions


def describe(objects: Sequence[ObjectInfo], background: str, image_size: int) -> str:
    """Detailed description: every object with size, colour and grid region, left to right."""
    order = sorted(objects, key=lambda o: (o.cx, o.cy, o.ann_id))
    items = [f"{vocab.with_article(noun_phrase(o, ('size', 'colour', 'category')))} "
             f"{region_phrase(grid_region(o, image_size))}" for o in order]
    return _sentence(f"the image shows {count_phrase(len(objects))} on a {background} "
                     f"background: {join_phrases(items)}")


def format_box(bbox: Sequence[float], image_size: int) -> str:
    """LLaVA-style normalised [x1, y1, x2, y2] with two decimals from a COCO [x, y, w, h]."""
    x, y, w, h = bbox
    coords = (x / image_size, y / image_size, (x + w) / image_size, (y + h) / image_size)
    return "[" + ", ".join(f"{c:.2f}" for c in coords) + "]"
