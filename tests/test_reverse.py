"""REVERSE's training side (jaxvlm.methods.reverse): span masking of the targets, in the training
pipeline too, hint injection and answer rendering, against the original's rules
(../shared/specs/ue_and_reverse.md §2)."""
import random

import numpy as np
import pytest

from data_utils import build_tokenizer
from test_llava_parity import torch_mods  # noqa: F401 (fixture)
from jaxvlm.data import chat_templates as ct
from jaxvlm.data.pipeline import SampleBuilder
from jaxvlm.data.conversation import record_from_llava
from jaxvlm.methods import reverse

S, C, U, X = 100, 101, 102, -100


def test_targets_inside_an_unconfident_span_are_not_trained():
    labels = np.array([X, X, 5, S, 6, 7, C, 8, S, 9, 10, U, 2])
    out = reverse.dehallucination_labels(labels, (S, C, U))
    np.testing.assert_array_equal(out, [X, X, 5, S, 6, 7, C, 8, S, X, X, U, 2])
    np.testing.assert_array_equal(labels, [X, X, 5, S, 6, 7, C, 8, S, 9, 10, U, 2])     # input untouched
    # two spans, only the unconfident one masked; an empty span masks nothing
    np.testing.assert_array_equal(reverse.dehallucination_labels(np.array([S, 4, U, S, U, S, 5, C]), (S, C, U)),
                                  [S, X, U, S, U, S, 5, C])
    # the original's quirk: an </UN> with no open span ignores every target before it
    np.testing.assert_array_equal(reverse.dehallucination_labels(np.array([5, 6, U, 7]), (S, C, U)), [X, X, U, 7])
    # a </CN> closes the span, so a later </UN> has none open
    np.testing.assert_array_equal(reverse.dehallucination_labels(np.array([S, 4, C, 5, U]), (S, C, U)),
                                  [X, X, X, X, U])


@pytest.fixture(scope="module")
def tok():
    t = build_tokenizer()
    t.add_tokens(list(reverse.TAGS))
    return t


def test_pipeline_masks_the_hallucinated_phrase(tok):
    rec = record_from_llava({"id": "r", "conversations": [
        {"from": "human", "value": "Describe the image."},
        {"from": "gpt", "value": "There is <SPAN>a red square</CN> next to <SPAN>a blue circle</UN>"}]}, "test")
    tags = reverse.tag_ids(tok)
    plain = SampleBuilder(tok, "vicuna_v1", None, 96, 0).build(rec)
    masked = SampleBuilder(tok, "vicuna_v1", None, 96, 0,
                           label_transform=lambda x: reverse.dehallucination_labels(x, tags)).build(rec)
    ids, a, b = plain["input_ids"], plain["labels"], masked["labels"]
    span_at = np.flatnonzero(ids == tags[0])[1]
    un_at = np.flatnonzero(ids == tags[2])[0]
    assert un_at - span_at > 2                                          # the phrase is several tokens
    assert np.all(b[span_at + 1:un_at] == ct.IGNORE_INDEX) and np.all(a[span_at + 1:un_at] != ct.IGNORE_INDEX)
    keep = np.ones(len(a), bool)
    keep[span_at + 1:un_at] = False
    np.testing.assert_array_equal(a[keep], b[keep])                     # everything else trains as before
    assert b[un_at] == tags[2] and b[span_at] == tags[0]


def test_tag_ids_name_missing_tags():
    with pytest.raises(ValueError, match=r"no <SPAN>, </CN>, </UN> token"):
        reverse.tag_ids(build_tokenizer())


def test_hint_injection():
    rec = {"id": "x", "conversations": [
        {"from": "human", "value": "<image>\nWhat is on the table?"},
        {"from": "gpt", "value": "...", "A_type": "general_answer", "hint": "A Blue Cup"},
        {"from": "human", "value": "Is it red?"}, {"from": "gpt", "value": "No", "A_type": "yes_no", "hint": "x"},
        {"from": "human", "value": "And the chair?"}, {"from": "gpt", "value": "...", "A_type": "general_answer"}]}
    out = reverse.inject_hints(rec, prob=1.0, rng=random.Random(0))
    assert [t["value"] for t in out["conversations"][::2]] == [
        "<image>\nWhat is on the table? (Hint: potential incorrect phrases -> a blue cup)", "Is it red?",
        "And the chair?"]
    assert rec["conversations"][0]["value"] == "<image>\nWhat is on the table?"       # the record is not modified
    assert reverse.inject_hints(rec, prob=0.0)["conversations"] == rec["conversations"]
    hits = sum("(Hint" in reverse.inject_hints(rec, 0.2, random.Random(k))["conversations"][0]["value"]
               for k in range(2000))
    assert abs(hits / 2000 - 0.2) < 0.03


def test_render_answer_drops_tags_and_reattaches_punctuation(tok):
    tags = reverse.tag_ids(tok)
    ids = tok("There is <SPAN>a red square</CN> , and <SPAN>a circle</CN> . Then", add_special_tokens=False)["input_ids"]
    assert reverse.render_answer(ids, tok, tags) == "There is a red square, and a circle. Then"
    assert reverse.render_answer(ids, tok, tags, cut_current_sentence=True) == "There is a red square, and a circle."


