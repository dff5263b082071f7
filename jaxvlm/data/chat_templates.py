"""Chat templates: render a conversation to text, tokenize it, and mark which tokens are supervised.

Four templates, checked against the original code (facts only):

* ``vicuna_v1`` — LLaVA-1.5 (``conv_vicuna_v1`` in LLaVA's conversation.py, which ``--version v1`` selects):
  ``<s>{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>``. The system text is
  "A chat between a curious *user* ..." (``conv_llava_v1`` is the "curious *human*" variant, kept here as
  ``llava_v1``).
* ``llama3`` — LLaVA-MORE (``conv_llava_llama_3``, rendered by the Llama-3 tokenizer's chat template):
  ``<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>`` then per message
  ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>``. ``llama3_1`` adds the
  Llama-3.1 template's "Cutting Knowledge Date ..." lines to the system message.
* ``chatml`` — Qwen2/2.5-VL: ``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
  <|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>\\n``.
* ``qwen_vl_raw`` — Qwen-VL pre-training style, no chat markup (SC-Tune):
  ``{prompt with <img><imgpad>x256</img>}{answer}<|endoftext|>``.

Supervision rule (one rule for every template): the supervised text of an assistant turn is exactly what a
generator would have to produce after ``render_prompt`` of the conversation up to that turn, i.e. the answer plus
the template's end-of-turn token (``</s>``, ``<|eot_id|>``, ``<|im_end|>``, ``<|endoftext|>``). Everything else
(BOS, system, user turns, role headers, image tokens, padding) gets label ``-100``. This is what LLaVA's
``preprocess_v1`` / LLaVA-MORE's ``preprocess_llama_3`` compute with their length arithmetic:

* reproduced: BOS and prompt masked; the end-of-turn token after each answer supervised; in vicuna the space after
  ``ASSISTANT:`` belongs to the answer (LLaVA's ``instruction_len - 2`` makes the first supervised token
  SentencePiece's ``▁answer``; with a byte-level BPE that splits off the space, the space token is supervised, which
  is what the model must emit after the ``ASSISTANT:`` generation prompt); a conversation that starts with a
  ``gpt`` turn drops that turn; a single image's ``<image>`` is moved to the front of its turn followed by ``\\n``
  (``preprocess_multimodal``); LLaVA-MORE emits ``<|begin_of_text|>`` once (it strips the tokenizer's extra BOS).
* not reproduced: the ``tokenization mismatch`` fallback that silently masks a whole sample (our token labels come
  from character offsets of one tokenization of the full text, so they cannot drift); the ``legacy`` / tokenizers
  0.14 ``-1`` corrections (they only exist to undo that drift).

Tokenization: the BOS string becomes the BOS id; the text is split at the template's image placeholder (as LLaVA's
``tokenizer_image_token`` splits at ``<image>``); each text chunk is tokenized once with
character offsets (``add_special_tokens=False``; special tokens are written into the text); a token is supervised
when it *starts* inside a supervised character span; each placeholder becomes ``n`` copies of ``image_token_id``.
A fast (``tokenizers``-backed) tokenizer is required for the offsets.

Example:
    >>> t = get_template("vicuna_v1")
    >>> msgs = [{"role": "user", "content": "<image>\\nWhat is it?"}, {"role": "assistant", "content": "A cat."}]
    >>> render(t, msgs).text
    "<s>A chat between ... USER: <image>\\nWhat is it? ASSISTANT: A cat.</s>"
    >>> render_prompt(t, msgs[:1])
    "<s>A chat between ... USER: <image>\\nWhat is it? ASSISTANT:"
    >>> enc = encode(t, msgs, tokenizer, image_token_id=32000, image_token_counts=[576])
    >>> enc.input_ids, enc.labels          # int32 [T], labels -100 outside "' A cat.</s>'"
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Mapping, Sequence

import numpy as np

IGNORE_INDEX = -100
IMAGE = "<image>"          # placeholder used in LLaVA-format data

Message = Mapping[str, str]   # {"role": "system"|"user"|"assistant", "content": str}


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """Text pieces of a chat format. Every turn is ``open + content + close``.

    The assistant turn is ``assistant_header`` (unsupervised; the generation prompt ends with it) +
    ``assistant_body[0] + content + assistant_body[1]`` (supervised) + ``assistant_after`` (unsupervised).
    """

    name: str
    bos: str                                  # written as text; the tokenizer must know it as a special token
    system: str | None                        # default system message (None: template has no system turn)
    system_turn: tuple[str, str]
    user_turn: tuple[str, str]
    assistant_header: str
    assistant_body: tuple[str, str]
    assistant_after: str = ""
    image_placeholder: str = IMAGE            # where image tokens go in rendered text (expanded by `encode`)
    image_text: str = IMAGE                   # what each `<image>` of the data becomes
    image_to_front: bool = False              # LLaVA preprocess_multimodal: single image -> "<image>\n" + text
    drop_image_newline: bool = False          # "<image>\n" -> image_text (no newline), Qwen style
    strip_content: bool = False               # llama3 chat template applies `| trim`
    stop_strings: tuple[str, ...] = ()        # end-of-turn strings a generator should stop at

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """Special-token strings this template writes as text (the tokenizer must map each to one id). The image
        placeholder is not one of them: it is cut out before tokenizing and replaced by `image_token_id`s."""
        cands = [self.bos, *self.stop_strings, "<|begin_of_text|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<img>", "</img>"]
        text = "".join((self.bos, *self.system_turn, *self.user_turn, self.assistant_header, *self.assistant_body,
                        self.assistant_after, self.image_text))
        return tuple(dict.fromkeys(c for c in cands if c and c in text))


_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_LLAVA_MORE_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                      "that the user provides, and assist the user with a variety of tasks using natural language.")
_LLAMA31_DATE = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"


def _vicuna(name: str, system: str) -> ChatTemplate:
    # LLaVA SeparatorStyle.TWO: system + sep, "ROLE: msg" + (sep | sep2) alternating, generation ends "ASSISTANT:".
    return ChatTemplate(name=name, bos="<s>", system=system, system_turn=("", " "), user_turn=("USER: ", " "),
                        assistant_header="ASSISTANT:", assistant_body=(" ", "</s>"), image_to_front=True,
                        stop_strings=("</s>",))


def _llama3(name: str, system: str, system_prefix: str = "") -> ChatTemplate:
    h = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"  # noqa: E731
    return ChatTemplate(name=name, bos="<|begin_of_text|>", system=system,
                        system_turn=(h("system") + system_prefix, "<|eot_id|>"),
                        user_turn=(h("user"), "<|eot_id|>"), assistant_header=h("assistant"),
                        assistant_body=("", "<|eot_id|>"), image_to_front=True, strip_content=True,
                        stop_strings=("<|eot_id|>",))


TEMPLATES: dict[str, ChatTemplate] = {
    "vicuna_v1": _vicuna("vicuna_v1", _VICUNA_SYSTEM),
    "llava_v1": _vicuna("llava_v1", _LLAVA_V1_SYSTEM),
    "llama3": _llama3("llama3", _LLAVA_MORE_SYSTEM),
    "llama3_1": _llama3("llama3_1", _LLAVA_MORE_SYSTEM, _LLAMA31_DATE),
    "chatml": ChatTemplate(
        name="chatml", bos="", system="You are a helpful assistant.",
        system_turn=("<|im_start|>system\n", "<|im_end|>\n"), user_turn=("<|im_start|>user\n", "<|im_end|>\n"),
        assistant_header="<|im_start|>assistant\n", assistant_body=("", "<|im_end|>"), assistant_after="\n",
        image_placeholder="<|image_pad|>", image_text="<|vision_start|><|image_pad|><|vision_end|>",
        drop_image_newline=True, stop_strings=("<|im_end|>",)),
    # Qwen-VL raw completion (SC-Tune): no system, no roles. The model overwrites the positions strictly between
    # <img> and </img> with the 256 resampler outputs, so the span is <img> + 256 x <imgpad> + </img>.
    "qwen_vl_raw": ChatTemplate(
        name="qwen_vl_raw", bos="", system=None, system_turn=("", ""), user_turn=("", ""), assistant_header="",
        assistant_body=("", "<|endoftext|>"), image_placeholder="<imgpad>", image_text="<img><imgpad></img>",
        drop_image_newline=True, stop_strings=("<|endoftext|>",)),
}


def get_template(template: str | ChatTemplate) -> ChatTemplate:
    if isinstance(template, ChatTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[template]


def end_tokens(template: str | ChatTemplate, tokenizer: Any) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """What ends an answer: (the ids a generator stops at, sorted: the tokenizer's EOS and the template's
    one-token stop strings; the stop strings that take several tokens, to cut from the decoded text)."""
    eos = set() if tokenizer.eos_token_id is None else {int(tokenizer.eos_token_id)}
    stops = []
    for s in get_template(template).stop_strings:
        ids = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            eos.add(int(ids[0]))
        else:
            stops.append(s)
    return tuple(sorted(eos)), tuple(stops)


# ----------------------------------------------------------------------------------------------- rendering

@dataclasses.dataclass(frozen=True)
class Rendered:
    """Rendered text; ``supervised`` are half-open character spans ``[start, end)`` of assistant answers."""

    text: str
    supervised: tuple[tuple[int, int], ...]

    def supervised_texts(self) -> list[str]:
        return [self.text[a:b] for a, b in self.supervised]


def _normalize(messages: Sequence[Message]) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ValueError(f"message {i} must be {{'role': 'system'|'user'|'assistant', 'content': str}}, got {m!r}")
        if role == "system" and i != 0:
            raise ValueError(f"a system message is only allowed first (message {i})")
        out.append({"role": role, "content": content})
    return out


def _place_images(t: ChatTemplate, content: str, n_images_total: int) -> str:
    if IMAGE not in content:
        return content
    if t.image_to_front and n_images_total == 1:
        # LLaVA preprocess_multimodal: remove the tag, strip, put "<image>\n" in front.
        content = (IMAGE + "\n" + content.replace(IMAGE, "").strip()).strip()
    if t.drop_image_newline:
        content = content.replace(IMAGE + "\n", IMAGE)
    return content.replace(IMAGE, t.image_text) if t.image_text != IMAGE else content


def render(template: str | ChatTemplate, messages: Sequence[Message], *,
           add_generation_prompt: bool = False) -> Rendered:
    """Render a whole conversation (training sample): text plus supervised character spans.

    ``messages``: optional system message first, then alternating user/assistant turns starting with user
    (a leading assistant turn is dropped, as LLaVA does). With ``add_generation_prompt`` the text ends with the
    assistant header after a final user turn.
    """
    t = get_template(template)
    msgs = _normalize(messages)
    system = t.system
    if msgs and msgs[0]["role"] == "system":
        if t.system is None:
            raise ValueError(f"chat template {t.name!r} has no system turn, but a system message was given")
        system = msgs.pop(0)["content"]
    if msgs and msgs[0]["role"] == "assistant":
        msgs = msgs[1:]
    n_images = sum(m["content"].count(IMAGE) for m in msgs)
    text, spans = [t.bos], []
    if system is not None:
        text += [t.system_turn[0], system.strip() if t.strip_content else system, t.system_turn[1]]
    pos = sum(map(len, text))
    for i, m in enumerate(msgs):
        want = ("user", "assistant")[i % 2]
        if m["role"] != want:
            raise ValueError(f"turns must alternate user/assistant; turn {i} is {m['role']!r}, expected {want!r}")
        content = _place_images(t, m["content"], n_images)
        if t.strip_content:
            content = content.strip()
        if want == "user":
            piece = t.user_turn[0] + content + t.user_turn[1]
        else:
            piece = t.assistant_header
            start = pos + len(piece)
            piece += t.assistant_body[0] + content + t.assistant_body[1]
            spans.append((start, pos + len(piece)))
            piece += t.assistant_after
        text.append(piece)
        pos += len(piece)
    if add_generation_prompt:
        if not msgs or msgs[-1]["role"] != "user":
            raise ValueError("a generation prompt needs the conversation to end with a user turn")
        text.append(t.assistant_header)
    return Rendered("".join(text), tuple(spans))


def render_prompt(template: str | ChatTemplate, messages: Sequence[Message]) -> str:
    """Generation prompt: the conversation (ending with a user turn) plus the assistant header, so that the model's
    continuation is the answer. Image tokens are still the template's ``image_placeholder`` (see ``encode_prompt``)."""
    return render(template, messages, add_generation_prompt=True).text


