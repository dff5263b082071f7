"""``jaxvlm eval``: score a predictions JSONL, print a table, optionally write a JSON report.

Examples::

    jaxvlm eval --metric pope --predictions preds.jsonl --annotations coco_pope_random.json
    jaxvlm eval --metric chair --predictions caps.jsonl --annotations coco/annotations --bootstrap
    jaxvlm eval --metric chair --mode refexp --predictions caps.jsonl --annotations captions_refcocog_gt.json
    jaxvlm eval --metric rec --box-format qwen_vl --predictions rec.jsonl --annotations refcocog_val.jsonl
    jaxvlm eval --metric amber --predictions amber.jsonl --annotations annotations.json \\
        --option association=relation.json --option safe_words=safe_words.txt
"""
from __future__ import annotations

import argparse
import json
import sys

from jaxvlm.eval.io import EvalInputError


def _option(s: str) -> tuple[str, object]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    try:
        return k.strip(), json.loads(v)
    except json.JSONDecodeError:
        return k.strip(), v  # a bare string (e.g. a path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxvlm.eval.harness import ALIASES, METRICS

    parser.description = __doc__.splitlines()[0]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "metrics:\n" + "\n".join(f"  {k:8s} {s.help}" for k, s in METRICS.items())
    parser.add_argument("--metric", required=True, choices=sorted([*METRICS, *ALIASES]))
    parser.add_argument("--predictions", required=True, nargs="+",
                        help="predictions JSONL from `jaxvlm generate` (several: the files of its --shard runs)")
    parser.add_argument("--annotations", nargs="+", default=None,
                        help="ground-truth file(s); chair --mode coco takes several COCO files or a folder")
    parser.add_argument("--output", help="write the JSON report here")
    parser.add_argument("--bootstrap", type=int, nargs="?", const=100, default=0, metavar="ROUNDS",
                        help="bootstrap mean/std/95%% CI over ROUNDS resamples (100 if no value)")
    parser.add_argument("--seed", type=int, default=42, help="bootstrap seed (REVERSE: 42)")
    parser.add_argument("--mode", choices=["coco", "refexp"], help="chair: ground-truth source")
    parser.add_argument("--box-format", choices=["auto", "llava", "qwen_vl", "qwen25_vl"],
                        help="rec: how boxes are written in the answers")
    parser.add_argument("--id-key", help="predictions field holding the id (default question_id / id)")
    parser.add_argument("--text-key", help="predictions field holding the answer (default answer / text)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="score a subset: annotations without a prediction are not an error")
    parser.add_argument("--per-sample", action="store_true", help="include per-sample records in the report")
    parser.add_argument("--option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                        help="extra metric argument (JSON value or string), repeatable")


def main(args: argparse.Namespace) -> int:
    from jaxvlm.eval.harness import evaluate, format_table, resolve_metric, write_report

    metric = resolve_metric(args.metric)
    kw = dict(args.option)
    if args.mode:
        kw["mode"] = args.mode
    if args.box_format:
        kw["box_format"] = args.box_format
    if args.allow_missing:
        kw["allow_missing"] = True
    ann = args.annotations
    if ann is not None and len(ann) == 1 and not (metric == "chair" and kw.get("mode", "coco") == "coco"):
        ann = ann[0]
    elif ann is not None and len(ann) > 1 and not (metric == "chair" and kw.get("mode", "coco") == "coco"):
        print(f"error: --metric {metric} takes one annotations file, got {len(ann)}", file=sys.stderr)
        return 2
    try:
        report = evaluate(metric, args.predictions, ann, bootstrap=args.bootstrap, seed=args.seed,
                          per_sample=args.per_sample, id_key=args.id_key, text_key=args.text_key, **kw)
    except (EvalInputError, LookupError, RuntimeError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(report))
    for note in report.get("notes", []):
        print(f"note: {note}")
    if args.output:
        write_report(report, args.output)
        print(f"report written to {args.output}")
    return 0
