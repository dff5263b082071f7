"""Forward speed, jaxvlm vs transformers, on a ~100M-parameter Qwen2.5-VL-shaped model:
one 448x448 image (32x32 patches -> 256 merged tokens) + 512 text tokens. Same weights in both
(converted from the torch model); prints the steady-state times and the torch/jax ratio, each side
in its own process, alternating (bench/timing.py).

Each side runs on its framework's GPU when it sees one (else the CPU; both sides print their device), in
fp32 (default; true fp32 matmuls on both sides, no TF32) or bf16 (`--dtype bfloat16`: weights and activations, as a bf16 checkpoint runs).
`--save-logits DIR` keeps each side's logits as `DIR/{jax,torch}_{dtype}.npy`, for numerics checks
across dtypes (bf16 against the fp32 reference).

    python bench/bench_qwen2_vl.py [--repeats 3] [--threads 2] [--dtype bfloat16] [--calls 20]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import alternate, best_of, conditions, emit, median_ratio  # noqa: E402

IMG, VID, VS, VE = 32000, 32001, 32002, 32003


def hf_model(transformers, torch):
    torch.manual_seed(0)
    text = dict(vocab_size=32064, hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=8,
                num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]})
    vision = dict(depth=12, hidden_size=384, intermediate_size=1024, num_heads=6, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, out_hidden_size=512, fullatt_block_indexes=[2, 5, 8, 11])
    cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMG,
                                        video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3, help="rounds (one jax and one torch process each)")
    ap.add_argument("--calls", type=int, default=4, help="timed calls per process (the best counts)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--save-logits", metavar="DIR", help="keep both sides' logits as DIR/{side}_{dtype}.npy")
    ap.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)     # child process
    ap.add_argument("--logits", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return measure(args)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.save_logits or tmp
        os.makedirs(out, exist_ok=True)
        runs = alternate(__file__, ["--calls", str(args.calls), "--threads", str(args.threads), "--logits", out,
                                    "--dtype", args.dtype], ("jax", "torch"), args.repeats)
        ours = np.load(f"{out}/jax_{args.dtype}.npy").astype(np.float32)
        ref = np.load(f"{out}/torch_{args.dtype}.npy").astype(np.float32)
        err = float(np.abs(ours - ref).max() / np.abs(ref).max())
        fp32_ref = f"{out}/torch_float32.npy"
        if args.dtype != "float32" and os.path.exists(fp32_ref):
            # Each side's reduced-precision logits against torch's fp32 ones (an earlier run into the same
            # DIR): max error over the logits' range, and how often the argmax token agrees.
            ref32 = np.load(fp32_ref)
            for name, x in (("jaxvlm", ours), ("transformers", ref)):
                print(f"{name} {args.dtype} vs fp32 reference: max rel err "
                      f"{np.abs(x - ref32).max() / np.abs(ref32).max():.2e}, argmax agreement "
                      f"{(x.argmax(-1) == ref32.argmax(-1)).mean():.4f}")
    jt, tt = [r["seconds"] for r in runs["jax"]], [r["seconds"] for r in runs["torch"]]
    print(runs["jax"][0]["info"])
    print(runs["torch"][0]["info"])
    print(f"conditions: {conditions()}")
    print(f"jax compile: {runs['jax'][0]['compile_s']:.2f}s")
    print(f"{args.dtype} forward (median of {args.repeats} rounds, each side in its own process): jaxvlm "
          f"{statistics.median(jt) * 1e3:.1f} ms, transformers {statistics.median(tt) * 1e3:.1f} ms, "
          f"speed-up {median_ratio(tt, jt):.2f}x  (logits rel err {err:.1e})")


def measure(args) -> None:
    """One side's process: build the model (same seed, same weights), time `calls` forwards."""
    bf16 = args.dtype == "bfloat16"
    if not bf16:     # true fp32 matmuls (no TF32 / bf16 passes on a GPU), as torch's default is
        jax.config.update("jax_default_matmul_precision", "highest")
    import torch
    import transformers
    from jaxvlm.conversion.qwen2_vl import qwen2_vl_from_torch
    from jaxvlm.models.params import count_params

    if args.threads:
        torch.set_num_threads(args.threads)
    if not bf16:     # cuDNN convolutions (the patch embedding's Conv3d) default to TF32 on a GPU: keep them fp32
        torch.backends.cudnn.allow_tf32 = False
    # jax takes its default device by itself; torch moves to CUDA when it sees it. The torch process never
    # asks jax for a backend (jax would reserve most of the GPU's memory there).
    gpu = args.side == "torch" and torch.cuda.is_available()
    tdev = "cuda" if gpu else "cpu"
    hf = hf_model(transformers, torch)
    rng = np.random.default_rng(0)
    grid = np.array([[1, 32, 32]])                                   # 448 x 448 px
    pix = rng.standard_normal((1024, 1176)).astype(np.float32)
    text = rng.integers(3, 30000, size=512)
    ids = np.concatenate([[1, VS], np.full(256, IMG), [VE], text])[None]
    mm = (ids == IMG).astype(np.int64)
    info, compile_s = "", None
    if args.side == "jax":
        cfg, model, params = qwen2_vl_from_torch(hf, dtype=jnp.bfloat16 if bf16 else None)
        del hf                                 # the jax process holds only its own weights
        if bf16:
            model = type(model)(cfg.with_dtype("bfloat16"))
        params = jax.device_put(params)        # resident weights, as torch's are (not re-sent every call)
        info = (f"params: {count_params(params) / 1e6:.1f}M, tokens: {ids.shape[1]} (256 image + 512 text + 3), "
                f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch threads: {torch.get_num_threads()}")
        fwd = jax.jit(lambda p, i, x, g: model.apply({"params": p}, i, x, g).logits)
        jargs = (params, jnp.asarray(ids), jnp.asarray(pix, jnp.bfloat16 if bf16 else jnp.float32), jnp.asarray(grid))
        t0 = time.perf_counter()
        fwd.lower(*jargs).compile()
        compile_s = time.perf_counter() - t0
        run = lambda: fwd(*jargs).block_until_ready()             # noqa: E731
    else:
        hf = hf.to(tdev, torch.bfloat16 if bf16 else torch.float32)
        info = (f"torch {torch.__version__} on {torch.cuda.get_device_name() if gpu else 'cpu'}, "
                f"attention: {hf.config._attn_implementation}, tf32 matmul: {torch.backends.cuda.matmul.allow_tf32}, "
                f"tf32 conv: {torch.backends.cudnn.allow_tf32}")
        targs = dict(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix).to(hf.dtype),
                     image_grid_thw=torch.tensor(grid), mm_token_type_ids=torch.tensor(mm))
        targs = {k: v.to(tdev) for k, v in targs.items()}

        def run():
            hf.model.rope_deltas = None
            with torch.no_grad():
                out = hf(**targs).logits
            if gpu:
                torch.cuda.synchronize()
            return out
    seconds = best_of(run, args.calls)
    logits = run()
    logits = logits.float().cpu().numpy() if args.side == "torch" else np.asarray(logits.astype(jnp.float32))
    np.save(f"{args.logits}/{args.side}_{args.dtype}.npy", logits)
    emit({"seconds": seconds, "compile_s": compile_s, "info": info})


if __name__ == "__main__":
    main()
