"""`jaxvlm sc-tune`: SC-Tune's describer/locator phases on a Qwen-VL-Chat folder or a converted LLaVA.

    jaxvlm sc-tune --checkpoint Qwen-VL-Chat/ --data object365.json --image-root images/ \
        --out out/sc_tune --batch-size 128 --max-steps 1800
    jaxvlm sc-tune --checkpoint llava-1.5-7b-jax/ --template vicuna_v1 --data object365.json ...

`--checkpoint` is the original Qwen-VL-Chat folder (`config.json`, weights, `qwen.tiktoken`), or a
converted jaxvlm LLaVA checkpoint (`jaxvlm convert`), which plays the roles through its chat template
with LLaVA-1.5's REG / REC instructions (`--describe-prompt` / `--locate-prompt` to change them;
`jaxvlm.methods.sc_tune_roles.ChatRoles`). Writes `OUT/metrics.jsonl` (one line per step: phase, mean
IoU reward, baseline, losses, PPO stats) and `OUT/step_N` every `--save-every` steps and at the end:
the source's layout (Qwen-VL-Chat: the original folder's files with the tuned safetensors; LLaVA: a
converted checkpoint in the source's parameter dtype), each folder complete before it appears.
Defaults are the original's (docs/methods.md); the batch is split over all devices (`--mesh`
data,fsdp,tensor).
"""
from __future__ import annotations

import argparse
import logging
import os
import pathlib
import re
import shutil
import sys

