"""Caption metrics through pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D).

Same pipeline as ``COCOEvalCap.evaluate`` (and UE's refcocog_eval_metric.py): Stanford
PTBTokenizer (Java, lower-cased, punctuation dropped) on references and candidates, then each
scorer. METEOR is the official Java METEOR 1.5 (``-l en -norm``). Differences from COCOEvalCap:

* references and candidates are tokenised in one Java call instead of two (same output: the
  tokenizer works line by line);
* one METEOR process serves a whole run (``MeteorScorer`` can be passed in and reused);
* SPICE is left out: pycocoevalcap downloads Stanford CoreNLP 3.6.0 at its first use, which
  fails offline.
"""
from __future__ import annotations

import shutil
from typing import Any, Mapping, Sequence

from jaxvlm.eval.io import EvalInputError, Prediction, canonical_id, read_json_or_jsonl

METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr")


class JavaNotFoundError(RuntimeError):
    """Java is needed for PTBTokenizer and METEOR 1.5 but is not on PATH."""


def require_java(who: str = "METEOR / PTBTokenizer") -> str:
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(
            f"{who} (pycocoevalcap) runs Java, but no `java` executable is on PATH. Install a Java "
            "runtime (8 or newer), e.g. `apt-get install default-jre-headless` or "
            "`conda install -c conda-forge openjdk`, then check `java -version`.")
    return java


class MeteorScorer:
    """One Java METEOR 1.5 process; use as a context manager (or call ``close``).

    Example:
        >>> with MeteorScorer() as m:                                   # doctest: +SKIP
        ...     caption_scores({"1": "a dog"}, {"1": ["a dog runs"]}, meteor=m)["METEOR"]
    """

    def __init__(self) -> None:
        require_java("METEOR 1.5")
        from pycocoevalcap.meteor.meteor import Meteor

        self._meteor = Meteor()

    def compute_score(self, gts: Mapping[str, list[str]], res: Mapping[str, list[str]]):
        if self._meteor is None:
            raise RuntimeError("MeteorScorer is closed")
        proc = self._meteor.meteor_p
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
            raise RuntimeError(f"the METEOR Java process exited (code {proc.returncode}): {err}")
        return self._meteor.compute_score(gts, res)

    def close(self) -> None:
        m, self._meteor = self._meteor, None
        if m is not None:
            # pycocoevalcap never releases its lock if a score line fails to parse; do not wait forever.
            locked = m.lock.acquire(timeout=5)
            try:
                m.meteor_p.stdin.close()
                m.meteor_p.kill()
                m.meteor_p.wait()
            finally:
                if locked:
                    m.lock.release()
            # Meteor.__del__ repeats this on a dead process, which is harmless.

    def __enter__(self) -> "MeteorScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def ptb_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """PTBTokenizer over {key: [captions]} in one Java call."""
    require_java("PTBTokenizer")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


def caption_scores(
    candidates: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    metrics: Sequence[str] = METRICS,
    meteor: MeteorScorer | None = None,
) -> dict:
    """Corpus scores plus per-caption scores for {id: candidate} against {id: [references]}.

    Only ids in ``candidates`` are scored (like COCOEvalCap, which scores the result ids).

    Example:
        >>> caption_scores({"1": "a dog runs"}, {"1": ["a dog is running"]}, metrics=("BLEU",))  # doctest: +SKIP
    """
    unknown = [k for k in candidates if k not in references]
    if unknown:
        raise EvalInputError(f"{len(unknown)} candidate ids have no reference captions, e.g. {unknown[:5]}")
    for m in metrics:
        if m not in METRICS:
            raise ValueError(f"unknown caption metric {m!r}; choose from {METRICS} (SPICE is not available)")
    ids = list(candidates)
    # Prefix keys so references and candidates share one tokenizer run.
    toks = ptb_tokenize({**{f"r{k}": list(references[k]) for k in ids}, **{f"c{k}": [candidates[k]] for k in ids}})
    gts = {k: toks[f"r{k}"] for k in ids}
    res = {k: toks[f"c{k}"] for k in ids}
    scores: dict[str, float] = {}
    per: dict[str, list[float]] = {}
    if "BLEU" in metrics:
        from pycocoevalcap.bleu.bleu import Bleu

        corpus, each = Bleu(4).compute_score(gts, res, verbose=0)
        for n in range(4):
            scores[f"BLEU_{n + 1}"] = float(corpus[n])
            per[f"BLEU_{n + 1}"] = [float(x) for x in each[n]]
    if "METEOR" in metrics:
        own = meteor is None
        scorer = MeteorScorer() if own else meteor
        try:
            corpus, each = scorer.compute_score(gts, res)
        finally:
            if own:
                scorer.close()
        scores["METEOR"], per["METEOR"] = float(corpus), [float(x) for x in each]
    if "ROUGE_L" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge

        corpus, each = Rouge().compute_score(gts, res)
        scores["ROUGE_L"], per["ROUGE_L"] = float(corpus), [float(x) for x in each]
    if "CIDEr" in metrics:
        from pycocoevalcap.cider.cider import Cider

        corpus, each = Cider().compute_score(gts, res)
        scores["CIDEr"], per["CIDEr"] = float(corpus), [float(x) for x in each]
    per_sample = [{"id": k, **{m: v[i] for m, v in per.items()}} for i, k in enumerate(ids)]
    return {"scores": scores, "per_sample": per_sample}


def load_references(annotations: Any) -> dict[str, list[str]]:
    """{id: [captions]} from a COCO captions file / dict (``annotations: [{image_id, caption}]``),
    a list of ``{id|image_id|question_id, caption|captions|references}`` records, or a dict id -> list."""
    d = read_json_or_jsonl(annotations, "reference captions") if not isinstance(annotations, (Mapping, list)) \
        else annotations
    if isinstance(d, Mapping) and "annotations" in d:
        d = d["annotations"]
    refs: dict[str, list[str]] = {}
    if isinstance(d, Mapping):
        for k, v in d.items():
            refs[canonical_id(k)] = [v] if isinstance(v, str) else list(v)
        return refs
    for i, r in enumerate(d):
        key = next((k for k in ("image_id", "id", "question_id") if k in r), None)
        cap = next((r[k] for k in ("caption", "captions", "references", "text") if k in r), None)
        if key is None or cap is None:
            raise EvalInputError(f"reference captions item {i}: needs an id and a caption")
        refs.setdefault(canonical_id(r[key]), []).extend([cap] if isinstance(cap, str) else cap)
    return refs


def score(predictions: Sequence[Prediction], annotations: Any, metrics: Sequence[str] = METRICS,
          meteor: MeteorScorer | None = None) -> dict:
    """Caption metrics for predictions keyed by ``image_id`` (else their id)."""
    cands: dict[str, str] = {}
    for p in predictions:
        key = canonical_id(p.record.get("image_id", p.id))
        if key in cands:
            raise EvalInputError(f"two predictions for caption id {key!r} (line {p.line}); pycocoevalcap "
                                 "scores one candidate per id")
        cands[key] = p.text
    out = caption_scores(cands, load_references(annotations), metrics, meteor)
    out["notes"] = ["PTBTokenizer + pycocoevalcap scorers; METEOR = Java METEOR 1.5; SPICE not computed "
                    "(needs a download of Stanford CoreNLP 3.6.0)"]
    return out
