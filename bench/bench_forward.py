"""Forward of a ~100M-parameter LLaVA-shaped model (seq 1024, fp32): jaxvlm vs transformers, same run.

Reports the speed ratio and model FLOPs utilisation against this machine's fp32 GEMM peak (the
better of a jax and a torch 2048^3 matmul). Each round runs jax and torch in their own processes, one
after the other (bench/timing.py says why); ratios and utilisations are per round, then the median.

    python bench/bench_forward.py [--seq 1024] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import alternate, best_of, conditions, emit, gemm_peak, median_ratio  # noqa: E402


def model_flops(text, vision, seq: int, n_img_tokens: int) -> float:
    """Matmul FLOPs of one forward as implemented (full, unmasked attention scores)."""
    d, f, L, v = text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.vocab_size
    kv = text.num_key_value_heads * (d // text.num_attention_heads)
    lm = L * (2 * seq * (2 * d * d + 2 * d * kv + 3 * d * f) + 4 * seq * seq * d) + 2 * seq * d * v
    dv, fv, Lv = vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers
    p = n_img_tokens + 1
    vis = Lv * (2 * p * (4 * dv * dv + 2 * dv * fv) + 4 * p * p * dv) + 2 * p * 3 * vision.patch_size ** 2 * dv
    proj = 2 * n_img_tokens * (dv * d + d * d)
    return lm + vis + proj


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3, help="rounds (one jax and one torch process each)")
    ap.add_argument("--calls", type=int, default=4, help="timed calls per process (the best counts)")
    ap.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)   # child process
    args = ap.parse_args()
    if args.side:
        return measure(args)
    runs = alternate(__file__, ["--seq", str(args.seq), "--calls", str(args.calls)], ("jax", "torch"), args.repeats)
    jt, tt = [r["seconds"] for r in runs["jax"]], [r["seconds"] for r in runs["torch"]]
    # The GEMM peak of a round: the better of what its two processes measured after their forwards.
    peaks = [max(a["gemm_peak"], b["gemm_peak"]) for a, b in zip(runs["jax"], runs["torch"])]
    flops = runs["jax"][0]["flops"]
    res = {
        "params_M": runs["jax"][0]["params_M"], "seq": args.seq, "rounds": args.repeats,
        "jaxvlm_s": round(statistics.median(jt), 4), "torch_s": round(statistics.median(tt), 4),
        "speedup_vs_torch": round(median_ratio(tt, jt), 3),
        "gemm_peak_gflops": round(statistics.median(peaks) / 1e9, 1),
        "jaxvlm_mfu": round(statistics.median(flops / t / p for t, p in zip(jt, peaks)), 3),
        "torch_mfu": round(statistics.median(flops / t / p for t, p in zip(tt, peaks)), 3),
        "jaxvlm_compile_s": runs["jax"][0]["compile_s"], "threads": runs["torch"][0]["threads"],
        "per_round_s": {"jax": [round(t, 3) for t in jt], "torch": [round(t, 3) for t in tt]},
        **conditions(),
    }
    print(json.dumps(res, indent=1))


def measure(args) -> None:
    """One side's process: build the model (same seed, same weights), time `calls` forwards."""
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from jaxvlm.conversion.api import llava_from_torch

    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                           num_attention_heads=6, image_size=224, patch_size=14)
    text = transformers.LlamaConfig(vocab_size=32000, hidden_size=640, intermediate_size=1728, num_hidden_layers=12,
                                    num_attention_heads=10, num_key_value_heads=10, max_position_embeddings=4096)
    n_img = (224 // 14) ** 2
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=31999,
                                   image_seq_length=n_img, vision_feature_layer=-2,
                                   vision_feature_select_strategy="default")
    hf = transformers.LlavaForConditionalGeneration(cfg).eval()
    n_params = sum(p.numel() for p in hf.parameters())
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 31000, size=(1, args.seq))
    ids[0, 10:10 + n_img] = 31999
    pix = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    compile_s = None
    if args.side == "jax":
        jcfg, model, params = llava_from_torch(hf)
        del hf                                  # the jax process holds only its own weights
        params = jax.device_put(params)
        fwd = jax.jit(lambda p, i, x: model.apply({"params": p}, i, x).logits)
        jids, jpix = jnp.asarray(ids), jnp.asarray(pix)
        t0 = time.perf_counter()
        fwd(params, jids, jpix).block_until_ready()
        compile_s = round(time.perf_counter() - t0, 2)
        seconds = best_of(lambda: fwd(params, jids, jpix).block_until_ready(), args.calls)
    else:
        ti, tp = torch.tensor(ids), torch.tensor(pix)

        def run_torch():
            with torch.no_grad():
                return hf(input_ids=ti, pixel_values=tp)
        seconds = best_of(run_torch, args.calls)
    emit({"seconds": seconds, "gemm_peak": gemm_peak(), "flops": model_flops(text, vision, args.seq, n_img),
          "params_M": round(n_params / 1e6, 1), "compile_s": compile_s, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
