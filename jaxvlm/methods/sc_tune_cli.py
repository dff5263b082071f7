"""`jaxvlm sc-tune`: SC-Tune's describer/locator phases on a Qwen-VL-Chat checkpoint folder.

    jaxvlm sc-tune --checkpoint Qwen-VL-Chat/ --data object365.json --image-root images/ \
        --out out/sc_tune --batch-size 128 --max-steps 1800

`--checkpoint` is the original folder (`config.json`, weights, `qwen.tiktoken`). Writes
`OUT/metrics.jsonl` (one line per step: phase, mean IoU reward, baseline, losses, PPO stats) and
`OUT/step_N` every `--save-every` steps and at the end: the same folder layout with the tuned
weights (safetensors) and the source's other files (tokenizer, remote code), each folder complete
before it appears. Defaults are the original's (docs/methods.md); the batch is split over all
devices (`--mesh` data,fsdp,tensor).
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
    parser.add_argument("--checkpoint", required=True, help="Qwen-VL-Chat folder (config.json, weights, qwen.tiktoken)")
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
        if m is None or not (pathlib.Path(args.resume) / "config.json").is_file():
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
    for need in ("config.json", "qwen.tiktoken"):
        if not (ckpt / need).is_file():
            raise FileNotFoundError(f"{ckpt / need} is missing: --checkpoint takes a Qwen-VL-Chat folder")
    try:
        shape = tuple(int(x) for x in args.mesh.split(","))
    except ValueError:
        raise ValueError(f"--mesh {args.mesh!r}: expected three integers data,fsdp,tensor") from None
    mesh = M.make_mesh(M.MeshConfig.from_shape(shape))
    # weights from the step folder when resuming (the source folder still gives the other files)
    cfg, params = conv.load_original(args.resume or ckpt, dtype=np.float32, show_progress=not args.no_progress)
    saved_dtype = _checkpoint_dtype(ckpt)
    cfg = cfg.with_dtype(args.dtype, "float32")
    tok = QwenTokenizer.from_dir(str(ckpt))
    sc = SCTuneConfig(caption_steps=args.caption_steps, bbox_steps=args.bbox_steps, max_steps=args.max_steps,
                      caption_lr=args.caption_lr, bbox_lr=args.bbox_lr,
                      caption_new_tokens=args.caption_new_tokens, box_new_tokens=args.box_new_tokens, train_vit=args.train_vit,
                      attend_left_pads=not args.mask_left_pads, seed=args.seed)
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
