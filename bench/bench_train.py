"""Train-step throughput of a ~100M-parameter LLaVA-shaped model: jaxvlm (make_train_step, AdamW,
fp32) vs PyTorch (transformers LlavaForConditionalGeneration + torch.optim.AdamW) on this machine,
in one run, as a ratio (each side in its own process, alternating: bench/timing.py); plus XLA's peak temporary memory of the jaxvlm step with and without remat.

    python bench/bench_train.py [--steps 3] [--batch 2] [--seq 256]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.models.clip import CLIPVisionConfig
from jaxvlm.models.llama import LMConfig
from jaxvlm.models.llava import Llava, LlavaConfig
from jaxvlm.models.params import count_params, init_params, logical_axes
from jaxvlm.train import mesh as M
from jaxvlm.train import optim as O
from jaxvlm.train import sharding as S
from jaxvlm.train import state as ST
from jaxvlm.train.step import StepShardings, make_train_step, vlm_lm_loss

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import alternate, conditions, emit, median_ratio  # noqa: E402

#: "100m": the ~100M LLaVA-shaped model; "demo": the shapes-world recipe's 2.5M model as sessions 9-27 shipped it
#: (4 unrolled layers, GQA 6/2, vocab 1024, 112 px / 16 px patches, MLP 512; `configs/shapes_llava.py` has used
#: MLP 256 since session 28; kept so that the README's ratios stay comparable), where fixed per-op costs weigh
#: more than the GEMMs.
SHAPES = {
    "100m": dict(text=dict(vocab_size=32000, hidden_size=640, intermediate_size=1728, num_layers=10, num_heads=10,
                           num_kv_heads=10, max_position_embeddings=2048),
                 vision=dict(hidden_size=384, intermediate_size=1536, num_layers=6, num_heads=6, image_size=224,
                             patch_size=32)),
    "demo": dict(text=dict(vocab_size=1024, hidden_size=192, intermediate_size=512, num_layers=4, num_heads=6,
                           num_kv_heads=2, max_position_embeddings=512, scan_layers=False),
                 vision=dict(hidden_size=128, intermediate_size=256, num_layers=3, num_heads=4, image_size=112,
                             patch_size=16)),
}
TEXT, VISION = SHAPES["100m"]["text"], SHAPES["100m"]["vision"]
IMG = TEXT["vocab_size"] - 1      # the image token: the last id


def use_shape(name: str) -> None:
    global TEXT, VISION, IMG
    TEXT, VISION = SHAPES[name]["text"], SHAPES[name]["vision"]
    IMG = TEXT["vocab_size"] - 1


def image_tokens() -> int:
    return (VISION["image_size"] // VISION["patch_size"]) ** 2


def make_batch(b: int, t: int, n_img_tokens: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, IMG, size=(b, t)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, 2:2 + n_img_tokens] = IMG
    labels = np.where(ids == IMG, -100, ids).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones((b, t), np.int32), "labels": labels,
            "pixel_values": rng.standard_normal((b, 3, VISION["image_size"], VISION["image_size"])).astype(np.float32)}


def bench_jax(batch: dict, steps: int, remat: str) -> dict:
    cfg = LlavaConfig(text=LMConfig(**TEXT, remat=remat), vision=CLIPVisionConfig(**VISION, remat=remat),
                      image_token_id=IMG)
    model = Llava(cfg)
    size = VISION["image_size"]
    ex = (jnp.full((1, cfg.tokens_per_image), IMG, jnp.int32), jnp.zeros((1, 3, size, size)))
    params = jax.jit(lambda k: init_params(model, k, *ex))(jax.random.key(0))
    n_params = count_params(params)
    abstract = jax.eval_shape(lambda p: p, params)
    opt = O.make_optimizer(O.OptimConfig(default_lr=1e-5, schedule="constant", clip_norm=1.0), abstract)
    mesh = M.make_mesh((1, 1, 1), jax.devices()[:1])
    rules = S.make_rules()
    p_sh = S.param_shardings(logical_axes(model, *ex), abstract, mesh, rules)
    st_sh = ST.state_shardings(p_sh, abstract, opt, mesh)
    state = jax.jit(lambda p: ST.create_train_state(p, opt, jax.random.key(1)), out_shardings=st_sh)(params)
    del params
    step = make_train_step(vlm_lm_loss(model), opt, StepShardings(mesh, rules, st_sh))
    b = S.shard_batch(batch, mesh)
    t0 = time.time()
    with S.sharding_context(mesh, rules):
        compiled = step.jitted.lower(state, b).compile()
    compile_s = time.time() - t0
    mem = compiled.memory_analysis()
    state, m = step(state, b)            # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t0 = time.time()
        state, m = step(state, b)
        jax.block_until_ready(m)
        times.append(time.time() - t0)
    return dict(params=n_params, compile_s=compile_s, step_s=float(np.median(times)), loss=float(m["loss"]),
                temp_bytes=int(mem.temp_size_in_bytes) if mem else None)


def bench_torch(batch: dict, steps: int) -> dict:
    import torch
    import transformers
    torch.manual_seed(0)
    t = TEXT
    text = transformers.LlamaConfig(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
                                    intermediate_size=t["intermediate_size"], num_hidden_layers=t["num_layers"],
                                    num_attention_heads=t["num_heads"], num_key_value_heads=t["num_kv_heads"],
                                    max_position_embeddings=t["max_position_embeddings"], rope_theta=10000.0)
    v = VISION
    vision = transformers.CLIPVisionConfig(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                                           num_hidden_layers=v["num_layers"], num_attention_heads=v["num_heads"],
                                           image_size=v["image_size"], patch_size=v["patch_size"])
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMG,
                                   image_seq_length=image_tokens(), vision_feature_layer=-2,
                                   vision_feature_select_strategy="default")
    model = transformers.LlavaForConditionalGeneration(cfg).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    tb = {k: torch.tensor(v) for k, v in batch.items()}
    tb["input_ids"], tb["labels"] = tb["input_ids"].long(), tb["labels"].long()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(**tb).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss)
    step()   # warm-up
    times = []
    for _ in range(steps):
        t0 = time.time()
        loss = step()
        times.append(time.time() - t0)
    return dict(params=n_params, step_s=float(np.median(times)), loss=loss, threads=torch.get_num_threads())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2, help="rounds (one jax and one torch process each)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="100m",
                    help="model shape (demo: the shapes-world recipe as shipped until session 28)")
    ap.add_argument("--side", choices=("jax", "torch", "jax_remat"), help=argparse.SUPPRESS)   # child process
    args = ap.parse_args()
    use_shape(args.shape)
    if args.side:
        batch = make_batch(args.batch, args.seq, image_tokens())
        r = {"jax": lambda: bench_jax(batch, args.steps, "none"), "torch": lambda: bench_torch(batch, args.steps),
             "jax_remat": lambda: bench_jax(batch, 1, "full")}[args.side]()
        return emit(dict(r, seconds=r["step_s"]))
    common = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--shape", args.shape]
    runs = alternate(__file__, common, ("jax", "torch"), args.rounds)
    remat = alternate(__file__, common, ("jax_remat",), 1)["jax_remat"][0]
    jt, tt = [r["step_s"] for r in runs["jax"]], [r["step_s"] for r in runs["torch"]]
    jx, pt = runs["jax"][0], runs["torch"][0]
    tokens = args.batch * args.seq
    out = {
        "shape": args.shape, "model_params": {"jaxvlm": jx["params"], "torch": pt["params"]},
        "tokens_per_step": tokens, "rounds": args.rounds,
        "jaxvlm_tokens_per_s": tokens / statistics.median(jt), "torch_tokens_per_s": tokens / statistics.median(tt),
        "ratio_jax_over_torch": median_ratio(tt, jt),
        "jaxvlm_compile_s": jx["compile_s"],
        "jaxvlm_remat_tokens_per_s": tokens / remat["step_s"],
        "xla_temp_bytes_no_remat": jx["temp_bytes"], "xla_temp_bytes_remat_full": remat["temp_bytes"],
        "loss": {"jaxvlm": jx["loss"], "torch": pt["loss"]}, "torch_threads": pt["threads"],
        "device": str(jax.devices()[0].platform), **conditions(),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
