"""Qwen-VL(-Chat) tokenizer: tiktoken BPE over `qwen.tiktoken` plus the QWen special tokens, with
the original's image-span rewrite, ChatML `make_context` and the raw (no template) prompt path.

Ids: the 151,643 BPE ranks, then `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|extra_0..204|>`,
`<ref> </ref> <box> </box> <quad> </quad> <img> </img> <imgpad>` (151,643 .. 151,859).
`<img>PATH</img>` becomes 258 ids: `<img>`, one id per UTF-8 byte of PATH (id == byte value),
`<imgpad>` up to 256, `</img>`; the model overwrites those 256 positions with the image features.

Example:
    >>> tok = QwenTokenizer.from_dir("Qwen-VL-Chat/")          # needs qwen.tiktoken
    >>> ids = tok.encode("<img>x.jpg</img><ref>a red car</ref><box>")   # SC-Tune's raw locator prompt
    >>> raw_text, ids = tok.make_context("Picture 1: <img>a.jpg</img>\\nWhat is it?")   # ChatML
    >>> tok.decode(ids, skip_special_tokens=True)
"""
from __future__ import annotations

import base64
import os
import unicodedata
from typing import Callable, Collection, Sequence

import tiktoken

PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
IMAGE_ST = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + EXTRAS + IMAGE_ST
IMG_TOKEN_SPAN = 256
DEFAULT_SYSTEM = "You are a helpful assistant."


def load_tiktoken_bpe(path: str) -> dict[bytes, int]:
    """`qwen.tiktoken`: one `base64(token) rank` per line."""
    with open(path, "rb") as fh:
        return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in fh.read().splitlines() if line)}


def _replace_closed_tag(ids: list[int], start: int, end: int, inside: Callable[[list[int]], list[int]]) -> list[int]:
    """Rewrite every `start ... end` run (inclusive) with `inside`; an unclosed `start` is an error."""
    out, pos = [], 0
    while True:
        try:
            s = ids.index(start, pos)
        except ValueError:
            break
        try:
            e = ids.index(end, s)
        except ValueError:
            raise ValueError("Unclosed image token") from None
        out += ids[pos:s] + inside(ids[s:e + 1])
        pos = e + 1
    return out + ids[pos:]