# ---------------------------------------------------------------------------------------------- tokenizing

@dataclasses.dataclass(frozen=True)
class Encoded:
    """input_ids / labels int32 ``[T]``; ``image_spans``: ``(start, end)`` token positions of each image."""

    input_ids: np.ndarray
    labels: np.ndarray
    image_spans: tuple[tuple[int, int], ...]


_tokenizer_lock = threading.Lock()   # HF fast tokenizers may mutably borrow their Rust state per call


def check_tokenizer(template: str | ChatTemplate, tokenizer: Any) -> None:
    """Clear error if the tokenizer is not a fast one or lacks a special token the template writes as text."""
    t = get_template(template)
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"chat template {t.name!r} needs a fast (tokenizers-backed) tokenizer for character "
                        f"offsets; got {type(tokenizer).__name__}")
    for s in t.special_tokens:
        ids = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"chat template {t.name!r} writes {s!r} as text, but the tokenizer splits it into "
                             f"{len(ids)} tokens; add it as a special token")


def _tokenize_chunk(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not text:
        return [], []
    with _tokenizer_lock:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def encode_rendered(template: str | ChatTemplate, rendered: Rendered, tokenizer: Any, *,
                    image_token_id: int | None = None, image_token_counts: Sequence[int] = ()) -> Encoded:
    """Tokenize rendered text; expand the i-th image placeholder to ``image_token_counts[i]`` x ``image_token_id``
    (default: the tokenizer's id of the placeholder)."""
    t = get_template(template)
    if not getattr(tokenizer, "is_fast", False):
        check_tokenizer(t, tokenizer)
    chunks = rendered.text.split(t.image_placeholder)
    n_img = len(chunks) - 1
    if n_img != len(image_token_counts):
        raise ValueError(f"the text has {n_img} image placeholder(s) ({t.image_placeholder!r}) but "
                         f"{len(image_token_counts)} image token count(s) were given")
    if n_img and image_token_id is None:
        image_token_id = tokenizer.convert_tokens_to_ids(t.image_placeholder)
    spans = sorted(rendered.supervised)
    ids: list[int] = []
    sup: list[bool] = []
    img_spans = []
    base = 0
    if t.bos and chunks[0].startswith(t.bos):
        # BOS as an id, the text after it tokenized on its own: a SentencePiece tokenizer then adds its "▁" prefix
        # to the first word exactly as with `add_special_tokens=True` (what LLaVA's tokenization sees).
        ids.append(int(tokenizer.convert_tokens_to_ids(t.bos)))
        sup.append(False)
        chunks[0] = chunks[0][len(t.bos):]
        base = len(t.bos)
    for k, chunk in enumerate(chunks):
        toks, offs = _tokenize_chunk(tokenizer, chunk)
        ids += toks
        for a, _ in offs:
            a += base
            sup.append(any(s <= a < e for s, e in spans))
        base += len(chunk)
        if k < n_img:
            n = int(image_token_counts[k])
            img_spans.append((len(ids), len(ids) + n))
            ids += [int(image_token_id)] * n
            sup += [False] * n
            base += len(t.image_placeholder)
    input_ids = np.asarray(ids, np.int32)
    labels = np.where(np.asarray(sup, bool), input_ids, IGNORE_INDEX).astype(np.int32)
    return Encoded(input_ids, labels, tuple(img_spans))


def encode(template: str | ChatTemplate, messages: Sequence[Message], tokenizer: Any, *,
           image_token_id: int | None = None, image_token_counts: Sequence[int] = (),
           add_generation_prompt: bool = False) -> Encoded:
    """``render`` + ``encode_rendered``: token ids and labels (``-100`` where not supervised) of a conversation."""
    rendered = render(template, messages, add_generation_prompt=add_generation_prompt)
    return encode_rendered(template, rendered, tokenizer, image_token_id=image_token_id,
                           image_token_counts=image_token_counts)


def encode_prompt(template: str | ChatTemplate, messages: Sequence[Message], tokenizer: Any, *,
                  image_token_id: int | None = None, image_token_counts: Sequence[int] = ()) -> np.ndarray:
    """Token ids ``[T]`` int32 of ``render_prompt(template, messages)`` with image tokens expanded."""
    return encode(template, messages, tokenizer, image_token_id=image_token_id,
                  image_token_counts=image_token_counts, add_generation_prompt=True).input_ids
