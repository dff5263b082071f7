"""A small byte-level BPE tokenizer for the synthetic shapes world.

Trained on the world's own text plus chat-template fragments, with the special tokens of every
model family the library serves (LLaVA ``<image>``, Qwen2.5-VL ChatML/vision tokens, REVERSE's
``<SPAN>``/``</CN>``/``</UN>``), each guaranteed to be a single id.  Digits are split one per token
(as in Qwen2) except in box coordinates: a two-decimal number such as ``0.12`` (with its leading
space) is one pre-token, and the corpus holds every value ``0.00``..``1.00``, so each coordinate is
one token and a box ``[0.12, 0.34, 0.56, 0.78]`` is 9 tokens instead of 24 (shorter sequences, and
the model predicts a coordinate in one step).  Being byte-level, any string round-trips exactly.

Example::

    from jaxvlm.data.shapes_world import generate_world
    from jaxvlm.data.shapes_tokenizer import build_tokenizer, load_tokenizer

    paths = generate_world("/tmp/shapes", n_train=200, n_val=20, n_test=20)
    tok = build_tokenizer(paths, "/tmp/shapes/tokenizer")
    tok = load_tokenizer("/tmp/shapes/tokenizer")          # same thing, from disk
    ids = tok("USER: <image>\\nHow many stars? ASSISTANT:", add_special_tokens=False)["input_ids"]

No BOS/EOS is added automatically (``add_special_tokens`` is a no-op): conversation templates own
their separators, so they add ``<s>``/``</s>``/``<|im_end|>`` explicitly.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .shapes_world import vocab
from .shapes_world.world import WorldPaths, iter_world_text

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS, EOS, UNK, PAD,
    "<image>",                                                       # LLaVA
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",                   # Qwen ChatML
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",  # Qwen2.5-VL
    "<SPAN>", "</CN>", "</UN>",                                      # REVERSE
)
#: Named attributes on the wrapped tokenizer (``tok.image_token``, ``tok.image_token_id`` ...).
NAMED_SPECIAL_TOKENS: dict[str, str] = {
    "image_token": "<image>",
    "im_start_token": "<|im_start|>",
    "im_end_token": "<|im_end|>",
    "endoftext_token": "<|endoftext|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
    "image_pad_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "span_token": "<SPAN>",
    "confident_token": "</CN>",
    "unconfident_token": "</UN>",
}
DEFAULT_VOCAB_SIZE = 1024

# Qwen2's split (contractions, letter runs with one leading non-letter, single digits,
# punctuation), preceded by whole box coordinates " 0.12" (see the module docstring).
_SPLIT_PATTERN = (r" ?\d\.\d\d(?!\d)|(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

VICUNA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the human's "
                    "questions.")
QWEN_SYSTEM = "You are a helpful assistant."
#: Template fragments the world text lacks; repeated so their common words get merges too.
TEMPLATE_CORPUS: tuple[str, ...] = (
    f"{VICUNA_V1_SYSTEM} USER: <image>\nDescribe the image. ASSISTANT: A red circle.</s>"
    "USER: How many stars are there? ASSISTANT: 2</s>",
    f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"
    "<|im_start|>assistant\nA red circle.<|im_end|>\n<|endoftext|>",
    "<|vision_start|><|video_pad|><|vision_end|>",
    "<SPAN>a red circle</CN> and <SPAN>a blue star</UN>",
    " ".join(vocab.CATEGORIES) + " " + " ".join(vocab.PLURALS.values()),
    " ".join(vocab.COLOUR_NAMES) + " " + " ".join(vocab.SIZE_NAMES) + " "
    + " ".join(vocab.BACKGROUNDS) + " " + " ".join(vocab.NUMBER_WORDS),
    "Yes No yes no " + " ".join(f"{k / 100:.2f}" for k in range(101))
    + " " + " ".join(f"[{k / 100:.2f}]" for k in range(101)),
)
TEMPLATE_REPEATS = 16


def _corpus(source: WorldPaths | Iterable[str]) -> Iterator[str]:
    texts = iter_world_text(source) if isinstance(source, WorldPaths) else source
    yield from texts
    for _ in range(TEMPLATE_REPEATS):
        yield from TEMPLATE_CORPUS


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Raw ``tokenizers`` byte-level BPE with all :data:`SPECIAL_TOKENS` (ids 0..14 in order)."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap(tok: Tokenizer, image_token: str = "<image>") -> PreTrainedTokenizerFast:
    """transformers wrapper (a ``TokenizersBackend`` in transformers 5).

    ``image_token`` is what processors read as ``tokenizer.image_token``: ``<image>`` for LLaVA,
    ``<|image_pad|>`` for Qwen2.5-VL (whose processor would otherwise pick up ``<image>``).
    """
    named = {**NAMED_SPECIAL_TOKENS, "image_token": image_token}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK, pad_token=PAD, extra_special_tokens=named,
                                   clean_up_tokenization_spaces=False)


def build_tokenizer(source: WorldPaths | Iterable[str], out_dir: str | Path | None = None, *,
                    vocab_size: int = DEFAULT_VOCAB_SIZE,
                    image_token: str = "<image>") -> PreTrainedTokenizerFast:
    """Train on a world's text (or any strings) plus template fragments; save if ``out_dir``."""
    if image_token not in SPECIAL_TOKENS:
        raise ValueError(f"image_token must be one of the special tokens, got {image_token!r}")
    tokenizer = wrap(train_bpe(_corpus(source), vocab_size), image_token)
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`build_tokenizer`."""
    return PreTrainedTokenizerFast.from_pretrained(str(path))
