"""Evaluation metrics for the five methods' benchmarks, scored from prediction files (no model).

    >>> from jaxvlm.eval import evaluate
    >>> evaluate("pope", "preds.jsonl", "coco_pope_random.json", bootstrap=100)   # doctest: +SKIP

Metrics: chair, pope, phd, caption (BLEU / METEOR / ROUGE-L / CIDEr), rec, res, vqa, mc, amber;
see ``jaxvlm.eval.harness.METRICS``. Modules are imported on use, so importing this package does
not load nltk or pycocoevalcap.
"""
from jaxvlm.eval.bootstrap import bootstrap
from jaxvlm.eval.harness import METRICS, evaluate, format_table, write_report
from jaxvlm.eval.io import EvalInputError, load_predictions

__all__ = ["METRICS", "EvalInputError", "bootstrap", "evaluate", "format_table", "load_predictions",
           "write_report"]
