"""The shapes world as a TFDS dataset: one example per image, with its objects, captions and LLaVA records.

`ShapesWorld` generates the world (`generate_world`, deterministic from the config's seed) and writes it
as a TFDS dataset in ArrayRecord files, which `as_data_source` reads by index without TensorFlow (the
images go in as their PNG files and come back as `uint8 [H, W, 3]` through PIL), so grain can feed them.

Each example:
    image:      `uint8 [H, W, 3]`; image_id (COCO id), file_name (under `images/<split>/`)
    objects:    per object `bbox` (TFDS order: ymin, xmin, ymax, xmax in [0, 1]), `category` (12 names),
                `colour` (8), `size` (small / medium / large), `area` (visible pixels) and `rle` (the COCO
                compressed RLE of its visible mask: `pycocotools.mask.decode({"size": [H, W], "counts": rle})`)
    captions:   the image's COCO captions
    llava:      the image's LLaVA records (caption, VQA, existence, grounding, ...), each as the JSON text of
                the record in `llava/<split>.json`

Example:
    >>> from jaxvlm.data.shapes_world.tfds_builder import ShapesWorld, ShapesWorldConfig
    >>> b = ShapesWorld(data_dir="/tmp/tfds", file_format="array_record",
    ...                 config=ShapesWorldConfig(name="tiny", n_train=64, n_val=8, n_test=8))
    >>> b.download_and_prepare()
    >>> train = b.as_data_source("train")          # len(train), train[0]["image"], ...
    >>> import grain; ds = grain.MapDataset.source(train).shuffle(seed=0)
"""
from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from .vocab import CATEGORIES, COLOUR_NAMES, SIZE_NAMES
from .world import GENERATOR_VERSION, SPLITS, generate_world


@dataclasses.dataclass(eq=False)
class ShapesWorldConfig(tfds.core.BuilderConfig):
    """`generate_world`'s arguments. The default is the embedded demo's world (seed 0, 112 px)."""
    seed: int = 0
    n_train: int = 3000
    n_val: int = 200
    n_test: int = 100
    image_size: int = 112


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
    """The synthetic shapes world (`jaxvlm.data.shapes_world`) as a TFDS builder."""

    VERSION = tfds.core.Version(f"{GENERATOR_VERSION}.0.0")     # the world generator's version
    RELEASE_NOTES = {f"{GENERATOR_VERSION}.0.0": f"shapes world generator v{GENERATOR_VERSION}"}
    BUILDER_CONFIGS = [ShapesWorldConfig(name="demo", description="the world `jaxvlm demo` trains on")]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "image_id": np.int64,
                "file_name": tfds.features.Text(),
                "objects": tfds.features.Sequence({
                    "bbox": tfds.features.BBoxFeature(),
                    "category": tfds.features.ClassLabel(names=list(CATEGORIES)),
                    "colour": tfds.features.ClassLabel(names=list(COLOUR_NAMES)),
                    "size": tfds.features.ClassLabel(names=list(SIZE_NAMES)),
                    "area": np.int64,
                    "rle": tfds.features.Text(),
                }),
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "llava": tfds.features.Sequence(tfds.features.Text()),
            }),
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        world = generate_world(Path(dl_manager.download_dir) / f"shapes_world_{c.name}", seed=c.seed,
                               n_train=c.n_train, n_val=c.n_val, n_test=c.n_test, image_size=c.image_size)
        sizes = {"train": c.n_train, "val": c.n_val, "test": c.n_test}
        return {s: self._generate_examples(world, s) for s in SPLITS if sizes[s] > 0}

    def _generate_examples(self, world, split: str):
        inst = json.loads(Path(world.instances[split]).read_text())
        names = {c["id"]: c["name"] for c in inst["categories"]}
        objects, captions, llava = defaultdict(list), defaultdict(list), defaultdict(list)
        for a in inst["annotations"]:
            objects[a["image_id"]].append(a)
        for a in json.loads(Path(world.captions[split]).read_text())["annotations"]:
            captions[a["image_id"]].append(a["caption"])
        by_file = {f"{split}/{im['file_name']}": im["id"] for im in inst["images"]}
        for r in json.loads(Path(world.llava[split]).read_text()):
            llava[by_file[r["image"]]].append(json.dumps(r))
        for im in inst["images"]:
            w, h = im["width"], im["height"]
            objs = objects[im["id"]]
            yield im["id"], {
                "image": str(world.image_dir(split) / im["file_name"]),
                "image_id": im["id"],
                "file_name": im["file_name"],
                "objects": {
                    "bbox": np.array([[y / h, x / w, (y + bh) / h, (x + bw) / w] for x, y, bw, bh in
                                      (o["bbox"] for o in objs)], np.float32).reshape(-1, 4),
                    "category": [names[o["category_id"]] for o in objs],
                    "colour": [o["attributes"]["colour"] for o in objs],
                    "size": [o["attributes"]["size"] for o in objs],
                    "area": [o["area"] for o in objs],
                    "rle": [_rle_counts(o["segmentation"]) for o in objs],
                },
                "captions": captions[im["id"]],
                "llava": llava[im["id"]],
            }


def _rle_counts(segmentation) -> str:
    """The compressed RLE string of a COCO segmentation (the world writes compressed RLE)."""
    counts = segmentation["counts"]
    return counts.decode() if isinstance(counts, bytes) else counts
