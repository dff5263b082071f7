"""Reading predictions and annotations, with errors that name the file and line.

A predictions file is JSON Lines, one object per line, as written by `jaxvlm generate`:
``{"question_id": 7, "text": "yes", ...}``. The id may be under ``question_id`` or ``id``
(``image_id`` too, for captioning); the answer under ``answer`` or ``text``.

Ids are compared in a canonical string form (``canonical_id``) so that ``7`` in a
predictions file matches ``"7"`` in an annotation file.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Mapping, Sequence

from jaxvlm import jsonio

ID_KEYS = ("question_id", "id")
TEXT_KEYS = ("answer", "text")


class EvalInputError(ValueError):
    """Bad evaluation input: a missing file, a malformed line, ids that do not pair up."""


@dataclass
class Prediction:
    """One predictions line: its canonical id, answer text and the whole record."""

    id: str
    text: str | None
    record: dict = field(repr=False)
    line: int | str | None = None  # 1-based line in the source file ("file:N" when read from several files)


def canonical_id(value: Any) -> str:
    """Ids compare as strings: 7, "7" and 7.0 are the same question."""
    if isinstance(value, bool) or value is None:
        raise TypeError(f"not an id: {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


_COCO_FILE = re.compile(r"^(?:.*?_)?0*(\d+)(?:\.(?:jpg|jpeg|png))?$", re.IGNORECASE)


def coco_image_id(value: Any) -> str:
    """COCO image id from an int or a file name: ``COCO_val2014_000000391895.jpg`` -> ``"391895"``.

    REVERSE's CHAIR script keys its predictions by such file names; other ids pass through.
    """
    s = canonical_id(value)
    m = _COCO_FILE.match(os.path.basename(s))
    return str(int(m.group(1))) if m else s


def read_jsonl(path: str | os.PathLike, what: str = "predictions") -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line raises naming its number."""
    return jsonio.read_jsonl(path, what, EvalInputError)


def read_json_or_jsonl(path: str | os.PathLike, what: str = "annotations") -> Any:
    """A .json file's value, or the list of objects of a JSON Lines file (see `jaxvlm.jsonio`)."""
    return jsonio.read_json_or_jsonl(path, what, EvalInputError)


def _pick(record: Mapping, keys: Sequence[str]) -> str | None:
    for k in keys:
        if k in record:
            return k
    return None


def load_predictions(
    predictions: str | os.PathLike | Iterable[Mapping] | Iterable[Prediction],
    id_key: str | Sequence[str] | None = None,
    text_key: str | Sequence[str] | None = None,
    require_text: bool = True,
) -> list[Prediction]:
    """Predictions from a JSONL path, several (e.g. the shards of `jaxvlm generate --shard`, read in turn;
    `line` is then "file:N"), or in-memory records.

    Example:
        >>> load_predictions([{"question_id": 1, "text": "yes"}])[0].id
        '1'
    """
    id_keys = (id_key,) if isinstance(id_key, str) else tuple(id_key or ID_KEYS)
    text_keys = (text_key,) if isinstance(text_key, str) else tuple(text_key or TEXT_KEYS)
    if isinstance(predictions, (list, tuple)) and predictions and all(
            isinstance(x, (str, os.PathLike)) for x in predictions):
        if len(predictions) == 1:
            predictions = predictions[0]
        else:
            rows = []
            for path in map(os.fspath, predictions):
                rows += [(f"{path}:{n}", rec, f"{path}:{n}") for n, rec in read_jsonl(path, "predictions")]
            return _predictions(rows, "+".join(map(os.fspath, predictions)), id_keys, text_keys, require_text)
    if isinstance(predictions, (str, os.PathLike)):
        src = os.fspath(predictions)
        rows = read_jsonl(src, "predictions")
    else:
        src = "<predictions>"
        rows = []
        for i, r in enumerate(predictions, start=1):
            if isinstance(r, Prediction):
                rows.append((r.line or i, r.record))
            elif isinstance(r, Mapping):
                rows.append((i, dict(r)))
            else:
                raise EvalInputError(f"{src} item {i}: expected a dict, got {type(r).__name__}")
    return _predictions([(f"{src}:{n}", rec, n) for n, rec in rows], src, id_keys, text_keys, require_text)


