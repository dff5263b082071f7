"""A synthetic shapes world: small images where hallucination and grounding are exactly measurable.

Each image is a textured background (plain, noisy, striped, checkered, gradient, dotted) with 1-8
shapes (12 categories x 8 colours x 3 sizes) that may occlude one another.  Every object's visible
pixels are known, so captions, referring expressions, boxes, counts and yes/no labels are exact.
The world is written in the formats of the real data sets, so the same readers serve both:
COCO instances + captions, RefCOCOg refs, LLaVA conversations, POPE and PhD-style probes.

Example::

    from jaxvlm.data.shapes_world import generate_world
    from jaxvlm.data.shapes_tokenizer import build_tokenizer

    paths = generate_world("/tmp/shapes", seed=0, n_train=2000, n_val=200, n_test=200)
    paths.instances["train"]          # annotations/instances_train.json (COCO, RLE masks)
    paths.llava["train"]              # llava/train.json
    paths.pope["val"]["adversarial"]  # pope/val_adversarial.jsonl
    tok = build_tokenizer(paths, "/tmp/shapes/tokenizer")

A second call with the same arguments returns at once (manifest ``world.json``).
"""
from .language import (format_box, parse_referring_expression, referring_expression,
                       resolve_referring_expression)
from .scene import ObjectInfo
from .world import EVAL_SPLITS, SPLITS, WorldPaths, generate_world, iter_world_text, object_infos

__all__ = ["generate_world", "WorldPaths", "iter_world_text", "object_infos", "ObjectInfo",
           "referring_expression", "resolve_referring_expression", "parse_referring_expression",
           "format_box", "SPLITS", "EVAL_SPLITS"]
