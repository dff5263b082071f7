"""Grain pipeline: LLaVA-format records -> fixed-shape numpy batches for training.

Order of operations (all on a grain ``MapDataset``, so every element is addressed by index and the iterator state
is one integer): records -> this host's shard -> per-epoch shuffle -> repeat (behind an optional easy-first
curriculum, ``curriculum_order``) -> build sample (load images, render chat template, tokenize, expand image tokens,
truncate/pad) -> ``to_iter_dataset`` (threads prefetch) -> batch.

Batch contract (``B = batch_size``, ``T = max_len``, ``S = images_per_sample``), all numpy:

=================  ====================  ==========================================================================
input_ids          ``[B, T]`` int32      padded with the tokenizer's pad id
attention_mask     ``[B, T]`` int32      1 on real tokens
labels             ``[B, T]`` int32      token id where supervised, ``-100`` elsewhere (not shifted)
pixel_values       ``[B*S, 3, H, W]``    float32; LLaVA. Qwen: ``[B*S, max_patches, C*T*P*P]``. Absent if S == 0
image_valid        ``[B*S]`` bool        slot ``b*S + j`` holds sample b's j-th image
num_images         ``[B]`` int32         valid slots of each sample (they are its first slots)
image_grid_thw     ``[B*S, 3]`` int32    Qwen processors only; ``[0, 0, 0]`` on empty slots
mm_token_type_ids  ``[B, T]`` int32      chatml only; 1 on image tokens (transformers v5 M-RoPE needs it)
=================  ====================  ==========================================================================

Empty image slots (how the model side should treat them): a sample with ``k < S`` images has ``k`` image spans
of image tokens in its ``input_ids`` and zero pixels in its slots ``k..S-1``; the image tokens in the batch
therefore number ``sum(image_valid) * tokens_per_image``, not ``B*S*tokens_per_image``. Encode all ``B*S`` slots
(static shape), then move the valid slots to the front in order before the row-major splice, e.g.
``feats = feats[llava.real_first(image_valid)]`` followed by ``llava.splice_image_features`` — its
cumulative index then never reaches the padding slots. (``Llava.__call__``'s host-side ``check_image_tokens``
compares against ``pixel_values.shape[0]``, so pass only the valid slots when calling it eagerly.)

Packing (``pack=True``): rows hold several samples each (first-fit); ``attention_mask`` holds each token's sample
(1, 2, ... ; 0 on padding), ``S`` is ``images_per_row`` and a row's valid slots are its samples' images in order
(``num_images`` counts them). The LM restricts attention to each sample and restarts its positions.

Bad records (``on_bad_record``): a missing or undecodable image, more images than slots, a mismatch between
``<image>`` placeholders and images, malformed turns, or a sample whose truncation to ``max_len`` would cut
through image tokens raise `BadRecordError` naming the record id (and path) with ``"error"``; with ``"skip"``
the record is dropped, logged and counted in ``Pipeline.skipped`` (counts are per process and restart from zero
after a resume). Text-only truncation is LLaVA's: tokens after ``max_len`` are dropped (labels too). It is not
silent: the first such record is logged with the answer tokens it lost, and ``Pipeline.truncated`` counts them all
(``jaxvlm train`` reports the count in its metrics as ``data_truncated``).

Sharding: host ``shard_index`` of ``shard_count`` reads records ``shard_index::shard_count`` (after dropping the
``len % shard_count`` tail with ``even_shards``, so every host has the same number of steps per epoch);
``batch_size`` is per host. Shuffling is a permutation per epoch seeded by ``seed + epoch`` (grain).

Example:
    >>> pipe = make_dataset("llava_665k.json", "/data/images", tokenizer, "vicuna_v1",
    ...                     LlavaImageProcessor.for_llava(cfg), max_len=2048, images_per_sample=1,
    ...                     batch_size=16, seed=0, image_token_id=cfg.image_token_id)
    >>> it = iter(pipe)
    >>> batch = next(it)
    >>> state = it.get_state()        # save with the checkpoint
    >>> it = iter(pipe); it.set_state(state)    # resumes at exactly the next batch

The state is a small dict (``{"next_index": n}``); save it beside the model (JSON, or orbax with
``grain.checkpoint.CheckpointSave``). Labels are not shifted: the loss compares ``logits[:, :-1]`` with
``labels[:, 1:]``.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import sys
import threading
from typing import Any, Callable, Sequence

import grain
import numpy as np

from jaxvlm.data import chat_templates as ct
from jaxvlm.data.conversation import BadRecordError, Record, load_records
from jaxvlm.data.image_processing import ImageProcessor, load_image

log = logging.getLogger(__name__)

_SLOT_KEYS = ("pixel_values", "image_valid")


class SkipLog:
    """Thread-safe counts of skipped records by reason (``missing_image``, ``bad_image``, ``too_long`` ...)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: list[str] = []        # first messages, for a report

    def add(self, err: BadRecordError) -> None:
        with self._lock:
            self.counts[err.reason] += 1
            if len(self.examples) < 20:
                self.examples.append(str(err))
        log.warning("skipping record: %s", err)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class TruncationLog:
    """Thread-safe count of samples cut to ``max_len`` (text only: a cut through image tokens is an error), the
    answer (label) tokens they lost, and how many lost every answer token, so they train nothing."""

    def __init__(self):
        self._lock = threading.Lock()
        self.records = self.label_tokens = self.emptied = 0

    def add(self, rid: str, length: int, max_len: int, dropped: int, kept: int) -> None:
        """One sample of `length` tokens cut to `max_len`: `dropped` answer tokens lost, `kept` left."""
        empty = dropped > 0 and kept == 0
        with self._lock:
            say = self.records == 0 or (empty and self.emptied == 0)   # the first cut, and the first emptied
            self.records += 1
            self.label_tokens += dropped
            self.emptied += empty
        if say:
            lost = "all of its answer tokens: it trains nothing" if empty else f"{dropped} answer token(s)"
            log.warning("record %r: %d tokens, truncated to max_len=%d (it lost %s); raise the sequence length "
                        "or shorten the record. Further truncations are counted, not logged (Pipeline.truncated; "
                        "data_truncated in jaxvlm train's metrics)", rid, length, max_len, lost)