def _predictions(rows: list[tuple], src: str, id_keys: tuple, text_keys: tuple, require_text: bool
                 ) -> list[Prediction]:
    """rows: (where, record, line): `where` names the file and line in errors, `line` is the Prediction's."""
    out = []
    for where, rec, line in rows:
        ik = _pick(rec, id_keys)
        if ik is None:
            raise EvalInputError(f"{where}: no id field (looked for {' / '.join(id_keys)})")
        tk = _pick(rec, text_keys)
        if tk is None and require_text:
            raise EvalInputError(f"{where}: no answer field (looked for {' / '.join(text_keys)})")
        text = rec[tk] if tk is not None else None
        if text is not None and not isinstance(text, str):
            raise EvalInputError(f"{where}: field {tk!r} should be a string, got {type(text).__name__}")
        try:
            pid = canonical_id(rec[ik])
        except TypeError as e:
            raise EvalInputError(f"{where}: {e}") from None
        out.append(Prediction(pid, text, rec, line))
    if not out:
        raise EvalInputError(f"{src}: no predictions")
    return out


def check_unique(preds: Sequence[Prediction]) -> None:
    """Pairing by id needs one prediction per id."""
    seen: dict[str, Prediction] = {}
    for p in preds:
        if p.id in seen:
            raise EvalInputError(f"duplicate prediction id {p.id!r} (lines {seen[p.id].line} and {p.line})")
        seen[p.id] = p


def pair_by_id(
    preds: Sequence[Prediction],
    annotations: Mapping[str, Any],
    allow_missing: bool = False,
    what: str = "annotations",
) -> list[tuple[Prediction, Any]]:
    """Join predictions with annotations on canonical id, in prediction order.

    A prediction without an annotation is always an error (it usually means the wrong file).
    An annotation without a prediction is an error unless ``allow_missing`` (a partial run).
    """
    check_unique(preds)
    unknown = [p for p in preds if p.id not in annotations]
    if unknown:
        ex = ", ".join(f"{p.id!r} (line {p.line})" for p in unknown[:5])
        raise EvalInputError(
            f"{len(unknown)} of {len(preds)} prediction ids are not in the {what}, e.g. {ex}; "
            f"{what} ids look like {_examples(annotations)}")
    if not allow_missing and len(annotations) > len(preds):
        have = {p.id for p in preds}
        missing = [k for k in annotations if k not in have]
        raise EvalInputError(
            f"{len(missing)} of {len(annotations)} {what} ids have no prediction, e.g. "
            f"{', '.join(map(repr, missing[:5]))} (pass allow_missing=True / --allow-missing to score a subset)")
    return [(p, annotations[p.id]) for p in preds]


def _examples(keys: Iterable[Hashable], n: int = 3) -> str:
    ex = []
    for k in keys:
        ex.append(repr(k))
        if len(ex) == n:
            break
    return ", ".join(ex) if ex else "(none: empty annotations)"


def index_records(
    records: Iterable[Mapping],
    id_keys: Sequence[str] = ID_KEYS,
    what: str = "annotations",
    fallback_index_base: int | None = None,
) -> dict[str, dict]:
    """Annotation records keyed by canonical id.

    With ``fallback_index_base`` set, a record without an id field gets its position
    (plus the base) as id; PhD's data.jsonl and AMBER's annotations.json are keyed that way.
    """
    out: dict[str, dict] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise EvalInputError(f"{what} item {i}: expected an object, got {type(rec).__name__}")
        k = _pick(rec, id_keys)
        if k is None:
            if fallback_index_base is None:
                raise EvalInputError(f"{what} item {i}: no id field (looked for {' / '.join(id_keys)})")
            key = str(i + fallback_index_base)
        else:
            key = canonical_id(rec[k])
        if key in out:
            raise EvalInputError(f"{what}: duplicate id {key!r}")
        out[key] = dict(rec)
    return out


def as_records(annotations: Any, what: str = "annotations", list_key: str | None = None) -> list:
    """Annotation records from a path (JSON or JSONL), a list, or a dict holding a list."""
    if isinstance(annotations, (str, os.PathLike)):
        annotations = read_json_or_jsonl(annotations, what)
    if isinstance(annotations, Mapping):
        for k in ((list_key,) if list_key else ()) + ("annotations", "questions", "data"):
            if k in annotations and isinstance(annotations[k], list):
                return annotations[k]
        if any(k in annotations for k in ID_KEYS):  # a one-line JSON Lines file named *.json
            return [annotations]
        raise EvalInputError(f"{what}: expected a list of records (or a dict with an 'annotations' list)")
    if annotations is None:
        raise EvalInputError(f"this metric needs {what}")
    return list(annotations)
