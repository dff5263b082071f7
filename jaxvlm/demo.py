"""`jaxvlm demo`: the embedded default, end to end on a 2-core CPU with no downloads.

1. generate the synthetic shapes world (cached) and its BPE tokenizer;
2. train the tiny LLaVA recipe (`configs/shapes_llava.py`) through the sharded train loop, or use
   the checkpoint that recipe produced (`assets/shapes_llava/`, reproduced by `--train`); with
   `--family qwen2_5_vl`, the tiny Qwen2.5-VL recipe (`configs/shapes_qwen2_vl.py`, always trained);
3. decode the test split with `jaxvlm generate` (captions, VQA, POPE adversarial, REC, REG);
4. score it with `jaxvlm eval` (CHAIR, POPE, VQA accuracy, REC Acc@0.5, METEOR) beside baselines;
   each decoding method (`METHODS`: UE, REVERSE, Chain-of-Spot, JUDGER, SC-Tune) adds a column, decoded with its
   `jaxvlm generate` flags from the model or, for those that need one, a copy fine-tuned for it
   (`jaxvlm.demo_tuners`);
5. write PNGs: predicted boxes, attention over the image, a logit-lens heatmap.

    jaxvlm demo --out out/demo              # uses the shipped checkpoint
    jaxvlm demo --out out/demo --train      # retrains it from scratch (stage 0 + 4200 steps; ~15 min on 2 cores)
    jaxvlm demo --out out/demo_qwen --family qwen2_5_vl     # the Qwen2.5-VL recipe, trained from scratch
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import sys
import time
from collections import Counter
from typing import Any, Sequence

from jaxvlm.demo_tuners import JUDGER_CROP_SIZE, JUDGER_LAYER, TUNERS, true_rois

REPO = pathlib.Path(__file__).resolve().parents[1]
ASSET = REPO / "assets" / "shapes_llava"

# The world the shipped checkpoint was trained on (deterministic from the seed).
WORLD = dict(seed=0, n_train=3000, n_val=50, n_test=100, image_size=112)
#: `--family` -> the recipe's config file under configs/ (the LLaVA one has a shipped checkpoint).
RECIPES = {"llava": "shapes_llava.py", "qwen2_5_vl": "shapes_qwen2_vl.py"}
#: The token ids each recipe fixes, by the shapes tokenizer's token they must name.
RECIPE_TOKENS = {"llava": {"image_token_id": "<image>"},
                 "qwen2_5_vl": {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                                "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/demo", help="output directory (world, predictions, report, PNGs)")
    p.add_argument("--family", choices=sorted(RECIPES), default="llava",
                   help="which tiny VLM: LLaVA (shipped checkpoint) or Qwen2.5-VL (trained by the run)")
    p.add_argument("--train", action="store_true", help="train from scratch instead of using the shipped checkpoint")
    p.add_argument("--steps", type=int, default=None, help="train steps (default: the recipe's)")
    p.add_argument("--vision-steps", type=int, default=None,
                   help="dense vision pretraining steps before training (default: the recipe's; 0 skips it)")
    p.add_argument("--vision-images", type=int, default=None,
                   help="images in stage 0's own world (default: the recipe's; 0 trains it on the LM's train split)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key when training (as in `jaxvlm train --set`), repeatable")
    p.add_argument("--n-train", type=int, default=WORLD["n_train"])
    p.add_argument("--n-test", type=int, default=WORLD["n_test"])
    p.add_argument("--checkpoint", default=None, help="use this converted checkpoint instead")
    p.add_argument("--batch-size", type=int, default=32, help="decode batch size")
    p.add_argument("--methods", default=None,
                   help=f"decoding methods to score beside the model, comma-separated (of: {', '.join(METHODS)}; "
                        "'' for none; default: every method the family serves; those that tune the model, REVERSE, CoS, "
                        "JUDGER and SC-Tune, serve LLaVA only)")
    p.add_argument("--save-asset", action="store_true",
                   help=f"write the trained checkpoint to {ASSET.relative_to(REPO)} (what the shipped demo uses)")


# ----------------------------------------------------------------------------- stages


def build_world(out: pathlib.Path, n_train: int, n_test: int):
    from jaxvlm.data.shapes_tokenizer import build_tokenizer
    from jaxvlm.data.shapes_world import generate_world
    w = generate_world(out / "world", seed=WORLD["seed"], n_train=n_train, n_val=WORLD["n_val"], n_test=n_test,
                       image_size=WORLD["image_size"])
    tok_dir = out / "tokenizer"
    tok = build_tokenizer(w, tok_dir)
    return w, tok, tok_dir


def stage0_settings(args: argparse.Namespace) -> dict:
    """The stage-0 keys the command line sets (`--vision-steps`, `--vision-images`)."""
    given = {"steps": args.vision_steps, "images": args.vision_images}
    return {k: v for k, v in given.items() if v is not None}


def recipe(out: pathlib.Path, world, tok_dir: pathlib.Path, steps: int | None = None,
           overrides: tuple[str, ...] = (), vision: dict | None = None, family: str = "llava"):
    """The family's recipe (`configs/shapes_llava.py`, `configs/shapes_qwen2_vl.py`) with this run's
    paths and overrides -> (train Config, stage-0 settings).

    vision: stage-0 settings that replace the recipe's `VISION_PRETRAIN` keys (e.g. `{"steps": 0}`).
    The recipe freezes the tower that stage 0 trained; when stage 0 is skipped (`steps` 0) and no
    `model.vision_init` is given, that freeze is dropped, so a random tower is trained, not frozen.
    The recipe's token ids are checked against the tokenizer in `tok_dir`."""
    import importlib.util

    from transformers import AutoTokenizer

    from jaxvlm.train.config import apply_overrides
    if family not in RECIPES:
        raise ValueError(f"unknown demo family {family!r}; known: {', '.join(sorted(RECIPES))}")
    spec = importlib.util.spec_from_file_location(RECIPES[family][:-3], REPO / "configs" / RECIPES[family])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    sets = [f"data.path={world.llava['train']}", f"data.image_root={world.image_root}",
            f"data.tokenizer={tok_dir}", f"train.workdir={out / 'train'}", f"train.export={out / 'checkpoint'}"]
    if steps is not None:
        sets.append(f"train.steps={steps}")
    cfg = apply_overrides(cfg, sets + list(overrides))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    for key, token in RECIPE_TOKENS[family].items():
        if cfg.model[key] != tok.convert_tokens_to_ids(token):
            raise ValueError(f"{RECIPES[family]}: model.{key}={cfg.model[key]} is not the tokenizer's id of "
                             f"{token} ({tok.convert_tokens_to_ids(token)}, {tok_dir})")
    vp = {**(getattr(mod, "VISION_PRETRAIN", {}) or {}), **(vision or {})}
    if not vp.get("steps") and not cfg.model.get("vision_init"):
        kept = [g for g in cfg.optim.groups if not (g["lr"] is None and g["pattern"].startswith(("vision_tower",
                                                                                                 "visual")))]
        if len(kept) != len(cfg.optim.groups):
            print("[demo] stage 0 skipped: the vision tower is trained with the LM instead of frozen", file=sys.stderr)
            cfg.optim.update(groups=kept)
    return cfg, vp


