"""The demo's method columns that decode a model tuned for the method: each tuner rewrites the shapes
world's training records into the method's format and fine-tunes the demo's checkpoint on them with the
recipe's train loop (`jaxvlm demo` calls them through `TUNERS`; ~100-200 s each on 2 cores).

- REVERSE: captions with every object phrase span-tagged, some with an absent shape tagged </UN>.
- Chain-of-Spot: one question of each VQA/existence record rewritten into CoS's two turns (ask for the
  region of interest, then answer over the full image and the ROI crop), the ROI being the square around
  the objects the question is about, which the world knows exactly (CoS's own ROIs come from relevance maps).
- JUDGER: VQA/existence questions over the image and the crop the model's own relative attention picks,
  answered with the standard answer (its stage III without the unreleased judgments).
- SC-Tune: not the train loop but SC-Tune's own phase loop (`jaxvlm.methods.sc_tune_loop` with
  `ChatRoles`): the model describes a referable object's box and locates its own description, PPO on the
  describer with the locate IoU as reward, SFT of the locator on the snapshot's descriptions.

    >>> tuned = TUNERS["CoS"](ckpt, world, tok_dir, out / "cos", steps=400)
"""
from __future__ import annotations

import json
import pathlib
import random
import sys
from typing import Any, Mapping, Sequence


def _tune_config(ckpt: pathlib.Path, world, tok_dir: pathlib.Path, out: pathlib.Path, steps: int,
                 overrides: Sequence[str], *extra: str):
    """The recipe fine-tuning `ckpt` for `steps` on `out/train.json` (the tuner writes it), with the recipe's
    optimizer, a 20-step warmup and the tower frozen; `extra`: more recipe keys. Exports `out/checkpoint`."""
    from jaxvlm.demo import recipe
    # `ckpt` already holds the trained box-token rows; the recipe's number_init is for a random init only.
    cfg, _ = recipe(out, world, tok_dir, steps, overrides=tuple(overrides) + (
        f"model.init_from={ckpt}", "model.number_init=False", f"data.path={out / 'train.json'}",
        "optim.warmup_steps=20",
        "checkpoint.async_save=False", *extra))
    return cfg


def _train(cfg, records: Sequence[Mapping[str, Any]]) -> pathlib.Path:
    """Write `records` where `cfg` reads its data and train -> the exported checkpoint. A run left in the
    workdir by an earlier demo resumes (or is reused once finished) only when it tuned the same checkpoint on
    the same records with the same config; any other is removed first, so a demo run again with another
    `--checkpoint` never decodes a copy tuned from the previous one."""
    import shutil

    from jaxvlm.train.loop import train
    data = pathlib.Path(cfg.data.path)
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(json.dumps(list(records)))
    digest = _tuning_digest(pathlib.Path(cfg.model.init_from),
                            json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode() + data.read_bytes())
    stamp = data.parent / "tuned_from.sha256"
    workdir, export = pathlib.Path(cfg.train.workdir), pathlib.Path(cfg.train.export)
    if (workdir.exists() or export.exists()) and (not stamp.is_file() or stamp.read_text() != digest):
        print(f"[demo] {workdir.parent}: an earlier tuning run of another checkpoint, data or config; starting over",
              file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(export, ignore_errors=True)
    stamp.write_text(digest)
    train(cfg)
    return export


def _tuning_digest(ckpt: pathlib.Path, settings: bytes) -> str:
    """What a tuned copy depends on: `settings` (config and data) and every file of the base checkpoint."""
    import hashlib
    h = hashlib.sha256(settings)
    for f in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(ckpt)).encode() + f.read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- REVERSE

NEGATIVE_SHARE = 0.43     # REVERSE's data: 2.9M negative of 6.8M QA turns


