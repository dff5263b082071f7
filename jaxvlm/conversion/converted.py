"""A converted jaxvlm checkpoint on disk: `DIR/jaxvlm_config.json` (the model config, tagged with
its kind) + `DIR/params/` (orbax) + optionally `DIR/hf_files/` (tokenizer / processor files and the
source `config.json`, kept so decoding and the export back to HF find them).

Example:
    >>> save_converted("ckpt/llava-7b", cfg, params)
    >>> cfg, params = load_converted("ckpt/llava-7b")      # what `jaxvlm generate --checkpoint` reads
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any, Iterable

import jax
import numpy as np

from jaxvlm.conversion.io import atomic_output_dir
from jaxvlm.models.config_io import config_from_dict, config_to_dict

CONFIG_FILE = "jaxvlm_config.json"
PARAMS_DIR = "params"
HF_FILES_DIR = "hf_files"
FORMAT_VERSION = 1


def save_converted(out_dir: str | os.PathLike, cfg, params: dict, *, hf_files: Iterable[str | os.PathLike] = (),
                   source: str | None = None, overwrite: bool = False) -> pathlib.Path:
    """Write `cfg` + `params` (numpy or jax arrays, any dtype) as a jaxvlm checkpoint directory.

    Written to a temporary sibling and renamed into place: an existing `out_dir` is refused unless
    `overwrite`, and is never left half-written. `hf_files` are copied into `hf_files/`. In a run of
    several processes the calling process writes alone (give it host arrays: `multihost.host_tree`)."""
    import orbax.checkpoint as ocp
    leaves = jax.tree.leaves(params)
    dtypes = sorted({str(np.dtype(x.dtype)) for x in leaves})
    meta = {"format": "jaxvlm", "format_version": FORMAT_VERSION, "config": config_to_dict(cfg),
            "param_dtypes": dtypes, "num_params": int(sum(int(np.prod(x.shape)) for x in leaves)),
            "source": source}
    with atomic_output_dir(out_dir, overwrite) as tmp:
        with ocp.Checkpointer(_low_memory_handler(), multiprocessing_options=_this_process_only()) as ckptr:
            ckptr.save(tmp / PARAMS_DIR, params)
        files = [pathlib.Path(f) for f in hf_files]
        if files:
            (tmp / HF_FILES_DIR).mkdir()
            for f in files:
                name = "source_config.json" if f.name == "config.json" else f.name
                shutil.copy2(f, tmp / HF_FILES_DIR / name)
        # Written last: a directory with this file is complete.
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return pathlib.Path(out_dir)


def _low_memory_handler():
    """orbax's default save holds a second copy of the params (a defensive deep copy of numpy
    leaves, and zstd buffers): 2-3x the checkpoint at peak. A synchronous save without those
    stays near 1x (measured in bench/bench_convert.py). Readable by any orbax PyTree restore."""
    import orbax.checkpoint as ocp
    th = ocp.type_handlers
    registry = th.create_type_handler_registry((np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
                                               (jax.Array, th.ArrayHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False,
                                       multiprocessing_options=_this_process_only())


def _this_process_only():
    """orbax synchronises every process of a multi-process run around a save; a converted checkpoint is
    written by one process (`jaxvlm train`'s process 0) from host arrays, so it is the only one taking part."""
    import orbax.checkpoint as ocp
    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


def read_converted_config(ckpt_dir: str | os.PathLike) -> Any:
    """Just the model config of a converted checkpoint (cheap: no weights are read)."""
    path = pathlib.Path(ckpt_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"jaxvlm checkpoint directory not found: {path}")
    if not (path / CONFIG_FILE).is_file():
        hint = " (it looks like a Hugging Face checkpoint: convert it first with `jaxvlm convert to-jaxvlm`)" \
            if (path / "config.json").is_file() else ""
        raise FileNotFoundError(f"{path} is not a jaxvlm checkpoint: {CONFIG_FILE} is missing{hint}")
    meta = json.loads((path / CONFIG_FILE).read_text())
    if meta.get("format") != "jaxvlm" or meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path / CONFIG_FILE}: unsupported format {meta.get('format')!r} "
                         f"version {meta.get('format_version')!r} (this jaxvlm reads version <= {FORMAT_VERSION})")
    return config_from_dict(meta["config"])


def load_converted(ckpt_dir: str | os.PathLike, target: Any = None) -> tuple[Any, dict]:
    """(config, params) of a converted checkpoint. Params come back as numpy arrays, or as `target`
    says: a tree of `jax.ShapeDtypeStruct` with shardings restores straight onto a mesh (and may
    change dtype)."""
    import orbax.checkpoint as ocp
    cfg = read_converted_config(ckpt_dir)
    path = pathlib.Path(ckpt_dir).absolute() / PARAMS_DIR
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path, target) if target is not None else ckptr.restore(path)
    return cfg, params


def hf_files_of(ckpt_dir: str | os.PathLike) -> list[pathlib.Path]:
    """Files kept from the source HF checkpoint (tokenizer, processor, ...), excluding its config."""
    d = pathlib.Path(ckpt_dir) / HF_FILES_DIR
    return sorted(p for p in d.iterdir() if p.name != "source_config.json") if d.is_dir() else []
