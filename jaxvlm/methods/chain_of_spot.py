"""Chain-of-Spot (Dong et al. 2024, arXiv 2403.12966) on LLaVA-1.5: ask the model for the region of
interest (ROI) of a question, crop it, and answer with the full image and the crop.

Inference (`roi_messages`, `parse_roi`, `crop_to_roi`, `answer_messages`; `jaxvlm generate
--chain-of-spot` runs both turns), as the original's ``llava/eval/model_vqa_loader_CoS.py``:

1. ``USER: <image>\\nTo answer the question: "{Q}", what is the region of interest in the image?``
   -> the ROI, e.g. ``[0.212, 0.35, 0.634, 0.771]`` (greedy, up to 128 new tokens).
2. The ROI is read as ``text[1:-1].split(", ")`` (first four numbers), scaled by the side of the image
   padded to a square (LLaVA's ``expand2square``) and cropped there by PIL (which rounds the box). If
   that fails (unparsable text, a reversed box) the crop is the whole image.
3. The same conversation continues with the ROI as the assistant's answer and
   ``USER: The region of interest in the image is <image>\\n. Answer the question: "{Q}"``; the model
   answers with both images (full first, crop second), the whole prompt run again.

Training data (`roi_label`, `cos_conversation`), as ``llava/train/train_CoS.py``: one QA turn of a
LLaVA record is rewritten into ROI-then-answer turns, the ROI label being a square box given in the
original image's pixels as ``[top, left, size]``, expressed in the padded square's coordinates.
Training asks "**where** is the region of interest", inference "**what** is": both are kept.

Example:
    >>> msgs = roi_messages('What colour is the car?')
    >>> roi = '[0.212, 0.35, 0.634, 0.771]'          # the model's answer to msgs
    >>> crop, cropped = crop_to_roi(image, roi, fill=(122, 116, 104))
    >>> msgs2 = answer_messages('What colour is the car?', roi)   # images: [image, crop]
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

from PIL import Image

from jaxvlm.data.image_processing import expand_to_square

ROI_QUESTION = 'To answer the question: "{question}", what is the region of interest in the image?'
ROI_QUESTION_TRAIN = 'To answer the question: "{question}", where is the region of interest in the image?'
ANSWER_QUESTION = 'The region of interest in the image is <image>\n. Answer the question: "{question}"'
RAW_IMAGE_PREFIX = "Now answer the following questions based on the raw image: "
#: The training label when a record has no ROI (the crop is then the whole image).
FULL_IMAGE_ROI = [0.0, 0.0, 1.0, 1.0]


def roi_messages(question: str, system: str | None = None) -> list[dict]:
    """Turn 1 (inference): the user asks for the ROI of `question`, with the image."""
    msgs = [] if system is None else [{"role": "system", "content": system}]
    return msgs + [{"role": "user", "content": "<image>\n" + ROI_QUESTION.format(question=question)}]


def answer_messages(question: str, roi: str, system: str | None = None) -> list[dict]:
    """Turn 2 (inference): turn 1, the model's ROI as its answer, then the question over the crop. Its two
    images are the full image and the crop, in that order."""
    return roi_messages(question, system) + [{"role": "assistant", "content": roi},
                                             {"role": "user", "content": ANSWER_QUESTION.format(question=question)}]


def parse_roi(text: str) -> tuple[float, float, float, float] | None:
    """The original's reading of a ROI answer: drop the first and last character, split on ", ", take
    the first four numbers. None where that fails (fewer than four, or one not a number)."""
    parts = text[1:-1].split(", ")
    try:
        x1, y1, x2, y2 = (float(p) for p in parts[:4])
    except ValueError:          # also fewer than four parts (unpacking)
        return None
    return x1, y1, x2, y2


def crop_to_roi(image: Image.Image, roi: str, fill: tuple[int, int, int]) -> tuple[Image.Image, bool]:
    """The crop turn 2 sees: the ROI (fractions of the padded square's side) cut from `image` padded to a
    square with `fill` (the image processor's mean colour, as LLaVA pads). Returns (crop, True), or
    (the padded image, False) where the ROI does not parse or PIL refuses the box (e.g. right < left);
    the processor pads every image to a square anyway, so that is the whole image."""
    square = expand_to_square(image, fill)
    box = parse_roi(roi)
    if box is None:
        return square, False
    side_x, side_y = square.size
    x1, y1, x2, y2 = box
    try:
        return square.crop((side_x * x1, side_y * y1, side_x * x2, side_y * y2)), True
    except ValueError:
        return square, False


def roi_box(top: float, left: float, size: float, width: int, height: int) -> tuple[float, float, float, float]:
    """A square ROI `[top, left, size]` in the original image's pixels (`width` x `height`) -> its box
    (x1, y1, x2, y2) in the image padded to a square, clipped to the image's extent along the padded axis
    and to the square along the other, as the original clips it. The training crop is cut there."""
    if width > height:
        pad = (width - height) // 2
        x1, y1 = left, top + pad
        return x1, y1, min(x1 + size, width), min(y1 + size, height + pad)
    pad = (height - width) // 2
    x1, y1 = left + pad, top
    return x1, y1, min(x1 + size, width + pad), min(y1 + size, height)


def roi_label(top: float, left: float, size: float, width: int, height: int) -> list[float]:
    """The training label of a square ROI `[top, left, size]` (see `roi_box`): its box as fractions of the
    padded square's side rounded to 3 decimals (written with ``str(list)``, e.g. ``[0.081, 0.2, 0.92, 0.84]``)."""
    side = max(width, height)
    return [round(v / side, 3) for v in roi_box(top, left, size, width, height)]


def roi_text(roi: Sequence[float], decimals: int | None = None) -> str:
    """A ROI label as the assistant writes it: ``str(list)`` as the original (``[0.081, 0.2, 0.92, 0.84]``),
    or with a fixed number of `decimals` (``[0.08, 0.20, 0.92, 0.84]``) for a tokenizer that reads
    coordinates of one width as single tokens."""
    if decimals is None:
        return str(list(roi))
    return "[" + ", ".join(f"{v:.{decimals}f}" for v in roi) + "]"


def cos_conversation(turns: Sequence[Mapping[str, Any]], question_index: int,
                     roi: Sequence[float] | None, decimals: int | None = None) -> list[dict]:
    """A LLaVA record's conversation (alternating human/gpt turns) rewritten for Chain-of-Spot training
    around QA pair `question_index`: ROI question (with the image) -> ROI label -> the question over the
    crop -> the original answer, then every other turn in its original order, the first of them prefixed
    with "Now answer the following questions based on the raw image: ". `roi` is `roi_label`'s box, or
    None for a record without one (label `FULL_IMAGE_ROI`; the crop is then the whole image), written by
    `roi_text(label, decimals)`. The record's two images are the full image and the crop."""
    n_pairs = len(turns) // 2
    if not 0 <= question_index < n_pairs:
        raise ValueError(f"question_index {question_index} is outside the record's {n_pairs} QA pairs")
    turns = [dict(copy.deepcopy(t)) for t in turns]
    for t in turns:
        # LLaVA's preprocess_multimodal first moves the image tag to the front ("<image>\n" + text)
        if "<image>" in t["value"]:
            t["value"] = ("<image>\n" + t["value"].replace("<image>", "").strip()).strip()
        t["value"] = t["value"].replace("<image>\n", "")
    q, a = turns[2 * question_index], turns[2 * question_index + 1]
    question = q["value"]
    label = list(FULL_IMAGE_ROI if roi is None else roi)
    out = [{"from": "human", "value": "<image>\n" + ROI_QUESTION_TRAIN.format(question=question)},
           {"from": "gpt", "value": roi_text(label, decimals)},
           dict(q, value=ANSWER_QUESTION.format(question=question)), a]
    out += [t for i, t in enumerate(turns) if i not in (2 * question_index, 2 * question_index + 1)]
    if len(out) > 4:
        out[4] = dict(out[4], value=RAW_IMAGE_PREFIX + out[4]["value"])
    return out


def cos_records(records: Sequence[Mapping[str, Any]], rois: Mapping[str, Mapping[str, Any]], image_root: str,
                crop_dir: str, *, seed: int = 0, fill: tuple[int, int, int] = (122, 116, 104),
                progress: bool = False, decimals: int | None = None) -> list[dict]:
    """LLaVA-format training records -> Chain-of-Spot ones that `jaxvlm train` reads with
    ``data.images_per_sample=2``: each record with an image gets one QA pair chosen at random (seeded), its
    conversation rewritten by `cos_conversation`, and two images: the original and its ROI crop, cut from the
    image padded to a square with `fill` (CLIP's mean colour, as LLaVA pads) and saved as PNG in `crop_dir`.

    rois: the original's ``chain-of-spot.json`` table, keyed ``f"{index:06d}_{id with '/' as '_'}_q{pair}"``
    with ``{"params": [top, left, size]}`` in original-image pixels; a record whose key is absent gets the
    whole-image label and the original image as its crop, as the original falls back. Records without an
    image are kept as they are. `decimals`: how labels are written (`roi_text`; None: as the original).
    Departure: the original draws the pair again every time it loads a record; here one draw per record
    is written (call again with another seed for more)."""
    import os
    import random
    import sys

    from tqdm import tqdm

    from jaxvlm.data.image_processing import load_image
    rng = random.Random(seed)
    os.makedirs(crop_dir, exist_ok=True)
    out = []
    for i, rec in enumerate(tqdm(records, desc="chain-of-spot records", unit="rec", disable=not progress,
                                 file=sys.stderr)):
        if "image" not in rec:
            out.append(dict(rec))
            continue
        turns = rec["conversations"]
        if len(turns) < 2:
            raise ValueError(f"record {i} ({rec.get('id')!r}) has no question-answer pair to rewrite")
        pair = rng.randrange(len(turns) // 2)
        key = f"{str(i).zfill(6)}_{str(rec['id']).replace('/', '_')}_q{pair}"
        meta = rois.get(key)
        label, crop_path = None, rec["image"]
        if meta is not None:
            image = load_image(os.path.join(image_root, rec["image"]), str(rec["id"]))
            w, h = image.size
            label = roi_label(*meta["params"], w, h)
            crop = expand_to_square(image, fill).crop(roi_box(*meta["params"], w, h))
            crop_path = os.path.join(os.path.abspath(crop_dir), f"{key}.png")
            crop.save(crop_path)
        out.append(dict(rec, image=[rec["image"], crop_path], conversations=cos_conversation(turns, pair, label, decimals)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jaxvlm.methods.chain_of_spot --records llava_v1_5_mix665k.json --rois chain-of-spot.json
    --image-root IMAGES --crops CROPS --out cos.json``: the training records `cos_records` writes."""
    import argparse
    import json
    import os

    p = argparse.ArgumentParser(prog="python -m jaxvlm.methods.chain_of_spot", description=main.__doc__)
    p.add_argument("--records", required=True, help="LLaVA-format JSON list")
    p.add_argument("--rois", required=True, help="the original's chain-of-spot.json ({key: {params: [top, left, size]}})")
    p.add_argument("--image-root", required=True)
    p.add_argument("--crops", required=True, help="folder for the crop PNGs")
    p.add_argument("--out", required=True, help="output JSON (refused if it exists)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for path, what in ((a.records, "--records"), (a.rois, "--rois")):
        if not os.path.isfile(path):
            raise SystemExit(f"{what}: no such file: {path}")
    if os.path.exists(a.out):
        raise SystemExit(f"--out {a.out} exists; not overwriting it")
    with open(a.records) as f:
        records = json.load(f)
    with open(a.rois) as f:
        rois = json.load(f)
    out = cos_records(records, rois, a.image_root, a.crops, seed=a.seed, progress=True)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, a.out)             # never a half-written file at --out
    print(f"wrote {len(out)} records to {a.out} (crops in {a.crops})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
