"""Kill-and-resume: 20 steps with checkpoints every 5; a run SIGKILLed right after the async save of
step 15 starts (so that save is usually cut off) restarts through the CLI from the newest complete
checkpoint and reproduces the uninterrupted run's losses bit for bit (same data order).

Both child processes share a persistent compilation cache, so the model compiles once."""
import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "train_tiny.py")
SETS = ["train.steps=20", "checkpoint.every=5", "checkpoint.keep=3", "mesh.data=2", "mesh.fsdp=2",
        "mesh.tensor=2", "train.log_every=1", "train.fast_compile=True"]


def losses(workdir) -> dict[int, float]:
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                out[r["step"]] = r["loss"]     # a resumed run's record overwrites the killed run's
    return out


def test_kill_and_resume_is_bit_exact(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_DEFAULT_MATMUL_PRECISION="highest")
    ref_dir, killed = tmp_path / "ref", tmp_path / "killed"
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import os, signal
        from jaxvlm.train.config import apply_overrides, load_config
        from jaxvlm.train.loop import train
        base = apply_overrides(load_config({CONFIG!r}), {SETS!r})
        train(apply_overrides(base, ["train.workdir={ref_dir}"]), progress=False)     # uninterrupted
        def kill(step, metrics):
            if step == 15:      # the step-15 async save has just been started
                os.kill(os.getpid(), signal.SIGKILL)
        train(apply_overrides(base, ["train.workdir={killed}"]), hooks=[kill], progress=False)
    """))
    r = subprocess.run([sys.executable, str(driver)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == -9, r.stderr[-3000:]
    assert max(losses(killed)) == 15 and max(losses(ref_dir)) == 20

    # Restart through the real CLI: resumes from the newest complete checkpoint (10, or 15 if that
    # save happened to finish before the kill).
    cmd = [sys.executable, "-m", "jaxvlm.cli", "train", "--config", CONFIG, "--no-progress",
           "--workdir", str(killed)] + [a for s in SETS for a in ("--set", s)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(killed / "metrics.jsonl") as f:
        starts = [json.loads(line) for line in f if '"event": "start"' in line]
    assert len(starts) == 2 and starts[-1]["resumed_from"] in (10, 15), starts
    assert starts[-1]["devices"] == 8

    ref, got = losses(ref_dir), losses(killed)
    assert sorted(got) == list(range(1, 21))
    for step in range(11, 21):
        assert got[step] == ref[step], (step, got[step], ref[step])
