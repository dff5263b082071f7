"""REVERSE (Wu et al., arXiv 2504.13169): hallucination-aware training with span tags. Answers tag every
key phrase as ``<SPAN>phrase</CN>`` (confident) or ``<SPAN>phrase</UN>`` (hallucinated; the answer ends
right after ``</UN>``). This module holds the training side as the original code does it
(tsunghan-wu/reverse_vlm, ``llava/train/train.py`` and ``llava/utils.py``):

- `dehallucination_labels`: the tokens strictly between ``<SPAN>`` and ``</UN>`` are not trained on (the
  model should not learn to say the hallucinated phrase), while ``<SPAN>``, ``</UN>``, ``</CN>`` and every
  other answer token keep their targets. `jaxvlm train` applies it with ``data.reverse_labels=True``
  (the tokenizer must hold the three tags: ``tokens.add=["<SPAN>", "</CN>", "</UN>"]`` grows the model).
- `inject_hints`: with probability 0.2, a general answer's question gets
  ``" (Hint: potential incorrect phrases -> {hint})"`` appended (apply it to LLaVA records when loading).
- `render_answer`: generated ids -> readable text (tags dropped, spaces before punctuation removed).

Retrospective resampling (the inference loop) is not here yet.

Example:
    >>> tok.add_tokens(list(TAGS))
    >>> labels = dehallucination_labels(labels, tag_ids(tok))
"""
from __future__ import annotations

import random
import re
import string
from typing import Any, Mapping, Sequence

import numpy as np

SPAN, CONFIDENT, UNCONFIDENT = "<SPAN>", "</CN>", "</UN>"
TAGS = (SPAN, CONFIDENT, UNCONFIDENT)
HINT = "(Hint: potential incorrect phrases -> {})"
IGNORE_INDEX = -100


def tag_ids(tokenizer: Any) -> tuple[int, int, int]:
    """The ids of (<SPAN>, </CN>, </UN>); a tokenizer without them is an error naming the missing ones."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in TAGS]
    unk = getattr(tokenizer, "unk_token_id", None)
    missing = [t for t, i in zip(TAGS, ids) if i is None or (unk is not None and i == unk)]
    if missing:
        raise ValueError(f"the tokenizer has no {', '.join(missing)} token(s); REVERSE adds them with "
                         f"tokenizer.add_tokens({list(TAGS)}) (in `jaxvlm train`: tokens.add)")
    return ids[0], ids[1], ids[2]


def dehallucination_labels(labels: np.ndarray, tags: Sequence[int], ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """`[T]` labels (token ids where supervised) -> a copy with every target strictly between a ``<SPAN>``
    and the ``</UN>`` that closes it set to `ignore_index`. `tags`: the ids of (<SPAN>, </CN>, </UN>).

    As the original (``process_dehallucination_label``, mode "naive"): a ``</CN>`` or ``</UN>`` resets the
    open span, and an ``</UN>`` with no open span ignores every target before it."""
    span, cn, un = (int(t) for t in tags)
    out = np.array(labels, copy=True)
    open_at = -1
    for i, tok in enumerate(out.tolist()):
        if tok == span:
            open_at = i
        elif tok == cn:
            open_at = -1
        elif tok == un:
            out[open_at + 1:i] = ignore_index
            open_at = -1
    return out


def inject_hints(record: Mapping[str, Any], prob: float = 0.2, rng: random.Random | None = None) -> dict:
    """A LLaVA record (conversations with REVERSE's ``A_type`` / ``hint`` on answer turns) -> a copy in which
    each question whose answer is a ``general_answer`` with a hint gets, with probability `prob`, the hint
    appended: ``"{q} (Hint: potential incorrect phrases -> {hint.lower()})"``."""
    draw = (rng or random).random
    turns = [dict(t) for t in record["conversations"]]
    for i in range(0, len(turns) - 1, 2):
        ans = turns[i + 1]
        if ans.get("A_type") == "general_answer" and draw() < prob and ans.get("hint") is not None:
            turns[i]["value"] = f"{turns[i]['value']} {HINT.format(ans['hint'].lower())}"
    return dict(record, conversations=turns)


def render_answer(ids: Sequence[int], tokenizer: Any, tags: Sequence[int], cut_current_sentence: bool = False) -> str:
    """Generated ids -> text as REVERSE shows it: the tags dropped, special tokens skipped, whitespace before
    punctuation removed; with `cut_current_sentence`, an unfinished last sentence is dropped."""
    keep = [int(i) for i in ids if int(i) not in {int(t) for t in tags}]
    text = tokenizer.decode(keep, skip_special_tokens=True).strip()
    text = re.sub(r"\s([%s])" % re.escape(string.punctuation), r"\1", text)
    if cut_current_sentence:
        sentences = text.split(".")
        text = ". ".join(sentences[:-1]) + "." if len(sentences) > 1 else ""
    return text