def train_model(out: pathlib.Path, world, tok_dir: pathlib.Path, steps: int | None,
                overrides: tuple[str, ...] = (), vision: dict | None = None,
                family: str = "llava") -> tuple[pathlib.Path, dict]:
    """The recipe: dense vision pretraining on masks (`jaxvlm.train.dense_vision`; skipped when the
    recipe's `VISION_PRETRAIN`, updated by `vision`, says 0 steps), then `jaxvlm.train.loop.train` from
    that tower. Returns (converted checkpoint dir, summary; the pretraining's history under "vision")."""
    from jaxvlm.train.config import apply_overrides
    from jaxvlm.train.loop import train
    cfg, vp = recipe(out, world, tok_dir, steps, overrides, vision, family)
    history = None
    if vp.get("steps"):
        path, history = pretrain_tower(out, world, cfg, vp)
        cfg = apply_overrides(cfg, [f"model.vision_init={path}"])
    summary = train(cfg)
    if history is not None:
        summary = dict(summary, vision=history)
    return out / "checkpoint", summary


def pretrain_tower(out: pathlib.Path, world, cfg, settings: dict) -> tuple[str, list[dict]]:
    """Dense pretraining of the recipe's vision tower -> params file.

    settings: `pretrain_vision`'s keywords, plus `images`: when > 0, stage 0 trains on the masks of a
    world of its own with that many images (`out/vision_world`, the next seed; the stand-in for
    CLIP's separate pretraining data), else on the LM's train split."""
    from jaxvlm.data.shapes_world import generate_world, vocab
    from jaxvlm.models.llava import LlavaConfig
    from jaxvlm.train import dense_vision as DV
    from jaxvlm.train.loop import image_processor, model_config
    mc = model_config(cfg)
    # LLaVA: the layer its projector reads; Qwen2/2.5-VL: the last block (the merger's input).
    layer = mc.vision_feature_layer if isinstance(mc, LlavaConfig) else -1
    if not isinstance(layer, int):
        raise ValueError(f"dense vision pretraining needs one vision_feature_layer, got {layer!r}")
    print(f"[demo] dense vision pretraining: {settings}", file=sys.stderr)
    settings = dict(settings)
    images = settings.pop("images", 0)
    if images:
        world = generate_world(out / "vision_world", seed=WORLD["seed"] + 1, n_train=images, n_val=0, n_test=0,
                               image_size=getattr(mc.vision, "image_size", WORLD["image_size"]))
    targets = DV.patch_targets(world.instances["train"], world.image_dir("train"), image_processor(mc, cfg.data),
                               mc.vision.patch_size, vocab.COLOUR_NAMES)
    params, history = DV.pretrain_vision(mc.vision, layer, targets, **settings)
    print(f"[demo] vision pretraining: {history[-1]}", file=sys.stderr)
    path = DV.save_vision_params(out / "vision_pretrain" / "vision_tower.msgpack", params)
    (out / "vision_pretrain" / "history.json").write_text(json.dumps(history, indent=1))
    return path, history


