"""Chat templates: exact rendered text per template (from the original code's conventions), and exactly which
tokens are supervised (decoded supervised spans == the assistant strings)."""
import numpy as np
import pytest

from jaxvlm.data import chat_templates as ct
from data_utils import build_tokenizer

TPI = 3   # image tokens per image in these tests

MSGS = [{"role": "user", "content": "What colour is the square?\n<image>"},       # LLaVA moves it to the front
        {"role": "assistant", "content": "The square is red."},
        {"role": "user", "content": "What shape is left of the circle?"},
        {"role": "assistant", "content": "blue"}]

VICUNA_SYS = ("A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.")
MORE_SYS = ("You are a helpful language and vision assistant. You are able to understand the visual content that "
            "the user provides, and assist the user with a variety of tasks using natural language.")

# Expected full text (training sample) and the supervised strings, written from the original formats:
# LLaVA conv_vicuna_v1 (SeparatorStyle.TWO, sep " ", sep2 "</s>"), the Llama-3 chat template LLaVA-MORE uses,
# Qwen2-VL chatml, and Qwen-VL raw completion.
EXPECTED = {
    "vicuna_v1": (
        f"<s>{VICUNA_SYS} USER: <image>\nWhat colour is the square? ASSISTANT: The square is red.</s>"
        "USER: What shape is left of the circle? ASSISTANT: blue</s>",
        [" The square is red.</s>", " blue</s>"]),
    "llama3": (
        f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{MORE_SYS}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat colour is the square?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nThe square is red.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat shape is left of the circle?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nblue<|eot_id|>",
        ["The square is red.<|eot_id|>", "blue<|eot_id|>"]),
    "chatml": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat colour is the square?\n<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\nThe square is red.<|im_end|>\n"
        "<|im_start|>user\nWhat shape is left of the circle?<|im_end|>\n"
        "<|im_start|>assistant\nblue<|im_end|>\n",
        ["The square is red.<|im_end|>", "blue<|im_end|>"]),
    "qwen_vl_raw": (
        "What colour is the square?\n<img><imgpad></img>The square is red.<|endoftext|>"
        "What shape is left of the circle?blue<|endoftext|>",
        ["The square is red.<|endoftext|>", "blue<|endoftext|>"]),
}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def supervised_runs(labels: np.ndarray) -> list[np.ndarray]:
    """Contiguous runs of supervised label ids."""
    runs, cur = [], []
    for x in labels:
        if x != ct.IGNORE_INDEX:
            cur.append(int(x))
        elif cur:
            runs.append(np.array(cur)); cur = []
    return runs + ([np.array(cur)] if cur else [])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_text_and_label_masking(name, tok):
    text, answers = EXPECTED[name]
    t = ct.get_template(name)
    r = ct.render(t, MSGS)
    assert r.text == text
    assert r.supervised_texts() == answers

    image_id = tok.convert_tokens_to_ids(t.image_placeholder)
    enc = ct.encode(t, MSGS, tok, image_token_id=image_id, image_token_counts=[TPI])
    ids, labels = enc.input_ids, enc.labels
    assert ids.dtype == np.int32 and labels.dtype == np.int32 and ids.shape == labels.shape
    # Supervised tokens carry their own id; everything else is -100.
    sup = labels != ct.IGNORE_INDEX
    np.testing.assert_array_equal(labels[sup], ids[sup])
    # Decoding the supervised runs gives back exactly the assistant strings of the template text.
    assert [tok.decode(run) for run in supervised_runs(labels)] == answers
    # Exactly TPI image tokens, contiguous, unsupervised, where the template put the image.
    (start, end), = enc.image_spans
    assert end - start == TPI and (ids == image_id).sum() == TPI and np.all(ids[start:end] == image_id)
    assert not sup[start:end].any()
    before = text[: text.index(t.image_placeholder)]
    assert tok.decode(ids[:start]) == before


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_generation_prompt_is_prefix_of_training_sample(name, tok):
    """render_prompt ends exactly where the first answer's supervision starts (ids and text)."""
    t = ct.get_template(name)
    prompt = ct.render_prompt(t, MSGS[:1])
    full = ct.render(t, MSGS)
    assert full.text.startswith(prompt) and full.supervised[0][0] == len(prompt)
    image_id = tok.convert_tokens_to_ids(t.image_placeholder)
    p_ids = ct.encode_prompt(t, MSGS[:1], tok, image_token_id=image_id, image_token_counts=[TPI])
    enc = ct.encode(t, MSGS, tok, image_token_id=image_id, image_token_counts=[TPI])
    np.testing.assert_array_equal(enc.input_ids[: len(p_ids)], p_ids)
    assert np.all(enc.labels[: len(p_ids)] == ct.IGNORE_INDEX) and enc.labels[len(p_ids)] != ct.IGNORE_INDEX
    # Second turn: the prompt through turn 3 ends where the second answer starts.
    p2 = ct.render_prompt(t, MSGS[:3])
    assert full.supervised[1][0] == len(p2) and full.text.startswith(p2)