def reverse_records(records: Sequence[Mapping[str, Any]], seed: int = 0) -> tuple[list[dict], int]:
    """LLaVA `records` with each caption answer span-tagged as REVERSE's data is: every object phrase as
    `<SPAN>phrase</CN>`; in a `NEGATIVE_SHARE` of them one phrase has its shape swapped for one the image lacks,
    tagged `</UN>`, and the answer ends there. Other records are kept. Returns (records, how many negatives)."""
    import re

    from jaxvlm.data.shapes_world.vocab import CATEGORIES
    rng = random.Random(seed)
    shape = re.compile(r"\b(" + "|".join(CATEGORIES) + r")\b")
    out, negatives = [], 0
    for r in records:
        if not r["id"].endswith("_caption"):
            out.append(dict(r))
            continue
        head, body = r["conversations"][1]["value"].split(": ", 1)       # "The image shows N shapes on ...: a, b and c."
        phrases = re.split(r", | and ", body.rstrip("."))
        tagged = [f"<SPAN>{p}</CN>" for p in phrases]
        if rng.random() < NEGATIVE_SHARE:
            k = rng.randrange(len(phrases))
            present = {m.group(1) for p in phrases for m in shape.finditer(p)}
            fake = shape.sub(rng.choice([c for c in CATEGORIES if c not in present]), phrases[k], count=1)
            text = head + ": " + ", ".join(tagged[:k] + [f"<SPAN>{fake}</UN>"])
            negatives += 1
        else:
            text = head + ": " + (", ".join(tagged[:-1]) + " and " + tagged[-1] if len(tagged) > 1 else tagged[0]) + "."
        out.append(dict(r, conversations=[r["conversations"][0], dict(r["conversations"][1], value=text)]))
    return out, negatives


def reverse_tune(ckpt: pathlib.Path, world, tok_dir: pathlib.Path, out: pathlib.Path, steps: int,
                 overrides: Sequence[str] = ()) -> pathlib.Path:
    """`ckpt` fine-tuned on `reverse_records` of the train split (targets inside an </UN> span not trained:
    `data.reverse_labels`)."""
    records, n_neg = reverse_records(_train_records(world))
    print(f"[demo] REVERSE: {n_neg} negative captions; fine-tuning {steps} steps", file=sys.stderr)
    return _train(_tune_config(ckpt, world, tok_dir, out, steps, overrides, "data.reverse_labels=True"), records)


def _train_records(world, kinds: tuple[str, ...] | None = None) -> list[dict]:
    """The train split's LLaVA records (those whose id ends in one of `kinds`, e.g. ``("_vqa",)``)."""
    records = json.loads(pathlib.Path(world.llava["train"]).read_text())
    return records if kinds is None else [r for r in records if r["id"].endswith(kinds)]


# ----------------------------------------------------------------------------- Chain-of-Spot

#: A ROI is the square around the question's objects, ROI_MARGIN pixels wider on each side and at least
#: ROI_MIN_SIDE (half the 112-px image's side, so the crop shows its objects at least 2x), kept inside the image.
ROI_MARGIN, ROI_MIN_SIDE = 8, 56
#: Chain-of-Spot's records need room for two images, the ROI turn and the rest (the longest is 343 tokens).
COS_SEQ_LEN = 352


def roi_square(objects: Sequence[Any], image_size: int) -> list[int] | None:
    """`[top, left, size]` (Chain-of-Spot's ROI parameters, pixels) of the square around `objects`
    (`ObjectInfo`s, COCO boxes), or None when there are none (the whole image is the ROI)."""
    if not objects:
        return None
    x1 = min(o.bbox[0] for o in objects)
    y1 = min(o.bbox[1] for o in objects)
    x2 = max(o.bbox[0] + o.bbox[2] for o in objects)
    y2 = max(o.bbox[1] + o.bbox[3] for o in objects)
    side = int(min(image_size, max(ROI_MIN_SIDE, max(x2 - x1, y2 - y1) + 2 * ROI_MARGIN)))
    left = int(min(max(round((x1 + x2 - side) / 2), 0), image_size - side))
    top = int(min(max(round((y1 + y2 - side) / 2), 0), image_size - side))
    return [top, left, side]


