"""Samples per second of training with packed rows (`data.pack=True`) against padded rows, jaxvlm, and against
PyTorch's padded rows (transformers LlavaForConditionalGeneration + AdamW, as LLaVA's trainer pads), in one
run (each side in its own process, alternating: bench/timing.py).

The samples are LLaVA-shaped: an image (49 tokens with the 100m shape's 224 px / 32 px tower) and a text whose
length is drawn from [32, 480] tokens, padded or packed into rows of --seq tokens. A row's step costs the same
either way (the packed one also runs `--images-per-row` image slots through the tower); packing needs fewer
rows for the same samples.

    python bench/bench_packing.py [--seq 1024] [--batch 2] [--samples 256]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train as BT  # noqa: E402
from timing import alternate, conditions, emit, median_ratio  # noqa: E402


def samples(n: int, seed: int = 0) -> list[dict]:
    """Padded samples as `SampleBuilder` makes them (ids, labels, mask, one image slot), seq `--seq`."""
    rng = np.random.default_rng(seed)
    n_img, size = BT.image_tokens(), BT.VISION["image_size"]
    out = []
    for _ in range(n):
        length = n_img + 2 + int(rng.integers(32, 481))
        ids = rng.integers(3, BT.IMG, size=length).astype(np.int32)
        ids[0], ids[1:1 + n_img] = 1, BT.IMG
        labels = np.full(length, -100, np.int32)
        labels[length // 2:] = ids[length // 2:]      # the answer half is supervised
        out.append(dict(input_ids=ids, labels=labels,
                        pixel_values=rng.standard_normal((1, 3, size, size)).astype(np.float32)))
    return out


def rows(seq: int, pack: bool, images_per_row: int, n: int) -> list[dict]:
    """The samples as rows of `seq` tokens: padded one per row, or packed by `jaxvlm.data.pipeline.pack_samples`."""
    import grain

    from jaxvlm.data.pipeline import pack_samples
    padded = []
    for s in samples(n):
        L = len(s["input_ids"])
        x = dict(input_ids=np.zeros(seq, np.int32), labels=np.full(seq, -100, np.int32),
                 attention_mask=np.zeros(seq, np.int32), pixel_values=s["pixel_values"],
                 image_valid=np.ones(1, bool), num_images=np.int32(1))
        x["input_ids"][:L], x["labels"][:L], x["attention_mask"][:L] = s["input_ids"], s["labels"], 1
        padded.append(x)
    if not pack:
        return padded
    ds = grain.MapDataset.source(padded).to_iter_dataset()
    return list(pack_samples(ds, seq, images_per_row, pad_token_id=0, bins=8))


def batch_of(rs: list[dict]) -> dict:
    b = {k: np.stack([r[k] for r in rs]) for k in ("input_ids", "labels", "attention_mask")}
    b["pixel_values"] = np.concatenate([r["pixel_values"] for r in rs])
    b["image_valid"] = np.concatenate([r["image_valid"] for r in rs])
    return b


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--images-per-row", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--side", choices=("padded", "packed", "torch"), help=argparse.SUPPRESS)   # child process
    args = ap.parse_args()
    if args.side:
        rs = rows(args.seq, args.side == "packed", args.images_per_row, args.batch * 4)
        batch = batch_of(rs[:args.batch])
        if args.side == "torch":
            batch = {k: v for k, v in batch.items() if k != "image_valid"}
            r = BT.bench_torch(batch, args.steps)
        else:
            r = BT.bench_jax(batch, args.steps, "none")
        return emit(dict(r, seconds=r["step_s"]))
    common = ["--seq", str(args.seq), "--batch", str(args.batch), "--images-per-row", str(args.images_per_row),
              "--steps", str(args.steps)]
    n_rows = {pack: len(rows(args.seq, pack, args.images_per_row, args.samples)) for pack in (False, True)}
    runs = alternate(__file__, common, ("padded", "packed", "torch"), args.rounds)
    step = {side: [r["step_s"] for r in runs[side]] for side in runs}
    # samples/s = samples / (rows / batch x step time)
    per_s = {side: args.samples / (n_rows[side == "packed"] / args.batch * statistics.median(t))
             for side, t in step.items()}
    row_ratio = n_rows[False] / n_rows[True]
    out = {
        "seq": args.seq, "batch": args.batch, "samples": args.samples, "images_per_row": args.images_per_row,
        "rows_padded": n_rows[False], "rows_packed": n_rows[True],
        "step_s": {side: statistics.median(t) for side, t in step.items()},
        "samples_per_s": per_s,
        # per-round ratios of step times, scaled by the rows each side needs
        "ratio_packed_over_padded": median_ratio(step["padded"], step["packed"]) * row_ratio,
        "ratio_packed_over_torch_padded": median_ratio(step["torch"], step["packed"]) * row_ratio,
        "ratio_padded_over_torch_padded": median_ratio(step["torch"], step["padded"]),
        "rounds": args.rounds, **conditions(),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
