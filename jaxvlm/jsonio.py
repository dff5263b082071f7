"""Reading the JSON and JSON Lines files every part of the library takes (records, questions,
predictions, annotations), with errors that name the file and line.

Each caller passes its own error class (`DataFileError`, `EvalInputError`, ...) so a user sees
which input was wrong; the messages are the same everywhere.
"""
from __future__ import annotations

import json
import os
from typing import Any


def check_file(path: str | os.PathLike, what: str, error: type[Exception] = ValueError) -> str:
    """`path` as a str if it is an existing file; otherwise `error` naming `what` and the path."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise error(f"{what} file not found: {path}")
    if os.path.isdir(path):
        raise error(f"{what} path is a directory, expected a file: {path}")
    return path


def read_jsonl(path: str | os.PathLike, what: str, error: type[Exception] = ValueError) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line raises naming its number."""
    path = check_file(path, what, error)
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise error(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno}): "
                                f"{raw.strip()[:80]!r}") from None
                if not isinstance(obj, dict):
                    raise error(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                rows.append((lineno, obj))
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {what} file {path}: {e}") from e
    return rows


def read_json_or_jsonl(path: str | os.PathLike, what: str, error: type[Exception] = ValueError,
                       with_lines: bool = False) -> Any:
    """A .json file's value, or the list of objects of a JSON Lines file.

    ``*.jsonl`` is always read as lines; otherwise the content decides, since LLaVA's POPE label
    files are JSON Lines named ``*.json``. with_lines: return `(lines, value)`, where `lines` holds
    each object's line number for JSON Lines and is None for a single JSON value.
    """
    path = check_file(path, what, error)
    if not path.endswith(".jsonl"):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise error(f"cannot read {what} file {path}: {e}") from e
        if not text.strip():
            raise error(f"{what} file {path} is empty")
        try:
            value = json.loads(text)
            return (None, value) if with_lines else value
        except json.JSONDecodeError as e:
            if text.lstrip()[0] == "[":            # meant as one JSON list: report where it breaks
                raise error(f"{what} file {path} is not valid JSON: {e}") from None
    # More than one top-level value: JSON Lines, so errors name the line.
    rows = read_jsonl(path, what, error)
    return ([n for n, _ in rows], [o for _, o in rows]) if with_lines else [o for _, o in rows]