def questions(world, split: str = "test") -> dict[str, tuple[list[dict], Any]]:
    """Question files (for `jaxvlm generate`) and annotations (for `jaxvlm eval`) per task."""
    recs = json.load(open(world.llava[split]))
    insts = json.load(open(world.instances[split]))
    images = {im["id"]: im for im in insts["images"]}
    file_to_id = {f"{split}/{im['file_name']}": im["id"] for im in insts["images"]}
    caps, vqa, vqa_ann, rec, rec_ann, reg, reg_ann = [], [], [], [], [], [], []
    for r in recs:
        image = r["image"]
        imid = file_to_id[image]
        if r["id"].endswith("_exist"):   # POPE-format questions: scored by POPE, not VQA
            continue
        turns = r["conversations"]
        for k in range(0, len(turns), 2):
            q = turns[k]["value"].replace("<image>", "").strip()
            a = turns[k + 1]["value"]
            qid = f"{r['id']}_{k // 2}"
            if r["id"].endswith("_caption"):
                caps.append({"question_id": imid, "image_id": imid, "image": image, "text": q})
            elif r["id"].endswith("_vqa"):
                vqa.append({"question_id": qid, "image": image, "text": q})
                vqa_ann.append({"question_id": qid, "answers": [a] * 10})
            elif q.startswith("Give the bounding box"):
                x1, y1, x2, y2 = json.loads(a)
                w, h = images[imid]["width"], images[imid]["height"]
                rec.append({"question_id": qid, "image": image, "text": q})
                rec_ann.append({"question_id": qid, "bbox": [x1 * w, y1 * h, x2 * w, y2 * h], "width": w, "height": h})
            else:
                reg.append({"question_id": qid, "image_id": qid, "image": image, "text": q})
                reg_ann.append({"image_id": qid, "caption": a})
    pope = [json.loads(line) for line in open(world.pope[split]["adversarial"])]
    pope_q = [{"question_id": p["question_id"], "image": f"{split}/{p['image']}", "text": p["text"]} for p in pope]
    return {
        "caption": (caps, [world.instances[split], world.captions[split]]),
        "vqa": (vqa, vqa_ann),
        "pope_adversarial": (pope_q, pope),
        "rec": (rec, rec_ann),
        "reg": (reg, reg_ann),
    }


MAX_NEW = {"caption": 96, "vqa": 8, "pope_adversarial": 6, "rec": 28, "reg": 16}

#: Decoding methods scored beside the plain model: name -> (`jaxvlm generate` flags, tasks).
#: UE contrasts the final layer with its candidate layers' logit lens (jaxvlm.methods.ue). Its own
#: candidates are the first quarter of Vicuna-7B's hidden states (0-7 of 32); here the first quarter of
#: the 4-layer LM's, 0 and 1, chosen per token by its JS rule (its prior was measured on Osprey and does
#: not carry over). Scored where its paper reports: captions (CHAIR), region descriptions (METEOR) and
#: yes/no hallucination (PhD there, POPE here).
#: REVERSE needs a model that writes span tags: `reverse_tune` fine-tunes the checkpoint on the train split's
#: captions with every object phrase tagged <SPAN>..</CN>, and in 43% of them (the original data's share of
#: negative answers) one phrase swapped for an absent shape, tagged </UN>, the answer ending there; then
#: captions are decoded with retrospective resampling, greedy at first (the original's Qwen setting), with
#: the threshold 0.2 on P(</UN>) (the tuned model puts ~0.1-0.2 on every phrase; 0.1 flags nearly all).
#: Chain-of-Spot (CoS) needs a model that asks for a region of interest and answers over the crop:
#: `demo_tuners.cos_tune` fine-tunes the checkpoint on the train split's VQA and existence records in CoS's
#: two-turn form; its column decodes VQA and POPE, as its paper reports (16 new tokens fit the ROI).
#: JUDGER answers over the image and the crop its relative attention picks, from a model `demo_tuners.judger_tune`
#: fine-tuned on such pairs (its stage III without the unreleased judgments); VQA and POPE as well.
#: SC-Tune decodes a model tuned by its describer/locator loop (`demo_tuners.sc_tune_tune`) on the object-level
#: tasks its paper reports (REC, REG) and the image-level ones it must keep (VQA, captions), plain greedy.
METHODS = {"UE": (("--ue-layers", "0,1"), ("caption", "reg", "pope_adversarial")),
           "REVERSE": (("--reverse", "--temperature", "0", "--reverse-threshold", "0.2", "--max-new-tokens", "128"),
                       ("caption",)),     # (tags make a caption ~3 tokens longer per object)
           "CoS": (("--chain-of-spot", "--max-new-tokens", "16"), ("vqa", "pope_adversarial")),
           "CoS-ROI": (("--chain-of-spot", "--max-new-tokens", "16"), ("vqa", "pope_adversarial")),
           "JUDGER": (("--judger", "--judger-layer", str(JUDGER_LAYER), "--judger-crop-size", str(JUDGER_CROP_SIZE)),
                      ("vqa", "pope_adversarial")),
           "SC-Tune": ((), ("rec", "reg", "vqa", "caption"))}
