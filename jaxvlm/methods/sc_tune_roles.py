"""Who plays SC-Tune's describer and locator: one model family's prompts, box text and batches.

`jaxvlm.methods.sc_tune_loop.SCTune` runs the same phase loop over either roles object:

- `QwenVLChatRoles`, the original (ivattyue/SC-Tune): raw prompts in Qwen-VL's grounding format
  (`sc_tune.describer_prompt` / `locator_prompt`), boxes as ``int(v * 999)`` of the image, the first
  ``<box>...</box>`` of the decoded prompt + answer, IoU in that integer space; only the ViT's
  resampler trains (the original's ``fix_vit``).
- `ChatRoles`, any chat-template VLM (LLaVA-1.5, LLaVA-MORE): one user turn with the image asks for
  a region's description or a caption's box, with LLaVA-1.5's own REG / REC instructions by default,
  and boxes written as LLaVA-1.5 writes them (``[0.12, 0.34, 0.56, 0.78]``: fractions of the square
  the processor pads the image to); an answer without four such numbers scores IoU 0, as the
  original scores an unparsable box. The vision tower stays frozen and the projector trains, as in
  LLaVA's own fine-tuning. SC-Tune's paper tunes Qwen-VL-Chat and reports that it carries over to
  other LVLMs; these are the choices that carry it to the LLaVA layout.

Boxes given to the loop are always ``[x1, y1, x2, y2]`` fractions of the (unpadded) image, as in the
original's ``object365.json``.

Example:
    >>> roles = ChatRoles(Llava(cfg), tok, LlavaImageProcessor.for_llava(cfg), "vicuna_v1")
    >>> tuner = SCTune(Llava(cfg), params, tok, SCTuneConfig(), roles=roles, batch_size=16)
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxvlm.data import chat_templates as ct
from jaxvlm.data.qwen_vl_processing import pad_batch, preprocess_images, raw_prompt_batch
from jaxvlm.methods.sc_tune import (box_iou, box_to_qwen, describer_prompt, find_bbox, locator_labels,
                                    locator_prompt, token_mask)

#: LLaVA-1.5's REG and REC instructions (its mix665k data), `{box}` / `{caption}` filled in.
LLAVA_DESCRIBE = "Please provide a short description for this region: {box}"
LLAVA_LOCATE = "Please provide the bounding box coordinate of the region this sentence describes: {caption}"
_NUMBER = r"\s*(-?\d+(?:\.\d+)?|-?\.\d+)\s*"
_BOX_TEXT = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")


def right_padded(rows: Sequence[Sequence[int]], pad_id: int, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) `[B, W]` of token rows right-padded to a width rounded up to `multiple` (one compile each)."""
    width = -(-max(len(r) for r in rows) // multiple) * multiple
    return pad_batch(rows, pad_id, "right", width)


class QwenVLChatRoles:
    """The original's roles for a `QwenVL` model and its `QwenTokenizer` (see the module docstring)."""

    engine_positions = "slots"      # HF's Qwen-VL generate counts the left pads in the positions

    def __init__(self, model: Any, tokenizer: Any):
        from jaxvlm.models.qwen_vl import example_inputs
        cfg = model.cfg
        self.tok, self.image_size = tokenizer, cfg.visual.image_size
        self.eos_ids, self.pad_id = (tokenizer.eod_id,), tokenizer.eod_id     # Qwen-VL pads with its EOS
        # a sampled image-span token would make the next forward read a bogus image span
        self.ban_ids = (cfg.image_start_id, cfg.image_end_id, cfg.image_pad_id)
        self.example_inputs = example_inputs(cfg)

    @staticmethod
    def frozen(train_vit: bool) -> str | None:
        return None if train_vit else r"visual/(?!attn_pool/).*"

    @staticmethod
    def forward_kwargs(positions, *, train: bool, ntk_seq_len=None) -> dict:
        return dict(positions=positions, train=train, ntk_seq_len=ntk_seq_len)

    def gen_mask(self, tokens) -> np.ndarray:
        return np.asarray(token_mask(jnp.asarray(tokens), self.pad_id), np.int32)

    def describe_batch(self, images: Sequence[Image.Image], boxes: Sequence[Sequence[float]]) -> dict:
        return raw_prompt_batch(self.tok, [describer_prompt(b) for b in boxes], [[im] for im in images],
                                size=self.image_size)

    def locate_batch(self, images: Sequence[Image.Image], captions: Sequence[str]) -> dict:
        return raw_prompt_batch(self.tok, [locator_prompt(c) for c in captions], [[im] for im in images],
                                size=self.image_size)

    def caption(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(list(tokens), skip_special_tokens=True).strip()

    def found_boxes(self, batch: dict, tokens: np.ndarray) -> list[list[int]]:
        # the original searches the decoded prompt + answer with special tokens kept
        return [find_bbox(self.tok.decode(list(p[m > 0]) + list(t), skip_special_tokens=False).strip())
                for p, m, t in zip(batch["input_ids"], batch["attention_mask"], np.asarray(tokens).tolist())]

    def iou(self, found: Sequence[Sequence[float]], boxes: Sequence[Sequence[float]],
            images: Sequence[Image.Image]) -> np.ndarray:
        """`[B]` IoU in Qwen's integer space, where the original computes it."""
        return box_iou(np.asarray(found), np.asarray([box_to_qwen(b) for b in boxes]))[:, 0]

    def locator_batch(self, captions: Sequence[str], boxes: Sequence[Sequence[float]],
                      images: Sequence[Image.Image], multiple: int) -> dict:
        rows = [self.tok.raw_prompt(locator_prompt(c, box_to_qwen(b))) for c, b in zip(captions, boxes)]
        ids, mask = right_padded(rows, self.pad_id, multiple)
        labels = locator_labels(ids, self.pad_id, self.tok.box_start_id).astype(np.int32)
        return dict(input_ids=ids, attention_mask=mask, labels=labels,
                    pixel_values=preprocess_images(images, self.image_size))


class ChatRoles:
    """Roles for a chat-template VLM (`Llava`): see the module docstring.

    template: the chat template's name (e.g. "vicuna_v1"); describe / locate: the user's instruction
    with `{box}` / `{caption}`; decimals: digits of the box text; system: a system prompt in place
    of the template's."""

    engine_positions = "mask"       # positions count real tokens, as HF's LLaVA generate

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, template: str | ct.ChatTemplate, *,
                 describe: str = LLAVA_DESCRIBE, locate: str = LLAVA_LOCATE, decimals: int = 2,
                 system: str | None = None):
        for text, field in ((describe, "box"), (locate, "caption")):
            try:
                filled = text.format(**{field: "\0"})
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"the instruction {text!r} can only have {{{field}}} to fill in ({e!r})") from None
            if "\0" not in filled:
                raise ValueError(f"the instruction {text!r} has no {{{field}}} to fill in")
        cfg = model.cfg
        self.tok, self.proc, self.template = tokenizer, image_processor, ct.get_template(template)
        self.describe_text, self.locate_text, self.decimals, self.system = describe, locate, int(decimals), system
        self.image_token_id = cfg.image_token_id
        self.eos_ids, self.stop_strings = ct.end_tokens(self.template, tokenizer)
        if not self.eos_ids:
            raise ValueError("the tokenizer has no EOS token and the template no one-token stop string")
        self.pad_id = self.eos_ids[0]          # generated rows are padded with an EOS after they end
        self.ban_ids = (cfg.image_token_id,)   # a sampled image token would break the next forward's splice
        size = cfg.vision.image_size
        self.example_inputs = (jnp.full((1, cfg.tokens_per_image), cfg.image_token_id, jnp.int32),
                               jnp.zeros((1, 3, size, size), jnp.float32))

    @staticmethod
    def frozen(train_vit: bool) -> str | None:
        return None if train_vit else r"vision_tower/.*"

    @staticmethod
    def forward_kwargs(positions, *, train: bool, ntk_seq_len=None) -> dict:
        return dict(positions=positions)

    def gen_mask(self, tokens) -> np.ndarray:
        """1 on each row's tokens up to and including its first EOS (a template stop string of several
        tokens does not end generation: it is only cut from the caption's text)."""
        end = np.isin(np.asarray(tokens), self.eos_ids)
        return ((np.cumsum(end, axis=1) - end) == 0).astype(np.int32)

    def square_box(self, box: Sequence[float], image: Image.Image) -> list[float]:
        """A box in fractions of `image` -> fractions of the square the processor pads it to (the model's)."""
        if getattr(self.proc, "aspect", "pad") != "pad":
            return list(map(float, box))
        w, h = image.size
        side = max(w, h)
        dx, dy = (side - w) / 2, (side - h) / 2
        x1, y1, x2, y2 = box
        return [(x1 * w + dx) / side, (y1 * h + dy) / side, (x2 * w + dx) / side, (y2 * h + dy) / side]

    def box_text(self, box: Sequence[float], image: Image.Image) -> str:
        return "[" + ", ".join(f"{v:.{self.decimals}f}" for v in self.square_box(box, image)) + "]"

    def _messages(self, text: str, answer: str | None = None) -> list[dict]:
        msgs = [] if self.system is None else [{"role": "system", "content": self.system}]
        msgs.append({"role": "user", "content": ct.IMAGE + "\n" + text})
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
        return msgs

    def _prompts(self, texts: Sequence[str], images: Sequence[Image.Image]) -> dict:
        procs = [self.proc(im) for im in images]
        rows = [ct.encode_prompt(self.template, self._messages(t), self.tok, image_token_id=self.image_token_id,
                                 image_token_counts=[p.num_tokens]) for t, p in zip(texts, procs)]
        ids, mask = pad_batch(rows, self.pad_id, "left", None)
        return dict(input_ids=ids, attention_mask=mask, pixel_values=np.stack([p.pixel_values for p in procs]))

    def describe_batch(self, images: Sequence[Image.Image], boxes: Sequence[Sequence[float]]) -> dict:
        return self._prompts([self.describe_text.format(box=self.box_text(b, im)) for b, im in zip(boxes, images)],
                             images)

    def locate_batch(self, images: Sequence[Image.Image], captions: Sequence[str]) -> dict:
        return self._prompts([self.locate_text.format(caption=c) for c in captions], images)

    def caption(self, tokens: Sequence[int]) -> str:
        tokens = list(tokens)
        for i, t in enumerate(tokens):
            if t in self.eos_ids:
                tokens = tokens[:i]
                break
        text = self.tok.decode(tokens, skip_special_tokens=True)
        for s in self.stop_strings:
            text = text.split(s)[0]
        return text.strip()

    def found_boxes(self, batch: dict, tokens: np.ndarray) -> list[list[float]]:
        """The first ``[a, b, c, d]`` of each answer (the square's fractions), else `[0, 0, 0, 0]`."""
        out = []
        for row in np.asarray(tokens).tolist():
            m = _BOX_TEXT.search(self.caption(row))
            out.append([float(v) for v in m.groups()] if m else [0.0, 0.0, 0.0, 0.0])
        return out

    def iou(self, found: Sequence[Sequence[float]], boxes: Sequence[Sequence[float]],
            images: Sequence[Image.Image]) -> np.ndarray:
        """`[B]` IoU in the padded square's fractions (equal to the image's: padding shifts and scales both boxes)."""
        truth = [self.square_box(b, im) for b, im in zip(boxes, images)]
        return box_iou(np.asarray(found, np.float32), np.asarray(truth, np.float32))[:, 0]

    def locator_batch(self, captions: Sequence[str], boxes: Sequence[Sequence[float]],
                      images: Sequence[Image.Image], multiple: int) -> dict:
        procs = [self.proc(im) for im in images]
        rows, labels = [], []
        for c, b, im, p in zip(captions, boxes, images, procs):
            enc = ct.encode(self.template, self._messages(self.locate_text.format(caption=c), self.box_text(b, im)),
                            self.tok, image_token_id=self.image_token_id, image_token_counts=[p.num_tokens])
            rows.append(enc.input_ids)
            labels.append(enc.labels)
        ids, mask = right_padded(rows, self.pad_id, multiple)
        lab = np.full(ids.shape, ct.IGNORE_INDEX, np.int32)
        for r, row in enumerate(labels):
            lab[r, :len(row)] = row
        return dict(input_ids=ids, attention_mask=mask, labels=lab,
                    pixel_values=np.stack([p.pixel_values for p in procs]))