class SampleBuilder:
    """Record -> one fixed-shape sample dict (per-sample arrays; `make_dataset` batches and flattens slots)."""

    def __init__(self, tokenizer: Any, template: str | ct.ChatTemplate, image_processor: ImageProcessor | None,
                 max_len: int, images_per_sample: int, *, image_root: str | os.PathLike | None = None,
                 image_token_id: int | None = None, pad_token_id: int | None = None,
                 on_bad_record: str = "error", skipped: SkipLog | None = None,
                 truncated: TruncationLog | None = None,
                 label_transform: Callable[[np.ndarray], np.ndarray] | None = None):
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        if max_len <= 0 or images_per_sample < 0:
            raise ValueError(f"need max_len > 0 and images_per_sample >= 0, got {max_len}, {images_per_sample}")
        self.template = ct.get_template(template)
        ct.check_tokenizer(self.template, tokenizer)
        self.tokenizer, self.processor = tokenizer, image_processor
        self.max_len, self.slots = int(max_len), int(images_per_sample)
        self.image_root = os.fspath(image_root) if image_root is not None else ""
        if image_token_id is None:
            image_token_id = tokenizer.convert_tokens_to_ids(self.template.image_placeholder)
            if image_token_id is None or image_token_id == tokenizer.unk_token_id:
                raise ValueError(f"pass image_token_id (the model config's): the tokenizer has no "
                                 f"{self.template.image_placeholder!r} token")
        self.image_token_id = int(image_token_id)
        pad = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        if pad is None:
            raise ValueError("the tokenizer has no pad token; pass pad_token_id")
        self.pad_token_id = int(pad)
        if self.slots and image_processor is None:
            raise ValueError("images_per_sample > 0 needs an image_processor")
        self.on_bad_record = on_bad_record
        self.skipped = skipped if skipped is not None else SkipLog()
        self.truncated = truncated if truncated is not None else TruncationLog()
        self.label_transform = label_transform

    def __call__(self, record: Record) -> dict[str, np.ndarray] | None:
        try:
            return self.build(record)
        except BadRecordError as e:
            if self.on_bad_record == "error":
                raise
            self.skipped.add(e)
            return None

    def build(self, record: Record) -> dict[str, np.ndarray]:
        rid = record.id
        n = len(record.images)
        if n > self.slots:
            raise BadRecordError(rid, "too_many_images",
                                 f"record {rid!r} has {n} images but images_per_sample={self.slots}")
        if record.num_image_placeholders != n:
            raise BadRecordError(rid, "image_count_mismatch", f"record {rid!r} has {n} image(s) but "
                                 f"{record.num_image_placeholders} {ct.IMAGE!r} placeholder(s) in its conversation")
        images = [self.processor(load_image(os.path.join(self.image_root, p), rid)) for p in record.images]
        try:
            enc = ct.encode(self.template, record.messages, self.tokenizer, image_token_id=self.image_token_id,
                            image_token_counts=[im.num_tokens for im in images])
        except ValueError as e:
            raise BadRecordError(rid, "malformed", f"record {rid!r}: {e}") from e
        ids, labels, T = enc.input_ids, enc.labels, self.max_len
        if self.label_transform is not None:     # a method's own targets (e.g. REVERSE's span masking)
            labels = self.label_transform(labels)
        if len(ids) > T:
            cut = [(k, a, b) for k, (a, b) in enumerate(enc.image_spans) if b > T]
            if cut:
                k, a, b = cut[0]
                raise BadRecordError(rid, "too_long", f"record {rid!r}: {len(ids)} tokens; truncating to "
                                     f"max_len={T} would cut image {k} (image tokens at {a}..{b - 1})")
            answer = np.asarray(labels) != ct.IGNORE_INDEX
            self.truncated.add(rid, len(ids), T, int(answer[T:].sum()), int(answer[:T].sum()))
            ids, labels = ids[:T], labels[:T]
        L = len(ids)
        out = {
            "input_ids": np.full(T, self.pad_token_id, np.int32),
            "attention_mask": np.zeros(T, np.int32),
            "labels": np.full(T, ct.IGNORE_INDEX, np.int32),
        }
        out["input_ids"][:L], out["attention_mask"][:L], out["labels"][:L] = ids, 1, labels
        if self.template.name == "chatml":
            out["mm_token_type_ids"] = (out["input_ids"] == self.image_token_id).astype(np.int32)
        if self.slots:
            empty = self.processor.empty()
            slots = images + [empty] * (self.slots - n)
            out["pixel_values"] = np.stack([s.pixel_values for s in slots])
            for key in empty.fields:
                out[key] = np.stack([s.fields[key] for s in slots])
            out["image_valid"] = np.arange(self.slots) < n
        out["num_images"] = np.int32(n)
        return out