#: Columns that decode another column's tuned model: CoS-ROI is the CoS model given each question's true ROI
#: (`demo_tuners.true_rois`) instead of its own, what its answer turn does when the ROI is right.
TUNED_AS = {"CoS-ROI": "CoS"}
#: Columns whose questions carry more than the text: name -> (questions, world) -> questions.
QUESTIONS_OF = {"CoS-ROI": true_rois}
#: Fine-tuning steps of the methods that decode a model tuned for them (`demo_tuners.TUNERS`; batch 8).
TUNE_STEPS = 400


def decode_all(ckpt: pathlib.Path, world, tasks: dict, out: pathlib.Path, batch_size: int,
               extra: Sequence[str] = (), predictions: str = "predictions",
               questions: str = "questions") -> dict[str, pathlib.Path]:
    """`jaxvlm generate` in batch mode, one engine per task length; `extra` adds its flags (a method's),
    questions go to `out/<questions>/TASK.jsonl`, answers to `out/<predictions>/TASK.jsonl`."""
    from jaxvlm.generate import cli as gen
    preds = {}
    for task, (qs, _) in tasks.items():
        qfile, pfile = out / questions / f"{task}.jsonl", out / predictions / f"{task}.jsonl"
        qfile.parent.mkdir(parents=True, exist_ok=True)
        pfile.parent.mkdir(parents=True, exist_ok=True)
        qfile.write_text("".join(json.dumps(q) + "\n" for q in qs))
        p = argparse.ArgumentParser()
        gen.add_arguments(p)
        args = p.parse_args(["--checkpoint", str(ckpt), "--questions", str(qfile), "--image-folder",
                             str(world.image_root), "--output", str(pfile), "--batch-size", str(batch_size),
                             "--max-new-tokens", str(MAX_NEW[task]), *extra])
        print(f"[demo] decoding {task}: {len(qs)} questions{' (' + ' '.join(extra) + ')' if extra else ''}",
              file=sys.stderr)
        gen.main(args)
        preds[task] = pfile
    return preds


class _PlainShapesExtractor:
    """CHAIR word extraction without nltk data, exact for the shapes vocabulary (regular plurals
    only): used when wordnet/punkt_tab/the POS tagger are not installed (no network here)."""

    def __init__(self, categories):
        self.forms = {c: c for c in categories}
        self.forms.update({(c + "es" if c.endswith(("s", "x", "sh", "ch")) else c + "s"): c for c in categories})

    def __call__(self, caption: str):
        import re

        from jaxvlm.eval.chair import CaptionObjects
        tokens = tuple(self.forms.get(w, w) for w in re.findall(r"[a-z]+", caption.lower()))
        words = tuple(w for w in tokens if w in self.forms.values())
        return CaptionObjects(words, words, tokens)


def shapes_chair_extractor():
    """CHAIR over the shapes world's 12 categories (nltk pipeline when its data is installed)."""
    from jaxvlm.data.shapes_world.vocab import CATEGORIES
    from jaxvlm.eval.chair import ChairExtractor
    from jaxvlm.eval.nltk_data import MissingNLTKDataError
    try:
        return ChairExtractor({c: c for c in CATEGORIES})
    except MissingNLTKDataError as e:
        print(f"[demo] nltk data missing ({str(e).splitlines()[0][:80]}...): CHAIR uses a plain tokenizer, "
              "exact for the shapes vocabulary", file=sys.stderr)
        return _PlainShapesExtractor(CATEGORIES)


