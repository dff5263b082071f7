"""`jaxvlm train` as two processes (hosts) of 4 CPU devices each, talking through jax.distributed (gloo),
against the same run as one process of 8 devices: the same losses, the same exported checkpoint and LoRA
adapter, and a restart of both processes resumes from their checkpoint with each one's data state.
The synthetic source makes the same global batches on any number of hosts; the record pipeline gives each
host a disjoint shard of its own order (tests/test_data_pipeline.py), so its batches depend on the host count.

This is how the launchers run it on a pod (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID);
the export at the end used to hang there (process 0 read arrays whose shards lived on the other host).
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "train_tiny.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _starts(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("event") == "start"]


def _sets(tmp_path, workdir, steps: int) -> list[str]:
    return ["mesh.fsdp=2", "mesh.data=-1",
            f"train.steps={steps}", "optim.total_steps=6", "checkpoint.every=3", "train.log_every=1",
            "lora.enabled=True", "lora.rank=4", "train.fast_compile=True", f"train.workdir={workdir}",
            f"train.export={workdir}_export"]


def _two_processes(tmp_path, workdir, steps: int) -> None:
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid), JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "jaxvlm.cli", "train", "--config", CONFIG, "--no-progress"]
        for s in _sets(tmp_path, workdir, steps):
            cmd += ["--set", s]
        log = open(tmp_path / f"{os.path.basename(workdir)}_{steps}_p{pid}.log", "w")
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        for p, _ in procs:
            p.wait(timeout=300)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    for pid, (p, _) in enumerate(procs):
        text = (tmp_path / f"{os.path.basename(workdir)}_{steps}_p{pid}.log").read_text()
        assert p.returncode == 0, f"process {pid} exited {p.returncode}:\n{text[-3000:]}"


def _exported(path) -> dict:
    from jaxvlm.conversion.converted import load_converted
    _, params = load_converted(path)
    import jax
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def _adapter(workdir) -> dict:
    from safetensors.numpy import load_file
    return load_file(os.path.join(workdir, "adapter", "adapter_model.safetensors"))


def test_two_processes_train_export_and_resume_as_one(tmp_path):
    from jaxvlm.cli import main
    ref = tmp_path / "ref"
    args = ["train", "--config", CONFIG, "--no-progress"]
    for s in _sets(tmp_path, ref, 6):
        args += ["--set", s]
    assert main(args) == 0                                  # this process: 8 devices
    assert _starts(ref)[0]["devices"] == 8

    two = tmp_path / "two"
    _two_processes(tmp_path, two, steps=3)                  # stops at the step-3 checkpoint
    with open(two / "checkpoints" / "3" / "data" / os.listdir(two / "checkpoints" / "3" / "data")[0]) as f:
        per_process = json.load(f)["__per_process__"]
    assert len(per_process) == 2                            # each host's iterator state is kept
    _two_processes(tmp_path, two, steps=6)                  # both restart: resume at 3

    starts = _starts(two)
    assert [s["resumed_from"] for s in starts] == [None, 3] and all(s["devices"] == 8 for s in starts)
    got, want = _losses(two), _losses(ref)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:    # the all-reduce runs across processes in another order: last-bit differences
        np.testing.assert_allclose(got[step], want[step], rtol=1e-6, err_msg=f"step {step}")

    a, b = _exported(f"{two}_export"), _exported(f"{ref}_export")
    assert sorted(a) == sorted(b)
    # measured: largest difference 1.2e-7 (export), 2.2e-7 (adapter, whose largest value is 0.13)
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=5e-7, err_msg=k)
    a, b = _adapter(two), _adapter(ref)
    assert sorted(a) == sorted(b) and len(b) > 0
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=5e-7, err_msg=k)
    assert any(np.abs(v).max() > 0 for k, v in b.items() if "lora_B" in k)    # the adapter did train
