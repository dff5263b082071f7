"""LLaVA-format records: read JSON / JSONL files into `Record`s with chat messages.

A record (LLaVA's `llava_v1_5_mix665k.json` layout)::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",      # or a list of paths, or absent
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}]}

Roles ``human``/``user`` -> ``user``, ``gpt``/``assistant`` -> ``assistant``, ``system`` -> ``system``. Other keys
(e.g. JUDGER's ``judgment``) are kept in ``Record.extra``.

Example:
    >>> records = load_records("data/llava_665k.jsonl")
    >>> records[0].id, records[0].images, records[0].messages[0]
    ('000000033471', ('coco/train2017/000000033471.jpg',), {'role': 'user', 'content': '<image>\\nWhat ...'})
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from jaxvlm.data.chat_templates import IMAGE
from jaxvlm.jsonio import read_json_or_jsonl

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataFileError(ValueError):
    """The records file cannot be read or is not LLaVA-format JSON / JSONL."""


class BadRecordError(ValueError):
    """One record cannot be turned into a sample (missing/undecodable image, too long, malformed)."""

    def __init__(self, record_id: str, reason: str, message: str):
        super().__init__(message)
        self.record_id, self.reason = record_id, reason


@dataclasses.dataclass(frozen=True)
class Record:
    id: str
    images: tuple[str, ...]                       # paths relative to the image root (or absolute)
    messages: tuple[dict[str, str], ...]          # {"role", "content"}
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_image_placeholders(self) -> int:
        return sum(m["content"].count(IMAGE) for m in self.messages)


def record_from_llava(obj: Any, where: str, index: int = 0) -> Record:
    """One LLaVA-format dict -> `Record`; `where` names the source in error messages."""
    if not isinstance(obj, dict):
        raise DataFileError(f"{where}: record {index} is a {type(obj).__name__}, expected an object")
    rid = str(obj.get("id", f"#{index}"))
    conv = obj.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataFileError(f"{where}: record {rid!r} has no 'conversations' list")
    messages = []
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict) or turn.get("from") not in _ROLES or not isinstance(turn.get("value"), str):
            raise DataFileError(f"{where}: record {rid!r} turn {j} must be {{'from': one of {sorted(_ROLES)}, "
                                f"'value': str}}, got {turn!r}")
        messages.append({"role": _ROLES[turn["from"]], "content": turn["value"]})
    image = obj.get("image")
    if image is None:
        images: tuple[str, ...] = ()
    elif isinstance(image, str):
        images = (image,)
    elif isinstance(image, list) and all(isinstance(p, str) for p in image):
        images = tuple(image)
    else:
        raise DataFileError(f"{where}: record {rid!r} 'image' must be a path or a list of paths, got {image!r}")
    extra = {k: v for k, v in obj.items() if k not in ("id", "image", "conversations")}
    return Record(rid, images, tuple(messages), extra)


def load_records(path: str | os.PathLike) -> list[Record]:
    """Read a JSON list or JSONL file of LLaVA-format records. Raises `DataFileError` naming the path (and line)."""
    path = os.fspath(path)
    lines, objs = read_json_or_jsonl(path, "records", DataFileError, with_lines=True)
    if lines is None:
        if not isinstance(objs, list):
            raise DataFileError(f"records file {path} holds a JSON {type(objs).__name__}, expected a list of records")
        return [record_from_llava(o, path, i) for i, o in enumerate(objs)]
    return [record_from_llava(o, f"{path} line {n}", i) for i, (n, o) in enumerate(zip(lines, objs))]