def evaluate_all(preds: dict, tasks: dict, world, out: pathlib.Path) -> dict:
    """Each decoded task's metrics (a method may decode only some tasks)."""
    from jaxvlm.eval import evaluate
    r = {}
    if "caption" in preds:
        r["chair"] = evaluate("chair", preds["caption"], tasks["caption"][1], mode="coco",
                              extractor=shapes_chair_extractor())["scores"]
    if "pope_adversarial" in preds:
        r["pope_adversarial"] = evaluate("pope", preds["pope_adversarial"], tasks["pope_adversarial"][1])["scores"]
    if "vqa" in preds:
        r["vqa"] = evaluate("vqa", preds["vqa"], tasks["vqa"][1])["scores"]
    if "rec" in preds:
        r["rec"] = evaluate("rec", preds["rec"], tasks["rec"][1], box_format="llava", square_pad=False)["scores"]
    if "reg" in preds:
        r["reg_meteor"] = evaluate("caption", preds["reg"], tasks["reg"][1], metrics=("METEOR",))["scores"]
    return r


def run_methods(names: Sequence[str], ckpt: pathlib.Path, world, tasks: dict, out: pathlib.Path,
                batch_size: int, tok_dir: pathlib.Path | None = None, tune_steps: int = TUNE_STEPS,
                overrides: Sequence[str] = ()) -> dict[str, dict]:
    """Decode and score each named decoding method (`METHODS`) on its tasks: name -> metrics. A method in
    `TUNERS` decodes a copy of `ckpt` fine-tuned for it (`tune_steps`, recipe `overrides`; `tok_dir`: the
    world's tokenizer)."""
    results, tuned = {}, {}
    for name in names:
        flags, method_tasks = METHODS[name]
        model, tuner = ckpt, TUNED_AS.get(name, name)
        if tuner in TUNERS:
            if tuner not in tuned:
                tuned[tuner] = TUNERS[tuner](ckpt, world, tok_dir or out / "tokenizer", out / tuner.lower(), tune_steps,
                                             overrides=tuple(overrides))
            model = tuned[tuner]
        sub = {k: tasks[k] for k in method_tasks}
        questions = "questions"
        if name in QUESTIONS_OF:
            sub = {k: (QUESTIONS_OF[name](qs, world), ann) for k, (qs, ann) in sub.items()}
            questions = f"questions_{name.lower()}"
        preds = decode_all(model, world, sub, out, batch_size, extra=flags, predictions=f"predictions_{name.lower()}",
                           questions=questions)
        results[name] = evaluate_all(preds, sub, world, out)
        rows = [json.loads(line) for task in method_tasks for line in open(preds[task])]
        if rows and "reverse_attempts" in rows[0]:       # how often REVERSE resampled, for the report
            results[name]["reverse_attempts"] = sum(r["reverse_attempts"] for r in rows) / len(rows)
        if rows and ("roi" in rows[0] or "crop_box" in rows[0]):
            results[name]["crop"] = crop_hits({t: preds[t] for t in method_tasks}, sub, world)
    return results


def _crop_of(row: dict, width: int, height: int) -> tuple[float, float, float, float]:
    """A decoded row's crop in image pixels: JUDGER's `crop_box`, or Chain-of-Spot's `roi` (fractions of the
    padded square; the whole image where it does not parse, as the crop then is)."""
    from jaxvlm.methods.chain_of_spot import parse_roi
    if "crop_box" in row:
        return tuple(row["crop_box"])
    box, side = parse_roi(row["roi"]), max(width, height)
    if box is None or not (box[0] < box[2] and box[1] < box[3]):
        return 0.0, 0.0, float(width), float(height)
    x1, y1, x2, y2 = (v * side for v in box)
    return x1 - (side - width) / 2, y1 - (side - height) / 2, x2 - (side - width) / 2, y2 - (side - height) / 2


def crop_hits(preds: dict[str, pathlib.Path], tasks: dict, world, split: str = "test") -> dict:
    """Where a method looked: over the questions about objects that are present (`tasks.question_objects`),
    the share whose crop (Chain-of-Spot's ROI, JUDGER's crop box) holds the centre of every such object
    (`hit`), and the share a crop of the same size placed uniformly at random would hold (`random`, the exact
    expectation). A crop that finds the objects scores above `random`."""
    from jaxvlm.data.shapes_world.tasks import question_objects
    from jaxvlm.data.shapes_world.world import scenes_by_file
    scenes = scenes_by_file(json.load(open(world.instances[split])))
    hit = chance = n = 0.0
    for task, path in preds.items():
        questions = {q["question_id"]: q for q in tasks[task][0]}
        for line in open(path):
            row = json.loads(line)
            q = questions[row["question_id"]]
            im, scene = scenes[pathlib.PurePosixPath(q["image"]).name]
            about = question_objects(q["text"], scene, im["width"])
            if not about:
                continue
            x1, y1, x2, y2 = _crop_of(row, im["width"], im["height"])
            first_x, last_x = min(o.cx for o in about), max(o.cx for o in about)      # the centres' extent
            first_y, last_y = min(o.cy for o in about), max(o.cy for o in about)
            n += 1
            hit += x1 <= first_x and last_x <= x2 and y1 <= first_y and last_y <= y2
            chance += (_placed_at_random(x2 - x1, first_x, last_x, im["width"])
                       * _placed_at_random(y2 - y1, first_y, last_y, im["height"]))
    return {"hit": hit / n if n else None, "random": chance / n if n else None, "questions": int(n)}