class QwenTokenizer:
    """Encode/decode exactly as the original `QWenTokenizer` (Qwen-VL-Chat remote code)."""

    def __init__(self, vocab_file: str, errors: str = "replace"):
        self.errors = errors
        ranks = load_tiktoken_bpe(vocab_file)
        self.special_tokens = {t: i for i, t in enumerate(SPECIAL_TOKENS, start=len(ranks))}
        self._enc = tiktoken.Encoding("Qwen", pat_str=PAT_STR, mergeable_ranks=ranks,
                                      special_tokens=self.special_tokens)
        if len(ranks) + len(self.special_tokens) != self._enc.n_vocab:
            raise ValueError(f"{vocab_file}: {len(ranks)} ranks + {len(self.special_tokens)} special tokens "
                             f"!= tiktoken's n_vocab {self._enc.n_vocab} (duplicate or missing ranks)")
        st = self.special_tokens
        self.eod_id = st[ENDOFTEXT]
        self.im_start_id, self.im_end_id = st[IM_START], st[IM_END]
        self.ref_start_id, self.ref_end_id = st["<ref>"], st["</ref>"]
        self.box_start_id, self.box_end_id = st["<box>"], st["</box>"]
        self.quad_start_id, self.quad_end_id = st["<quad>"], st["</quad>"]
        self.img_start_id, self.img_end_id, self.img_pad_id = st["<img>"], st["</img>"], st["<imgpad>"]
        self.pad_id = self.eod_id   # Qwen-VL-Chat pads (and stops) with <|endoftext|>

    @classmethod
    def from_dir(cls, path: str, **kw) -> "QwenTokenizer":
        """From a folder holding `qwen.tiktoken` (a Qwen-VL-Chat snapshot)."""
        return cls(os.path.join(path, "qwen.tiktoken"), **kw)

    def __len__(self) -> int:
        return self._enc.n_vocab

    # ------------------------------------------------------------------ encode

    def encode(self, text: str, allowed_special: Collection[str] | str = "all",
               disallowed_special: Collection[str] | str = ()) -> list[int]:
        """NFC-normalise, tiktoken-encode (special surface forms become special ids unless excluded by
        `allowed_special`), then rewrite each `<img>PATH</img>` to its fixed 258-id span. No BOS/EOS."""
        text = unicodedata.normalize("NFC", text)
        ids = self._enc.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)
        return _replace_closed_tag(ids, self.img_start_id, self.img_end_id, self._encode_image_span)

    def _encode_image_span(self, span: list[int]) -> list[int]:
        path = b"".join(self._enc.decode_single_token_bytes(i) for i in span[1:-1])
        if len(path) > IMG_TOKEN_SPAN:
            raise ValueError("The content in <img>..</img> is too long")
        return [self.img_start_id] + list(path) + [self.img_pad_id] * (IMG_TOKEN_SPAN - len(path)) + [self.img_end_id]

    # ------------------------------------------------------------------ decode

    def decode(self, ids: Sequence[int] | int, skip_special_tokens: bool = False, keep_image_special: bool = False,
               errors: str | None = None) -> str:
        """Image spans decode back to `<img>PATH</img>`; `skip_special_tokens` drops every special id
        (>= `<|endoftext|>`), except `<ref>/<box>/<quad>` tags when `keep_image_special`."""
        ids = [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
        ids = _replace_closed_tag(ids, self.img_start_id, self.img_end_id, self._decode_image_span)
        if skip_special_tokens:
            keep = {self.ref_start_id, self.ref_end_id, self.box_start_id, self.box_end_id,
                    self.quad_start_id, self.quad_end_id} if keep_image_special else set()
            ids = [i for i in ids if i < self.eod_id or i in keep]
        return self._enc.decode(ids, errors=errors or self.errors)

    def _decode_image_span(self, span: list[int]) -> list[int]:
        inner = span[1:-1]
        if self.img_pad_id in inner:
            inner = inner[:inner.index(self.img_pad_id)]
        path = bytes(inner).decode("utf-8")
        return [self.img_start_id] + self._enc.encode(path) + [self.img_end_id]

    # ------------------------------------------------------------------ prompts

    def image_spans(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        """(position of `<img>`, position of `</img>`) of every image span."""
        starts = [i for i, t in enumerate(ids) if t == self.img_start_id]
        ends = [i for i, t in enumerate(ids) if t == self.img_end_id]
        return list(zip(starts, ends))

    def from_list_format(self, items: Sequence[dict]) -> str:
        """`[{'image': path}, {'text': ...}, {'ref': ..., 'box': [(x1, y1, x2, y2), ...]}]` -> query text."""
        text, n_images = "", 0
        for ele in items:
            if "image" in ele:
                n_images += 1
                text += f"Picture {n_images}: <img>{ele['image']}</img>\n"
            elif "text" in ele:
                text += ele["text"]
            elif "box" in ele:
                if "ref" in ele:
                    text += f"<ref>{ele['ref']}</ref>"
                for box in ele["box"]:
                    text += "<box>(%d,%d),(%d,%d)</box>" % tuple(box[:4])
            else:
                raise ValueError(f"unsupported element {ele!r}: expected an 'image', 'text' or 'box' key")
        return text

    def raw_prompt(self, text: str) -> list[int]:
        """The Qwen-VL raw path (`chat_format='raw'`, no template), which SC-Tune's describer and
        locator prompts use: just `encode(text)`."""
        return self.encode(text)

    def make_context(self, query: str, history: Sequence[tuple[str, str | None]] | None = None,
                     system: str = DEFAULT_SYSTEM, max_window_size: int = 6144,
                     chat_format: str = "chatml") -> tuple[str, list[int]]:
        """`qwen_generation_utils.make_context`: (raw_text, ids) for a chat turn. ChatML markers are
        inserted as ids; roles and contents are encoded with only the image/ref/box tags parsed, so
        `<|im_start|>` typed inside a message stays text. History turns are kept newest-first while
        the context fits `max_window_size` tokens."""
        if chat_format == "raw":
            return query, self.encode(query)
        if chat_format != "chatml":
            raise ValueError(f"unknown chat format {chat_format!r}: expected 'chatml' or 'raw'")
        nl = self.encode("\n")

        def turn(role: str, content: str) -> tuple[str, list[int]]:
            ids = self.encode(role, allowed_special=set(IMAGE_ST)) + nl + self.encode(content, allowed_special=set(IMAGE_ST))
            return f"{role}\n{content}", ids

        system_text, system_ids = turn("system", system)
        system_ids = [self.im_start_id] + system_ids + [self.im_end_id]
        raw_text, context = "", []
        for q, r in reversed(list(history or [])):
            q_text, q_ids = turn("user", q)
            q_ids = [self.im_start_id] + q_ids + [self.im_end_id]
            if r is not None:
                r_text, r_ids = turn("assistant", r)
                nxt = nl + q_ids + nl + [self.im_start_id] + r_ids + [self.im_end_id]
                prev = f"\n{IM_START}{q_text}{IM_END}\n{IM_START}{r_text}{IM_END}"
            else:
                nxt = nl + q_ids + nl
                prev = f"\n{IM_START}{q_text}{IM_END}\n"
            if len(system_ids) + len(nxt) + len(context) >= max_window_size:
                break
            context, raw_text = nxt + context, prev + raw_text
        ids = (system_ids + context + nl + [self.im_start_id] + turn("user", query)[1] + [self.im_end_id] + nl
               + [self.im_start_id] + self.encode("assistant") + nl)
        raw_text = f"{IM_START}{system_text}{IM_END}" + raw_text + f"\n{IM_START}user\n{query}{IM_END}\n{IM_START}assistant\n"
        return raw_text, ids
