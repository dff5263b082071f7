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

Retrospective resampling (`retrospective_resample`, the inference loop of ``llava/eval/inference_utils.py``):
generate; at each phrase's closing tag read P(</UN>) from the raw next-token distribution; at the first
phrase above the threshold, keep what precedes it (the confident spans), add the phrase to a hint in the
prompt, raise the temperature by 0.05 (at most +0.5) and resample from there, keeping only the next span
of a correction; after 10 failed local tries, fall back to the last full sentence; stop after 50 tries.
`engine_generator` drives it with `jaxvlm.generate.Engine` (tracked P(</UN>), one row); `reverse_answers`
runs many prompts' loops as one batch (`engine_rows_generator`), a finished prompt's row going to the next.

Example:
    >>> tok.add_tokens(list(TAGS))
    >>> labels = dehallucination_labels(labels, tag_ids(tok))
"""
from __future__ import annotations

import dataclasses
import random
import re
import string
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

SPAN, CONFIDENT, UNCONFIDENT = "<SPAN>", "</CN>", "</UN>"
TAGS = (SPAN, CONFIDENT, UNCONFIDENT)
HINT = "(Hint: potential incorrect phrases -> {})"
OPEN_QA_PROMPT = ("For this question, please point out the false premises or note what information is missing, "
                  "rather than answering it directly.")
OPEN_QA_DEFAULT_ANSWER = "Unable to answer directly due to false premises or missing information."
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


# ----------------------------------------------------------------------------- retrospective resampling


@dataclasses.dataclass
class Resampled:
    """What `retrospective_resample` returns: the answer (tags dropped), the history of attempts as
    (raw text, the flagged phrase | None | "successful correction" | "out of room"), and whether it ended
    without a flag."""

    text: str
    history: list[tuple[str, str | None]]
    success: bool


#: generate(prefix_ids `[T]`, temperature) -> (new ids `[n]` including a final EOS if one was produced,
#: P(</UN>) `[n]` from the raw (unprocessed) distribution at the step that produced each new id); it raises
#: `OutOfRoom` when its cache cannot hold the prefix and at least one new token
Generator = Callable[[np.ndarray, float], tuple[np.ndarray, np.ndarray]]


class OutOfRoom(Exception):
    """A generator's decode cache cannot hold the prefix and one more token (the resampling loop's
    prefix grows with kept text and hints)."""


class RowRequest(NamedTuple):
    """One attempt of one prompt in a `reverse_answers` round."""
    index: int            # the prompt's index
    attempt: int          # how many attempts this prompt has had (its sampling key)
    prefix: np.ndarray    # `[T]` ids
    temperature: float


#: generate_rows(requests) -> one `(new ids, P(</UN>))` (as `Generator` returns) or `OutOfRoom` per request
RowsGenerator = Callable[[Sequence[RowRequest]], Sequence["tuple[np.ndarray, np.ndarray] | OutOfRoom"]]


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=True).strip()


def _without_tags_text(text: str) -> str:
    for t in (UNCONFIDENT, CONFIDENT, SPAN):
        text = text.replace(t, "")
    return text.strip()


def _closers(ids: np.ndarray, tags: Sequence[int]) -> np.ndarray:
    """Positions of </CN> and </UN> in `ids`, in order."""
    return np.flatnonzero((ids == tags[1]) | (ids == tags[2]))


def _tags_pair_up(ids: np.ndarray, tags: Sequence[int]) -> bool:
    """As many closers as <SPAN>s, and each <SPAN> before its closer."""
    opens, closes = np.flatnonzero(ids == tags[0]), _closers(ids, tags)
    return len(opens) == len(closes) and bool(np.all(opens <= closes))


def _check(existing: np.ndarray, new: np.ndarray, p_un: np.ndarray, tokenizer, tags, threshold: float,
           correcting: bool, eos_id: int):
    """One attempt's verdict: (text, raw text, new ids, flagged phrase | None, backtrack index, latest
    index). While correcting, only the first span of `new` counts (the rest is cut, EOS appended)."""
    if correcting:
        closes = _closers(new, tags)
        if len(closes):
            c = int(closes[0])
            new = np.concatenate([new[:c + 1], [eos_id]])
            p_un = np.concatenate([p_un[:c + 1], p_un[-1:]])
    latest = len(new)
    out = np.concatenate([existing, new]).astype(np.int64)
    raw = _decode(tokenizer, out)
    if not np.any(out == tags[0]):
        plain = raw.split(UNCONFIDENT)[0].replace(CONFIDENT, "").strip()
        return plain, plain, new, None, -1, latest
    readable = render_answer(out, tokenizer, tags)
    if not _tags_pair_up(out, tags):
        return raw, readable, new, "Format Error", 0, latest     # (raw, readable): the original's order here
    opens, closes = np.flatnonzero(new == tags[0]), _closers(new, tags)
    phrase, back = None, -1
    for k, (o, c) in enumerate(zip(opens, closes)):
        if p_un[c] > threshold and back == -1:
            if k == 0:
                latest, back = int(c) + 1, 0
            else:
                back = int(closes[k - 1]) + 1          # just after the last confident phrase
            phrase = _decode(tokenizer, new[o + 1:c])
    return readable, raw, new, phrase, back, latest


def retrospective_resample(generate: Generator, prompt_ids: Sequence[int], tokenizer: Any, *,
                           threshold: float = 0.003, temperature: float = 1.0, max_attempts: int = 50,
                           local_attempts: int = 10, temperature_step: float = 0.05, open_qa_prompt: bool = False,
                           cut_unfinished_sentence: bool = False, assistant_tokens: int = 5,
                           style: str = "llava") -> Resampled:
    """REVERSE's decoding for one prompt (`prompt_ids` `[T]`, chat-templated, ending with the assistant
    header of `assistant_tokens` tokens, before which hints go). Defaults are the original's: tau 0.003
    (0.5 for yes/no benchmarks), T0 1.0 (0.0 for Qwen), N 50, K 10, step 0.05 (its flag for 0.1 is never
    read). `open_qa_prompt` adds the false-premise prompt; `style` is the original's per-model hint text:
    "llava" (the false-premise prompt always, then the hint, unspaced), "llama3" (LLaVA-MORE: both spaced)
    or "qwen" (Qwen2.5-VL: the false-premise prompt only with `open_qa_prompt`, each part after a space);
    `cut_unfinished_sentence` applies when all attempts are used (the original's open-ended QA flag).

    A `generate` that raises `OutOfRoom` (its cache cannot hold the grown prefix) ends the loop as the
    attempt limit does: the kept text is the answer, `success` is False, the history's last entry is
    flagged "out of room"."""
    return _drive(_resampling(prompt_ids, tokenizer, threshold=threshold, temperature=temperature,
                              max_attempts=max_attempts, local_attempts=local_attempts,
                              temperature_step=temperature_step, open_qa_prompt=open_qa_prompt,
                              cut_unfinished_sentence=cut_unfinished_sentence, assistant_tokens=assistant_tokens,
                              style=style), generate)


def reverse_answer(generate: Generator, prompt_ids: Sequence[int], tokenizer: Any, **kw) -> Resampled:
    """`retrospective_resample` as the original's evaluation calls it: an empty answer is retried with the
    false-premise prompt, and an empty retry becomes "Unable to answer directly due to false premises or
    missing information." (``model_vqa_loader.py``)."""
    return _drive(_answering(prompt_ids, tokenizer, **kw), generate)


def reverse_answers(generate_rows: RowsGenerator, prompts: Sequence[Sequence[int]], tokenizer: Any, *,
                    batch_size: int, **kw) -> Iterator[tuple[int, Resampled]]:
    """`reverse_answer` for many prompts, `batch_size` of them in flight at once: each round asks
    `generate_rows` for one attempt of every live prompt, and a finished prompt's place goes to the next
    one. Yields `(index, Resampled)` as prompts finish (not in order). Each prompt follows exactly the
    loop `reverse_answer` runs for it alone; with `engine_rows_generator` it also samples the same tokens,
    since every attempt draws from a key of its own (prompt index, attempt number).

    Example:
        >>> rows = engine_rows_generator(engine, params, tok, batch_of_rows, max_new_tokens=128, seed=0)
        >>> answers = dict(reverse_answers(rows, prompts, tok, batch_size=engine.batch_size))
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for ids in prompts:                       # bad arguments fail before any generation
        _check_args(ids, kw.get("assistant_tokens", 5), kw.get("style", "llava"))
    live: dict[int, tuple[Any, tuple[np.ndarray, float]]] = {}    # index -> (its loop, its next request)
    calls = [0] * len(prompts)
    started = 0

    def advance(i: int, steps, got=None) -> Resampled | None:
        """Move prompt i's loop on (start it, send it a result or throw it OutOfRoom); its answer once done."""
        try:
            live[i] = (steps, next(steps) if got is None else
                       steps.throw(got) if isinstance(got, OutOfRoom) else steps.send(got))
        except StopIteration as stop:
            return stop.value
        return None

    while True:
        while len(live) < batch_size and started < len(prompts):
            i, started = started, started + 1
            if (done := advance(i, _answering(prompts[i], tokenizer, **kw))) is not None:
                yield i, done
        if not live:
            return
        order = list(live)
        results = generate_rows([RowRequest(i, calls[i], *live[i][1]) for i in order])
        for i, got in zip(order, results):
            calls[i] += 1
            if (done := advance(i, live.pop(i)[0], got)) is not None:
                yield i, done


def _drive(steps, generate: Generator) -> Resampled:
    """Run a resampling coroutine to its end with one prompt's `generate`."""
    try:
        request = next(steps)
        while True:
            try:
                got = generate(*request)
            except OutOfRoom as e:
                request = steps.throw(e)
                continue
            request = steps.send(got)
    except StopIteration as stop:
        return stop.value


def _check_args(prompt_ids: Sequence[int], assistant_tokens: int, style: str) -> None:
    if style not in ("llava", "llama3", "qwen"):
        raise ValueError(f"style must be 'llava', 'llama3' or 'qwen', got {style!r}")
    if len(prompt_ids) <= assistant_tokens:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens, not more than the {assistant_tokens} "
                         f"assistant-header tokens the hints go before")