# Retrospective resampling against the original loops (reverse_vlm's LLaVA and Qwen inference_utils.py), run
# on the same scripted model: reverse_resampling_cases.json holds what the originals returned for these
# scripts (text, history, success, calls, temperatures, prefixes), covering corrections, format errors, the
# 10-try fall back to the last sentence and the 50-try limit. (A fuzz over 300 scripts per style matched too.)
def scripted(tok, seed):
    S, C, U = reverse.tag_ids(tok)
    words = list(range(10, 60))
    rng = np.random.default_rng(seed)
    script = []
    for _ in range(80):
        ids = []
        for _ in range(rng.integers(1, 5)):
            ids += list(rng.choice(words, rng.integers(0, 3)))
            if rng.random() < 0.8:
                ids += [S] + list(rng.choice(words, rng.integers(1, 3))) + [C if rng.random() < 0.6 else U]
            if rng.random() < 0.3:
                ids.append(tok.convert_tokens_to_ids("."))
            if rng.random() < 0.05:
                ids.append(S)                                   # a format error now and then
        ids.append(tok.eos_token_id)
        script.append((np.array(ids), rng.random(len(ids)) ** rng.choice([1, 3, 8])))
    threshold = float(rng.choice([0.003, 0.2, 0.5]))
    prompt = list(rng.choice(words, 12))
    return script, threshold, prompt


@pytest.mark.parametrize("style", ["llava", "qwen"])
def test_retrospective_resampling_follows_the_original(tok, style):
    """"llava": llava/eval/inference_utils.py (T0 1.0); "qwen": qwenvl/eval/inference_utils.py (T0 0, its
    own hint text, the false-premise prompt only when asked)."""
    import hashlib
    import json
    import pathlib
    cases = json.loads((pathlib.Path(__file__).parent / "reverse_resampling_cases.json").read_text())[style]
    assert {c["success"] for c in cases.values()} == {True, False}
    for seed, want in cases.items():
        script, threshold, prompt = scripted(tok, int(seed))
        prefixes, temps = [], []

        def generate(prefix, temperature):
            prefixes.append([int(i) for i in prefix])
            temps.append(round(float(temperature), 6))
            return script[len(prefixes) - 1]

        res = reverse.retrospective_resample(generate, prompt, tok, threshold=threshold, style=style,
                                             temperature=1.0 if style == "llava" else 0.0,
                                             open_qa_prompt=want.get("open_qa_prompt", False),
                                             cut_unfinished_sentence=bool(int(seed) % 2))
        assert (res.text, res.success) == (want["text"], want["success"]), seed
        assert [list(h) for h in res.history] == want["history"], seed
        assert len(prefixes) == want["calls"] and temps == pytest.approx(want["temps"]), seed
        assert [len(p) for p in prefixes] == want["prefix_lengths"], seed
        assert hashlib.sha1(json.dumps(prefixes).encode()).hexdigest() == want["prefix_sha"], seed


def test_batched_loops_equal_each_prompt_alone(tok):
    """reverse_answers (several prompts' loops sharing each call, a finished prompt's row refilled) against
    reverse_answer run per prompt on the same scripts, for both styles' settings; and a generator out of
    room ends a loop as the attempt limit does."""
    seeds = [int(k) for k in __import__("json").loads(
        (__import__("pathlib").Path(__file__).parent / "reverse_resampling_cases.json").read_text())["llava"]][:7]
    runs = [scripted(tok, s) for s in seeds]
    for threshold in (0.003, 0.2):
        kw = dict(threshold=threshold, temperature=1.0, max_attempts=12, local_attempts=3)
        want = []
        for script, _, prompt in runs:
            it = iter(script)
            want.append(reverse.reverse_answer(lambda prefix, t, it=it: next(it), prompt, tok, **kw))
        served = [iter(script) for script, _, _ in runs]
        rounds, seen = [], []

        def rows(requests):
            rounds.append([r.index for r in requests])
            seen.extend((r.index, r.attempt) for r in requests)
            return [next(served[r.index]) for r in requests]

        got = dict(reverse.reverse_answers(rows, [p for _, _, p in runs], tok, batch_size=3, **kw))
        assert sorted(got) == list(range(len(runs)))
        for i, w in enumerate(want):
            assert (got[i].text, got[i].success, got[i].history) == (w.text, w.success, w.history), (threshold, i)
        assert max(len(r) for r in rounds) == 3 and len(rounds) < len(seen)     # batched, several per call
        for i in range(len(runs)):       # each prompt's attempts are numbered 0, 1, 2, ... in order
            assert [a for j, a in seen if j == i] == list(range(sum(j == i for j, _ in seen)))
        assert any(len(w.history) > 1 for w in want) and len({len(w.history) for w in want}) > 1

    script, _, prompt = runs[0]
    calls = []

    def full_after_two(prefix, t):
        if len(calls) == 2:
            raise reverse.OutOfRoom("cache full")
        calls.append(1)
        return script[len(calls) - 1]

    res = reverse.retrospective_resample(full_after_two, prompt, tok, threshold=0.0, temperature=1.0)
    assert len(calls) == 2 and not res.success and res.history[-1][1] == "out of room"
    with pytest.raises(ValueError, match="style must be"):
        list(reverse.reverse_answers(rows, [prompt], tok, batch_size=2, style="vicuna"))


