"""Decode speed: jaxvlm's Engine vs transformers `generate`, same model, same run.

A ~100M LLaVA-shaped model (Llama LM 768 x 8 layers, vocab 32000, a small CLIP tower), fp32,
greedy, 128 new tokens (no early stop), batch 1 and batch 8. Reports per batch size:
decode tokens/s (prefill excluded) for both and their ratio, time to first token, jaxvlm's compile
time, and decode speed as a fraction of the weight-streaming bound (bytes of weights read per step /
memory bandwidth; bandwidth measured here with a large numpy copy, or given with --bandwidth-gbs).

    python bench/bench_decode.py [--batch-sizes 1 8] [--new-tokens 128] [--layers 8]
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def measure_bandwidth_gbs(n_bytes: int = 1 << 29, repeats: int = 5) -> float:
    """Read + write bandwidth of a large array copy (GB/s), best of a few."""
    a = np.ones(n_bytes // 4, np.float32)
    b = np.empty_like(a)
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best / 1e9


def build(args):
    import torch
    import transformers
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=112, patch_size=14, projection_dim=256)
    text = transformers.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                                    num_hidden_layers=args.layers, num_attention_heads=12, num_key_value_heads=12,
                                    max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=31999,
                                   image_seq_length=64, vision_feature_layer=-2,
                                   vision_feature_select_strategy="default")
    hf = transformers.LlavaForConditionalGeneration(cfg).eval()
    hf.generation_config.eos_token_id = None   # always 128 tokens on both sides
    return hf


def batch_of(b: int, prompt_text: int, rng):
    ids = rng.integers(3, 31000, size=(b, 1 + 64 + prompt_text))
    ids[:, 0] = 1
    ids[:, 1:65] = 31999
    pix = rng.standard_normal((b, 3, 112, 112)).astype(np.float32)
    return ids, np.ones_like(ids), pix


def bench_hf(torch, hf, ids, mask, pix, new):
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pix),
              do_sample=False, pad_token_id=0)
    with torch.no_grad():
        hf.generate(**kw, max_new_tokens=2)            # warm-up
        t = time.perf_counter()
        hf.generate(**kw, max_new_tokens=1)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        out = hf.generate(**kw, max_new_tokens=new)
        total = time.perf_counter() - t
    return ttft, total, out[:, ids.shape[1]:].numpy()


def bench_jax(engine, params, ids, mask, pix, new):
    import jax
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pix)
    t = time.perf_counter()
    state = engine.prefill(params, batch)
    jax.block_until_ready(state.logits)
    first_prefill = time.perf_counter() - t
    t = time.perf_counter()
    out = engine.decode(params, state, new)
    jax.block_until_ready(out.logits)
    first_decode = time.perf_counter() - t
    t = time.perf_counter()
    state = engine.prefill(params, batch)
    jax.block_until_ready(state.logits)
    ttft = time.perf_counter() - t
    times = []
    for _ in range(2):
        t = time.perf_counter()
        out = engine.decode(params, state, new)
        jax.block_until_ready(out.logits)
        times.append(time.perf_counter() - t)
    decode = min(times)
    compile_s = (first_prefill - ttft) + (first_decode - decode)
    toks, _ = out.generated()
    return ttft, decode, compile_s, toks[:ids.shape[0]]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-text", type=int, default=63, help="text tokens after the 64 image tokens")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--bandwidth-gbs", type=float, default=None)
    args = p.parse_args(argv)

    import jax
    import torch

    from jaxvlm.conversion.api import llava_from_torch
    from jaxvlm.generate import Engine, SamplerConfig

    bw = args.bandwidth_gbs or measure_bandwidth_gbs()
    hf = build(args)
    cfg, model, params = llava_from_torch(hf)
    params = jax.device_put(params)
    text = cfg.text
    n_lm = sum(int(x.size) for x in jax.tree.leaves(params["language_model"]))
    n_all = sum(int(x.size) for x in jax.tree.leaves(params))
    streamed = (n_lm - text.vocab_size * text.hidden_size) * 4       # every weight but the embedding table
    print(f"model: {n_all / 1e6:.1f}M params (LM {n_lm / 1e6:.1f}M), fp32; weights read per decode step "
          f"{streamed / 1e6:.0f} MB; memory bandwidth {bw:.1f} GB/s -> bound {bw * 1e9 / streamed:.1f} steps/s")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    rows = []
    for b in args.batch_sizes:
        ids, mask, pix = batch_of(b, args.prompt_text, np.random.default_rng(b))
        max_len = -(-(ids.shape[1] + args.new_tokens) // 64) * 64
        engine = Engine(model, batch_size=b, max_len=max_len, sampler=SamplerConfig())
        j_ttft, j_dec, j_compile, j_toks = bench_jax(engine, params, ids, mask, pix, args.new_tokens)
        h_ttft, h_total, h_toks = bench_hf(torch, hf, ids, mask, pix, args.new_tokens)
        n = args.new_tokens
        h_tps = b * (n - 1) / max(h_total - h_ttft, 1e-9)     # HF's decode: total minus its first token
        j_tps = b * n / j_dec
        bound = bw * 1e9 / streamed * b
        same = float(np.mean(j_toks == h_toks))
        rows.append((b, j_tps, h_tps, j_tps / h_tps, j_tps / bound, j_ttft, h_ttft, j_compile, same))
    print(f"\n{'batch':>5} {'jax tok/s':>10} {'hf tok/s':>9} {'ratio':>6} {'jax/bound':>9} "
          f"{'jax TTFT s':>10} {'hf TTFT s':>9} {'compile s':>9} {'same tokens':>11}")
    for r in rows:
        print(f"{r[0]:>5} {r[1]:>10.1f} {r[2]:>9.1f} {r[3]:>6.2f} {r[4]:>9.2f} {r[5]:>10.3f} {r[6]:>9.3f} "
              f"{r[7]:>9.1f} {r[8]:>11.2f}")


if __name__ == "__main__":
    main()
