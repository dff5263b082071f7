"""Data: chat templates, LLaVA-format records, per-family image preprocessing and the grain training pipeline.

Light modules are imported eagerly; `make_dataset` & co. (grain) and the image processors (transformers) load on
first use, so `import jaxvlm.data.shapes_world` stays cheap.
"""
from jaxvlm.data.chat_templates import (IGNORE_INDEX, TEMPLATES, ChatTemplate, encode, encode_prompt, get_template,
                                        render, render_prompt)
from jaxvlm.data.conversation import BadRecordError, DataFileError, Record, load_records

_LAZY = {
    "make_dataset": "pipeline", "Pipeline": "pipeline", "SampleBuilder": "pipeline", "SkipLog": "pipeline",
    "LlavaImageProcessor": "image_processing", "Qwen2VLImageProcessor": "image_processing",
    "load_image": "image_processing", "expand_to_square": "image_processing",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"jaxvlm.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'jaxvlm.data' has no attribute {name!r}")


__all__ = ["IGNORE_INDEX", "TEMPLATES", "ChatTemplate", "get_template", "render", "render_prompt", "encode",
           "encode_prompt", "Record", "load_records", "DataFileError", "BadRecordError", *_LAZY]