def _answering(prompt_ids, tokenizer, **kw):
    """`reverse_answer` as a coroutine (see `_resampling`)."""
    res = yield from _resampling(prompt_ids, tokenizer, **kw)
    if res.text == "":
        res = yield from _resampling(prompt_ids, tokenizer, **dict(kw, open_qa_prompt=True))
        if res.text == "":
            res = dataclasses.replace(res, text=OPEN_QA_DEFAULT_ANSWER)
    return res


def _resampling(prompt_ids, tokenizer, *, threshold: float = 0.003, temperature: float = 1.0,
                max_attempts: int = 50, local_attempts: int = 10, temperature_step: float = 0.05,
                open_qa_prompt: bool = False, cut_unfinished_sentence: bool = False, assistant_tokens: int = 5,
                style: str = "llava"):
    """The loop of `retrospective_resample` as a coroutine: yields each attempt's `(prefix ids, temperature)`,
    is sent back `(new ids, P(</UN>))` (or thrown `OutOfRoom`), and returns the `Resampled`. One loop serves
    one prompt (`_drive`) and many prompts batched together (`reverse_answers`)."""
    _check_args(prompt_ids, assistant_tokens, style)
    tags = tag_ids(tokenizer)
    eos = tokenizer.eos_token_id
    prompt = np.asarray(prompt_ids, np.int64)
    existing = np.zeros((0,), np.int64)
    history: list[tuple[str, str | None]] = []
    phrases: list[str] = []
    correcting, local, temp = False, 0, temperature
    phrase = None

    def prefix() -> np.ndarray:
        if not phrases and not open_qa_prompt:
            return np.concatenate([prompt, existing])
        if style == "qwen":
            hint = " " + OPEN_QA_PROMPT if open_qa_prompt else " "
        else:
            hint = (" " if style == "llama3" else "") + OPEN_QA_PROMPT
        if phrases:
            neg = HINT.format(", ".join(phrases[-5:]))
            hint += {"llava": neg, "llama3": f" {neg} ", "qwen": f" {neg}"}[style]
        hint_ids = np.asarray(tokenizer.encode(hint), np.int64)[1:]      # the original drops the first id (BOS)
        cut = len(prompt) - assistant_tokens
        return np.concatenate([prompt[:cut], hint_ids, prompt[cut:], existing])

    for _ in range(max_attempts):
        if not correcting:
            temp = temperature
        try:
            new, p_un = yield prefix(), temp
        except OutOfRoom:
            phrase = "out of room"
            break
        new, p_un = np.asarray(new, np.int64), np.asarray(p_un, np.float64)
        text, raw, new, phrase, back, latest = _check(existing, new, p_un, tokenizer, tags, threshold, correcting, eos)
        if phrase is None:
            if not correcting:
                history.append((raw, None))
                return Resampled(text, history, True)
            correcting, local = False, 0
            history.append((raw, "successful correction"))
            existing = np.concatenate([existing, new[:back]])            # back == -1: all but the EOS
            continue
        correcting, local = True, local + 1
        temp = min(temp + temperature_step, temperature + 0.5)
        if phrase.lower() not in phrases:
            phrases.append(phrase.lower())
        if local == local_attempts:                  # give up on this spot: back to the last full sentence
            if not len(existing):
                first = np.flatnonzero(new == tags[0])
                dropped = _decode(tokenizer, new[:first[0]] if len(first) else new).lower()
            else:
                periods = np.flatnonzero(existing == tokenizer.convert_tokens_to_ids("."))
                keep = int(periods[-1]) + 1 if len(periods) else 0
                dropped = _without_tags_text(_decode(tokenizer, existing[keep:]))
                existing = existing[:keep]
            if dropped:
                phrases.append(dropped)
            history.append((_decode(tokenizer, existing), phrase))
            local = 0
            continue
        history.append((_decode(tokenizer, np.concatenate([existing, new[:latest]])), phrase))
        existing = np.concatenate([existing, new[:back]])
    history.append((_decode(tokenizer, existing), phrase))
    return Resampled(render_answer(existing, tokenizer, tags, cut_current_sentence=cut_unfinished_sentence),
                     history, False)


