"""The shapes world's TFDS builder (jaxvlm.data.shapes_world.tfds_builder): every example equals the
world's own files (image pixels, COCO boxes and masks, captions, LLaVA records), read without TensorFlow
through `as_data_source`, and grain iterates it."""
import json

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from jaxvlm.data.shapes_world.tfds_builder import ShapesWorld, ShapesWorldConfig
    root = tmp_path_factory.mktemp("tfds")
    b = ShapesWorld(data_dir=str(root), file_format="array_record",
                    config=ShapesWorldConfig(name="tiny", seed=3, n_train=5, n_val=2, n_test=4))
    b.download_and_prepare()
    from jaxvlm.data.shapes_world import generate_world     # the same world: returns at once from its manifest
    world = generate_world(next(root.glob("downloads/shapes_world_tiny")), seed=3, n_train=5, n_val=2, n_test=4)
    return b, world


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_examples_equal_the_world_files(built, split):
    from pycocotools import mask as mask_utils

    from jaxvlm.data.shapes_world.vocab import CATEGORIES, COLOUR_NAMES, SIZE_NAMES
    b, world = built
    src = b.as_data_source(split)
    inst = json.loads(world.instances[split].read_text())
    assert len(src) == len(inst["images"]) == {"train": 5, "val": 2, "test": 4}[split]
    names = {c["id"]: c["name"] for c in inst["categories"]}
    records = json.loads(world.llava[split].read_text())
    caps = json.loads(world.captions[split].read_text())["annotations"]
    seen = set()
    for i in range(len(src)):
        ex = src[i]
        im = next(m for m in inst["images"] if m["id"] == int(ex["image_id"]))
        seen.add(im["id"])
        assert ex["file_name"].decode() == im["file_name"]
        pixels = np.asarray(Image.open(world.image_dir(split) / im["file_name"]).convert("RGB"))
        np.testing.assert_array_equal(ex["image"], pixels)
        w, h = im["width"], im["height"]
        anns = [a for a in inst["annotations"] if a["image_id"] == im["id"]]
        o = ex["objects"]
        assert len(o["bbox"]) == len(anns) >= 1
        for k, a in enumerate(anns):
            x, y, bw, bh = a["bbox"]
            np.testing.assert_allclose(o["bbox"][k], [y / h, x / w, (y + bh) / h, (x + bw) / w], rtol=1e-6)
            assert CATEGORIES[o["category"][k]] == names[a["category_id"]]
            assert COLOUR_NAMES[o["colour"][k]] == a["attributes"]["colour"]
            assert SIZE_NAMES[o["size"][k]] == a["attributes"]["size"]
            m = mask_utils.decode({"size": [h, w], "counts": o["rle"][k]})
            assert int(m.sum()) == int(o["area"][k]) == a["area"]
        assert sorted(c.decode() for c in ex["captions"]) == sorted(c["caption"] for c in caps
                                                                      if c["image_id"] == im["id"])
        want = [r for r in records if r["image"] == f"{split}/{im['file_name']}"]
        assert [json.loads(r) for r in ex["llava"]] == want and len(want) >= 3
    assert seen == {m["id"] for m in inst["images"]}


def test_grain_reads_the_data_source(built):
    import grain
    b, _ = built
    src = b.as_data_source("train")
    ds = grain.MapDataset.source(src).shuffle(seed=0).map(lambda e: (int(e["image_id"]), e["image"].shape))
    got = list(ds)
    assert sorted(i for i, _ in got) == sorted(int(src[k]["image_id"]) for k in range(len(src)))
    assert {s for _, s in got} == {(112, 112, 3)}


def test_a_bad_config_names_the_problem(tmp_path):
    from jaxvlm.data.shapes_world.tfds_builder import ShapesWorld, ShapesWorldConfig
    b = ShapesWorld(data_dir=str(tmp_path), file_format="array_record",
                    config=ShapesWorldConfig(name="bad", image_size=10, n_train=2, n_val=1, n_test=1))
    with pytest.raises(ValueError, match=r"image_size must be in \[64, 224\], got 10"):
        b.download_and_prepare()
    assert not list(tmp_path.rglob("dataset_info.json"))       # nothing half-built looks like a dataset
    with pytest.raises(KeyError, match="has not been generated"):
        b.as_data_source("train")