def test_engine_generator_reads_p_un_at_each_generated_token(torch_mods):
    import jax
    import jax.numpy as jnp

    from jaxvlm.conversion.api import llava_from_torch
    from jaxvlm.generate import Engine, Hooks
    from test_generate import full_logits
    from test_llava_parity import IMG, tiny_llava_hf

    class Tags:        # a stand-in tokenizer: the model's ids 5, 9, 7 play <SPAN>, </CN>, </UN>
        unk_token_id, eos_token_id = None, 2

        def convert_tokens_to_ids(self, t):
            return {"<SPAN>": 5, "</CN>": 9, "</UN>": 7}[t]

    torch, transformers = torch_mods
    cfg, model, params = llava_from_torch(tiny_llava_hf(transformers, "llama2"))
    engine = Engine(model, batch_size=1, max_len=96, buckets=(64, 96), hooks=Hooks(track_token_ids=(7,)))
    rng = np.random.default_rng(1)
    prompt = np.concatenate([[1], rng.integers(3, IMG, 3), np.full(16, IMG), rng.integers(3, IMG, 10)])
    pix = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    batch_of = lambda ids: {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int32),   # noqa: E731
                            "pixel_values": pix}
    gen = reverse.engine_generator(engine, params, Tags(), batch_of, max_new_tokens=12, seed=5)
    new, p_un = gen(prompt, 1.0)
    again, _ = gen(prompt, 1.0)
    assert len(new) == len(p_un) == 12 and not np.array_equal(new, again)      # sampled, a fresh key each call
    assert IMG not in new        # (a sampled image-token id would make the cache-free reference read an image)
    seq = np.concatenate([prompt, new])[None]
    logits = full_logits(model, params, seq, np.ones_like(seq), pix).logits[0, len(prompt) - 1:-1]
    np.testing.assert_allclose(p_un, np.asarray(jax.nn.softmax(jnp.asarray(logits), -1))[:, 7], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="the prompt has 4 tokens, not more than the 5"):
        reverse.retrospective_resample(gen, prompt[:4], Tags())
    with pytest.raises(ValueError, match="style must be"):
        reverse.retrospective_resample(gen, prompt, Tags(), style="vicuna")
    with pytest.raises(ValueError, match="track_token_ids"):
        reverse.engine_generator(Engine(model, batch_size=1, max_len=96), params, Tags(), batch_of, max_new_tokens=4)

    # Batched rows (prompts of different lengths) sample what each prompt's own one-row generator samples:
    # attempt a of prompt i draws from its own key, whatever shares the batch.
    many = Engine(model, batch_size=3, max_len=96, buckets=(64, 96), hooks=Hooks(track_token_ids=(7,)))
    prompts = [prompt, prompt[:-3], np.concatenate([prompt, rng.integers(3, IMG, 5)])]

    def rows_of(reqs):           # left-padded to the longest prefix
        t = max(len(r.prefix) for r in reqs)
        return {"input_ids": np.stack([np.pad(r.prefix, (t - len(r.prefix), 0)) for r in reqs]),
                "attention_mask": np.stack([np.pad(np.ones(len(r.prefix), np.int32), (t - len(r.prefix), 0))
                                            for r in reqs]),
                "pixel_values": np.concatenate([pix] * len(reqs))}
    rows = reverse.engine_rows_generator(many, params, Tags(), rows_of, max_new_tokens=12, seed=5)
    got = rows([reverse.RowRequest(i, a, p, t) for i, (a, p, t) in enumerate([(0, prompts[0], 1.0), (3, prompts[1], 1.3),
                                                                            (1, prompts[2], 0.0)])])
    for i, (a, t) in enumerate([(0, 1.0), (3, 1.3), (1, 0.0)]):
        alone = reverse.engine_generator(engine, params, Tags(), batch_of, max_new_tokens=12, seed=5, index=i)
        for _ in range(a):
            alone(prompts[i], t)
        new_i, p_i = alone(prompts[i], t)
        np.testing.assert_array_equal(got[i][0], new_i)
        np.testing.assert_allclose(got[i][1], p_i, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(got[0][0], new)                  # prompt 0's first attempt, as above
    # A prefix with less room than max_new_tokens is generated alone with the room left; none left: OutOfRoom.
    long, full = np.concatenate([prompt, rng.integers(3, IMG, 90 - len(prompt))]), np.full(96, 3)
    short, out = rows([reverse.RowRequest(0, 0, long, 1.0), reverse.RowRequest(1, 0, full, 1.0)])
    assert len(short[0]) == 6 and isinstance(out, reverse.OutOfRoom) and "96-slot" in str(out)
    with pytest.raises(ValueError, match=r"row_keys must be one jax.random.key per given row \(1\)"):
        engine.prefill(params, batch_of(prompt), row_keys=np.array([1, 2]))
