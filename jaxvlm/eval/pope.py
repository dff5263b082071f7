"""POPE yes/no metrics (LLaVA's and REVERSE's eval_pope.py) and the shared yes/no answer parser.

Parsing (kept exactly, since the published POPE / PhD numbers depend on it): keep the text before
the first '.', delete commas, split on single spaces; the answer is "no" if one of the words is
exactly ``No``, ``no`` or ``not``, else "yes". So "Not at all" and "NO" count as *yes*, and
"There is no dog" as *no*.

Pairing: the original scripts pair answers with labels by position; here they pair by question id.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Sequence

from jaxvlm.eval.io import EvalInputError, Prediction, as_records, index_records, pair_by_id

_NO_WORDS = frozenset({"No", "not", "no"})


def parse_yes_no(text: str) -> str:
    """'yes' or 'no' from a free-form answer, with the POPE rule.

    Example:
        >>> parse_yes_no("No, there is no cat."), parse_yes_no("There is a cat, not a dog."), parse_yes_no("Not really")
        ('no', 'no', 'yes')
    """
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if _NO_WORDS.intersection(words) else "yes"


def _label(value: Any, where: str) -> int:
    s = str(value).strip().lower()
    if s in ("yes", "1", "true"):
        return 1
    if s in ("no", "0", "false"):
        return 0
    raise EvalInputError(f"{where}: label must be yes/no, got {value!r}")


def binary_metrics(records: Sequence[Mapping]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 ("yes" = positive) and yes-ratio over {pred, label} records."""
    tp = sum(r["pred"] == 1 and r["label"] == 1 for r in records)
    fp = sum(r["pred"] == 1 and r["label"] == 0 for r in records)
    tn = sum(r["pred"] == 0 and r["label"] == 0 for r in records)
    fn = sum(r["pred"] == 0 and r["label"] == 1 for r in records)
    n = len(records)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": (tp + fp) / n if n else 0.0}


aggregate = binary_metrics


def score(predictions: Sequence[Prediction], annotations: Any, allow_missing: bool = False,
          label_key: str = "label") -> dict:
    """POPE metrics; per-category ones (and their mean) too when annotations carry ``category``.

    ``annotations``: POPE label records ``{"question_id", "label": "yes"|"no", ["category"]}``
    (a JSONL path such as ``coco_pope_random.json``, or a list).

    Example:
        >>> from jaxvlm.eval.io import load_predictions
        >>> preds = load_predictions([{"question_id": 1, "text": "Yes."}, {"question_id": 2, "text": "No."}])
        >>> score(preds, [{"question_id": 1, "label": "yes"}, {"question_id": 2, "label": "yes"}])["scores"]["recall"]
        0.5
    """
    labels = index_records(as_records(annotations, "POPE labels"), what="POPE labels")
    records = []
    for p, ann in pair_by_id(predictions, labels, allow_missing, "POPE labels"):
        if label_key not in ann:
            raise EvalInputError(f"POPE labels: question {p.id!r} has no {label_key!r} field")
        records.append({"id": p.id, "pred": 1 if parse_yes_no(p.text) == "yes" else 0,
                        "label": _label(ann[label_key], f"POPE labels, question {p.id!r}"),
                        "category": ann.get("category")})
    out = {"scores": binary_metrics(records), "per_sample": records}
    by_cat: dict[str, list] = defaultdict(list)
    for r in records:
        if r["category"] is not None:
            by_cat[str(r["category"])].append(r)
    if by_cat:
        cats = {c: binary_metrics(rs) for c, rs in sorted(by_cat.items())}
        # Papers quote POPE as the average over the random / popular / adversarial splits.
        cats["mean_over_categories"] = {k: sum(m[k] for m in cats.values()) / len(cats)
                                        for k in next(iter(cats.values()))}
        out["by_category"] = cats
    return out
