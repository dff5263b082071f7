"""One entry point for every metric: ``evaluate(metric, predictions, annotations, **kw) -> report``.

A report is a JSON-ready dict::

    {"metric": "pope", "n": 3000, "scores": {...}, ["by_category": {...}],
     ["bootstrap": {score: {"mean", "std", "ci95", "rounds", "seed"}}], "notes": [...],
     ["per_sample": [...]]}
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from jaxvlm.eval.bootstrap import bootstrap as _bootstrap
from jaxvlm.eval.io import load_predictions


@dataclass(frozen=True)
class MetricSpec:
    module: str              # module under jaxvlm.eval
    score: str               # its scoring function
    aggregate: str | None    # its per-sample -> scores function (for the bootstrap)
    id_keys: tuple[str, ...] = ("question_id", "id")
    require_text: bool = True
    needs_annotations: bool = True
    help: str = ""


METRICS: dict[str, MetricSpec] = {
    "chair": MetricSpec("chair", "score", "aggregate", ("image_id", "question_id", "id"),
                        help="CHAIRs / CHAIRi / Recall / Len (mode=coco: COCO instances+captions; "
                             "mode=refexp: reference expressions)"),
    "pope": MetricSpec("pope", "score", "aggregate", help="POPE accuracy / precision / recall / F1 / yes-ratio"),
    "phd": MetricSpec("phd", "score", "aggregate", help="PhD yes/no accuracy per task x mode"),
    "caption": MetricSpec("captioning", "score", None, ("image_id", "question_id", "id"),
                          help="BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr via pycocoevalcap"),
    "rec": MetricSpec("grounding", "score_rec", "rec_aggregate", help="box IoU and Acc@0.5 from text boxes"),
    "res": MetricSpec("grounding", "score_res", "res_aggregate", require_text=False,
                      help="mask cIoU / gIoU / Acc@0.5"),
    "vqa": MetricSpec("vqa", "score", "aggregate", help="official VQAv2 accuracy"),
    "mc": MetricSpec("vqa", "score_mc", "mc_aggregate", help="multiple-choice (letter) accuracy"),
    "amber": MetricSpec("amber", "score", "aggregate", help="AMBER generative CHAIR / Cover / Hal / Cog"),
}
ALIASES = {"meteor": "caption", "captioning": "caption", "cider": "caption", "multiple_choice": "mc"}


def resolve_metric(metric: str) -> str:
    name = ALIASES.get(metric.lower(), metric.lower())
    if name not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {sorted(METRICS)} (aliases {sorted(ALIASES)})")
    return name


def _module(spec: MetricSpec):
    import importlib

    return importlib.import_module(f"jaxvlm.eval.{spec.module}")


def evaluate(
    metric: str,
    predictions: Any,
    annotations: Any = None,
    *,
    bootstrap: int = 0,
    seed: int = 42,
    per_sample: bool = False,
    id_key: str | None = None,
    text_key: str | None = None,
    **kw: Any,
) -> dict:
    """Score a predictions file (or list of records) with one metric.

    ``bootstrap=N`` adds N-round bootstrap mean / std / 95% CI of every score (REVERSE uses 100;
    fixed ``seed``). Other keyword arguments go to the metric, e.g. ``mode="refexp"`` (chair),
    ``box_format="qwen_vl"`` (rec), ``allow_missing=True``, ``association=...`` (amber),
    ``meteor=MeteorScorer()`` (caption).

    Example:
        >>> r = evaluate("pope", [{"question_id": 1, "text": "No, there is not."}],
        ...              [{"question_id": 1, "label": "no"}])
        >>> r["scores"]["accuracy"], r["n"]
        (1.0, 1)
    """
    name = resolve_metric(metric)
    spec = METRICS[name]
    if spec.needs_annotations and annotations is None:
        raise ValueError(f"metric {name!r} needs annotations")
    preds = load_predictions(predictions, id_key=id_key or spec.id_keys, text_key=text_key,
                             require_text=spec.require_text)
    mod = _module(spec)
    result = getattr(mod, spec.score)(preds, annotations, **kw)
    report: dict[str, Any] = {"metric": name, "n": len(result["per_sample"]), "scores": result["scores"]}
    for k, v in result.items():
        if k not in ("scores", "per_sample", "notes"):
            report[k] = v
    if bootstrap:
        if spec.aggregate is None:
            report.setdefault("notes", []).append(f"bootstrap not available for {name} (corpus-level scorers)")
        else:
            agg: Callable[[Sequence[Mapping]], Mapping[str, float]] = getattr(mod, spec.aggregate)
            report["bootstrap"] = _bootstrap(result["per_sample"], agg, rounds=bootstrap, seed=seed)
    report["notes"] = report.get("notes", []) + list(result.get("notes", []))
    if isinstance(predictions, (str, os.PathLike)):
        report["predictions"] = os.fspath(predictions)
    elif isinstance(predictions, (list, tuple)) and all(isinstance(x, (str, os.PathLike)) for x in predictions):
        report["predictions"] = os.fspath(predictions[0]) if len(predictions) == 1 else list(map(os.fspath, predictions))
    if per_sample:
        report["per_sample"] = result["per_sample"]
    return report


def format_table(report: Mapping[str, Any]) -> str:
    """Plain-text table of a report's scores (and bootstrap columns when present)."""
    boot = report.get("bootstrap") or {}
    rows = [("score", "value") + (("boot mean", "boot std", "95% CI") if boot else ())]
    for k, v in report["scores"].items():
        row = (k, f"{v:.4f}")
        if boot:
            b = boot.get(k)
            ci = next((x for kk, x in b.items() if kk.startswith("ci")), None) if b else None
            row += (f"{b['mean']:.4f}", f"{b['std']:.4f}", f"[{ci[0]:.4f}, {ci[1]:.4f}]") if b else ("", "", "")
        rows.append(row)
    for cat, scores in (report.get("by_category") or {}).items():
        for k, v in scores.items():
            rows.append((f"{cat}/{k}", f"{v:.4f}") + (("", "", "") if boot else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{report['metric']}  (n = {report['n']})"]
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], path: str | os.PathLike) -> None:
    d = os.path.dirname(os.fspath(path))
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
        f.write("\n")