@dataclasses.dataclass
class Pipeline:
    """``iter(pipeline)`` -> grain ``DatasetIterator`` of batches with ``get_state()`` / ``set_state()``."""

    dataset: grain.IterDataset
    skipped: SkipLog
    num_records: int          # records in this host's shard (per epoch)
    steps_per_epoch: int      # batches per epoch on this host when nothing is skipped (unpacked)
    # samples cut to max_len so far, counted as they are built (the read-ahead included)
    truncated: TruncationLog = dataclasses.field(default_factory=TruncationLog)

    def __iter__(self):
        return iter(self.dataset)


def pack_samples(samples: grain.IterDataset, max_len: int, images_per_row: int, pad_token_id: int, *,
                 bins: int = 8, seed: int = 0, token_keys: Sequence[str] = ("input_ids", "labels"),
                 slot_keys: Sequence[str] = _SLOT_KEYS) -> grain.IterDataset:
    """Padded samples (`SampleBuilder`'s) -> rows of several samples each (grain's `FirstFitPackIterDataset`:
    a sample goes to the first of `bins` rows with room for its tokens and images; when one does not fit, the
    rows are emitted). ``attention_mask`` becomes the segment ids (1, 2, ... per sample, 0 on padding) and
    the image slots hold the row's images in order; see `make_dataset`. Checkpointable like the rest.
    token_keys: the `[T]` features (Qwen's chatml adds ``mm_token_type_ids``); slot_keys: the per-image ones
    (Qwen's processors add ``image_grid_thw``)."""
    from grain import experimental as gx
    slot_keys = tuple(slot_keys) if images_per_row else ()
    pads = {"input_ids": pad_token_id, "labels": ct.IGNORE_INDEX, "image_valid": False}

    def unpad(x: dict) -> dict:
        n_tok, n_img = int(x["attention_mask"].sum()), int(x["num_images"])
        if n_img > images_per_row:
            raise ValueError(f"a sample has {n_img} images but images_per_row={images_per_row}")
        out = {k: x[k][:n_tok].copy() for k in token_keys}
        out["labels"][0] = ct.IGNORE_INDEX     # never predicted from the previous sample's last token
        out.update({k: x[k][:n_img] for k in slot_keys})
        return out

    lengths = {**{k: max_len for k in token_keys}, **{k: images_per_row for k in slot_keys}}
    packed = gx.FirstFitPackIterDataset(samples.map(unpad), length_struct=lengths, num_packing_bins=bins, seed=seed,
                                        shuffle_bins=False, padding_struct={k: pads.get(k, 0) for k in lengths})

    def to_contract(x: dict) -> dict:
        out = {k: x[k] for k in (*token_keys, *slot_keys)}
        out["attention_mask"] = x["input_ids_segment_ids"].astype(np.int32)
        if slot_keys:
            out["image_valid"] = x["image_valid"].astype(bool)
        out["num_images"] = np.int32(out["image_valid"].sum() if slot_keys else 0)
        return out
    return packed.map(to_contract)