def _placed_at_random(side: float, first: float, last: float, extent: float) -> float:
    """P(an interval of `side` placed uniformly within [0, extent] covers [first, last])."""
    room = extent - side
    if room <= 0:
        return 1.0 if side >= last - first else 0.0
    return max(0.0, min(room, first) - max(0.0, last - side)) / room


def baselines(world, tasks: dict, seed: int = 0) -> dict:
    """Reference points the trained model must beat (computed on the same test questions)."""
    from jaxvlm.data.shapes_world.vocab import CATEGORIES, COLOURS
    from jaxvlm.eval import evaluate
    from jaxvlm.eval.io import load_predictions
    rng = random.Random(seed)
    out = {}
    # VQA: always answer the most frequent test answer.
    answers = Counter(a["answers"][0] for a in tasks["vqa"][1])
    major = answers.most_common(1)[0][0]
    vq = load_predictions([{"question_id": q["question_id"], "text": major} for q in tasks["vqa"][0]])
    out["vqa_majority"] = {"answer": major, **evaluate("vqa", vq, tasks["vqa"][1])["scores"]}
    # REC: the centre half of the image.
    rq = load_predictions([{"question_id": q["question_id"], "text": "[0.25, 0.25, 0.75, 0.75]"}
                           for q in tasks["rec"][0]])
    out["rec_centre_box"] = evaluate("rec", rq, tasks["rec"][1], box_format="llava", square_pad=False)["scores"]
    # Captions: as many random objects as the image has.
    insts = json.load(open(world.instances["test"]))
    n_obj = Counter(a["image_id"] for a in insts["annotations"])
    colours = list(COLOURS)
    cq = []
    for q in tasks["caption"][0]:
        objs = [f"a {rng.choice(colours)} {rng.choice(CATEGORIES)}" for _ in range(n_obj[q["image_id"]])]
        cq.append({"question_id": q["question_id"], "image_id": q["image_id"],
                   "text": "The image shows " + ", ".join(objs) + "."})
    out["chair_random_objects"] = evaluate("chair", load_predictions(cq, id_key="image_id"), tasks["caption"][1],
                                           mode="coco", extractor=shapes_chair_extractor())["scores"]
    return out


