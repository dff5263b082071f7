"""Decode speed: jaxvlm's Engine vs transformers `generate`, same model, same run.

A ~100M LLaVA-shaped model (Llama LM 768 x 8 layers, vocab 32000, a small CLIP tower), fp32,
greedy, 128 new tokens (no early stop), batch 1 and batch 8. Reports per batch size:
decode tokens/s (prefill excluded) for both and their ratio, time to first token, jaxvlm's compile
time, and decode speed as a fraction of the weight-streaming bound (bytes of weights read per step /
memory bandwidth; bandwidth measured here with a large numpy copy, or given with --bandwidth-gbs).
Each side runs in its own process (bench/timing.py says why).

    python bench/bench_decode.py [--batch-sizes 1 8] [--new-tokens 128] [--layers 8]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import alternate, emit, median_ratio  # noqa: E402


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
    p.add_argument("--rounds", type=int, default=1, help="rounds (one jax and one torch process each)")
    p.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)        # child process
    p.add_argument("--tokens-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side:
        return measure(args)
    bw = args.bandwidth_gbs or measure_bandwidth_gbs()
    common = ["--batch-sizes", *map(str, args.batch_sizes), "--new-tokens", str(args.new_tokens),
              "--prompt-text", str(args.prompt_text), "--layers", str(args.layers)]
    with tempfile.TemporaryDirectory() as tmp:
        runs = alternate(__file__, common + ["--tokens-dir", tmp], ("jax", "torch"), args.rounds)
        same = {b: float(np.mean(np.load(f"{tmp}/jax_{b}.npy") == np.load(f"{tmp}/torch_{b}.npy")))
                for b in args.batch_sizes}
    info = runs["jax"][0]
    streamed = info["streamed_bytes"]
    print(f"model: {info['params_M']:.1f}M params (LM {info['lm_params_M']:.1f}M), fp32; weights read per decode "
          f"step {streamed / 1e6:.0f} MB; memory bandwidth {bw:.1f} GB/s -> bound {bw * 1e9 / streamed:.1f} steps/s")
    print(f"{info['versions']}; each side in its own process, {args.rounds} round(s), median")
    print(f"\n{'batch':>5} {'jax tok/s':>10} {'hf tok/s':>9} {'ratio':>6} {'jax/bound':>9} "
          f"{'jax TTFT s':>10} {'hf TTFT s':>9} {'compile s':>9} {'same tokens':>11}")
    for b in args.batch_sizes:
        k = str(b)
        j = [r["per_batch"][k] for r in runs["jax"]]
        h = [r["per_batch"][k] for r in runs["torch"]]
        j_tps, h_tps = (statistics.median(x["tps"] for x in rs) for rs in (j, h))
        ratio = median_ratio([x["tps"] for x in j], [x["tps"] for x in h])
        print(f"{b:>5} {j_tps:>10.1f} {h_tps:>9.1f} {ratio:>6.2f} {j_tps / (bw * 1e9 / streamed * b):>9.2f} "
              f"{statistics.median(x['ttft'] for x in j):>10.3f} {statistics.median(x['ttft'] for x in h):>9.3f} "
              f"{j[0]['compile']:>9.1f} {same[b]:>11.2f}")


def measure(args) -> None:
    """One side's process: build the model (same seed, same weights), decode every batch size."""
    import jax
    import torch

    from jaxvlm.conversion.api import llava_from_torch
    from jaxvlm.generate import Engine, SamplerConfig

    hf = build(args)
    cfg, model, params = llava_from_torch(hf)
    text = cfg.text
    n_lm = sum(int(x.size) for x in jax.tree.leaves(params["language_model"]))
    n_all = sum(int(x.size) for x in jax.tree.leaves(params))
    if args.side == "jax":
        del hf                                   # the jax process holds only its own weights
        params = jax.device_put(params)
    else:
        del params
    per_batch = {}
    for b in args.batch_sizes:
        ids, mask, pix = batch_of(b, args.prompt_text, np.random.default_rng(b))
        n = args.new_tokens
        if args.side == "jax":
            max_len = -(-(ids.shape[1] + n) // 64) * 64
            engine = Engine(model, batch_size=b, max_len=max_len, sampler=SamplerConfig())
            ttft, dec, compile_s, toks = bench_jax(engine, params, ids, mask, pix, n)
            tps = b * n / dec
        else:
            ttft, total, toks = bench_hf(torch, hf, ids, mask, pix, n)
            tps, compile_s = b * (n - 1) / max(total - ttft, 1e-9), None     # decode: total minus first token
        np.save(f"{args.tokens_dir}/{args.side}_{b}.npy", np.asarray(toks))
        per_batch[str(b)] = dict(tps=tps, ttft=ttft, compile=compile_s)
    emit({"seconds": per_batch[str(args.batch_sizes[0])]["ttft"], "per_batch": per_batch,
          "params_M": n_all / 1e6, "lm_params_M": n_lm / 1e6,
          "streamed_bytes": (n_lm - text.vocab_size * text.hidden_size) * 4,      # every weight but the embedding
          "versions": f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
                      f"({torch.get_num_threads()} threads)"})


if __name__ == "__main__":
    main()
