"""Model configs <-> JSON-ready dicts (what `jaxvlm_config.json` next to a converted checkpoint holds).

The dict is tagged with the config's kind, so one loader reads any model:

    >>> d = config_to_dict(llava_cfg)      # {"kind": "llava", "text": {...}, "vision": {...}, ...}
    >>> config_from_dict(d) == llava_cfg
    True

Other model families register their dataclass once with `register_config`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxvlm.models.clip import CLIPVisionConfig
from jaxvlm.models.llama import LMConfig
from jaxvlm.models.llava import LlavaConfig
from jaxvlm.models.qwen2_vl import Qwen2VLConfig, QwenVisionConfig

# kind -> (dataclass, {field: kind of the nested config it holds})
_KINDS: dict[str, tuple[type, dict[str, str]]] = {}


def register_config(kind: str, cls: type, nested: Mapping[str, str] | None = None) -> None:
    """Make `cls` (a dataclass) serialisable under `kind`; `nested` names fields holding sub-configs."""
    if kind in _KINDS and _KINDS[kind][0] is not cls:
        raise ValueError(f"config kind {kind!r} is already registered for {_KINDS[kind][0].__name__}")
    _KINDS[kind] = (cls, dict(nested or {}))


register_config("lm", LMConfig)
register_config("clip_vision", CLIPVisionConfig)
register_config("llava", LlavaConfig, {"text": "lm", "vision": "clip_vision"})
register_config("qwen2_vl_vision", QwenVisionConfig)
register_config("qwen2_vl", Qwen2VLConfig, {"text": "lm", "vision": "qwen2_vl_vision"})   # Qwen2-VL and 2.5-VL


def _kind_of(cfg) -> str:
    for kind, (cls, _) in _KINDS.items():
        if type(cfg) is cls:
            return kind
    raise TypeError(f"{type(cfg).__name__} is not a registered config; known: "
                    f"{sorted(c.__name__ for c, _ in _KINDS.values())}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def config_to_dict(cfg) -> dict:
    """A registered config dataclass -> plain JSON-ready dict with a `kind` tag."""
    kind = _kind_of(cfg)
    nested = _KINDS[kind][1]
    out: dict[str, Any] = {"kind": kind}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in nested:
            out[f.name] = config_to_dict(value)
        elif f.name == "rope_scaling" and value is not None:
            out[f.name] = {k: _jsonable(v) for k, v in value}   # frozen items -> dict
        else:
            out[f.name] = _jsonable(value)
    return out


def config_from_dict(d: Mapping) -> Any:
    """Inverse of `config_to_dict`. Unknown fields are an error (a silently dropped field would
    give a different model)."""
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"config dict has kind {kind!r}; known kinds: {sorted(_KINDS)}")
    cls, nested = _KINDS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{kind} config has unknown field(s) {unknown}; {cls.__name__} fields: {sorted(names)}")
    kw = {k: (config_from_dict(v) if k in nested else v) for k, v in d.items()}
    return cls(**kw)