def pictures(ckpt: pathlib.Path, world, tasks: dict, preds: dict, out: pathlib.Path) -> list[str]:
    """Predicted vs true box, attention of the last prompt token over the image, a logit lens."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from PIL import Image

    from jaxvlm.data.chat_templates import get_template
    from jaxvlm.generate.cli import DEFAULT_TEMPLATES, encode_request, load_model
    from jaxvlm.viz import save_attention_overlay, save_logit_lens_heatmap

    cfg, model, params, tok, proc, family = load_model(str(ckpt))
    pngs = []
    rec_q, rec_ann = tasks["rec"]
    pred = {json.loads(line)["question_id"]: json.loads(line)["answer"] for line in open(preds["rec"])}
    q, ann = rec_q[0], rec_ann[0]
    img = draw_rec_boxes(Image.open(world.image_root / q["image"]).convert("RGB"), ann["bbox"],
                         pred.get(q["question_id"], ""))
    path = out / "rec_boxes.png"
    img.resize((img.width * 3, img.height * 3), Image.NEAREST).save(path)
    pngs.append(str(path))

    # one forward over a VQA prompt: attention over the image and every layer's logit lens
    vq = tasks["vqa"][0][0]
    image = Image.open(world.image_root / vq["image"]).convert("RGB")
    ids, pix = encode_request(cfg, tok, proc, get_template(DEFAULT_TEMPLATES[family]), vq["text"], image)
    layer = cfg.text.num_layers - 1
    kw = dict(output_hidden_states=True, attn_layers=(layer,))
    if family == "qwen2_vl":     # patch rows + (t, h, w); the image tokens form the merged grid
        rows, thw = pix
        o = model.apply({"params": params}, jnp.asarray(ids)[None], jnp.asarray(rows), jnp.asarray(thw)[None], **kw)
        m = cfg.vision.spatial_merge_size
        grid, side = (int(thw[1]) // m, int(thw[2]) // m), (int(thw[2]) * cfg.vision.patch_size,
                                                            int(thw[1]) * cfg.vision.patch_size)
    else:
        o = model.apply({"params": params}, jnp.asarray(ids)[None], jnp.asarray(pix)[None], **kw)
        g = cfg.vision.image_size // cfg.vision.patch_size
        grid, side = (g, g), (cfg.vision.image_size,) * 2
    img_pos = np.nonzero(np.asarray(o.image_token_mask[0]))[0]
    attn = np.asarray(o.attentions[0, 0, :, -1, :]).mean(0)[img_pos]
    pngs.append(save_attention_overlay(np.asarray(image.resize(side)), attn, grid,
                                       str(out / "attention_over_image.png"),
                                       title=f"layer {layer}: last prompt token -> image ({vq['text'][:40]}...)"))
    lens = jax.vmap(lambda h: model.apply({"params": params}, h, True, method="logit_lens"))(o.hidden_states)
    tail = slice(len(ids) - 12, len(ids))
    pngs.append(save_logit_lens_heatmap(np.asarray(lens[:, 0, tail]), tok.convert_ids_to_tokens(list(ids[tail])),
                                        str(out / "logit_lens.png"), decode=tok.convert_ids_to_tokens))
    return pngs


def draw_rec_boxes(img, gt_box, answer: str):
    """The reference box (`[x1, y1, x2, y2]` px) in green and the answer's box (LLaVA `[x1, y1, x2, y2]`
    fractions) in red, on a copy of `img`; an unparsable answer draws no red box."""
    from PIL import ImageDraw

    from jaxvlm.eval.grounding import parse_box
    img = img.copy()
    draw = ImageDraw.Draw(img)
    draw.rectangle(list(gt_box), outline=(0, 255, 0), width=2)
    parsed = parse_box(answer, "llava")
    if parsed is not None:
        x1, y1, x2, y2 = parsed[1]
        (x1, x2), (y1, y2) = sorted((x1, x2)), sorted((y1, y2))   # a weak model may swap corners
        draw.rectangle([x1 * img.width, y1 * img.height, x2 * img.width, y2 * img.height], outline=(255, 0, 0), width=2)
    return img


def format_table(metrics: dict, base: dict, methods: dict[str, dict] | None = None) -> str:
    """The demo's table: the model, each decoding method (its metrics, '-' where it decoded no such
    task), and the baseline the model must beat. Metrics are `evaluate_all`'s results."""
    methods = methods or {}
    centre, chair_rand = base["rec_centre_box"], base["chair_random_objects"]
    rows = [   # label, (task, metric), baseline, what the baseline is
        ("VQA accuracy", ("vqa", "accuracy"), base["vqa_majority"].get("accuracy"),
         f"majority answer '{base['vqa_majority']['answer']}'"),
        ("REC Acc@0.5", ("rec", "acc@0.5"), centre.get("acc@0.5"), "centre box"),
        ("REC mean IoU", ("rec", "mean_iou"), centre.get("mean_iou"), "centre box"),
        ("CHAIR-i (captions)", ("chair", "CHAIRi"), chair_rand.get("CHAIRi"), "random-object captioner"),
        ("CHAIR-s (captions)", ("chair", "CHAIRs"), chair_rand.get("CHAIRs"), "random-object captioner"),
        ("Recall (captions)", ("chair", "Recall"), chair_rand.get("Recall"), "random-object captioner"),
        ("POPE adv. accuracy", ("pope_adversarial", "accuracy"), 0.5, "chance"),
        ("POPE adv. F1", ("pope_adversarial", "f1"), None, ""),
        ("POPE adv. yes-ratio", ("pope_adversarial", "yes_ratio"), 0.5, "balanced"),
        ("REG METEOR", ("reg_meteor", "METEOR"), None, ""),
        ("Crop on the objects", ("crop", "hit"), None, "CoS/JUDGER: crop holds the asked-about objects"),
        ("  same-size random crop", ("crop", "random"), None, "(the share a random crop would hold)"),
    ]
    fmt = lambda v: f"{v:8.3f}" if isinstance(v, (int, float)) else f"{'-':>8s}"      # noqa: E731
    head = "".join(f" {m[:8]:>8s}" for m in methods)
    lines = [f"{'metric':24s} {'model':>8s}{head} {'baseline':>9s}  baseline is", "-" * (70 + 9 * len(methods))]
    for label, (task, key), b, what in rows:
        cols = "".join(" " + fmt(m.get(task, {}).get(key)) for m in (metrics, *methods.values()))
        fb = f"{b:9.3f}" if isinstance(b, (int, float)) else f"{'':>9s}"
        lines.append(f"{label:24s}{cols} {fb}  {what}")
    return "\n".join(lines)