def question_roi(question: str, scene: Sequence[Any], image_size: int, rng: random.Random) -> list[int] | None:
    """A shapes-world question's ROI, `[top, left, size]`: the `roi_square` around the objects it is about
    (`tasks.question_objects`), or, when it asks about something absent, around one of the scene's objects
    drawn with `rng` (were its ROI the whole image, the ROI alone would give the "no" away). None for a
    question the world does not ask (its ROI is then the whole image)."""
    from jaxvlm.data.shapes_world.tasks import question_objects
    about = question_objects(question, scene, image_size)
    return None if about is None else roi_square(about or [rng.choice(scene)], image_size)


def cos_rois(records: Sequence[Mapping[str, Any]], instances: Mapping[str, Any], seed: int = 0) -> dict[str, dict]:
    """Chain-of-Spot's ROI table (`chain_of_spot.cos_records`' `rois`, keyed by record index, id and QA pair)
    for shapes-world LLaVA records: each question's `question_roi`."""
    from jaxvlm.data.shapes_world.world import scenes_by_file
    rng = random.Random(seed)
    scenes = scenes_by_file(instances)
    table = {}
    for i, rec in enumerate(records):
        im, scene = scenes[pathlib.PurePosixPath(rec["image"]).name]
        turns = rec["conversations"]
        for pair in range(len(turns) // 2):
            square = question_roi(turns[2 * pair]["value"], scene, im["width"], rng)
            if square is not None:
                table[f"{i:06d}_{str(rec['id']).replace('/', '_')}_q{pair}"] = {"params": square}
    return table


def true_rois(questions: Sequence[Mapping[str, Any]], world, split: str = "test", seed: int = 0) -> list[dict]:
    """`jaxvlm generate` question records (`image` as `split/file`) each given its `question_roi` as the ROI
    answer Chain-of-Spot's first turn would write (`roi`, read by `--chain-of-spot` instead of asking): the
    demo's CoS-ROI column, what the answer turn makes of a right ROI."""
    from jaxvlm.data.shapes_world.world import scenes_by_file
    from jaxvlm.methods.chain_of_spot import roi_label, roi_text
    scenes = scenes_by_file(json.loads(pathlib.Path(world.instances[split]).read_text()))
    rng = random.Random(seed)
    out = []
    for q in questions:
        im, scene = scenes[pathlib.PurePosixPath(q["image"]).name]
        square = question_roi(q["text"], scene, im["width"], rng)
        out.append(dict(q) if square is None else
                   dict(q, roi=roi_text(roi_label(*square, im["width"], im["height"]), decimals=2)))
    return out


def cos_tune(ckpt: pathlib.Path, world, tok_dir: pathlib.Path, out: pathlib.Path, steps: int,
             overrides: Sequence[str] = ()) -> pathlib.Path:
    """`ckpt` fine-tuned on Chain-of-Spot records made from the train split's VQA and existence records
    (the tasks its column decodes), two images a sample (full image, ROI crop)."""
    from jaxvlm.methods.chain_of_spot import cos_records
    records = _train_records(world, ("_vqa", "_exist"))
    rois = cos_rois(records, json.loads(pathlib.Path(world.instances["train"]).read_text()))
    cos = cos_records(records, rois, str(world.image_root), str(out / "crops"), decimals=2, progress=True)
    print(f"[demo] Chain-of-Spot: {len(cos)} records, {len(rois)} questions with a ROI; fine-tuning {steps} steps",
          file=sys.stderr)
    cfg = _tune_config(ckpt, world, tok_dir, out, steps, overrides, "data.images_per_sample=2",
                       f"data.seq_len={COS_SEQ_LEN}")
    return _train(cfg, cos)


# ----------------------------------------------------------------------------- JUDGER

#: JUDGER's crop sides are 1-2x the model's input (336 px) on images of ~500-1000 px; on the 112-px world the
#: same share of the image is 1-2x 56 px. Its attention layer, 14 of Vicuna-7B's 32, sits mid-depth: here the
#: second to last (layer 2 of the recipe's 4).
JUDGER_CROP_SIZE, JUDGER_LAYER = 56, -2
#: Single-turn records of two images and a short question (the longest is 160 tokens, the mean 149).
JUDGER_SEQ_LEN = 160


def judger_records(ckpt: pathlib.Path, records: Sequence[Mapping[str, Any]], image_root: str | pathlib.Path,
                   crop_dir: pathlib.Path, n: int, seed: int = 0) -> list[dict]:
    """`n` question-answer pairs drawn (seeded) from LLaVA `records`, each as JUDGER's training sample: one
    turn ``<image><image>\n{question}`` over the full image and the crop that `ckpt`'s own relative attention
    picks for the question (`judger.question_crop`, stage II), answered with the record's answer (stage III's
    standard answer). Crops are written to `crop_dir`."""
    import os

    from PIL import Image
    from tqdm import tqdm

    from jaxvlm.data.image_processing import load_image
    from jaxvlm.generate.cli import load_model
    from jaxvlm.methods import judger
    _, model, params, tok, proc, _ = load_model(str(ckpt))
    layer = judger.layer_index(JUDGER_LAYER, model.cfg.text.num_layers)
    rng = random.Random(seed)
    pairs = [(r, k) for r in records for k in range(0, len(r["conversations"]) - 1, 2)]
    general = judger.raw_prompt_ids(tok, judger.GENERAL_PROMPT, model.cfg.image_token_id, model.cfg.tokens_per_image)
    crop_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for r, k in tqdm(rng.sample(pairs, min(n, len(pairs))), desc="JUDGER crops", unit="q", file=sys.stderr):
        question = r["conversations"][k]["value"].replace("<image>", "").strip()
        image: Image.Image = load_image(os.path.join(image_root, r["image"]), str(r["id"]))
        _, box = judger.question_crop(model, params, tok, question, proc(image).pixel_values[None], image.size,
                                      layer=layer, bbox_size=JUDGER_CROP_SIZE, general_ids=general)
        crop = crop_dir / f"{r['id']}_q{k // 2}.png"
        image.crop(box).save(crop)
        out.append({"id": f"{r['id']}_q{k // 2}", "image": [r["image"], str(crop.resolve())],
                    "conversations": [{"from": "human", "value": "<image><image>\n" + question},
                                      dict(r["conversations"][k + 1])]})
    return out


def judger_tune(ckpt: pathlib.Path, world, tok_dir: pathlib.Path, out: pathlib.Path, steps: int,
                overrides: Sequence[str] = ()) -> pathlib.Path:
    """`ckpt` fine-tuned as JUDGER's stage III without its judgments: (image, crop, question) -> the standard
    answer, on the train split's VQA and existence questions (the tasks its column decodes), the crops from
    `ckpt`'s relative attention. The judgments (GPT-4o's critiques of wrong answers) and the loss that uses
    them are not released, so that half of the training is not here."""
    cfg = _tune_config(ckpt, world, tok_dir, out, steps, overrides, "data.images_per_sample=2",
                       f"data.seq_len={JUDGER_SEQ_LEN}")
    recs = judger_records(ckpt, _train_records(world, ("_vqa", "_exist")), world.image_root, out / "crops",
                          steps * cfg.data.batch_size)
    print(f"[demo] JUDGER: {len(recs)} questions with their crops; fine-tuning {steps} steps", file=sys.stderr)
    return _train(cfg, recs)


# ----------------------------------------------------------------------------- SC-Tune

#: SC-Tune on the demo's LLaVA: the original's settings (`SCTuneConfig`'s defaults: a fresh snapshot and
#: optimizer at each switch, PPO's KL, clip and sampling) except that the run is one describer-then-locator
#: cycle in the original's 2:1 proportion (its phases are 200 and 100 steps; it runs 8 cycles), the learning
#: rates keep the original's ratio to its base model's fine-tuning rate (Qwen-VL-Chat's 1e-5 : 5e-7 describer,
#: 1e-6 locator) against the recipe's 3e-4, the world's descriptions are 2-6 tokens (the original's 3-token
#: minimum would pad "the star" with a third), and its boxes ~10 tokens.
SC_TUNE = dict(caption_lr=1.5e-5, bbox_lr=3e-5, min_new_tokens=1, caption_new_tokens=12, box_new_tokens=16)
SC_TUNE_BATCH = 8


def sc_tune_records(world, split: str = "train") -> list[dict]:
    """SC-Tune's box records (`{"image_id", "bbox"}`, corners as fractions of the image, as the original's
    object365.json) for the split's referable objects: the world's RefCOCOg-style refs, each of which has
    an unambiguous description, so a perfect describer-locator cycle exists."""
    sizes = {im["id"]: (im["width"], im["height"])
             for im in json.loads(pathlib.Path(world.instances[split]).read_text())["images"]}
    out = []
    for ref in json.loads(pathlib.Path(world.refs_json).read_text()):
        if ref["split"] == split:
            (w, h), (x, y, bw, bh) = sizes[ref["image_id"]], ref["bbox"]
            out.append({"image_id": ref["file_name"], "bbox": [x / w, y / h, (x + bw) / w, (y + bh) / h]})
    return out


def sc_tune_tune(ckpt: pathlib.Path, world, tok_dir: pathlib.Path, out: pathlib.Path, steps: int,
                 overrides: Sequence[str] = ()) -> pathlib.Path:
    """`ckpt` tuned by SC-Tune's phase loop (one cycle: 2/3 of `steps` describer, then locator steps, batch
    `SC_TUNE_BATCH`; `SC_TUNE`) over the train split's
    referable objects, the describer asked with the world's REG prompt and the locator with its REC prompt
    (`ChatRoles`); written to `out/checkpoint` (reused when an earlier run tuned the same checkpoint with the
    same settings). `tok_dir` and `overrides` (the recipe's) do not apply: the tokenizer is the checkpoint's
    and SC-Tune does not run the recipe's train loop."""
    import shutil

    import jax

    from jaxvlm.conversion.converted import hf_files_of, save_converted
    from jaxvlm.data.shapes_world.tasks import REC_PROMPT, REG_PROMPT
    from jaxvlm.generate.cli import load_model
    from jaxvlm.methods.sc_tune_loop import SCTune, SCTuneConfig
    from jaxvlm.methods.sc_tune_roles import ChatRoles
    from jaxvlm.train import mesh as M
    if overrides:
        print(f"[demo] SC-Tune runs its own loop, not the recipe's: {list(overrides)} do not apply to it", file=sys.stderr)
    records = sc_tune_records(world)
    describer = max(1, round(steps * 2 / 3))
    # the loop stops once its step count exceeds max_steps
    sc = SCTuneConfig(caption_steps=describer, bbox_steps=max(1, steps - describer), max_steps=steps - 1, **SC_TUNE)
    export, run = out / "checkpoint", out / "run"
    digest = _tuning_digest(ckpt, json.dumps([repr(sc), SC_TUNE_BATCH, records]).encode())
    stamp = out / "tuned_from.sha256"
    if export.is_dir() and stamp.is_file() and stamp.read_text() == digest:
        print(f"[demo] SC-Tune: reusing {export}", file=sys.stderr)
        return export
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(export, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    cfg, model, params, tok, proc, _ = load_model(str(ckpt))
    roles = ChatRoles(model, tok, proc, "vicuna_v1", describe=REG_PROMPT, locate=REC_PROMPT.format(expr="{caption}"))
    print(f"[demo] SC-Tune: {len(records)} referable objects; {steps} steps", file=sys.stderr)
    tuner = SCTune(model, params, tok, sc, roles=roles, batch_size=SC_TUNE_BATCH,
                   mesh=M.make_mesh((1, 1, 1), jax.devices()[:1]), max_len=160)
    tuner.train(records, world.image_root, out_dir=run)
    save_converted(export, cfg, jax.device_get(tuner.state.params), hf_files=hf_files_of(ckpt))
    stamp.write_text(digest)
    return export


#: Methods whose column decodes a model tuned for them: name -> tuner(ckpt, world, tok_dir, out, steps,
#: overrides) -> tuned checkpoint.
TUNERS = {"REVERSE": reverse_tune, "CoS": cos_tune, "JUDGER": judger_tune, "SC-Tune": sc_tune_tune}
