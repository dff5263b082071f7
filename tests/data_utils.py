"""Shared helpers for tests/test_data_*.py: a tiny offline byte-level BPE tokenizer with every template's
special tokens, tiny images and LLaVA-format records on disk."""
from __future__ import annotations

import json
import pathlib

import numpy as np
from PIL import Image

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>",
            "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|endoftext|>", "<img>", "</img>", "<imgpad>", "<ref>", "</ref>", "<box>", "</box>"]

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: What colour is the square? ASSISTANT: The "
    "square is red. What shape is left of the circle? It is a triangle. You are a helpful language and vision "
    "assistant. answer record number system user",
] * 4


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
LLAVA_NAMED = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
QWEN_NAMED = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")


def build_tokenizer(specials=SPECIALS, corpus=CORPUS, vocab_size: int = 420, **named):
    """Byte-level BPE wrapped as a transformers fast tokenizer; nothing is downloaded. The one
    builder of the test suite: `specials` get ids 0.. in order; `named` are the wrapper's token
    arguments (default: LLaVA's <s>, </s>, <unk>, <pad>; `QWEN_NAMED` for the Qwen families)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **(named or LLAVA_NAMED))


def write_image(path: pathlib.Path, w: int, h: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def write_records(path: pathlib.Path, records: list[dict], jsonl: bool = True) -> pathlib.Path:
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def llava_record(i: int, images: list[str]) -> dict:
    """Record i: `len(images)` images; its answers carry the number i so a test can tell records apart."""
    tags = "".join("<image>" for _ in images)
    rec = {"id": f"r{i}", "conversations": [
        {"from": "human", "value": (tags + "\n" if tags else "") + "What colour is the square?"},
        {"from": "gpt", "value": f"answer {i}"},
        {"from": "human", "value": "What shape is left of the circle?"},
        {"from": "gpt", "value": f"It is a triangle {i}."}]}
    if images:
        rec["image"] = images[0] if len(images) == 1 else images
    return rec


def write_mixed_records(d: pathlib.Path, n: int) -> tuple[pathlib.Path, pathlib.Path]:
    """n records under d: every 6th text-only, every 6th+1 with two images, the rest one image (mixed aspect
    ratios, in d/img). -> (d, the records file)."""
    (d / "img").mkdir()
    records = []
    for i in range(n):
        k_images = 0 if i % 6 == 0 else 2 if i % 6 == 1 else 1
        names = [f"{i}_{k}.png" for k in range(k_images)]
        for k, name in enumerate(names):
            write_image(d / "img" / name, 12 + 3 * (i % 5), 20 - (i % 4), seed=10 * i + k)
        records.append(llava_record(i, names))
    return d, write_records(d / "train.jsonl", records)