def save_asset(ckpt: pathlib.Path, tok_dir: pathlib.Path, asset: pathlib.Path = ASSET) -> pathlib.Path:
    """A converted checkpoint -> `assets/shapes_llava/` (fp32 safetensors + config + tokenizer)."""
    import shutil

    import jax
    import numpy as np

    from jaxvlm.conversion.converted import load_converted
    from jaxvlm.conversion.io import write_safetensors
    from jaxvlm.models.config_io import config_to_dict
    cfg, params = load_converted(ckpt)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    tmp = asset.with_name(asset.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tokenizer").mkdir(parents=True)
    write_safetensors(tmp / "params.safetensors", sorted(flat.items()))
    (tmp / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    for f in sorted(os.listdir(tok_dir)):
        shutil.copy2(pathlib.Path(tok_dir) / f, tmp / "tokenizer" / f)
    (tmp / "README.md").write_text(
        "The shapes-world LLaVA the embedded default uses, trained by this repository's recipe:\n\n"
        "    jaxvlm demo --out out/demo --train --save-asset\n\n"
        f"({WORLD}, configs/shapes_llava.py). Loaded by `jaxvlm demo`.\n")
    shutil.rmtree(asset, ignore_errors=True)
    os.replace(tmp, asset)
    return asset


def shipped_checkpoint(out: pathlib.Path) -> pathlib.Path:
    """The recipe's checkpoint from `assets/` (safetensors + config + tokenizer) -> a converted dir."""
    from jaxvlm.conversion.converted import save_converted
    from jaxvlm.conversion.io import open_checkpoint
    from jaxvlm.models.config_io import config_from_dict
    cfg = config_from_dict(json.loads((ASSET / "config.json").read_text()))
    reader = open_checkpoint(str(ASSET / "params.safetensors"))
    params: dict = {}
    for key in reader.keys():
        node = params
        parts = key.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = reader.get(key).astype("float32")
    hf = [ASSET / "tokenizer" / f for f in sorted(os.listdir(ASSET / "tokenizer"))]
    return save_converted(out / "checkpoint_shipped", cfg, params, hf_files=hf, source=str(ASSET), overwrite=True)


def main(args) -> int:
    trains = not args.checkpoint and (args.train or args.family != "llava")   # only LLaVA's checkpoint ships
    if args.set and not trains:
        raise SystemExit("jaxvlm demo: --set overrides the training recipe, so it needs --train and no --checkpoint "
                         "(a given or shipped checkpoint is used as it is)")
    if args.save_asset and args.family != "llava":
        raise SystemExit(f"jaxvlm demo: --save-asset writes {ASSET.relative_to(REPO)}, the LLaVA recipe's checkpoint; "
                         f"--family {args.family} has no shipped asset")
    # the tuners fine-tune with the LLaVA recipe and export a LLaVA checkpoint
    served = [m for m in METHODS if args.family == "llava" or TUNED_AS.get(m, m) not in TUNERS]
    given = ",".join(served) if args.methods is None else args.methods
    method_names = [m.strip() for m in given.split(",") if m.strip()]
    unknown = [m for m in method_names if m not in METHODS]
    if unknown:
        raise SystemExit(f"jaxvlm demo: unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    unserved = [m for m in method_names if m not in served]
    if unserved:
        raise SystemExit(f"jaxvlm demo: {', '.join(unserved)} fine-tunes the LLaVA recipe's model; --family "
                         f"{args.family} serves {', '.join(served)}")
    t0 = time.perf_counter()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    world, tok, tok_dir = build_world(out, args.n_train, args.n_test)
    timings["world_s"] = round(time.perf_counter() - t0, 1)
    train_summary = None
    if args.checkpoint:
        ckpt = pathlib.Path(args.checkpoint)
    elif trains or not (ASSET / "params.safetensors").is_file():
        t = time.perf_counter()
        ckpt, train_summary = train_model(out, world, tok_dir, args.steps, overrides=tuple(args.set),
                                          vision=stage0_settings(args), family=args.family)
        timings["train_s"] = round(time.perf_counter() - t, 1)
        if args.save_asset:
            print(f"[demo] wrote {save_asset(ckpt, tok_dir)}", file=sys.stderr)
    else:
        ckpt = shipped_checkpoint(out)
    tasks = questions(world, "test")
    t = time.perf_counter()
    preds = decode_all(ckpt, world, tasks, out, args.batch_size)
    timings["decode_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    metrics = evaluate_all(preds, tasks, world, out)
    base = baselines(world, tasks)
    timings["eval_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    methods = run_methods(method_names, ckpt, world, tasks, out, args.batch_size, tok_dir)
    if method_names:
        timings["methods_s"] = round(time.perf_counter() - t, 1)
    pngs = pictures(ckpt, world, tasks, preds, out)
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    report = {"checkpoint": str(ckpt), "metrics": metrics, "methods": methods, "baselines": base, "train": train_summary,
              "timings": timings, "pngs": pngs, "n_questions": {k: len(v[0]) for k, v in tasks.items()}}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(format_table(metrics, base, methods))
    print(f"\nPNGs: {', '.join(pngs)}\nreport: {out / 'report.json'}\ntime: {timings}")
    return 0