def _flatten_slots(batch: dict[str, np.ndarray], slot_keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    # [B, S, ...] -> [B*S, ...]: the model sees one flat list of images, sample-major.
    return {k: (v.reshape(-1, *v.shape[2:]) if k in slot_keys else v) for k, v in batch.items()}


def curriculum_order(records: Sequence[Record], stages: Sequence[Sequence[float]], key: str, batch_size: int,
                     seed: int = 0) -> np.ndarray:
    """Indices of the records served before the regular shuffled epochs: easy examples first.

    stages: ``[(until_step, max_value), ...]`` with increasing steps: until batch ``until_step`` (counted from 0
    by this host's batches), every record served has ``record.extra[key] <= max_value`` (e.g. the shapes world's
    ``num_objects``: scenes of one object first, then two, ...). Each stage shuffles its pool (seeded by
    ``seed`` and the stage) and cycles through it if the stage needs more records than the pool holds.
    -> ``[until_last * batch_size]`` int indices into ``records``.
    """
    if not stages:
        return np.zeros((0,), np.int64)
    values = []
    for r in records:
        v = r.extra.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ValueError(f"curriculum: record {r.id!r} has no numeric {key!r} field (got {v!r}); the curriculum "
                             f"orders records by it")
        values.append(v)
    values = np.asarray(values, np.float64)
    out, prev = [], 0
    for k, stage in enumerate(stages):
        if (not isinstance(stage, (list, tuple)) or len(stage) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in stage)
                or not float(stage[0]).is_integer()):
            raise ValueError(f"curriculum stage {k} must be [until_step, max_{key}] (a whole step, a number), got "
                             f"{stage!r}; the curriculum is a list of such stages")
        until, limit = int(stage[0]), float(stage[1])
        if until <= prev:
            raise ValueError(f"curriculum stages must end at increasing steps, got {[s[0] for s in stages]}")
        pool = np.flatnonzero(values <= limit)
        if not len(pool):
            raise ValueError(f"curriculum stage {k}: no record has {key} <= {limit:g}")
        need = (until - prev) * batch_size
        rng = np.random.default_rng([seed, k])
        reps = -(-need // len(pool))
        out.append(np.concatenate([rng.permutation(pool) for _ in range(reps)])[:need])
        prev = until
    return np.concatenate(out)


def make_dataset(records_path: str | os.PathLike | Sequence[Record], image_root: str | os.PathLike | None,
                 tokenizer: Any, template: str | ct.ChatTemplate, image_processor: ImageProcessor | None,
                 max_len: int, images_per_sample: int, batch_size: int, seed: int = 0,
                 shard_index: int | None = None, shard_count: int | None = None, *,
                 image_token_id: int | None = None, pad_token_id: int | None = None, num_epochs: int | None = None,
                 shuffle: bool = True, on_bad_record: str = "error", even_shards: bool = True,
                 drop_remainder: bool = True, num_threads: int = 8, prefetch: int = 64,
                 curriculum: Sequence[Sequence[float]] = (), curriculum_key: str = "num_objects",
                 label_transform: Callable[[np.ndarray], np.ndarray] | None = None,
                 pack: bool = False, images_per_row: int | None = None, pack_bins: int = 8) -> Pipeline:
    """Build the training data pipeline (see the module docstring for the batch contract).

    records_path: LLaVA-format JSON/JSONL file, or already-loaded `Record`s. image_root: prefix for image paths.
    image_token_id: the model config's image token id (LLaVA ``image_token_index``); default: the tokenizer's id
    of the template's placeholder. num_epochs: None repeats forever. shard_index/shard_count default to
    ``jax.process_index()`` / ``jax.process_count()``. num_threads/prefetch: grain read threads and buffer.
    curriculum: ``[(until_step, max_value), ...]``: the first batches serve only records whose
    ``curriculum_key`` field is at most ``max_value`` (see `curriculum_order`), then the regular epochs
    start; the iterator state still resumes at exactly the next batch.
    label_transform: `[T]` labels -> `[T]` labels of each encoded sample, before truncation (a method's own
    targets, e.g. `jaxvlm.methods.reverse.dehallucination_labels`).
    pack: put several samples in each row (grain's first-fit packing over `pack_bins` rows at a time) instead
    of padding each one to ``max_len``: ``attention_mask`` then holds each token's sample, 1, 2, ... (0 on
    padding), which the LM reads as segments (each sample attends to itself, its positions start at 0), and a
    row's image slots (``images_per_row``, default ``images_per_sample``) hold its samples' images in order.
    The batch contract is otherwise the same (Qwen's ``mm_token_type_ids`` and ``image_grid_thw`` packed too).
    """
    if shard_index is None or shard_count is None:
        import jax
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if isinstance(records_path, (str, os.PathLike)):
        records = load_records(records_path)
    else:
        records = list(records_path)
    skipped, truncated = SkipLog(), TruncationLog()
    builder = SampleBuilder(tokenizer, template, image_processor, max_len, images_per_sample,
                            image_root=image_root, image_token_id=image_token_id, pad_token_id=pad_token_id,
                            on_bad_record=on_bad_record, skipped=skipped, truncated=truncated,
                            label_transform=label_transform)

    total = len(records)
    if even_shards:
        records = records[: len(records) - len(records) % shard_count]
    records = records[shard_index::shard_count]
    num_records = len(records)
    if num_records == 0:
        raise ValueError(f"shard {shard_index}/{shard_count} of {total} records is empty")
    ds = grain.MapDataset.source(records)
    if shuffle:
        ds = ds.shuffle(seed=seed)     # grain: permutation seeded by seed + epoch when repeated
    ds = ds.repeat(num_epochs)
    first = curriculum_order(records, curriculum, curriculum_key, batch_size, seed)
    if len(first):
        main, n_first = ds, len(first)
        length = sys.maxsize if num_epochs is None else n_first + len(main)
        ds = grain.MapDataset.range(length).map(
            lambda i: records[first[i]] if i < n_first else main[i - n_first])
    ds = ds.map(builder)               # None (a skipped record) is dropped by the iterator
    slot_keys = _SLOT_KEYS + (("image_grid_thw",) if images_per_sample and
                              "image_grid_thw" in image_processor.empty().fields else ())
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    if pack:
        token_keys = ("input_ids", "labels") + (("mm_token_type_ids",) if builder.template.name == "chatml" else ())
        it_ds = pack_samples(it_ds, max_len, images_per_row or images_per_sample, builder.pad_token_id,
                             bins=pack_bins, seed=seed, token_keys=token_keys, slot_keys=slot_keys)
    it_ds = (it_ds.batch(batch_size, drop_remainder=drop_remainder)
             .map(functools.partial(_flatten_slots, slot_keys=slot_keys)))
    return Pipeline(it_ds, skipped, num_records, num_records // batch_size, truncated)
