"""VQA accuracy (official VQAv2 evaluation) and multiple-choice accuracy.

Open-ended accuracy follows GT-Vision-Lab/VQA ``vqaEval.py``:

* the prediction is whitespace-normalised, then punctuation-processed, then digit/article-processed
  (lower-case, number words "none".."ten" -> "0".."10", drop "a"/"an"/"the", restore
  apostrophes in contractions such as "dont" -> "don't");
* the human answers get only the punctuation step, and only when they are not all identical
  (VQAv2 answers are already normalised in the annotation files);
* accuracy = mean over the 10 leave-one-out subsets of min(#matching humans in the subset / 3, 1).

Quirks kept from the official code: its period regex ``(?!<=\\d)(\\.)(?!\\d)`` drops every '.' not
followed by a digit, and ``re.UNICODE`` is passed where ``sub`` expects a count, so at most 32
periods go; a punctuation mark is deleted (not spaced) when it touches a space anywhere in the text.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Mapping, Sequence

from jaxvlm.eval.io import EvalInputError, Prediction, as_records, index_records, pair_by_id

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The official processing of a predicted answer.

    Example:
        >>> normalize_answer("Two dogs."), normalize_answer("The  cat"), normalize_answer("dont know")
        ('2 dogs', 'cat', "don't know")
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction against the human answers (usually 10).

    Example:
        >>> vqa_accuracy("two", ["2"] * 2 + ["3"] * 8)  # 2 humans agree: 8 subsets hold both, 2 hold one
        0.6
    """
    if not answers:
        raise ValueError("no ground-truth answers")
    pred = normalize_answer(prediction)
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    matches = [g == pred for g in gts]
    total = sum(matches)
    # Leave-one-out: dropping answer i leaves total - matches[i] matching humans.
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(gts)


def _answers(ann: Mapping, qid: str) -> list[str]:
    raw = ann.get("answers")
    if raw is None:
        raise EvalInputError(f"VQA annotations: question {qid!r} has no 'answers' list")
    return [a["answer"] if isinstance(a, Mapping) else str(a) for a in raw]


def aggregate(records: Sequence[Mapping]) -> dict[str, float]:
    out = {"accuracy": sum(r["accuracy"] for r in records) / len(records) if records else 0.0}
    by_type: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r.get("answer_type"):
            by_type[r["answer_type"]].append(r["accuracy"])
    for t, v in sorted(by_type.items()):
        out[f"accuracy/{t}"] = sum(v) / len(v)
    return out


def score(predictions: Sequence[Prediction], annotations: Any, allow_missing: bool = False) -> dict:
    """VQA accuracy. ``annotations``: records ``{"question_id", "answers": [10 strings or
    {"answer": ...} dicts], ["answer_type"]}`` or an official VQAv2 annotation file."""
    anns = index_records(as_records(annotations, "VQA annotations"), what="VQA annotations")
    records = []
    for p, ann in pair_by_id(predictions, anns, allow_missing, "VQA annotations"):
        answers = _answers(ann, p.id)
        records.append({"id": p.id, "prediction": normalize_answer(p.text),
                        "accuracy": vqa_accuracy(p.text, answers), "answer_type": ann.get("answer_type")})
    return {"scores": aggregate(records), "per_sample": records}


# ---------------------------------------------------------------------------------------------
# Multiple choice

_LETTER_PATTERNS = (
    re.compile(r"^\s*\(?([A-Z])\)?\s*$"),                       # "B", "(B)"
    re.compile(r"^\s*\(?([A-Z])[\).:,]"),                       # "B.", "B) text", "(B) text", "B: text"
    re.compile(r"answer is:?\s*\(?([A-Z])\b"),                  # "The answer is B." (ScienceQA style)
    re.compile(r"(?:option|choice)\s*\(?([A-Z])\b", re.IGNORECASE),
)


def parse_choice(text: str, options: Sequence[str] | None = None, letters: str | None = None) -> str | None:
    """Letter chosen in a free-form answer, or None.

    Tries, in order: a bare letter ("B", "(B)"), a leading letter with a delimiter ("B. cat",
    "(B) cat"), "the answer is B", "option B"; then, when ``options`` (texts in letter order)
    are given, an answer equal (case-insensitively) to exactly one option text.

    Example:
        >>> parse_choice("(C) a red car"), parse_choice("The answer is B."), parse_choice("dog", ["cat", "dog"])
        ('C', 'B', 'B')
    """
    letters = letters or "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(options) if options else 26]
    for pat in _LETTER_PATTERNS:
        m = pat.search(text)
        if m and m.group(1).upper() in letters:
            return m.group(1).upper()
    if options:
        t = text.strip().rstrip(".").strip().lower()
        hits = [letters[i] for i, o in enumerate(options) if str(o).strip().lower() == t]
        if len(hits) == 1:
            return hits[0]
    return None


def mc_aggregate(records: Sequence[Mapping]) -> dict[str, float]:
    n = len(records)
    return {"accuracy": sum(r["correct"] for r in records) / n if n else 0.0,
            "unparsed": sum(r["choice"] is None for r in records) / n if n else 0.0}


def score_mc(predictions: Sequence[Prediction], annotations: Any, allow_missing: bool = False) -> dict:
    """Multiple-choice accuracy. ``annotations``: ``{"question_id", "answer": "B" (or an index),
    ["options": [...] in letter order]}``. An unparsable answer counts as wrong."""
    anns = index_records(as_records(annotations, "multiple-choice annotations"),
                         what="multiple-choice annotations")
    records = []
    for p, ann in pair_by_id(predictions, anns, allow_missing, "multiple-choice annotations"):
        if "answer" not in ann:
            raise EvalInputError(f"multiple-choice annotations: question {p.id!r} has no 'answer'")
        gold = ann["answer"]
        gold = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[gold] if isinstance(gold, int) else str(gold).strip().upper()
        options = ann.get("options") or ann.get("choices")
        choice = parse_choice(p.text, options)
        records.append({"id": p.id, "choice": choice, "answer": gold, "correct": choice == gold})
    return {"scores": mc_aggregate(records), "per_sample": records}
