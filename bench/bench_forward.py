"""Forward of a ~100M-parameter LLaVA-shaped model (seq 1024, fp32): jaxvlm vs transformers, same run.

Reports the speed ratio and model FLOPs utilisation against this machine's fp32 GEMM peak,
measured in the same run (the better of a jax and a torch large square matmul).

    python bench/bench_forward.py [--seq 1024] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def gemm_peak(n: int = 2048, repeats: int = 5) -> float:
    import jax
    import jax.numpy as jnp
    import torch
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best.append(time.perf_counter() - t)
    ta = torch.ones(n, n)
    torch.mm(ta, ta)
    tb = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(ta, ta)
        tb.append(time.perf_counter() - t)
    flops = 2 * n ** 3
    return max(flops / min(best), flops / min(tb))


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
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

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
    jcfg, model, params = llava_from_torch(hf)
    params = jax.device_put(params)

    rng = np.random.default_rng(0)
    ids = rng.integers(3, 31000, size=(1, args.seq))
    ids[0, 10:10 + n_img] = 31999
    pix = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)

    fwd = jax.jit(lambda p, i, x: model.apply({"params": p}, i, x).logits)
    t0 = time.perf_counter()
    fwd(params, jnp.asarray(ids), jnp.asarray(pix)).block_until_ready()
    compile_s = time.perf_counter() - t0
    jt = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        fwd(params, jnp.asarray(ids), jnp.asarray(pix)).block_until_ready()
        jt.append(time.perf_counter() - t)

    ti, tp = torch.tensor(ids), torch.tensor(pix)
    with torch.no_grad():
        hf(input_ids=ti, pixel_values=tp)
        tt = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            hf(input_ids=ti, pixel_values=tp)
            tt.append(time.perf_counter() - t)

    peak = gemm_peak()
    flops = model_flops(text, vision, args.seq, n_img)
    res = {
        "params_M": round(n_params / 1e6, 1), "seq": args.seq,
        "jaxvlm_s": round(min(jt), 4), "torch_s": round(min(tt), 4), "speedup_vs_torch": round(min(tt) / min(jt), 3),
        "gemm_peak_gflops": round(peak / 1e9, 1),
        "jaxvlm_mfu": round(flops / min(jt) / peak, 3), "torch_mfu": round(flops / min(tt) / peak, 3),
        "jaxvlm_compile_s": round(compile_s, 2), "threads": torch.get_num_threads(),
    }
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
