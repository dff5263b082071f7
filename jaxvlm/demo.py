"""`jaxvlm demo`: the embedded default, end to end on this machine, no downloads.

Stage 1 (always): a tiny LLaVA is built, one forward returns every layer's state, attention maps
and the image-token positions; PNGs of attention over the image and of the logit lens are written.
Later stages (shapes world -> train -> decode -> evaluate) run when their modules are present.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/demo", help="output directory (PNGs, JSON report)")
    p.add_argument("--seed", type=int, default=0)


def introspection_stage(out_dir: str, seed: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxvlm.models.clip import CLIPVisionConfig
    from jaxvlm.models.llama import LMConfig
    from jaxvlm.models.llava import Llava, LlavaConfig
    from jaxvlm.models.params import count_params, init_params
    from jaxvlm.viz import save_attention_overlay, save_logit_lens_heatmap

    cfg = LlavaConfig(
        text=LMConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                      num_kv_heads=2),
        vision=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, image_size=64,
                                patch_size=8),
        image_token_id=255)
    model = Llava(cfg)
    rng = np.random.default_rng(seed)
    n_img = cfg.tokens_per_image
    ids = np.concatenate([[1, 5, 6], np.full(n_img, cfg.image_token_id), rng.integers(3, 250, 12)])[None]
    yy, xx = np.mgrid[0:64, 0:64]
    image = np.stack([(xx * 4) % 256, (yy * 4) % 256, ((xx + yy) * 2) % 256], -1).astype(np.uint8)
    pix = ((image.astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)[None]
    params = init_params(model, jax.random.key(seed), jnp.asarray(ids), jnp.asarray(pix))
    t0 = time.perf_counter()
    out = jax.jit(lambda p, i, x: model.apply({"params": p}, i, x, output_hidden_states=True,
                                              output_vision_hidden_states=True, attn_layers=(-1,)))(
        params, jnp.asarray(ids), jnp.asarray(pix))
    fwd_s = time.perf_counter() - t0
    img_pos = np.nonzero(np.asarray(out.image_token_mask[0]))[0]
    attn_last = np.asarray(out.attentions[0, 0, :, -1, :]).mean(0)[img_pos]
    grid = (cfg.vision.image_size // cfg.vision.patch_size,) * 2
    lens = jax.vmap(lambda h: model.apply({"params": params}, h, True, method="logit_lens"))(out.hidden_states)
    tail = slice(ids.shape[1] - 10, ids.shape[1])
    pngs = [
        save_attention_overlay(image, attn_last, grid, os.path.join(out_dir, "attention_last_token.png")),
        save_logit_lens_heatmap(np.asarray(lens[:, 0, tail]), [str(t) for t in ids[0, tail]],
                                os.path.join(out_dir, "logit_lens.png"), decode=lambda t: [str(i) for i in t]),
    ]
    return {
        "params": count_params(params), "hidden_states": list(out.hidden_states.shape),
        "vision_hidden_states": list(out.vision_hidden_states.shape), "image_tokens": int(len(img_pos)),
        "first_forward_s_incl_compile": round(fwd_s, 2), "pngs": pngs,
    }


def main(args) -> int:
    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    report = {"introspection": introspection_stage(args.out, args.seed)}
    report["total_s"] = round(time.perf_counter() - t0, 1)
    path = os.path.join(args.out, "report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    print(f"report: {path}")
    return 0
