"""The closed vocabulary of the shapes world: categories, colours, sizes, backgrounds and priors.

Everything a caption, question or referring expression can say comes from the tuples here, so
parsers and hallucination metrics can enumerate the world exhaustively.  The priors are skewed on
purpose: a frequency skew makes POPE's "popular" setting meaningful, scene themes make
"adversarial" (co-occurrence) negatives genuinely tempting, and per-category typical colours give
attribute hallucination something to latch onto.
"""
from __future__ import annotations

CATEGORIES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "heart", "cross",
    "diamond", "hexagon", "ring", "arrow", "moon", "pentagon",
)
#: COCO category ids are 1-based, in CATEGORIES order.
CATEGORY_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(CATEGORIES)}
SUPERCATEGORIES: dict[str, str] = {
    "circle": "curved", "heart": "curved", "ring": "curved", "moon": "curved",
    "square": "polygon", "triangle": "polygon", "diamond": "polygon",
    "hexagon": "polygon", "pentagon": "polygon",
    "star": "symbol", "cross": "symbol", "arrow": "symbol",
}
PLURALS: dict[str, str] = {c: (c + "es" if c.endswith(("s", "x", "sh", "ch")) else c + "s")
                           for c in CATEGORIES}

#: Saturated RGB so an object's colour is never confusable with the muted backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "cyan": (30, 200, 210),
    "blue": (40, 80, 225),
    "purple": (140, 60, 200),
    "pink": (245, 120, 190),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

#: Radius as a fraction of the image side; the bands do not overlap even with jitter, so the
#: size word is a function of the drawn object.
SIZES: dict[str, float] = {"small": 0.075, "medium": 0.11, "large": 0.15}
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
SIZE_JITTER = 0.1

BACKGROUNDS: tuple[str, ...] = ("plain", "noisy", "striped", "checkered", "gradient", "dotted")

#: Relative category frequency (drives POPE "popular").
CATEGORY_WEIGHTS: dict[str, float] = {
    "circle": 12, "square": 10, "triangle": 9, "star": 8, "heart": 4, "cross": 5,
    "diamond": 6, "hexagon": 3, "ring": 4, "arrow": 3, "moon": 5, "pentagon": 2,
}
#: Scene themes: categories that co-occur (drives POPE "adversarial").
THEMES: dict[str, tuple[str, ...]] = {
    "sky": ("moon", "star", "circle"),
    "cards": ("heart", "diamond", "cross"),
    "geometry": ("square", "triangle", "pentagon", "hexagon"),
    "signs": ("arrow", "ring", "circle", "triangle"),
}
THEME_NAMES: tuple[str, ...] = tuple(THEMES)
THEME_PROB = 0.55
#: Each category's typical colour (drives attribute hallucination probes).
TYPICAL_COLOUR: dict[str, str] = {
    "circle": "blue", "square": "green", "triangle": "orange", "star": "yellow",
    "heart": "red", "cross": "red", "diamond": "cyan", "hexagon": "purple",
    "ring": "orange", "arrow": "green", "moon": "yellow", "pentagon": "pink",
}
TYPICAL_COLOUR_PROB = 0.5

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven",
                                 "eight", "nine", "ten")


def article(word: str) -> str:
    """'a' or 'an' for the word that follows (all vocabulary words are regular)."""
    return "an" if word[0] in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def plural(category: str, n: int) -> str:
    return category if n == 1 else PLURALS[category]
