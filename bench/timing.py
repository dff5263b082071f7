"""Same-run timing for the jaxvlm-vs-PyTorch benches: each side in its own process, alternating.

Two things bias a naive "time jax, then torch" loop on a shared 2-core box:
- drift: the box's speed wanders by 10-20% over a minute (other tenants), so whichever side ran
  in the quiet stretch wins;
- co-residence: in one process, the other framework's thread pool and allocator state slow the
  side that runs after it (measured here: the jax forward 1.6-1.7 s alone, 1.8-2.4 s right after
  a torch forward in the same process), which no real user's program pays.
So a bench's parent process starts one child per side and round, alternating sides (ABAB...);
each child builds its model, warms up, times a few calls and prints one JSON line.  Ratios are
taken per round (neighbouring processes, same conditions) and summarised by the median.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable


def best_of(fn: Callable[[], object], calls: int, warmup: int = 1) -> float:
    """Fastest of `calls` timed calls, after `warmup` untimed ones (compilation, first-touch)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def child_env() -> dict[str, str]:
    """The environment both sides' processes run in: the malloc tunables the `jaxvlm` command sets
    for itself, for jax and torch alike, decided by `jaxvlm.cli.tunables_to_set` (none off Linux, with
    the user's own `GLIBC_TUNABLES`, or with `JAXVLM_NO_HUGEPAGES`)."""
    from jaxvlm.cli import tunables_to_set
    env = dict(os.environ)
    tunables = tunables_to_set("bench", env)      # "bench" is no lean command: the heap is kept
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    return env


def conditions() -> dict:
    """What a number depends on beyond the code: the CPU and the glibc malloc tunables both sides ran
    under (on session 16's AVX2 box they moved causal attention at T=1024 from 32-36 ms a layer to
    20-23 ms: without them XLA's temporaries are mmap'd and first-touched on every call)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "glibc_tunables": child_env().get("GLIBC_TUNABLES", "")}


def gemm_peak(n: int = 2048, calls: int = 5) -> float:
    """FLOP/s of the faster of an n^3 fp32 matmul in jax and in torch (this process)."""
    import jax
    import jax.numpy as jnp
    import torch
    a, ta = jnp.ones((n, n), jnp.float32), torch.ones(n, n)
    f = jax.jit(lambda x: x @ x)
    t = min(best_of(lambda: f(a).block_until_ready(), calls), best_of(lambda: torch.mm(ta, ta), calls))
    return 2 * n ** 3 / t


def emit(result: dict) -> None:
    """A child's report: one JSON line on stdout, tagged so that library chatter cannot clash."""
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def alternate(script: str, args: list[str], sides: tuple[str, ...], rounds: int) -> dict[str, list[dict]]:
    """Run `python script *args --side S` for every side, `rounds` times in alternation, each in
    `child_env()`.

    Returns each side's child reports in round order. A child that fails raises with its stderr.
    """
    out: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(rounds):
        for side in sides:
            proc = subprocess.run([sys.executable, script, *args, "--side", side], capture_output=True, text=True,
                                  env=child_env())
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
            if proc.returncode or not lines:
                raise RuntimeError(f"bench child {side} (round {r}) failed with code {proc.returncode}:\n"
                                   f"{proc.stderr[-3000:]}")
            out[side].append(json.loads(lines[-1][len("BENCH_RESULT "):]))
            print(f"[bench] round {r + 1}/{rounds} {side}: {out[side][-1]['seconds'] * 1e3:.1f} ms", file=sys.stderr)
    return out


def median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))