def test_template_details(tok):
    # llama3 trims contents (chat template `| trim`); vicuna keeps them.
    m = [{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": " yes "}]
    assert ct.render("llama3", m).supervised_texts() == ["yes<|eot_id|>"]
    assert ct.render("vicuna_v1", m).supervised_texts() == ["  yes </s>"]
    # A leading assistant turn is dropped (LLaVA preprocess_v1); a custom system message replaces the default.
    r = ct.render("vicuna_v1", [{"role": "system", "content": "SYS"}, {"role": "assistant", "content": "x"}, *m])
    assert r.text == "<s>SYS USER:   hi   ASSISTANT:  yes </s>"
    # Llama-3.1's template adds the knowledge-date lines to the system turn.
    assert "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are" in ct.render("llama3_1", m).text
    # Several images keep their positions (no move to the front).
    two = [{"role": "user", "content": "A <image> and B <image>?"}, {"role": "assistant", "content": "same"}]
    assert "USER: A <image> and B <image>? ASSISTANT:" in ct.render("vicuna_v1", two).text
    enc = ct.encode("vicuna_v1", two, tok, image_token_id=4, image_token_counts=[2, 5])
    assert [b - a for a, b in enc.image_spans] == [2, 5] and (enc.input_ids == 4).sum() == 7


def test_end_tokens_split_one_token_stops_from_longer_ones(tok):
    """One-token stop strings join the EOS (the compiled loop stops at them); longer ones are returned to be
    cut from the text. A broken split would stop at the first piece of a longer string, or never at "</s>"."""
    import dataclasses
    eos = tok.convert_tokens_to_ids("</s>")
    longer = "ASSISTANT:"
    assert len(tok(longer, add_special_tokens=False)["input_ids"]) > 1
    tpl = dataclasses.replace(ct.get_template("vicuna_v1"), stop_strings=("</s>", longer, "<image>"))
    assert ct.end_tokens(tpl, tok) == (tuple(sorted({eos, tok.convert_tokens_to_ids("<image>")})), (longer,))
    assert ct.end_tokens("vicuna_v1", tok) == ((eos,), ())


def test_template_errors(tok):
    with pytest.raises(ValueError, match="unknown chat template 'nope'"):
        ct.get_template("nope")
    with pytest.raises(ValueError, match="alternate"):
        ct.render("vicuna_v1", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="end with a user turn"):
        ct.render_prompt("vicuna_v1", MSGS[:2])
    with pytest.raises(ValueError, match="no system turn"):
        ct.render("qwen_vl_raw", [{"role": "system", "content": "s"}, *MSGS[:2]])
    with pytest.raises(ValueError, match="1 image placeholder"):
        ct.encode("vicuna_v1", MSGS, tok, image_token_id=4, image_token_counts=[])
    # A tokenizer that lacks a template's special token is rejected by name.
    from data_utils import CORPUS
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    raw = Tokenizer(models.BPE()); raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bare = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    with pytest.raises(ValueError, match="begin_of_text.*add it as a special token"):
        ct.check_tokenizer("llama3", bare)
    # LLaVA-1.5's tokenizer has no "<image>" token: the placeholder is cut out before tokenizing, so that is fine.
    ct.check_tokenizer("vicuna_v1", bare)
    enc = ct.encode("vicuna_v1", MSGS, bare, image_token_id=32000, image_token_counts=[TPI])
    assert (enc.input_ids == 32000).sum() == TPI


def test_sentencepiece_style_tokenizer_matches_llava_conventions():
    """With a Llama-style (Metaspace, prepend 'first') tokenizer: BOS id then '▁A' as with add_special_tokens=True,
    and the first supervised token of each answer is '▁word' (what LLaVA's `instruction_len - 2` selects)."""
    from data_utils import CORPUS, SPECIALS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS))
    sp = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                 pad_token="<pad>")
    enc = ct.encode("vicuna_v1", MSGS, sp, image_token_id=4, image_token_counts=[TPI])
    toks = sp.convert_ids_to_tokens(enc.input_ids.tolist())
    assert toks[:3] == ["<s>", "▁A", "▁chat"]
    runs = supervised_runs(enc.labels)
    assert [sp.convert_ids_to_tokens(r.tolist())[0] for r in runs] == ["▁The", "▁"]   # "blue" is not in the vocab
    assert [sp.decode(r) for r in runs] == ["The square is red.</s>", "blue</s>"]      # Metaspace drops the "▁"
