"""Peak memory of checkpoint conversion: a ~1 GB fp32 LLaVA-shaped HF checkpoint (random weights,
written to a temp dir) -> jaxvlm (orbax) -> HF again, each direction in a fresh subprocess.

Reports peak RSS as a multiple of the checkpoint size, both whole-process and above the process's
baseline after imports (jax + orbax + numpy alone take a few hundred MB). Target: <= 1.3x.

    python bench/bench_convert.py [--gb 1.0] [--dtype float32|bfloat16] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time


def peak_rss() -> int:
    """High-water RSS of this process (VmHWM; unlike ru_maxrss it is not inherited across fork)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Start the high-water mark afresh (Linux >= 4.0), so imports are not counted as the peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def llava_shaped(target_bytes: float):
    """A LLaVA-1.5-like config (vocab 32064, CLIP tower, mlp2x projector) of about `target_bytes` fp32."""
    from jaxvlm.models.clip import CLIPVisionConfig
    from jaxvlm.models.llama import LMConfig
    from jaxvlm.models.llava import LlavaConfig
    vision = CLIPVisionConfig(hidden_size=512, intermediate_size=2048, num_layers=12, num_heads=8, image_size=224,
                              patch_size=14)
    d, ffn, vocab = 1024, 2816, 32064
    per_layer = 4 * d * d + 3 * d * ffn + 2 * d
    fixed = 2 * vocab * d + 40e6   # embeddings + head + tower/projector (approx.)
    layers = max(1, round((target_bytes / 4 - fixed) / per_layer))
    text = LMConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ffn, num_layers=layers, num_heads=16,
                    rms_norm_eps=1e-5)
    return LlavaConfig(text=text, vision=vision, image_token_id=32000)


def make_checkpoint(out: pathlib.Path, gb: float) -> int:
    import jax
    import numpy as np

    from jaxvlm.conversion import llava_io
    cfg = llava_shaped(gb * 1e9)
    shapes = llava_io._abstract_llava(cfg)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (rng.standard_normal(s.shape, np.float32) * 0.02), shapes)
    # Two shards + index, as real checkpoints come.
    llava_io.export_llava(cfg, params, out, max_shard_bytes=int(gb * 1e9 / 2) + 1, progress=False)
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def child(direction: str, src: str, dst: str, dtype: str | None) -> None:
    """Runs in a fresh process; prints one JSON line."""
    from jaxvlm.conversion import llava_io
    from jaxvlm.conversion.converted import load_converted, save_converted
    import orbax.checkpoint  # noqa: F401 - imported before the baseline is taken
    base_peak, base_now = peak_rss(), current_rss()
    reset_peak_rss()
    t = time.perf_counter()
    if direction == "to-jaxvlm":
        cfg, params = llava_io.import_llava(src, dtype=dtype, progress=False)
        after_import = peak_rss()
        save_converted(dst, cfg, params)
    else:
        cfg, params = load_converted(src)
        after_import = peak_rss()
        llava_io.export_llava(cfg, params, dst, dtype=dtype, progress=False)
    print(json.dumps({"baseline_peak": base_peak, "baseline_now": base_now, "after_read": after_import,
                      "peak": peak_rss(), "seconds": time.perf_counter() - t}))


def run_child(direction, src, dst, dtype) -> dict:
    cmd = [sys.executable, __file__, "--child", direction, str(src), str(dst)] + (["--dtype", dtype] if dtype else [])
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--dtype", default=None, help="cast on import (default: keep fp32)")
    ap.add_argument("--keep", default=None, help="work in this dir and keep it")
    ap.add_argument("--child", nargs=3, metavar=("DIRECTION", "SRC", "DST"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child, args.dtype)

    work = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        t = time.perf_counter()
        size = make_checkpoint(work / "hf", args.gb)
        print(f"checkpoint: {size / 2**30:.2f} GiB fp32 (written in {time.perf_counter() - t:.1f} s)")
        rows = {"to-jaxvlm": run_child("to-jaxvlm", work / "hf", work / "jax", args.dtype),
                "to-hf": run_child("to-hf", work / "jax", work / "hf2", None)}
        out_size = {"to-jaxvlm": size * (0.5 if args.dtype == "bfloat16" else 1.0)}
        out_size["to-hf"] = out_size["to-jaxvlm"]
        print(f"{'direction':10s} {'peak GiB':>9s} {'base GiB':>9s} {'peak/ckpt':>10s} {'(peak-base)/ckpt':>17s} "
              f"{'time s':>7s}")
        for name, r in rows.items():
            print(f"{name:10s} {r['peak'] / 2**30:9.2f} {r['baseline_now'] / 2**30:9.2f} "
                  f"{r['peak'] / size:10.2f} {(r['peak'] - r['baseline_now']) / size:17.2f} {r['seconds']:7.1f}")
        print(json.dumps({"checkpoint_bytes": size, **rows}))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
