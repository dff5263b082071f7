"""Data sources the trainer reads without the full data pipeline, served through grain (iterators
with `get_state()/set_state()`):
- synthetic LLaVA-shaped batches, deterministic per index (training, resumption and benchmarks run
  without any dataset);
- pre-tokenized fixed-shape arrays in a `.npz` file.
Same batch contract as `jaxvlm.data.pipeline`: input_ids / attention_mask / labels `[B, T]` int32, pixel_values `[B*S, 3, H, W]` float32,
image_valid `[B*S]` bool (S image slots per sample).
"""
from __future__ import annotations

import dataclasses

import grain
import numpy as np


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    seq_len: int = 32
    vocab_size: int = 128
    image_token_id: int = 127
    tokens_per_image: int = 16
    image_size: int = 32
    images_per_sample: int = 1
    num_records: int = 10_000
    pad_id: int = 0


def make_example(cfg: SyntheticConfig, index: int) -> dict:
    """One record: [bos, text..., image tokens, text..., pad...] with loss on the text after the image."""
    rng = np.random.default_rng(index)
    t = cfg.seq_len
    ids = np.full((t,), cfg.pad_id, np.int32)
    n_img = cfg.images_per_sample * cfg.tokens_per_image
    length = int(rng.integers(n_img + 4, t + 1))
    ids[:length] = rng.integers(3, min(cfg.image_token_id, cfg.vocab_size), size=length)
    ids[0] = 1
    ids[2:2 + n_img] = cfg.image_token_id
    mask = (np.arange(t) < length).astype(np.int32)
    labels = np.where(mask > 0, ids, -100).astype(np.int32)
    labels[:2 + n_img] = -100
    pix = rng.standard_normal((cfg.images_per_sample, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pix,
            "image_valid": np.ones((cfg.images_per_sample,), bool)}


def _flatten_images(batch: dict) -> dict:
    out = dict(batch)
    out["pixel_values"] = batch["pixel_values"].reshape((-1,) + batch["pixel_values"].shape[2:])
    out["image_valid"] = batch["image_valid"].reshape(-1)
    return out


def synthetic_dataset(cfg: SyntheticConfig, batch_size: int, seed: int = 0, shard_index: int = 0,
                      shard_count: int = 1) -> grain.IterDataset:
    """Shuffled, repeated, batched grain dataset; `iter(ds)` has `get_state()/set_state()`.
    With several hosts each takes every `shard_count`-th record (its local batch)."""
    ds = grain.MapDataset.range(cfg.num_records).shuffle(seed=seed).repeat()
    ds = ds[shard_index::shard_count]
    ds = ds.map(lambda i: make_example(cfg, int(i))).batch(batch_size, drop_remainder=True).map(_flatten_images)
    return ds.to_iter_dataset()


# ----------------------------------------------------------------------------- pre-tokenized arrays

BATCH_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_valid")


def load_arrays(path: str) -> dict[str, np.ndarray]:
    """A `.npz` of fixed-shape, pre-tokenized records: input_ids/attention_mask/labels `[R, T]`,
    optional pixel_values `[R, S, 3, H, W]` and image_valid `[R, S]`."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - BadZipFile, pickle refusals, ...: name the file, not zip internals
        raise ValueError(f"cannot read data file {path} as .npz arrays: {type(e).__name__}: {e}") from e
    missing = [k for k in ("input_ids", "labels") if k not in arrays]
    if missing:
        raise ValueError(f"data file {path} lacks {missing} (has {sorted(arrays)})")
    n = len(arrays["input_ids"])
    bad = {k: len(v) for k, v in arrays.items() if len(v) != n}
    if bad:
        raise ValueError(f"data file {path}: arrays disagree on the number of records ({n} input_ids vs {bad})")
    arrays.setdefault("attention_mask", (arrays["input_ids"] != 0).astype(np.int32))
    return {k: v for k, v in arrays.items() if k in BATCH_KEYS}


def array_dataset(path: str, batch_size: int, seed: int = 0, shard_index: int = 0,
                  shard_count: int = 1) -> grain.IterDataset:
    arrays = load_arrays(path)
    n = len(arrays["input_ids"])
    ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat()[shard_index::shard_count]
    ds = ds.map(lambda i: {k: v[int(i)] for k, v in arrays.items()}).batch(batch_size, drop_remainder=True)
    if "pixel_values" in arrays:
        ds = ds.map(_flatten_images)
    return ds.to_iter_dataset()
