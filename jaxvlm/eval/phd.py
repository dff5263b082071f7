"""PhD yes/no accuracy per task x mode, as UE's phd_eval_metric.py reports it.

Answers are parsed with the POPE rule (``jaxvlm.eval.pope.parse_yes_no``). Each PhD record has a
``task`` (object_recognition, attribute_recognition, sentiment_analysis, positional_reasoning,
counting) and a ``mode`` whose part before the first '_' is ``neutral`` or ``misleading``. The
ten reported cells are ON AN SN PN CN (neutral) and OM AM SM PM CM (misleading).

Difference from the original: UE pairs the concatenated per-GPU outputs with labels *by
position*, which misaligns them under multi-GPU sharding; here they pair by question id. PhD's
``data.jsonl`` has no id field, so a record's id is its ``question_id``/``id`` if present, else
its 0-based line index (what ``jaxvlm generate`` writes as ``question_id`` for such files).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Sequence

from jaxvlm.eval.io import EvalInputError, Prediction, as_records, index_records, pair_by_id
from jaxvlm.eval.pope import parse_yes_no

TASK_LETTERS = {
    "object_recognition": "O",
    "attribute_recognition": "A",
    "sentiment_analysis": "S",
    "positional_reasoning": "P",
    "counting": "C",
}
MODE_LETTERS = {"neutral": "N", "misleading": "M"}


def cell_name(task: str, mode: str) -> str:
    """'object_recognition', 'misleading_xyz' -> 'OM'; unknown tasks keep their full name."""
    m = mode.split("_")[0]
    t = TASK_LETTERS.get(task)
    return f"{t}{MODE_LETTERS[m]}" if t and m in MODE_LETTERS else f"{task}_{m}"


def aggregate(records: Sequence[Mapping]) -> dict[str, float]:
    """Accuracy per task x mode cell plus overall accuracy."""
    cells: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        cells[r["cell"]].append(r["correct"])
    out = {"accuracy": sum(r["correct"] for r in records) / len(records) if records else 0.0}
    order = [f"{t}{m}" for m in "NM" for t in "OASPC"]
    for c in order + sorted(set(cells) - set(order)):
        if c in cells:
            out[c] = sum(cells[c]) / len(cells[c])
    return out


def score(predictions: Sequence[Prediction], annotations: Any, allow_missing: bool = False) -> dict:
    """PhD accuracy per task x mode (see the module docstring for the id convention).

    Example:
        >>> from jaxvlm.eval.io import load_predictions
        >>> ann = [{"answer": "yes", "task": "counting", "mode": "neutral"},
        ...        {"answer": "no", "task": "counting", "mode": "misleading_1"}]
        >>> preds = load_predictions([{"question_id": 1, "text": "Yes"}, {"question_id": 0, "text": "Yes"}])
        >>> score(preds, ann)["scores"]
        {'accuracy': 0.5, 'CN': 1.0, 'CM': 0.0}
    """
    recs = index_records(as_records(annotations, "PhD annotations"), what="PhD annotations",
                         fallback_index_base=0)
    records = []
    for p, ann in pair_by_id(predictions, recs, allow_missing, "PhD annotations"):
        for k in ("answer", "task", "mode"):
            if k not in ann:
                raise EvalInputError(f"PhD annotations: question {p.id!r} has no {k!r} field")
        label = str(ann["answer"]).strip().lower()
        if label not in ("yes", "no"):
            raise EvalInputError(f"PhD annotations: question {p.id!r} answer must be yes/no, got {ann['answer']!r}")
        pred = parse_yes_no(p.text)
        records.append({"id": p.id, "pred": pred, "label": label, "correct": pred == label,
                        "cell": cell_name(str(ann["task"]), str(ann["mode"]))})
    return {"scores": aggregate(records), "per_sample": records,
            "notes": ["PhD: predictions paired with labels by question id (UE pairs by position)"]}
