"""`jaxvlm convert`: Hugging Face checkpoints to jaxvlm and back.

    jaxvlm convert to-jaxvlm llava-v1.5-7b/ ckpt/llava-7b --vision-tower clip-vit-large-patch14-336/ --dtype bfloat16
    jaxvlm convert to-hf ckpt/llava-7b llava-7b-hf/ --image-token-id 32000 --max-shard-size 5GB

to-jaxvlm reads any LLaVA layout (llava-hf, transformers 5, original LLaVA) or a Llama/Qwen2 LM,
and keeps the tokenizer/processor files; to-hf writes safetensors + config.json for transformers.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20, '1000' -> 1000."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("to-jaxvlm", help="HF checkpoint (dir or weight files) -> jaxvlm checkpoint dir")
    a.add_argument("source", nargs="+", help="checkpoint directory, or weight file(s) with config.json beside them")
    a.add_argument("output", help="jaxvlm checkpoint directory to create")
    a.add_argument("--vision-tower", default=None,
                   help="CLIP checkpoint dir for original-LLaVA checkpoints that lack the tower's weights")
    a.add_argument("--layout", default=None, choices=["hub", "hf_saved", "hf_memory", "original"],
                   help="force the LLaVA key layout (detected by default)")
    b = sub.add_parser("to-hf", help="jaxvlm checkpoint dir -> HF safetensors + config.json")
    b.add_argument("source", help="jaxvlm checkpoint directory")
    b.add_argument("output", help="HF checkpoint directory to create")
    b.add_argument("--max-shard-size", type=parse_size, default="4GiB", help="shard above this (default 4GiB)")
    b.add_argument("--image-token-id", type=int, default=None,
                   help="in-vocab image placeholder id (needed for original-LLaVA imports, which use -200)")
    for p in (a, b):
        p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="cast the weights (default: keep)")
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing output (swapped in only once the new one is complete)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from jaxvlm.conversion import llava_io
    from jaxvlm.conversion.converted import hf_files_of, load_converted, save_converted
    from jaxvlm.conversion.table import ConversionError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    progress = not args.no_progress
    try:
        if args.direction == "to-jaxvlm":
            source = args.source[0] if len(args.source) == 1 else args.source
            cfg, params = llava_io.import_checkpoint(source, args.vision_tower, args.dtype, progress=progress,
                                                     **({"layout": args.layout} if args.layout else {}))
            out = save_converted(args.output, cfg, params, hf_files=llava_io.hf_side_files(source),
                                 source=" ".join(args.source), overwrite=args.overwrite)
        else:
            cfg, params = load_converted(args.source)
            out = llava_io.export_checkpoint(cfg, params, args.output, args.dtype, max_shard_bytes=args.max_shard_size,
                                             image_token_id=args.image_token_id, overwrite=args.overwrite,
                                             extra_files=hf_files_of(args.source), progress=progress)
    except (ConversionError, FileNotFoundError, FileExistsError) as e:
        print(f"jaxvlm convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (peak RSS {llava_io.peak_rss_bytes() / 2**30:.2f} GiB)")
    return 0
