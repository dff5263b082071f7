"""CHAIR (Rohrbach et al. 2018) as computed by the REVERSE and UE evaluation scripts.

Pipeline per caption: lower-case, ``nltk.word_tokenize``, ``nltk.pos_tag``, WordNet lemmatisation
with the POS mapped to WordNet's (J/V/N/R, else noun), merge "double words" (``hot dog``,
``baby elephant`` -> ``elephant``...), drop ``seat`` when ``toilet`` is present, keep words in the
COCO-80 synonym table and map each to its category ("node word").

Ground-truth objects per image, two modes:
  * ``coco``  (REVERSE's CHAIR-MSCOCO): COCO instance categories  U  objects of the COCO captions.
  * ``refexp`` (UE's RefCOCOg variant): objects of the reference expression(s) only.

Metrics (micro-averaged over captions, as the scripts do):
  CHAIRs = #captions with >= 1 hallucinated object / #captions
  CHAIRi = #hallucinated object mentions / #object mentions
  Recall = sum over captions of #distinct GT objects mentioned / sum of #GT objects
  Len    = 0.01 * mean number of tokens after double-word merging (printed x100 by the scripts)

Faithfully kept quirks of the original (with nltk's WordNet 3.0 data): "men" stays "men" (WordNet
lists it as a lemma) so it is never a person; "dining" tagged as a verb lemmatises to "din";
"motor bike" and "cheesecake" never match (their table entries carry a leading space); "skiing"
-> "ski" -> skis; "sports ball" never merges ("sports" -> "sport"), "ball" alone maps to it.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from jaxvlm.eval.io import EvalInputError, Prediction, canonical_id, coco_image_id, read_json_or_jsonl
from jaxvlm.eval.nltk_data import require_nltk_data

# The COCO-80 synonym table of the original CHAIR code (LisaAnne/Hallucination data/synonyms.txt),
# one category per line, first entry = COCO category name. Transcribed verbatim, including the
# original's two double spaces (", " split leaves " motor bike" and " cheesecake" with a leading
# space, so those two synonyms can never match: a quirk every published CHAIR number carries),
# the repeated entries and "iPhone" (never matches lower-cased captions).
SYNONYMS_TXT = """\
person, girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, worker, passenger, sister, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, female, guy, traveler, mother, father, gentleman, pitcher, player, skier, snowboarder, skater, skateboarder, person, woman, guy, foreigner, child, gentleman, caller, offender, coworker, trespasser, patient, politician, soldier, grandchild, serviceman, walker, drinker, doctor, bicyclist, thief, buyer, teenager, student, camper, driver, solider, hunter, shopper, villager
bicycle, bike, bicycle, bike, unicycle, minibike, trike
car, automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi
motorcycle, scooter,  motor bike, motor cycle, motorbike, scooter, moped
airplane, jetliner, plane, air plane, monoplane, aircraft, jet, jetliner, airbus, biplane, seaplane
bus, minibus, trolley
train, locomotive, tramway, caboose
truck, pickup, lorry, hauler, firetruck
boat, ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, catamaran, pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, barge, ferry, sailboard, paddleboat, lifeboat, freighter, steamboat, riverboat, battleship, steamship
traffic light, street light, traffic signal, stop light, streetlight, stoplight
fire hydrant, hydrant
stop sign
parking meter
bench, pew
bird, ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, hummingbird, mallard, finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, woodpecker, egret, chickadee, quail, bluebird, kingfisher, buzzard, willet, gull, swan, bluejay, flamingo, cormorant, parrot, loon, gosling, waterbird, pheasant, rooster, sandpiper, crow, raven, turkey, oriole, cowbird, warbler, magpie, peacock, cockatiel, lorikeet, puffin, vulture, condor, macaw, peafowl, cockatoo, songbird
cat, kitten, feline, tabby
dog, puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, terrier, poodle, labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, corgi, cocker, greyhound, retriever, brindle, hound, whippet, husky
horse, colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, bronco
sheep, lamb, ram, lamb, goat, ewe
cow, cattle, oxen, ox, calf, cattle, holstein, heifer, buffalo, bull, zebu, bison
elephant
bear, panda
zebra
giraffe
backpack, knapsack
umbrella
handbag, wallet, purse, briefcase
tie, bow, bow tie
suitcase, suit case, luggage
frisbee
skis, ski
snowboard
sports ball, ball
kite
baseball bat
baseball glove
skateboard
surfboard, longboard, skimboard, shortboard, wakeboard
tennis racket, racket
bottle
wine glass
cup
fork
knife, pocketknife, knive
spoon
bowl, container
banana
apple
sandwich, burger, sub, cheeseburger, hamburger
orange
broccoli
carrot
hot dog
pizza
donut, doughnut, bagel
cake,  cheesecake, cupcake, shortcake, coffeecake, pancake
chair, seat, stool
couch, sofa, recliner, futon, loveseat, settee, chesterfield
potted plant, houseplant
bed
dining table, table, desk
toilet, urinal, commode, toilet, lavatory, potty
tv, monitor, televison, television
laptop, computer, notebook, netbook, lenovo, macbook, laptop computer
mouse
remote
keyboard
cell phone, mobile phone, phone, cellphone, telephone, phon, smartphone, iPhone
microwave
oven, stovetop, stove, stove top oven
toaster
sink
refrigerator, fridge, fridge, freezer
book
clock
vase
scissors
teddy bear, teddybear
hair drier, hairdryer
toothbrush
"""


def _parse_synonyms(text: str) -> tuple[dict[str, str], frozenset[str]]:
    node_of: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        entries = line.split(", ")  # not ",": keeps the leading-space quirk above
        for e in entries:
            node_of[e] = entries[0]
    return node_of, frozenset(node_of)


SYNONYM_TO_NODE, COCO_OBJECT_WORDS = _parse_synonyms(SYNONYMS_TXT)
COCO_CATEGORIES = tuple(line.split(", ")[0] for line in SYNONYMS_TXT.splitlines() if line.strip())

# Word pairs read as one token (after lemmatisation). Mapped to themselves unless noted; pairs
# whose result is not in the table ("home plate", "train track") stop "plate"/"train" firing.
# "stove top oven" has three words so a two-word lookup never sees it (kept as in the original).
_COCO_DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
    "stove top oven", "home plate", "train track",
)
# "baby bird" is a bird, not a person; "passenger jet" is a jet, not a person.
_ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
                 "animal", "cub")
_VEHICLE_WORDS = ("jet", "train")


def _double_words() -> dict[str, str]:
    d = {w: w for w in _COCO_DOUBLE_WORDS}
    for a in _ANIMAL_WORDS:
        d[f"baby {a}"] = a
        d[f"adult {a}"] = a
    for v in _VEHICLE_WORDS:
        d[f"passenger {v}"] = v
    d["bow tie"] = "tie"
    d["toilet seat"] = "toilet"
    d["wine glas"] = "wine glass"  # legacy of a pattern.en singulariser; harmless with WordNet
    return d


DOUBLE_WORDS = _double_words()


@dataclass(frozen=True)
class CaptionObjects:
    """COCO objects found in one caption."""

    words: tuple[str, ...]   # the matched (merged) words, e.g. ("puppy", "hot dog")
    nodes: tuple[str, ...]   # their COCO categories, e.g. ("dog", "hot dog")
    tokens: tuple[str, ...]  # all tokens after lemmatisation + double-word merging (for Len)


class ChairExtractor:
    """Caption -> COCO object mentions, with the original CHAIR's tokenisation rules.

    Example (needs nltk's punkt_tab, averaged_perceptron_tagger_eng and wordnet):
        >>> ChairExtractor()("Two puppies and a hot dog on a dining table.").nodes
        ('dog', 'hot dog', 'dining table')
    """

    def __init__(self, synonyms: Mapping[str, str] | None = None) -> None:
        """synonyms: word -> object node for another object vocabulary (e.g. the shapes world's
        categories); default the COCO-80 table. Double-word merging stays COCO's."""
        self._synonyms = dict(SYNONYM_TO_NODE if synonyms is None else synonyms)
        require_nltk_data()
        import nltk
        from nltk.corpus import wordnet
        from nltk.stem import WordNetLemmatizer

        self._tokenize = nltk.word_tokenize
        self._tag = nltk.pos_tag
        self._lemmatize = WordNetLemmatizer().lemmatize
        self._pos = {"J": wordnet.ADJ, "V": wordnet.VERB, "N": wordnet.NOUN, "R": wordnet.ADV}
        self._noun = wordnet.NOUN
        self._cache: dict[str, CaptionObjects] = {}

    def lemmas(self, caption: str) -> list[str]:
        tagged = self._tag(self._tokenize(caption.lower()))
        return [self._lemmatize(w, pos=self._pos.get(t[:1], self._noun)) for w, t in tagged]

    def __call__(self, caption: str) -> CaptionObjects:
        hit = self._cache.get(caption)
        if hit is not None:
            return hit
        lemmas = self.lemmas(caption)
        merged: list[str] = []
        i = 0
        while i < len(lemmas):
            pair = " ".join(lemmas[i:i + 2])
            if pair in DOUBLE_WORDS:
                merged.append(DOUBLE_WORDS[pair])
                i += 2
            else:
                merged.append(lemmas[i])
                i += 1
        words = merged
        # "the seat of the toilet" must not fire "chair".
        if "toilet" in words and "seat" in words:
            words = [w for w in words if w != "seat"]
        objs = [w for w in words if w in self._synonyms]
        out = CaptionObjects(tuple(objs), tuple(self._synonyms[w] for w in objs), tuple(merged))
        if len(self._cache) < 100_000:
            self._cache[caption] = out
        return out


# ---------------------------------------------------------------------------------------------
# Ground-truth objects

def _load(obj: Any, what: str) -> Any:
    return read_json_or_jsonl(obj, what) if isinstance(obj, (str, os.PathLike)) else obj


def _expand_coco_dir(path: str) -> list[str]:
    names = [f"{kind}_{split}2014.json" for kind in ("instances", "captions") for split in ("train", "val")]
    found = [os.path.join(path, n) for n in names if os.path.exists(os.path.join(path, n))]
    if not found:
        raise EvalInputError(f"{path}: no COCO 2014 annotation files found (looked for {', '.join(names)})")
    return found


def coco_gt_objects(
    annotations: Sequence[Any] | Any,
    image_ids: Iterable[str] | None = None,
    extractor: ChairExtractor | None = None,
) -> dict[str, set[str]]:
    """REVERSE's CHAIR-MSCOCO ground truth: instance categories U caption objects per image.

    ``annotations``: COCO ``instances_*.json`` / ``captions_*.json`` paths or loaded dicts, or a
    directory holding ``{instances,captions}_{train,val}2014.json`` (REVERSE uses train+val).
    Captions are parsed only for ``image_ids`` when given: the result for those ids is the same,
    and it skips parsing ~600k COCO captions.
    """
    items = annotations if isinstance(annotations, (list, tuple)) else [annotations]
    paths_or_dicts: list[Any] = []
    for a in items:
        if isinstance(a, (str, os.PathLike)) and os.path.isdir(a):
            paths_or_dicts.extend(_expand_coco_dir(os.fspath(a)))
        else:
            paths_or_dicts.append(a)
    wanted = None if image_ids is None else set(image_ids)
    objects: dict[str, set[str]] = defaultdict(set)
    known: set[str] = set()
    n_inst = n_caps = 0
    for a in paths_or_dicts:
        d = _load(a, "COCO annotations")
        if not isinstance(d, Mapping) or not isinstance(d.get("annotations"), list):
            raise EvalInputError(f"{a if isinstance(a, str) else 'annotations'}: not a COCO annotation file "
                                 "(expected a dict with an 'annotations' list)")
        known.update(canonical_id(im["id"]) for im in d.get("images", ()))
        anns = d["annotations"]
        if "categories" in d:  # instances file
            n_inst += 1
            cat_name = {c["id"]: c["name"] for c in d["categories"]}
            for ann in anns:
                imid = canonical_id(ann["image_id"])
                known.add(imid)
                if wanted is None or imid in wanted:
                    name = cat_name[ann["category_id"]]
                    objects[imid].add(SYNONYM_TO_NODE.get(name, name))
        elif anns and "caption" in anns[0]:  # captions file
            n_caps += 1
            extractor = extractor or ChairExtractor()
            for ann in anns:
                imid = canonical_id(ann["image_id"])
                known.add(imid)
                if wanted is None or imid in wanted:
                    objects[imid].update(extractor(ann["caption"]).nodes)
        elif anns:
            raise EvalInputError("COCO annotations: neither an instances file (no 'categories') "
                                 "nor a captions file (no 'caption' field)")
    if n_inst == 0 and n_caps == 0:
        raise EvalInputError("CHAIR coco mode needs COCO instances and/or captions annotations")
    return {k: set(objects.get(k, ())) for k in known}


def refexp_gt_objects(
    annotations: Any,
    extractor: ChairExtractor | None = None,
    text_keys: Sequence[str] = ("caption", "ref", "expression", "sentence", "text"),
) -> dict[str, set[str]]:
    """UE's RefCOCOg ground truth: objects of the reference expression(s) of each region only.

    ``annotations``: a COCO-captions-style dict (``{"annotations": [{"image_id", "caption"}]}``,
    as UE's ``captions_refcocog_gt.json``), a path to one, or a list of ``{"image_id"|"id", "caption"}``.
    """
    d = _load(annotations, "reference expressions")
    recs = d["annotations"] if isinstance(d, Mapping) and "annotations" in d else d
    if not isinstance(recs, list):
        raise EvalInputError("reference expressions: expected a list of records or {'annotations': [...]}")
    extractor = extractor or ChairExtractor()
    out: dict[str, set[str]] = defaultdict(set)
    for i, r in enumerate(recs):
        key = next((k for k in ("image_id", "id", "question_id") if k in r), None)
        text = next((r[k] for k in text_keys if k in r), None)
        if key is None or text is None:
            raise EvalInputError(f"reference expressions item {i}: needs an image_id/id and a caption")
        out[canonical_id(r[key])].update(extractor(text).nodes)
    return dict(out)


# ---------------------------------------------------------------------------------------------
# Scoring

def score_caption(caption: str, gt_objects: set[str], extractor: ChairExtractor) -> dict:
    """Per-caption CHAIR record (counts; the metrics come from ``aggregate``)."""
    found = extractor(caption)
    mentions = list(zip(found.words, found.nodes))
    halluc = [(w, n) for w, n in mentions if n not in gt_objects]
    recalled = {n for _, n in mentions if n in gt_objects}
    return {
        "mentions": [list(m) for m in mentions],
        "hallucinated": [list(h) for h in halluc],
        "gt_objects": sorted(gt_objects),
        "n_mentions": len(mentions),
        "n_hallucinated": len(halluc),
        "n_recalled": len(recalled),
        "n_gt": len(gt_objects),
        "n_tokens": len(found.tokens),
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def aggregate(records: Sequence[Mapping]) -> dict[str, float]:
    """CHAIRs, CHAIRi, Recall and Len over per-caption records (see the module docstring)."""
    n = len(records)
    return {
        "CHAIRs": _ratio(sum(r["n_hallucinated"] > 0 for r in records), n),
        "CHAIRi": _ratio(sum(r["n_hallucinated"] for r in records), sum(r["n_mentions"] for r in records)),
        "Recall": _ratio(sum(r["n_recalled"] for r in records), sum(r["n_gt"] for r in records)),
        "Len": _ratio(0.01 * sum(r["n_tokens"] for r in records), n),
    }


def score(
    predictions: Sequence[Prediction],
    annotations: Any,
    mode: str = "coco",
    extractor: ChairExtractor | None = None,
) -> dict:
    """CHAIR over predictions (one caption each; an image may appear more than once).

    A prediction's image is its ``image_id`` field (COCO file names such as
    ``COCO_val2014_000000391895.jpg`` are accepted in coco mode), else its id. ``annotations``:
    see ``coco_gt_objects`` (mode="coco") or ``refexp_gt_objects`` (mode="refexp").

    Example:
        >>> from jaxvlm.eval.io import load_predictions
        >>> preds = load_predictions([{"image_id": 1, "text": "A dog and a cat."}], id_key="image_id")
        >>> score(preds, [{"image_id": 1, "caption": "a puppy on a couch"}], mode="refexp")["scores"]["CHAIRi"]
        0.5
    """
    extractor = extractor or ChairExtractor()
    if mode == "coco":
        ids = [coco_image_id(p.record.get("image_id", p.id)) for p in predictions]
        gt = coco_gt_objects(annotations, image_ids=set(ids), extractor=extractor)
    elif mode == "refexp":
        ids = [canonical_id(p.record.get("image_id", p.id)) for p in predictions]
        gt = refexp_gt_objects(annotations, extractor=extractor)
    else:
        raise ValueError(f"CHAIR mode must be 'coco' or 'refexp', got {mode!r}")
    unknown = [(p, i) for p, i in zip(predictions, ids) if i not in gt]
    if unknown:
        ex = ", ".join(f"{i!r} (line {p.line})" for p, i in unknown[:5])
        raise EvalInputError(f"{len(unknown)} of {len(predictions)} prediction image ids have no ground truth "
                             f"in the annotations, e.g. {ex}")
    records = []
    for p, imid in zip(predictions, ids):
        rec = {"id": p.id, "image_id": imid, **score_caption(p.text or "", gt[imid], extractor)}
        records.append(rec)
    return {"scores": aggregate(records), "per_sample": records,
            "notes": [f"CHAIR {mode} mode; values are fractions (papers print x100); Len = 0.01 x mean tokens"]}
