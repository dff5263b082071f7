"""`jaxvlm train` rejects bad input with a clear message before compiling anything."""
import os

import numpy as np
import pytest

from jaxvlm.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "train_tiny.py")


def run(tmp_path, capsys, *sets):
    args = ["train", "--config", CONFIG, "--no-progress", "--workdir", str(tmp_path / "w")]
    for s in sets:
        args += ["--set", s]
    rc = main(args)
    return rc, capsys.readouterr().err


def test_unknown_config_key(tmp_path, capsys):
    rc, err = run(tmp_path, capsys, "optim.learning_rate=1e-3")
    assert rc == 2 and "unknown config key 'optim.learning_rate'" in err and "default_lr" in err


def test_wrong_type(tmp_path, capsys):
    rc, err = run(tmp_path, capsys, "train.steps=many")
    assert rc == 2 and "train.steps" in err and "int" in err


def test_mesh_larger_than_devices(tmp_path, capsys):
    rc, err = run(tmp_path, capsys, "mesh.data=4", "mesh.fsdp=4")
    assert rc == 2 and "needs 16 devices but only 8 are available" in err


def test_batch_not_divisible(tmp_path, capsys):
    rc, err = run(tmp_path, capsys, "data.batch_size=6", "mesh.data=8")
    assert rc == 2 and "data.batch_size=6 is not divisible by the data-parallel size 8" in err


def test_unreadable_data_file(tmp_path, capsys):
    bad = tmp_path / "data.npz"
    bad.write_bytes(b"this is not a zip archive")
    rc, err = run(tmp_path, capsys, "data.kind='npz'", f"data.path='{bad}'")
    assert rc == 2 and "cannot read data file" in err and str(bad) in err
    rc, err = run(tmp_path, capsys, "data.kind='npz'", f"data.path='{tmp_path / 'missing.npz'}'")
    assert rc == 2 and "data file not found" in err


def test_npz_missing_arrays(tmp_path, capsys):
    path = tmp_path / "d.npz"
    np.savez(path, input_ids=np.zeros((4, 8), np.int32))
    rc, err = run(tmp_path, capsys, "data.kind='npz'", f"data.path='{path}'")
    assert rc == 2 and "lacks ['labels']" in err


def test_missing_config_file(tmp_path, capsys):
    rc = main(["train", "--config", str(tmp_path / "nope.py")])
    assert rc == 2 and "config file not found" in capsys.readouterr().err


def test_url_workdir_is_refused(tmp_path, capsys):
    rc, err = run(tmp_path, capsys, "train.export='gs://bucket/run/export'")
    assert rc == 2 and "train.export='gs://bucket/run/export': a URL" in err and "gcsfuse" in err
    assert not (tmp_path / "w").exists()


def test_init_from_a_converted_checkpoint(tmp_path, capsys):
    """model.init_from takes what train.export writes (a converted jaxvlm checkpoint) as well as an HF folder:
    at learning rate 0 the next export holds exactly the same parameters, and only tokenizer files are
    carried (not the weights)."""
    import jax

    from jaxvlm.conversion.converted import load_converted
    first = tmp_path / "first"
    rc, err = run(tmp_path, capsys, "train.steps=3", f"train.export='{first}'")
    assert rc == 0, err
    (first / "hf_files").mkdir(exist_ok=True)
    (first / "hf_files" / "tokenizer_config.json").write_text("{}")   # a tokenizer file rides along
    second = tmp_path / "second"
    args = ["train", "--config", CONFIG, "--no-progress", "--workdir", str(tmp_path / "w2")]
    for s in ("train.steps=1", "optim.default_lr=0.0", f"model.init_from='{first}'", f"train.export='{second}'"):
        args += ["--set", s]
    assert main(args) == 0, capsys.readouterr().err
    (_, a), (_, b) = load_converted(first), load_converted(second)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert sorted(p.name for p in (second / "hf_files").iterdir()) == ["tokenizer_config.json"]
    rc, err = run(tmp_path / "fresh", capsys, f"model.init_from='{tmp_path}'")     # a new workdir: not a resume
    assert rc == 2 and "neither a jaxvlm checkpoint (jaxvlm_config.json) nor a Hugging Face folder" in err


def test_resume_with_another_config_is_refused(tmp_path, capsys):
    """A workdir resumes only with its run's own settings: another learning rate or data seed is an error
    naming each changed key, before anything is read or written (here before the missing data file, which would
    fail next); more steps, another mesh or logging are fine."""
    rc, err = run(tmp_path, capsys, "train.steps=2", "checkpoint.every=1", "checkpoint.async_save=False")
    assert rc == 0, err
    record = tmp_path / "w" / "run_config.json"
    saved, metrics = record.read_text(), (tmp_path / "w" / "metrics.jsonl").read_text()
    rc, err = run(tmp_path, capsys, "train.steps=4", "checkpoint.every=1", "checkpoint.async_save=False",
                  "optim.default_lr=0.5", "data.seed=3", "data.kind='npz'", f"data.path='{tmp_path / 'no.npz'}'")
    assert rc == 2 and "holds a run with another config" in err and "-> 0.5" in err, err
    assert "data.kind: 'synthetic' -> 'npz'" in err and "data file not found" not in err
    assert "data.seed: 0 -> 3" in err and "optim.default_lr" in err and "use a new workdir" in err
    assert record.read_text() == saved and (tmp_path / "w" / "metrics.jsonl").read_text() == metrics
    rc, err = run(tmp_path, capsys, "train.steps=3", "checkpoint.every=1", "checkpoint.async_save=False",
                  "train.log_every=1", "mesh.data=4", "mesh.fsdp=2")
    assert rc == 0, err
    assert '"resumed_from": 2' in (tmp_path / "w" / "metrics.jsonl").read_text()
