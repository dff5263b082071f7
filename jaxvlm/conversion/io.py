"""Checkpoint files, one tensor at a time: readers for safetensors (memory-mapped, zero-copy numpy
views, bf16 via ml_dtypes), sharded checkpoints (`*.index.json`) and PyTorch `.bin`
(`torch.load(weights_only=True, mmap=True)`, torch imported only then); a streaming safetensors
writer; and an atomic output directory (write beside, then rename).

Example:
    >>> with open_checkpoint("llava-1.5-7b-hf/") as reader:     # a dir, a file, or a list of files
    ...     keys = reader.keys()
    ...     w = reader.get("language_model.model.embed_tokens.weight")   # np.ndarray, read-only view
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import pathlib
import shutil
import struct
import sys
import tempfile
from typing import Iterable, Iterator, Sequence

import ml_dtypes
import numpy as np

from jaxvlm.conversion.table import ConversionError

PathLike = str | os.PathLike

# safetensors dtype names <-> numpy dtypes (bf16 / fp8 come from ml_dtypes).
_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NP_TO_ST = {v: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 2**20   # the safetensors spec caps the JSON header at 100 MB
assert sys.byteorder == "little", "safetensors data is little-endian; big-endian hosts are not supported"


class CheckpointReader:
    """Random access to the tensors of a checkpoint: `keys()`, `get(key) -> np.ndarray`.

    `release(key)` tells the reader a tensor has been consumed (a memory-mapped reader drops its
    pages, so resident memory stays near the size of what has been built, not of the file)."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def get(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def release(self, key: str) -> None:
        pass

    def nbytes(self, key: str) -> int:
        return int(self.get(key).nbytes)

    def close(self) -> None:
        pass

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsReader(CheckpointReader):
    """One `.safetensors` file, memory-mapped; `get` returns a zero-copy read-only numpy view.

    The format (8-byte little-endian header size, JSON header, raw little-endian data) is parsed
    here rather than through `safetensors.numpy`, which cannot represent bf16."""

    def __init__(self, path: PathLike):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"safetensors file not found: {self.path}")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise ConversionError(f"{self.path}: not a safetensors file or truncated (header claims {n} "
                                      f"bytes, file has {size})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConversionError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise ConversionError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for key, e in header.items():
            try:
                dtype = _ST_DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                begin, end = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise ConversionError(f"{self.path}: corrupt safetensors entry for {key!r}: {e!r} "
                                      f"({type(err).__name__}: {err})") from None
            if end - begin != dtype.itemsize * int(np.prod(shape)) or self._data_start + end > size:
                raise ConversionError(f"{self.path}: tensor {key!r} ({e['dtype']}{list(shape)}) does not fit "
                                      f"the file (offsets {begin}..{end}, file {size} bytes): truncated or corrupt")
            self._entries[key] = (dtype, shape, begin, end)
        self._file = open(self.path, "rb")
        self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def nbytes(self, key: str) -> int:
        _, _, begin, end = self._entries[key]
        return end - begin

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        dtype, shape, _, _ = self._entries[key]
        return shape, dtype

    def get(self, key: str) -> np.ndarray:
        if key not in self._entries:
            raise KeyError(f"{key!r} is not in {self.path}")
        dtype, shape, begin, end = self._entries[key]
        count = int(np.prod(shape))
        x = np.frombuffer(self._mmap, dtype=dtype, count=count,
                          offset=self._data_start + begin) if count else np.empty(0, dtype)
        return x.reshape(shape)

    def release(self, key: str) -> None:
        # Clean file-backed pages count towards RSS while mapped; drop them once the tensor is copied.
        if self._mmap is None or key not in self._entries or not hasattr(mmap, "MADV_DONTNEED"):
            return
        _, _, begin, end = self._entries[key]
        start = (self._data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        stop = self._data_start + end
        if stop > start:
            with contextlib.suppress(OSError, ValueError):
                self._mmap.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def close(self) -> None:
        # Views handed out keep the mapping alive (numpy holds a buffer export); closing then is harmless.
        with contextlib.suppress(BufferError):
            if self._mmap is not None:
                self._mmap.close()
        self._file.close()


class TorchBinReader(CheckpointReader):
    """A PyTorch `.bin` state dict, loaded with `weights_only=True` (no pickle code runs) and
    `mmap=True` where the file format allows it (torch >= 2.1 zip format)."""

    def __init__(self, path: PathLike):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"PyTorch checkpoint not found: {self.path}")
        try:
            import torch
        except ImportError:
            raise ImportError(f"reading {self.path} needs PyTorch (`pip install jaxvlm[torch]`); "
                              "safetensors checkpoints do not") from None
        self._torch = torch
        try:
            try:
                state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                # Legacy (pre-zip) files cannot be mapped: load them whole.
                state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt or unsafe files
            raise ConversionError(f"{self.path}: unreadable PyTorch checkpoint ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConversionError(f"{self.path}: expected a state dict of tensors, got {type(state).__name__}")
        self._state = state

    def keys(self) -> list[str]:
        return list(self._state)

    def nbytes(self, key: str) -> int:
        t = self._state[key]
        return t.numel() * t.element_size()

    def get(self, key: str) -> np.ndarray:
        t = self._state[key].detach()
        if t.dtype == self._torch.bfloat16:
            return t.view(self._torch.uint16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    def close(self) -> None:
        self._state = {}


class MultiReader(CheckpointReader):
    """Several readers seen as one (shards, or weights spread over files)."""

    def __init__(self, readers: Sequence[CheckpointReader], names: Sequence[str] | None = None):
        self.readers = list(readers)
        self._where: dict[str, CheckpointReader] = {}
        for i, r in enumerate(self.readers):
            for k in r.keys():
                if k in self._where:
                    where = names[i] if names else f"reader {i}"
                    raise ConversionError(f"tensor {k!r} appears in more than one file (again in {where})")
                self._where[k] = r

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, key: str) -> np.ndarray:
        return self._where[key].get(key)

    def nbytes(self, key: str) -> int:
        return self._where[key].nbytes(key)

    def release(self, key: str) -> None:
        self._where[key].release(key)

    def close(self) -> None:
        for r in self.readers:
            r.close()


def _open_file(path: pathlib.Path) -> CheckpointReader:
    if path.name.endswith(".index.json"):
        return _open_index(path)
    if path.suffix == ".safetensors":
        return SafetensorsReader(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return TorchBinReader(path)
    raise ConversionError(f"{path}: unknown checkpoint file type (expected .safetensors, .bin/.pt/.pth or "
                          "*.index.json)")


def _open_index(index: pathlib.Path) -> CheckpointReader:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConversionError(f"{index}: not a checkpoint index (needs a 'weight_map'): {e}") from None
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{index} lists shard(s) that are not there: {missing}")
    multi = MultiReader([_open_file(index.parent / f) for f in files], files)
    # The index must agree with the shards (a stale index would silently drop tensors).
    have = set(multi.keys())
    absent = sorted(set(weight_map) - have)
    if absent:
        raise ConversionError(f"{index} names {len(absent)} tensor(s) its shards do not hold: {absent[:5]}")
    return multi


def find_weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """The weight files of a checkpoint directory, in transformers' order of preference."""
    for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                 "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    indexes = sorted(directory.glob("*.safetensors.index.json")) or sorted(directory.glob("*.bin.index.json"))
    if indexes:
        return indexes[:1]
    # Non-training files only: HF trainers leave e.g. training_args.bin beside the weights.
    return sorted(directory.glob("*.safetensors")) or \
        [p for p in sorted(directory.glob("*.bin")) if p.name != "training_args.bin"]


def open_checkpoint(source: PathLike | Sequence[PathLike]) -> CheckpointReader:
    """A reader over a checkpoint directory, one weight file, an index, or a list of files."""
    if isinstance(source, (list, tuple)):
        paths = [pathlib.Path(p) for p in source]
        for p in paths:
            if not p.exists():
                raise FileNotFoundError(f"checkpoint file not found: {p}")
        readers = [_open_file(p) for p in paths]
        return readers[0] if len(readers) == 1 else MultiReader(readers, [str(p) for p in paths])
    path = pathlib.Path(source)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        files = find_weight_files(path)
        if not files:
            raise FileNotFoundError(f"{path} holds no weights (looked for *.safetensors[.index.json], "
                                    f"pytorch_model.bin[.index.json], *.bin); it has: "
                                    f"{sorted(p.name for p in path.iterdir())[:10]}")
        return open_checkpoint(files)
    return _open_file(path)


# ----------------------------------------------------------------------------- writing


def write_safetensors(path: PathLike, tensors: Iterable[tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> int:
    """Write `(key, array)` pairs as one safetensors file (bf16 via ml_dtypes); returns bytes written."""
    tensors = list(tensors)
    return write_safetensors_stream(path, [(k, x.nbytes) for k, x in tensors], iter(tensors), metadata)


def write_safetensors_stream(path: PathLike, plan: Sequence[tuple[str, int]],
                             tensors: Iterator[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None) -> int:
    """Write the tensors named by `plan` (`(key, nbytes)` in order), pulling them one at a time from
    `tensors`: only one tensor is in memory at once. Shapes are not known up front, so the header
    gets a worst-case reservation and is padded with spaces, as the format allows."""
    meta = dict(metadata or {"format": "pt"})
    worst = {k: {"dtype": "F8_E4M3", "shape": [2**63] * 8, "data_offsets": [2**63, 2**63]} for k, _ in plan}
    reserve = len(json.dumps({"__metadata__": meta, **worst}, separators=(",", ":")).encode())
    reserve += -reserve % 8   # data starts 8-byte aligned
    header: dict = {"__metadata__": meta}
    offset = 0
    with open(path, "wb") as f:
        f.seek(8 + reserve)
        for key, nbytes in plan:
            got, x = next(tensors)
            if got != key or x.nbytes != nbytes:
                raise ConversionError(f"writer expected {key!r} ({nbytes} bytes), got {got!r} ({x.nbytes} bytes)")
            dt = np.dtype(x.dtype)
            if dt not in _NP_TO_ST:
                raise ConversionError(f"cannot write {key!r}: dtype {dt} has no safetensors equivalent")
            header[key] = {"dtype": _NP_TO_ST[dt], "shape": list(x.shape), "data_offsets": [offset, offset + nbytes]}
            np.ascontiguousarray(x).tofile(f)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        f.seek(0)
        f.write(struct.pack("<Q", reserve))
        f.write(raw + b" " * (reserve - len(raw)))
    return 8 + reserve + offset


def write_sharded_safetensors(directory: PathLike, plan: Sequence[tuple[str, int]],
                              tensors: Iterator[tuple[str, np.ndarray]], max_shard_bytes: int,
                              prefix: str = "model") -> list[str]:
    """Stream tensors (`plan`: `(key, nbytes)` in the order `tensors` yields them) into
    `prefix.safetensors`, or into shards `prefix-0000i-of-0000n.safetensors` of at most
    `max_shard_bytes` (a bigger single tensor gets its own shard) plus `prefix.safetensors.index.json`.
    Returns the file names written."""
    directory = pathlib.Path(directory)
    shards: list[list[tuple[str, int]]] = [[]]
    size = 0
    for key, nbytes in plan:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, nbytes))
        size += nbytes
    n = len(shards)
    names = [f"{prefix}.safetensors"] if n == 1 else \
        [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for name, shard in zip(names, shards):
        write_safetensors_stream(directory / name, shard, tensors)
    if n > 1:
        index = {"metadata": {"total_size": sum(b for _, b in plan)},
                 "weight_map": {k: names[i] for i, shard in enumerate(shards) for k, _ in shard}}
        (directory / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        names.append(f"{prefix}.safetensors.index.json")
    return names


@contextlib.contextmanager
def atomic_output_dir(out_dir: PathLike, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Yield a fresh temporary directory beside `out_dir`; on success it replaces `out_dir`.

    An existing `out_dir` is refused unless `overwrite`; even then it is only swapped out after the
    new one is complete, so a failure part-way leaves it exactly as it was."""
    out = pathlib.Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists; choose a new path or pass overwrite=True "
                              "(--overwrite): it is replaced only once the new checkpoint is complete")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
