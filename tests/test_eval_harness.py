"""Harness, JSONL reading and the `jaxvlm eval` command: reports and clear input errors."""
from __future__ import annotations

import json

import pytest

from jaxvlm.cli import main as jaxvlm_main
from jaxvlm.eval import EvalInputError, evaluate, load_predictions

LABELS = [{"question_id": 1, "label": "yes"}, {"question_id": 2, "label": "no"}, {"question_id": 3, "label": "no"}]


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_predictions_accept_both_key_spellings(tmp_path):
    p = _write_jsonl(tmp_path / "p.jsonl", [{"id": 1, "answer": "yes"}, "", {"question_id": "2", "text": "no"}])
    preds = load_predictions(p)
    assert [(x.id, x.text, x.line) for x in preds] == [("1", "yes", 1), ("2", "no", 3)]


def test_missing_predictions_file(tmp_path):
    with pytest.raises(EvalInputError, match=r"predictions file not found: .*nope\.jsonl"):
        evaluate("pope", tmp_path / "nope.jsonl", LABELS)


def test_malformed_line_names_its_number(tmp_path):
    p = _write_jsonl(tmp_path / "p.jsonl", [{"question_id": 1, "text": "yes"}, {"question_id": 2, "text": "no"},
                                            '{"question_id": 3, "text": "no"'])
    with pytest.raises(EvalInputError, match=r"p\.jsonl:3: malformed JSON line"):
        evaluate("pope", p, LABELS)


def test_line_without_id_or_answer(tmp_path):
    p = _write_jsonl(tmp_path / "p.jsonl", [{"question_id": 1, "text": "yes"}, {"qid": 2, "text": "no"}])
    with pytest.raises(EvalInputError, match=r"p\.jsonl:2: no id field \(looked for question_id / id\)"):
        evaluate("pope", p, LABELS)
    p = _write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "output": "yes"}])
    with pytest.raises(EvalInputError, match=r"q\.jsonl:1: no answer field \(looked for answer / text\)"):
        evaluate("pope", p, LABELS)


def test_id_mismatch(tmp_path):
    p = _write_jsonl(tmp_path / "p.jsonl", [{"question_id": 1, "text": "yes"}, {"question_id": 7, "text": "no"}])
    with pytest.raises(EvalInputError, match=r"not in the POPE labels, e.g. '7' \(line 2\); POPE labels ids look "
                                             r"like '1', '2', '3'"):
        evaluate("pope", p, LABELS, allow_missing=True)


def test_missing_annotations_file(tmp_path):
    p = _write_jsonl(tmp_path / "p.jsonl", [{"question_id": 1, "text": "yes"}])
    with pytest.raises(EvalInputError, match=r"POPE labels file not found"):
        evaluate("pope", p, tmp_path / "labels.json")


def test_unknown_metric():
    with pytest.raises(ValueError, match=r"unknown metric 'bleurt'"):
        evaluate("bleurt", [{"question_id": 1, "text": "x"}], LABELS)


def test_cli_writes_report_and_prints_table(tmp_path, capsys):
    p = _write_jsonl(tmp_path / "preds.jsonl", [{"question_id": 1, "text": "Yes."}, {"question_id": 2, "text": "No."},
                                                {"question_id": 3, "text": "Yes, it is."}])
    a = _write_jsonl(tmp_path / "labels.jsonl", LABELS)
    out = tmp_path / "out" / "report.json"
    rc = jaxvlm_main(["eval", "--metric", "pope", "--predictions", str(p), "--annotations", str(a),
                      "--output", str(out), "--bootstrap", "20", "--per-sample"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["metric"] == "pope" and report["n"] == 3
    assert report["scores"]["accuracy"] == pytest.approx(2 / 3)
    assert report["bootstrap"]["f1"]["rounds"] == 20
    assert len(report["per_sample"]) == 3
    printed = capsys.readouterr().out
    assert "pope  (n = 3)" in printed and "accuracy" in printed and "95% CI" in printed


def test_cli_reports_input_errors(tmp_path, capsys):
    a = _write_jsonl(tmp_path / "labels.jsonl", LABELS)
    rc = jaxvlm_main(["eval", "--metric", "pope", "--predictions", str(tmp_path / "missing.jsonl"),
                      "--annotations", str(a)])
    assert rc == 1
    assert "predictions file not found" in capsys.readouterr().err


def test_cli_options_reach_the_metric(tmp_path):
    p = _write_jsonl(tmp_path / "preds.jsonl", [{"question_id": 1, "text": "<box>(0,0),(499.5,499.5)</box>"}])
    a = _write_jsonl(tmp_path / "rec.jsonl", [{"question_id": 1, "bbox": [0, 0, 100, 100], "width": 200, "height": 200}])
    out = tmp_path / "r.json"
    rc = jaxvlm_main(["eval", "--metric", "rec", "--predictions", str(p), "--annotations", str(a),
                      "--box-format", "qwen_vl", "--option", "threshold=0.9", "--output", str(out)])
    assert rc == 0
    assert json.loads(out.read_text())["scores"]["acc@0.9"] == 1.0


def test_cli_scores_the_shards_of_one_run_together(tmp_path, capsys):
    """`jaxvlm generate --shard` writes one file per shard; --predictions takes them all, and a question
    answered in two of them is an error naming both places."""
    rows = [{"question_id": 1, "text": "Yes."}, {"question_id": 2, "text": "No."}, {"question_id": 3, "text": "Yes."}]
    whole = _write_jsonl(tmp_path / "whole.jsonl", rows)
    s0 = _write_jsonl(tmp_path / "s0.jsonl", [rows[0], rows[2]])
    s1 = _write_jsonl(tmp_path / "s1.jsonl", [rows[1]])
    a = _write_jsonl(tmp_path / "labels.jsonl", LABELS)
    reports = {}
    for name, files in (("whole", [whole]), ("shards", [s0, s1])):
        out = tmp_path / f"{name}.json"
        assert jaxvlm_main(["eval", "--metric", "pope", "--predictions", *map(str, files), "--annotations", str(a),
                            "--output", str(out), "--per-sample"]) == 0
        reports[name] = json.loads(out.read_text())
    assert reports["shards"]["scores"] == reports["whole"]["scores"] and reports["whole"]["n"] == 3
    assert reports["whole"]["scores"]["accuracy"] == pytest.approx(2 / 3)
    assert reports["shards"]["predictions"] == [str(s0), str(s1)] and reports["whole"]["predictions"] == str(whole)
    dup = _write_jsonl(tmp_path / "s2.jsonl", [rows[2]])
    capsys.readouterr()
    assert jaxvlm_main(["eval", "--metric", "pope", "--predictions", str(s0), str(s1), str(dup),
                        "--annotations", str(a)]) == 1
    err = capsys.readouterr().err
    assert "duplicate prediction id '3'" in err and "s0.jsonl:2" in err and "s2.jsonl:1" in err