def engine_rows_generator(engine, params, tokenizer: Any,
                          batch_of_rows: Callable[[Sequence[RowRequest]], Mapping[str, Any]], *,
                          max_new_tokens: int, seed: int = 0,
                          key_index: Sequence[int] | None = None) -> RowsGenerator:
    """A `RowsGenerator` over `jaxvlm.generate.Engine`: `batch_of_rows(requests)` makes the engine's batch
    of their prefixes, left-padded (ids, mask, each prompt's images; Qwen2-VL also grids and M-RoPE
    positions, e.g. `jaxvlm generate`'s ``Answerer.batch_of``). The engine must be built with
    ``Hooks(track_token_ids=(id of </UN>,))``. Attempt `a` of prompt `i` samples with the key
    `fold_in(fold_in(key(seed), i), a)`, whatever else shares its batch. A prefix whose row cannot hold
    `max_new_tokens` more is generated alone with the room left; one with no room at all gets `OutOfRoom`.
    key_index: prompt i's key is `key_index[i]`'s (e.g. its position in a larger question file); default i."""
    from jaxvlm.generate import question_keys, tracked_prob
    un = tag_ids(tokenizer)[2]
    if un not in engine.hooks.track_token_ids:
        raise ValueError(f"build the engine with Hooks(track_token_ids=({un},)): REVERSE reads P(</UN>)")

    def generate_rows(requests: Sequence[RowRequest]):
        out: list = [None] * len(requests)
        full, groups = [], []
        for k, r in enumerate(requests):
            room = engine.max_len - len(r.prefix)
            if room < 1:
                out[k] = OutOfRoom(f"prompt {r.index}: its {len(r.prefix)}-token prefix fills the "
                                   f"{engine.max_len}-slot decode cache")
            elif room < max_new_tokens:
                groups.append(([k], room))
            else:
                full.append(k)
        groups += [(full[j:j + engine.batch_size], max_new_tokens) for j in range(0, len(full), engine.batch_size)]
        for ks, n_new in groups:
            reqs = [requests[k] for k in ks]
            gen = engine.generate(params, dict(batch_of_rows(reqs)), max_new_tokens=n_new,
                                  temperature=[r.temperature for r in reqs],
                                  row_keys=question_keys(seed, [r.index if key_index is None else key_index[r.index]
                                                                for r in reqs], [r.attempt for r in reqs]))
            start = int(gen.state.gen_start)
            probs = np.asarray(tracked_prob(gen.state, un, engine.hooks))
            for j, k in enumerate(ks):
                n = int(gen.lengths[j])
                out[k] = (gen.tokens[j, :n], probs[j, start:start + n])
        return out

    return generate_rows


def engine_generator(engine, params, tokenizer: Any, batch_of: Callable[[np.ndarray], Mapping[str, Any]], *,
                     max_new_tokens: int, seed: int = 0, index: int = 0) -> Generator:
    """A `Generator` over `jaxvlm.generate.Engine` for one prompt: `engine_rows_generator` with one row,
    `batch_of(prefix_ids)` making its batch; prompt `index`'s keys, so it samples what `reverse_answers`
    samples for that prompt."""
    rows = engine_rows_generator(engine, params, tokenizer, lambda reqs: batch_of(reqs[0].prefix),
                                 max_new_tokens=max_new_tokens, seed=seed)
    calls = [0]

    def generate(prefix: np.ndarray, temperature: float):
        got = rows([RowRequest(index, calls[0], np.asarray(prefix), temperature)])[0]
        calls[0] += 1
        if isinstance(got, OutOfRoom):
            raise got
        return got

    return generate
