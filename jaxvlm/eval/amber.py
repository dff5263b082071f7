"""AMBER generative metrics: CHAIR, Cover, Hal, Cog (Wang et al. 2023, arXiv 2311.07397).

Per response, the candidate objects are the nouns of the answer (nltk tokenise + POS tag, keep
NN*, WordNet noun lemma, no lower-casing: as AMBER's script), kept only if they are in the
object vocabulary (every word of the association table ``relation.json``, keys and values; without
the table, every ``truth``/``hallu`` word of the annotation file). Words of the optional global
``safe_words.txt`` list are kept in the denominator but never judged. A noun *matches* a truth
object if it equals it or one of its associated words; likewise for ``hallu`` objects.

Over all responses (mentions counted with repetition, as AMBER does):

  CHAIR = hallucinated mentions / candidate mentions          (hallucinated = matches no truth object)
  Cover = truth objects mentioned / truth objects
  Hal   = responses with >= 1 hallucinated mention / responses
  Cog   = mentions matching a ``hallu`` object / candidate mentions      (paper definition)
  Cog_hallu_cover = ``hallu`` objects mentioned / ``hallu`` objects     (AMBER's released script,
          hence the Cog numbers in the REVERSE and AMBER papers' tables)

Simplification: AMBER's script also accepts a noun whose spaCy ``en_core_web_lg`` vector similarity
to a truth (or hallu) word exceeds 0.8; that model is a separate 600 MB download, so only exact
(lemma and association-table) matches are used here. Expect a slightly higher CHAIR and lower
Cover than the official script where synonyms outside the association table occur.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

from jaxvlm.eval.io import EvalInputError, Prediction, as_records, index_records, pair_by_id, read_json_or_jsonl
from jaxvlm.eval.nltk_data import CHAIR_RESOURCES, require_nltk_data


class NounExtractor:
    """AMBER's ``extract_nouns``: lemmatised NN* tokens of the raw (not lower-cased) text."""

    def __init__(self) -> None:
        require_nltk_data(CHAIR_RESOURCES, who="AMBER")
        import nltk
        from nltk.stem import WordNetLemmatizer

        self._tokenize, self._tag = nltk.word_tokenize, nltk.pos_tag
        self._lemmatize = WordNetLemmatizer().lemmatize

    def __call__(self, text: str) -> list[str]:
        return [self._lemmatize(w) for w, t in self._tag(self._tokenize(text)) if t.startswith("NN")]


def _load_association(association: Any) -> dict[str, list[str]]:
    if association is None:
        return {}
    d = read_json_or_jsonl(association, "AMBER association table") \
        if isinstance(association, (str, os.PathLike)) else association
    if not isinstance(d, Mapping):
        raise EvalInputError("AMBER association table: expected a JSON object word -> [related words]")
    return {str(k): [str(x) for x in v] for k, v in d.items()}


def _load_safe_words(safe_words: Any) -> frozenset[str]:
    if safe_words is None:
        return frozenset()
    if isinstance(safe_words, (str, os.PathLike)):
        with open(safe_words, encoding="utf-8") as f:
            return frozenset(line.strip() for line in f if line.strip())
    return frozenset(safe_words)


def response_record(nouns: Sequence[str], truth: Sequence[str], hallu: Sequence[str],
                    association: Mapping[str, Sequence[str]], vocabulary: Iterable[str] | set[str],
                    safe_words: frozenset[str] = frozenset()) -> dict:
    """Counts for one response, given its extracted nouns."""
    # word -> indices of the objects it stands for (the object itself or an associated word)
    def index(objs: Sequence[str]) -> dict[str, set[int]]:
        m: dict[str, set[int]] = {}
        for i, o in enumerate(objs):
            for w in [o, *association.get(o, ())]:
                m.setdefault(w, set()).add(i)
        return m

    truth_of, hallu_of = index(truth), index(hallu)
    mentions = [n for n in nouns if n in vocabulary]
    covered_truth: set[int] = set()
    covered_hallu: set[int] = set()
    hallucinated: list[str] = []
    cog: list[str] = []
    for n in mentions:
        if n in safe_words:
            continue
        if n in truth_of:
            covered_truth |= truth_of[n]
            continue
        if n in hallu_of:
            covered_hallu |= hallu_of[n]
            cog.append(n)
        hallucinated.append(n)
    return {"mentions": mentions, "hallucinated": hallucinated, "cog_mentions": cog,
            "n_truth": len(truth), "n_truth_covered": len(covered_truth),
            "n_hallu": len(hallu), "n_hallu_covered": len(covered_hallu)}


def aggregate(records: Sequence[Mapping]) -> dict[str, float]:
    def r(a: float, b: float) -> float:
        return a / b if b else 0.0

    n_mentions = sum(len(x["mentions"]) for x in records)
    return {
        "CHAIR": r(sum(len(x["hallucinated"]) for x in records), n_mentions),
        "Cover": r(sum(x["n_truth_covered"] for x in records), sum(x["n_truth"] for x in records)),
        "Hal": r(sum(bool(x["hallucinated"]) for x in records), len(records)),
        "Cog": r(sum(len(x["cog_mentions"]) for x in records), n_mentions),
        "Cog_hallu_cover": r(sum(x["n_hallu_covered"] for x in records), sum(x["n_hallu"] for x in records)),
    }


def score(predictions: Sequence[Prediction], annotations: Any, association: Any = None,
          safe_words: Any = None, extractor: NounExtractor | None = None,
          allow_missing: bool = False) -> dict:
    """AMBER generative metrics.

    ``annotations``: AMBER's ``annotations.json`` (a list; ``question_id`` k is item k-1, or an
    ``id`` field), generative items ``{"type": "generative", "truth": [...], "hallu": [...]}``.
    Discriminative items are ignored. ``association``: ``relation.json`` (optional);
    ``safe_words``: ``safe_words.txt`` (optional).
    """
    recs = as_records(annotations, "AMBER annotations")
    anns = index_records(recs, what="AMBER annotations", fallback_index_base=1)
    gen = {k: a for k, a in anns.items() if a.get("type", "generative") == "generative"}
    for k, a in gen.items():
        if not isinstance(a.get("truth"), list) or not isinstance(a.get("hallu"), list):
            raise EvalInputError(f"AMBER annotations: item {k!r} needs 'truth' and 'hallu' lists")
    assoc = _load_association(association)
    if assoc:
        vocabulary = set(assoc) | {w for v in assoc.values() for w in v}
    else:
        vocabulary = {w for a in gen.values() for w in [*a["truth"], *a["hallu"]]}
    safe = _load_safe_words(safe_words)
    extractor = extractor or NounExtractor()
    records = []
    for p, ann in pair_by_id(predictions, gen, allow_missing, "AMBER generative annotations"):
        rec = response_record(extractor(p.text), ann["truth"], ann["hallu"], assoc, vocabulary, safe)
        records.append({"id": p.id, **rec})
    notes = ["AMBER: exact lemma / association matching only (no spaCy similarity > 0.8 synonyms)"]
    if not assoc:
        notes.append("AMBER: no association table given; vocabulary = all truth/hallu words of the annotations")
    return {"scores": aggregate(records), "per_sample": records, "notes": notes}
