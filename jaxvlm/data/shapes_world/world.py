"""``generate_world``: write a shapes world as COCO / RefCOCOg / LLaVA / POPE / PhD files.

Layout under ``out_dir`` (image paths in each format are relative as noted)::

    world.json                              manifest: params, per-file sha256, content hash
    images/<split>/shapes_<split>_<id>.png
    annotations/instances_<split>.json      COCO instances (file_name relative to images/<split>)
    annotations/captions_<split>.json       COCO captions
    refcocog/refs.json, refcocog/refs(umd).p, refcocog/instances.json
                                            RefCOCOg (file_name relative to images/)
    llava/<split>.json                      LLaVA conversations (image relative to images/)
    pope/<split>_<setting>.jsonl            POPE, eval splits only (image: images/<split>/...)
    phd/<split>.jsonl                       PhD-style probes, eval splits only (likewise)

Every random draw comes from ``numpy.random.default_rng([seed, split, index, stream])``, so an
image's content depends only on (seed, split, index, generator params) and not on split sizes.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from . import vocab
from .io import atomic_write_bytes, encode_rle, json_bytes, jsonl_bytes, pickle_bytes, \
    png_bytes, sha256_file
from .language import make_captions, referring_expression
from .scene import ObjectInfo, sample_scene, tight_bbox
from .tasks import (POPE_SETTINGS, CategoryStats, ImageRecord, llava_records, phd_items,
                    pope_items, pope_question)

#: Bump whenever output bytes change for the same params, so stale caches are regenerated.
GENERATOR_VERSION = 4  # 2: "leftmost"/"on the left" (and the other directions) were inverted;
#                        3: POPE-style existence records, 3 REC turns per grounding record
#                        4: every LLaVA record carries num_objects (the curriculum's key)
SPLITS: tuple[str, ...] = ("train", "val", "test")
EVAL_SPLITS: tuple[str, ...] = ("val", "test")
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_IMAGE_ID_BASE = {"train": 1_000_000, "val": 2_000_000, "test": 3_000_000}
_STREAMS = {"scene": 0, "captions": 1, "llava": 2, "pope": 3, "phd": 4}
_AUTO_PROGRESS_MIN_IMAGES = 200


@dataclass(frozen=True)
class WorldPaths:
    """Every file of a generated world (images excepted: see :meth:`image_dir`)."""

    root: Path
    manifest: Path
    image_root: Path
    instances: dict[str, Path]
    captions: dict[str, Path]
    llava: dict[str, Path]
    pope: dict[str, dict[str, Path]]   # split -> setting -> jsonl
    phd: dict[str, Path]
    refs_json: Path
    refs_pickle: Path
    refs_instances: Path

    @classmethod
    def under(cls, root: str | Path) -> WorldPaths:
        root = Path(root)
        ann = root / "annotations"
        return cls(
            root=root, manifest=root / "world.json", image_root=root / "images",
            instances={s: ann / f"instances_{s}.json" for s in SPLITS},
            captions={s: ann / f"captions_{s}.json" for s in SPLITS},
            llava={s: root / "llava" / f"{s}.json" for s in SPLITS},
            pope={s: {m: root / "pope" / f"{s}_{m}.jsonl" for m in POPE_SETTINGS}
                  for s in EVAL_SPLITS},
            phd={s: root / "phd" / f"{s}.jsonl" for s in EVAL_SPLITS},
            refs_json=root / "refcocog" / "refs.json",
            refs_pickle=root / "refcocog" / "refs(umd).p",
            refs_instances=root / "refcocog" / "instances.json",
        )

    def image_dir(self, split: str) -> Path:
        return self.image_root / split


def object_infos(instances: dict[str, Any]) -> dict[int, tuple[ObjectInfo, ...]]:
    """Objects per image id from a loaded instances JSON (uses the ``attributes`` extension)."""
    names = {c["id"]: c["name"] for c in instances["categories"]}
    out: dict[int, list[ObjectInfo]] = {img["id"]: [] for img in instances["images"]}
    for a in instances["annotations"]:
        out[a["image_id"]].append(ObjectInfo(
            ann_id=a["id"], category=names[a["category_id"]], colour=a["attributes"]["colour"],
            size=a["attributes"]["size"], bbox=tuple(a["bbox"])))  # type: ignore[arg-type]
    return {k: tuple(v) for k, v in out.items()}


def scenes_by_file(instances: dict[str, Any]) -> dict[str, tuple[dict[str, Any], tuple[ObjectInfo, ...]]]:
    """Each image of a loaded instances JSON by its bare file name -> (its image entry, its objects), for
    records that name an image by path (``train/shapes_train_1000001.png``: look up the path's name)."""
    objects = object_infos(instances)
    return {im["file_name"]: (im, objects[im["id"]]) for im in instances["images"]}


def _categories() -> list[dict[str, Any]]:
    return [{"id": vocab.CATEGORY_IDS[c], "name": c, "supercategory": vocab.SUPERCATEGORIES[c]}
            for c in vocab.CATEGORIES]


def _info() -> dict[str, Any]:
    # No dates: the bytes must depend on the parameters only.
    return {"description": "jaxvlm synthetic shapes world", "version": str(GENERATOR_VERSION)}


class _Writer:
    """Atomic writes under root, remembering (sha256, size) per relative path for the manifest."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, dict[str, Any]] = {}

    def write(self, path: Path, data: bytes) -> None:
        rel = path.relative_to(self.root).as_posix()
        atomic_write_bytes(path, data)
        self.files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _rng(seed: int, split: str, index: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_CODES[split], index, _STREAMS[stream]])


def _content_hash(files: dict[str, dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]['sha256']}\n".encode())
    return h.hexdigest()


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _intact(root: Path, files: dict[str, dict[str, Any]], verify: bool) -> bool:
    for rel, meta in files.items():
        p = root / rel
        if not p.is_file() or p.stat().st_size != meta["bytes"]:
            return False
        if verify and sha256_file(p) != meta["sha256"]:
            return False
    return True


def _sentences(expr: str, ref_id: int) -> list[dict[str, Any]]:
    variants = [expr, expr.removeprefix("the ")]
    return [{"sent_id": ref_id * 10 + k, "raw": v, "sent": v, "tokens": v.split()}
            for k, v in enumerate(variants)]


def _generate_split(w: _Writer, paths: WorldPaths, split: str, n: int, p: dict[str, Any],
                    bar: tqdm) -> tuple[list[ImageRecord], list[dict], list[dict], list[dict]]:
    """Render one split and write its COCO, captions and LLaVA files; returns records + refs."""
    size, seed = p["image_size"], p["seed"]
    records: list[ImageRecord] = []
    images, anns, caps, refs = [], [], [], []
    for i in range(n):
        image_id = _IMAGE_ID_BASE[split] + i + 1
        file_name = f"shapes_{split}_{image_id:07d}.png"
        scene = sample_scene(_rng(seed, split, i, "scene"), size, p["max_objects"],
                             p["min_visible"])
        w.write(paths.image_dir(split) / file_name, png_bytes(scene.image))
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size,
                       "background": scene.background, "theme": scene.theme})
        objects = []
        for k, s in enumerate(scene.shapes):
            obj = ObjectInfo(image_id * 10 + k, s.category, s.colour, s.size,
                             tight_bbox(s.visible))
            objects.append(obj)
            anns.append({"id": obj.ann_id, "image_id": image_id,
                         "category_id": vocab.CATEGORY_IDS[s.category],
                         "segmentation": encode_rle(s.visible), "area": int(s.visible.sum()),
                         "bbox": list(obj.bbox), "iscrowd": 0,
                         "attributes": {"colour": s.colour, "size": s.size}})
        rec = ImageRecord(image_id, file_name, split, scene.background, size, tuple(objects))
        records.append(rec)
        for j, text in enumerate(make_captions(rec.objects, rec.background,
                                               _rng(seed, split, i, "captions"),
                                               p["captions_per_image"])):
            caps.append({"image_id": image_id, "id": image_id * 10 + j, "caption": text})
        for o in rec.objects:
            expr = referring_expression(o, rec.objects, size)
            if expr is not None:
                refs.append({"ref_id": o.ann_id, "ann_id": o.ann_id, "image_id": image_id,
                             "category_id": vocab.CATEGORY_IDS[o.category], "split": split,
                             "file_name": f"{split}/{file_name}", "bbox": list(o.bbox),
                             "sent_ids": [o.ann_id * 10, o.ann_id * 10 + 1],
                             "sentences": _sentences(expr, o.ann_id)})
        bar.update(1)
    w.write(paths.instances[split], json_bytes({"info": _info(), "licenses": [], "images": images,
                                                "annotations": anns,
                                                "categories": _categories()}))
    w.write(paths.captions[split], json_bytes({"info": _info(), "licenses": [],
                                               "images": images, "annotations": caps}))
    llava = [r for i, rec in enumerate(records)
             for r in llava_records(rec, _rng(seed, split, i, "llava"))]
    w.write(paths.llava[split], json_bytes(llava, indent=1))
    return records, images, anns, refs


def _write_eval_files(w: _Writer, paths: WorldPaths, split: str, records: list[ImageRecord],
                      seed: int) -> None:
    stats = CategoryStats.from_records(records)
    pope: dict[str, list[dict]] = {s: [] for s in POPE_SETTINGS}
    phd: list[dict] = []
    for i, rec in enumerate(records):
        for setting, items in pope_items(rec, stats, _rng(seed, split, i, "pope")).items():
            for category, label in items:
                pope[setting].append({"question_id": len(pope[setting]) + 1,
                                      "image": rec.file_name, "text": pope_question(category),
                                      "label": label})
        for item in phd_items(rec, stats, _rng(seed, split, i, "phd")):
            # "answer" duplicates "label": jaxvlm.eval.phd reads the UE-style field name.
            phd.append({"question_id": len(phd) + 1, "image_id": rec.image_id,
                        "image": rec.file_name, **item, "answer": item["label"]})
    for setting in POPE_SETTINGS:
        w.write(paths.pope[split][setting], jsonl_bytes(pope[setting]))
    w.write(paths.phd[split], jsonl_bytes(phd))


def generate_world(out_dir: str | Path, seed: int = 0, n_train: int = 2000, n_val: int = 200,
                   n_test: int = 200, image_size: int = 112, *, max_objects: int = 8,
                   captions_per_image: int = 3, min_visible: float = 0.6,
                   progress: bool | None = None, verify: bool = False) -> WorldPaths:
    """Generate (or reuse) a shapes world in ``out_dir`` and return its paths.

    Returns at once when ``out_dir/world.json`` records the same parameters and every listed file
    is present with its recorded size (``verify=True`` also re-hashes them).  The manifest is
    written last, so an interrupted run is regenerated next time rather than trusted.
    """
    if not 64 <= image_size <= 224:
        raise ValueError(f"image_size must be in [64, 224], got {image_size}")
    if not 1 <= max_objects <= 8:
        raise ValueError(f"max_objects must be in [1, 8], got {max_objects}")
    if n_train < 0 or n_val < 0 or n_test < 0:
        raise ValueError("split sizes must be >= 0")
    if not 1 <= captions_per_image <= 5:
        raise ValueError("captions_per_image must be in [1, 5]")
    params = {"version": GENERATOR_VERSION, "seed": int(seed), "n_train": int(n_train),
              "n_val": int(n_val), "n_test": int(n_test), "image_size": int(image_size),
              "max_objects": int(max_objects), "captions_per_image": int(captions_per_image),
              "min_visible": float(min_visible)}
    paths = WorldPaths.under(out_dir)
    old = _read_manifest(paths.manifest)
    if old is not None and old.get("params") == params and \
            _intact(paths.root, old.get("files", {}), verify):
        return paths

    paths.root.mkdir(parents=True, exist_ok=True)
    paths.manifest.unlink(missing_ok=True)  # from here on the directory is "incomplete"
    for stale in paths.root.rglob(".*.tmp-*"):  # leftovers of a killed run's atomic writes
        stale.unlink(missing_ok=True)
    w = _Writer(paths.root)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    total = sum(sizes.values())
    show = total >= _AUTO_PROGRESS_MIN_IMAGES if progress is None else progress
    all_images, all_anns, all_refs = [], [], []
    with tqdm(total=total, desc="shapes world", unit="img", disable=not show) as bar:
        for split in SPLITS:
            records, images, anns, refs = _generate_split(w, paths, split, sizes[split], params,
                                                          bar)
            all_images += [{**img, "file_name": f"{split}/{img['file_name']}"} for img in images]
            all_anns += anns
            all_refs += refs
            if split in EVAL_SPLITS:
                _write_eval_files(w, paths, split, records, params["seed"])
    w.write(paths.refs_json, json_bytes(all_refs))
    w.write(paths.refs_pickle, pickle_bytes(all_refs))
    w.write(paths.refs_instances, json_bytes({"info": _info(), "licenses": [],
                                              "images": all_images, "annotations": all_anns,
                                              "categories": _categories()}))
    # Only files this generator listed before are ever deleted.
    for rel in sorted(set((old or {}).get("files", {})) - set(w.files)):
        (paths.root / rel).unlink(missing_ok=True)
    manifest = {"generator": "jaxvlm.data.shapes_world", "params": params,
                "content_hash": _content_hash(w.files),
                "files": {rel: w.files[rel] for rel in sorted(w.files)}}
    atomic_write_bytes(paths.manifest, json_bytes(manifest, indent=1))
    return paths


def iter_world_text(paths: WorldPaths) -> Iterator[str]:
    """Every natural-language string in the world, in a fixed order (tokenizer corpus)."""
    for split in SPLITS:
        for a in json.loads(paths.captions[split].read_text())["annotations"]:
            yield a["caption"]
        for rec in json.loads(paths.llava[split].read_text()):
            for turn in rec["conversations"]:
                yield turn["value"]
    for ref in json.loads(paths.refs_json.read_text()):
        for s in ref["sentences"]:
            yield s["raw"]
    for split in EVAL_SPLITS:
        for setting in POPE_SETTINGS:
            for line in paths.pope[split][setting].read_text().splitlines():
                yield json.loads(line)["text"]
        for line in paths.phd[split].read_text().splitlines():
            yield json.loads(line)["question"]
