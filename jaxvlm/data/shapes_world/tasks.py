"""Question-answer tasks over scenes: LLaVA conversations, POPE and PhD-style probes.

All answers are computed from the object list, never sampled, so every label is exact.  Each
builder takes its own ``numpy`` Generator, so adding a task never shifts another task's draws.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import vocab
from .language import (OPPOSITE_RELATION, RELATIONS, describe, format_box, grid_region,
                       grid_region_is_clear, referring_expression, relation_holds,
                       resolve_referring_expression)
from .scene import ObjectInfo

IMAGE_TOKEN = "<image>"
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
CAPTION_PROMPT = "Describe the image."
REC_PROMPT = "Give the bounding box of: {expr}"
REG_PROMPT = "Describe the region {box}."
POPE_SETTINGS: tuple[str, ...] = ("random", "popular", "adversarial")
PHD_TASKS: tuple[str, ...] = ("object", "attribute", "counting", "positional")
PHD_MODES: tuple[str, ...] = ("base", "sec", "icc")
POPE_PER_IMAGE = 3
EXISTENCE_PAIRS = 3   # yes/no pairs per training existence record


@dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str


@dataclass(frozen=True)
class ImageRecord:
    """One image as the task builders see it."""

    image_id: int
    file_name: str       # bare name inside the split's image folder
    split: str
    background: str
    image_size: int
    objects: tuple[ObjectInfo, ...]


def existence_question(colour: str | None, category: str) -> str:
    words = f"{colour} {category}" if colour else category
    return f"Is there {vocab.with_article(words)} in the image?"


def count_question(category: str) -> str:
    return f"How many {vocab.PLURALS[category]} are there?"


def colour_count_question(colour: str) -> str:
    return f"How many {colour} shapes are there?"


_EXISTENCE = re.compile(r"^Is there an? (?:(?P<colour>[a-z]+) )?(?P<category>[a-z]+) in the image\?$")
_COUNT = re.compile(r"^How many (?P<noun>[a-z]+)(?P<shapes> shapes)? are there\?$")
_ASK_ABOUT = re.compile(r"^(?:What colour is|Where is) (?P<expr>.+)\?$")
_RELATION = re.compile(r"^Is (?P<a>.+?) (?P<rel>" + "|".join(map(re.escape, RELATIONS)) + r") (?P<b>.+)\?$")
_PLURAL_TO_CATEGORY = {p: c for c, p in vocab.PLURALS.items()}


def question_objects(question: str, objects: Sequence[ObjectInfo],
                     image_size: int) -> list[ObjectInfo] | None:
    """The objects a VQA or existence question of this world is about (what a region of interest
    should hold): the matching shapes of an existence or count question (none when absent), the
    referent of a colour or position question, both objects of a relation question. None when the
    question is not one this world asks. The short-answer suffix and the image tag are ignored.

        >>> question_objects("How many stars are there?", objects, 112)      # every star
    """
    q = " ".join(question.replace(IMAGE_TOKEN, " ").replace(SHORT_ANSWER_PROMPT, " ").split())
    if m := _EXISTENCE.match(q):
        colour, category = m["colour"], m["category"]
        if category not in vocab.CATEGORY_IDS or (colour is not None and colour not in vocab.COLOUR_NAMES):
            return None
        return [o for o in objects if o.category == category and colour in (None, o.colour)]
    if m := _COUNT.match(q):
        if m["shapes"]:
            return [o for o in objects if o.colour == m["noun"]] if m["noun"] in vocab.COLOUR_NAMES else None
        category = _PLURAL_TO_CATEGORY.get(m["noun"])
        return None if category is None else [o for o in objects if o.category == category]
    if m := _RELATION.match(q):
        a = resolve_referring_expression(m["a"], objects, image_size)
        b = resolve_referring_expression(m["b"], objects, image_size)
        return a + [o for o in b if o not in a] if len(a) == 1 and len(b) == 1 else None
    if m := _ASK_ABOUT.match(q):
        found = resolve_referring_expression(m["expr"], objects, image_size)
        return found if len(found) == 1 else None
    return None


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _clear_pairs(rec: ImageRecord) -> list[tuple[str, str, str, bool]]:
    """(expr_a, relation, expr_b, truth) over pairs with attribute-only expressions."""
    exprs = {o.ann_id: referring_expression(o, rec.objects, rec.image_size, use_spatial=False)
             for o in rec.objects}
    out = []
    for a in rec.objects:
        for b in rec.objects:
            if a.ann_id == b.ann_id or exprs[a.ann_id] is None or exprs[b.ann_id] is None:
                continue
            for rel in RELATIONS:
                truth = relation_holds(a, b, rel, rec.image_size)
                if truth is not None:
                    out.append((exprs[a.ann_id], rel, exprs[b.ann_id], truth))  # type: ignore
    return out


def vqa_candidates(rec: ImageRecord, rng: np.random.Generator) -> list[QA]:
    """At most one short-answer question per kind, in a fixed kind order."""
    objs, size = rec.objects, rec.image_size
    qas: list[QA] = []
    o = _pick(rng, objs)
    qas.append(QA("existence", existence_question(o.colour, o.category), "yes"))

    present = {(x.colour, x.category) for x in objs}
    present_cats = sorted({x.category for x in objs}, key=vocab.CATEGORY_IDS.__getitem__)
    # Half the negatives swap only the colour of a present shape: attribute, not object, errors.
    recolour = [(c, cat) for cat in present_cats for c in vocab.COLOUR_NAMES
                if (c, cat) not in present]
    absent = [(c, cat) for cat in vocab.CATEGORIES for c in vocab.COLOUR_NAMES
              if cat not in present_cats]
    pool = recolour if (recolour and rng.random() < 0.5) else absent
    c, cat = _pick(rng, pool)
    qas.append(QA("existence", existence_question(c, cat), "no"))

    colourless = [(x, e) for x in objs
                  if (e := referring_expression(x, objs, size, use_colour=False)) is not None]
    if colourless:
        x, e = _pick(rng, colourless)
        qas.append(QA("colour", f"What colour is {e}?", x.colour))

    counts = Counter(x.category for x in objs)
    cat = _pick(rng, present_cats) if rng.random() < 0.8 else _pick(rng, vocab.CATEGORIES)
    qas.append(QA("count", count_question(cat), str(counts.get(cat, 0))))
    colour = _pick(rng, vocab.COLOUR_NAMES)
    qas.append(QA("count", colour_count_question(colour),
                  str(sum(x.colour == colour for x in objs))))

    placeable = [(x, e) for x in objs if grid_region_is_clear(x, size)
                 and (e := referring_expression(x, objs, size)) is not None]
    if placeable:
        x, e = _pick(rng, placeable)
        qas.append(QA("position", f"Where is {e}?", grid_region(x, size)))

    pairs = _clear_pairs(rec)
    if pairs:
        want = bool(rng.random() < 0.5)
        pairs = [p for p in pairs if p[3] == want] or pairs
        a, rel, b, truth = _pick(rng, pairs)
        qas.append(QA("relation", f"Is {a} {rel} {b}?", "yes" if truth else "no"))
    return qas


def _conversation(turns: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": f"{IMAGE_TOKEN}\n{q}" if i == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return conv


def theme_mates(present: Sequence[str]) -> list[str]:
    """Absent categories that share a scene theme with a present one (the tempting negatives)."""
    mates = {c for members in vocab.THEMES.values() if set(members) & set(present) for c in members}
    return [c for c in vocab.CATEGORIES if c in mates and c not in present]


def existence_turns(rec: ImageRecord, rng: np.random.Generator,
                    n_pairs: int = EXISTENCE_PAIRS) -> list[tuple[str, str]]:
    """POPE-format yes/no turns ("Is there a <category> in the image?", no answer hint), balanced.

    Positives are present categories; each negative is, with equal odds, a theme mate of a present
    category (POPE "adversarial"), a frequent category ("popular") or any absent one ("random"),
    so the model learns to say "no" to exactly the negatives the evaluation asks about.
    """
    present = sorted({o.category for o in rec.objects}, key=vocab.CATEGORY_IDS.__getitem__)
    absent = [c for c in vocab.CATEGORIES if c not in present]
    mates = theme_mates(present)
    popular = sorted(absent, key=lambda c: -vocab.CATEGORY_WEIGHTS[c])[:4]
    k = min(n_pairs, len(present), len(absent))
    positives = [present[int(i)] for i in rng.choice(len(present), size=k, replace=False)]
    negatives: list[str] = []
    for _ in range(k):
        u = rng.random()
        pool = mates if u < 1 / 3 else popular if u < 2 / 3 else absent
        pool = [c for c in pool if c not in negatives] or [c for c in absent if c not in negatives]
        negatives.append(_pick(rng, pool))
    turns = [(pope_question(c), "yes") for c in positives] + [(pope_question(c), "no") for c in negatives]
    return [turns[int(i)] for i in rng.permutation(len(turns))]


def llava_records(rec: ImageRecord, rng: np.random.Generator,
                  max_vqa_turns: int = 4, max_rec_turns: int = 3) -> list[dict]:
    """LLaVA-format records for one image: caption, short-answer VQA, POPE-style existence,
    grounding (REC + REG).

    ``image`` is relative to the world's image root (``<split>/<file_name>``). Every record carries
    ``num_objects`` (the scene's object count), the default key of the train pipeline's optional
    easy-first curriculum (`jaxvlm.data.pipeline.curriculum_order`, train config ``data.curriculum``).
    """
    image = f"{rec.split}/{rec.file_name}"
    records = [{"id": f"{rec.image_id}_caption", "image": image,
                "conversations": _conversation(
                    [(CAPTION_PROMPT, describe(rec.objects, rec.background, rec.image_size))])}]

    qas = vqa_candidates(rec, rng)
    chosen = [qas[int(i)] for i in rng.permutation(len(qas))[:max_vqa_turns]]
    records.append({"id": f"{rec.image_id}_vqa", "image": image, "conversations": _conversation(
        [(f"{qa.question}\n{SHORT_ANSWER_PROMPT}", qa.answer) for qa in chosen])})

    records.append({"id": f"{rec.image_id}_exist", "image": image,
                    "conversations": _conversation(existence_turns(rec, rng))})

    referable = [(o, e) for o in rec.objects
                 if (e := referring_expression(o, rec.objects, rec.image_size)) is not None]
    if referable:
        order = [referable[int(i)] for i in rng.permutation(len(referable))]
        turns = [(REC_PROMPT.format(expr=e), format_box(o.bbox, rec.image_size))
                 for o, e in order[:max_rec_turns]]
        o, e = order[-1]  # REG on the last one: a different object whenever there are two+
        turns.append((REG_PROMPT.format(box=format_box(o.bbox, rec.image_size)), e))
        records.append({"id": f"{rec.image_id}_grounding", "image": image,
                        "conversations": _conversation(turns)})
    for r in records:
        r["num_objects"] = len(rec.objects)
    return records


# ----------------------------------------------------------------------------------------- POPE
@dataclass(frozen=True)
class CategoryStats:
    """Image-level category frequency and co-occurrence over one split."""

    frequency: dict[str, int]
    cooccurrence: dict[tuple[str, str], int]

    @classmethod
    def from_records(cls, records: Sequence[ImageRecord]) -> CategoryStats:
        freq: Counter[str] = Counter()
        cooc: Counter[tuple[str, str]] = Counter()
        for rec in records:
            cats = sorted({o.category for o in rec.objects})
            freq.update(cats)
            cooc.update((a, b) for a in cats for b in cats if a != b)
        return cls(dict(freq), dict(cooc))

    def popular(self, exclude: set[str]) -> list[str]:
        return sorted((c for c in vocab.CATEGORIES if c not in exclude),
                      key=lambda c: (-self.frequency.get(c, 0), vocab.CATEGORY_IDS[c]))

    def adversarial(self, present: set[str]) -> list[str]:
        return sorted((c for c in vocab.CATEGORIES if c not in present),
                      key=lambda c: (-sum(self.cooccurrence.get((g, c), 0) for g in present),
                                     vocab.CATEGORY_IDS[c]))


def pope_question(category: str) -> str:
    return existence_question(None, category)


def pope_items(rec: ImageRecord, stats: CategoryStats,
               rng: np.random.Generator) -> dict[str, list[tuple[str, str]]]:
    """Per setting, (category, label) pairs alternating yes/no; positives shared by settings."""
    present = sorted({o.category for o in rec.objects}, key=vocab.CATEGORY_IDS.__getitem__)
    k = min(POPE_PER_IMAGE, len(present))
    positives = [present[int(i)] for i in rng.choice(len(present), size=k, replace=False)]
    absent = [c for c in vocab.CATEGORIES if c not in present]
    negatives = {
        "random": [absent[int(i)] for i in rng.choice(len(absent), size=k, replace=False)],
        "popular": stats.popular(set(present))[:k],
        "adversarial": stats.adversarial(set(present))[:k],
    }
    return {s: [item for p, n in zip(positives, negatives[s]) for item in ((p, "yes"), (n, "no"))]
            for s in POPE_SETTINGS}


# ------------------------------------------------------------------------------------------ PhD
def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _count_words(n: int, category: str) -> str:
    return f"{vocab.NUMBER_WORDS[n]} {vocab.plural(category, n)}"


def _exactly_question(n: int, category: str) -> str:
    be = "Is" if n == 1 else "Are"
    return f"{be} there exactly {_count_words(n, category)} in the image?"


def phd_items(rec: ImageRecord, stats: CategoryStats,
              rng: np.random.Generator) -> list[dict[str, str | None]]:
    """PhD-style probes: per task a yes and a no question, each in base/sec/icc mode.

    ``sec`` prefixes a specious but plausible-sounding hint towards the wrong answer; ``icc``
    prefixes a flat statement that contradicts the image.  Both always push towards the wrong
    label, so the drop from base measures how much the model trusts text over pixels.
    """
    objs, size = rec.objects, rec.image_size
    present = sorted({o.category for o in objs}, key=vocab.CATEGORY_IDS.__getitem__)
    out: list[dict[str, str | None]] = []

    def emit(task: str, question: str, label: str, sec: str, icc: str) -> None:
        for mode, ctx in (("base", None), ("sec", sec), ("icc", icc)):
            out.append({"task": task, "mode": mode, "label": label, "context": ctx,
                        "question": question if ctx is None else f"{ctx} {question}"})

    # object: the negative is the absent category that co-occurs most with what is present.
    yes_cat = _pick(rng, present)
    no_cat = _pick(rng, stats.adversarial(set(present))[:3])
    mate = max(present, key=lambda g: (stats.cooccurrence.get((g, no_cat), 0),
                                       -vocab.CATEGORY_IDS[g]))
    emit("object", existence_question(None, yes_cat), "yes",
         f"{_cap(vocab.PLURALS[yes_cat])} are rarely seen in pictures like this one.",
         f"There is no {yes_cat} in this image.")
    emit("object", existence_question(None, no_cat), "no",
         f"{_cap(vocab.PLURALS[no_cat])} often appear together with {vocab.PLURALS[mate]}.",
         f"There is {vocab.with_article(vocab.TYPICAL_COLOUR[no_cat] + ' ' + no_cat)} "
         "in this image.")

    # attribute: the wrong colour is the category's typical one when that is wrong (a prior).
    colourless = [(o, e) for o in objs
                  if (e := referring_expression(o, objs, size, use_colour=False)) is not None]
    if colourless:
        o, e = _pick(rng, colourless)
        wrong = vocab.TYPICAL_COLOUR[o.category]
        if wrong == o.colour:
            wrong = _pick(rng, [c for c in vocab.COLOUR_NAMES if c != o.colour])
        sec = f"{_cap(vocab.PLURALS[o.category])} are usually {wrong}."
        icc = f"{_cap(e)} is {wrong}."
        emit("attribute", f"Is {e} {o.colour}?", "yes", sec, icc)
        emit("attribute", f"Is {e} {wrong}?", "no", sec, icc)

    # counting: off by one, the most tempting miscount.
    cat = _pick(rng, present)
    n = sum(o.category == cat for o in objs)
    m = n + 1 if (n == 1 or rng.random() < 0.5) else n - 1
    sec = f"At a glance there seem to be {_count_words(m, cat)}."
    icc = f"There {'is' if m == 1 else 'are'} exactly {_count_words(m, cat)} in this image."
    emit("counting", _exactly_question(n, cat), "yes", sec, icc)
    emit("counting", _exactly_question(m, cat), "no", sec, icc)

    # positional: the no question flips the true relation.
    pairs = [p for p in _clear_pairs(rec) if p[3]]
    if pairs:
        a, rel, b, _ = _pick(rng, pairs)
        wrong_rel = OPPOSITE_RELATION[rel]
        sec = f"At a glance, {a} seems to be {wrong_rel} {b}."
        icc = f"{_cap(a)} is {wrong_rel} {b}."
        emit("positional", f"Is {a} {rel} {b}?", "yes", sec, icc)
        emit("positional", f"Is {a} {wrong_rel} {b}?", "no", sec, icc)
    return out


__all__ = ["QA", "ImageRecord", "CategoryStats", "vqa_candidates", "llava_records", "pope_items",
           "pope_question", "phd_items", "POPE_SETTINGS", "PHD_TASKS", "PHD_MODES",
           "existence_question", "existence_turns", "count_question", "colour_count_question", "format_box"]