import numpy as np

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxvlm.methods.sc_tune_loop import SCTuneConfig
    d = SCTuneConfig()
    parser.add_argument("--checkpoint", required=True, help="Qwen-VL-Chat folder (config.json, weights, qwen.tiktoken) "
                        "or a converted jaxvlm LLaVA checkpoint")
    parser.add_argument("--data", required=True, help="JSON list / JSONL of {image_id, bbox: [x1, y1, x2, y2] in [0, 1]}")
    parser.add_argument("--image-root", required=True, help="folder the image_ids are relative to")
    parser.add_argument("--out", required=True, help="output folder (metrics.jsonl, step_N checkpoints)")
    parser.add_argument("--batch-size", type=int, default=128, help="rows per step, all devices (original: 16 x 8)")
    parser.add_argument("--max-steps", type=int, default=d.max_steps,
                        help="stop once the step count exceeds this (the original's check: 2400 -> 2401 batches)")
    parser.add_argument("--caption-steps", type=int, default=d.caption_steps, help="describer (PPO) steps per phase")
    parser.add_argument("--bbox-steps", type=int, default=d.bbox_steps, help="locator (SFT) steps per phase")
    parser.add_argument("--caption-lr", type=float, default=d.caption_lr)
    parser.add_argument("--bbox-lr", type=float, default=d.bbox_lr)
    parser.add_argument("--caption-new-tokens", type=int, default=d.caption_new_tokens, help="longest caption")
    parser.add_argument("--box-new-tokens", type=int, default=d.box_new_tokens, help="longest locator answer")
    parser.add_argument("--save-every", type=int, default=300)
    parser.add_argument("--train-vit", action="store_true", help="train the whole ViT (default: only its resampler)")
    parser.add_argument("--mask-left-pads", action="store_true",
                        help="mask the prompts' left padding in the teacher-forced log-probs (the original attends to it)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="compute dtype (weights and AdamW state are kept in float32, as the original's bf16 "
                             "mixed precision; step_N folders are written in the checkpoint's own dtype)")
    parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (-1: the rest of the devices)")
    parser.add_argument("--resume", metavar="OUT/step_N", help="continue the run in --out from its step_N folder "
                        "(a phase start, e.g. a multiple of --save-every's default 300)")
    parser.add_argument("--template", default=None, help="LLaVA: the chat template (default: the family's, e.g. vicuna_v1)")
    parser.add_argument("--describe-prompt", default=None, help="LLaVA: the describer's instruction with {box} "
                        "(default: LLaVA-1.5's REG instruction)")
    parser.add_argument("--locate-prompt", default=None, help="LLaVA: the locator's instruction with {caption} "
                        "(default: LLaVA-1.5's REC instruction)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        return _run(args)
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        print(f"jaxvlm sc-tune: {e}", file=sys.stderr)
        return 2


def _checkpoint_dtype(ckpt: pathlib.Path):
    """The dtype of the source folder's weights (`torch_dtype` in its config.json), to write them back in."""
    import json

    import ml_dtypes
    name = json.loads((ckpt / "config.json").read_text()).get("torch_dtype", "float32")
    return {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}.get(name, np.float32)


def _run(args: argparse.Namespace) -> int:
    import jax

    from jaxvlm.conversion import qwen_vl as conv
    from jaxvlm.conversion.converted import CONFIG_FILE
    from jaxvlm.data.qwen_vl_tokenizer import QwenTokenizer
    from jaxvlm.methods.sc_tune_loop import SCTune, SCTuneConfig, read_box_records
    from jaxvlm.models.qwen_vl import QwenVL
    from jaxvlm.train import mesh as M

    if jax.process_count() > 1:
        raise ValueError("jaxvlm sc-tune runs in one process (one host's devices); multi-host feeding is not wired")
    out = pathlib.Path(args.out)
    resume_step = None
    if args.resume:
        m = re.fullmatch(r"step_(\d+)", pathlib.Path(args.resume).name)
        step_dir = pathlib.Path(args.resume)
        if m is None or not ((step_dir / "config.json").is_file() or (step_dir / CONFIG_FILE).is_file()):
            raise FileNotFoundError(f"--resume {args.resume}: expected a step_N folder written by jaxvlm sc-tune")
        resume_step = int(m.group(1))
        later = sorted(p.name for p in out.glob("step_*") if re.fullmatch(r"step_\d+", p.name)
                       and int(p.name[5:]) > resume_step)
        if later:
            raise ValueError(f"{out} already holds {', '.join(later)} beyond --resume {args.resume}; they would be "
                             f"overwritten: move them away first")
    elif (out / "metrics.jsonl").exists() or any(out.glob("step_*")):
        raise ValueError(f"{out} already holds an SC-Tune run (metrics.jsonl / step_*); choose a new --out "
                         f"or continue it with --resume {out}/step_N")
    records = read_box_records(args.data)                  # bad data fails before any compile
    if not pathlib.Path(args.image_root).is_dir():
        raise FileNotFoundError(f"--image-root {args.image_root} is not a folder")
    ckpt = pathlib.Path(args.checkpoint)
    chat = (ckpt / CONFIG_FILE).is_file()     # a converted jaxvlm checkpoint, else the original Qwen-VL-Chat folder
    if not chat:
        for need in ("config.json", "qwen.tiktoken"):
            if not (ckpt / need).is_file():
                raise FileNotFoundError(f"{ckpt / need} is missing: --checkpoint takes a Qwen-VL-Chat folder or a "
                                        f"converted jaxvlm LLaVA checkpoint")
    if not chat and (args.template or args.describe_prompt or args.locate_prompt):
        raise ValueError("--template / --describe-prompt / --locate-prompt are for LLaVA checkpoints; Qwen-VL-Chat "
                         "plays the roles with the original's raw prompts")
    try:
        shape = tuple(int(x) for x in args.mesh.split(","))
    except ValueError:
        raise ValueError(f"--mesh {args.mesh!r}: expected three integers data,fsdp,tensor") from None
    mesh = M.make_mesh(M.MeshConfig.from_shape(shape))
    sc = SCTuneConfig(caption_steps=args.caption_steps, bbox_steps=args.bbox_steps, max_steps=args.max_steps,
                      caption_lr=args.caption_lr, bbox_lr=args.bbox_lr,
                      caption_new_tokens=args.caption_new_tokens, box_new_tokens=args.box_new_tokens, train_vit=args.train_vit,
                      attend_left_pads=not args.mask_left_pads, seed=args.seed)
    if chat:
        return _run_chat(args, ckpt, out, records, sc, mesh, resume_step)
    # weights from the step folder when resuming (the source folder still gives the other files)
    cfg, params = conv.load_original(args.resume or ckpt, dtype=np.float32, show_progress=not args.no_progress)
    saved_dtype = _checkpoint_dtype(ckpt)
    cfg = cfg.with_dtype(args.dtype, "float32")
    tok = QwenTokenizer.from_dir(str(ckpt))
    tuner = SCTune(QwenVL(cfg), params, tok, sc, batch_size=args.batch_size, mesh=mesh)
    del params
    if resume_step is not None:
        tuner.resume(tuner.state.params, resume_step)
    # the source's config.json (dtype flags included) and its other files go beside the tuned weights
    extra = [p for p in ckpt.iterdir() if p.is_file() and p.name not in WEIGHT_INDEXES
             and not p.name.endswith((".safetensors", ".bin"))]

    def export(params, step):
        # the weights folder is written under a temporary name, completed with the source's other
        # files, then renamed: a step_N folder is always whole
        final, tmp = out / f"step_{step}", out / f".step_{step}.partial"
        if tmp.exists():
            shutil.rmtree(tmp)
        conv.save_original(tmp, cfg, params, dtype=saved_dtype)
        for p in extra:
            shutil.copy2(p, tmp / p.name)
        os.replace(tmp, final)

    summary = tuner.train(records, args.image_root, out_dir=out, save_every=args.save_every, export=export,
                          progress=not args.no_progress)
    print(summary)
    return 0


def _run_chat(args: argparse.Namespace, ckpt: pathlib.Path, out: pathlib.Path, records, sc, mesh,
              resume_step: int | None) -> int:
    """A converted LLaVA checkpoint through `ChatRoles`; step_N folders are converted checkpoints."""
    import jax

    from jaxvlm.conversion.converted import hf_files_of, load_converted, save_converted
    from jaxvlm.generate.cli import DEFAULT_TEMPLATES, load_model
    from jaxvlm.methods.sc_tune_loop import SCTune
    from jaxvlm.methods.sc_tune_roles import LLAVA_DESCRIBE, LLAVA_LOCATE, ChatRoles
    from jaxvlm.models.llava import LlavaConfig

    cfg, model, params, tok, proc, family = load_model(str(ckpt))
    if not isinstance(cfg, LlavaConfig):
        raise ValueError(f"{ckpt} is a {type(cfg).__name__} checkpoint; jaxvlm sc-tune tunes Qwen-VL-Chat folders "
                         f"and converted LLaVA checkpoints")
    if resume_step is not None:
        _, params = load_converted(args.resume)
    saved = jax.tree.map(lambda x: np.dtype(x.dtype), params)           # written back in the source's dtypes
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)    # AdamW keeps float32 weights
    model = type(model)(cfg.with_dtype(args.dtype, "float32"))
    roles = ChatRoles(model, tok, proc, args.template or DEFAULT_TEMPLATES[family],
                      describe=args.describe_prompt or LLAVA_DESCRIBE, locate=args.locate_prompt or LLAVA_LOCATE)
    tuner = SCTune(model, params, tok, sc, roles=roles, batch_size=args.batch_size, mesh=mesh)
    del params
    if resume_step is not None:
        tuner.resume(tuner.state.params, resume_step)

    def export(params, step):
        # save_converted writes a temporary sibling and renames it: a step_N folder is always whole
        tuned = jax.tree.map(lambda x, d: np.asarray(x).astype(d), params, saved)
        save_converted(out / f"step_{step}", cfg, tuned, hf_files=hf_files_of(ckpt), source=str(ckpt), overwrite=True)

    summary = tuner.train(records, args.image_root, out_dir=out, save_every=args.save_every, export=export,
                          progress=not args.no_progress)
    print(summary)
    return 0
