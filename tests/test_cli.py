"""The `jaxvlm` console command restarts itself once with its malloc tunables (see `jaxvlm.cli`)."""
import ctypes.util
import os
import subprocess
import sys

import pytest

from jaxvlm import cli


def test_console_command_restarts_once_with_its_tunables(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.os, "execv", lambda exe, args: calls.append((exe, args, dict(cli.os.environ))))
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(sys, "argv", ["jaxvlm", "eval", "--help"])
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("JAXVLM_NO_HUGEPAGES", raising=False)
    cli._restart_with_malloc_tunables()
    (exe, args, env), = calls
    assert args == [sys.executable, "-m", "jaxvlm.cli", "eval", "--help"]
    assert env["GLIBC_TUNABLES"] == f"{cli.HUGEPAGE_TUNABLE}:{cli.HEAP_TUNABLES}"   # eval keeps its heap
    cli._restart_with_malloc_tunables()            # the restarted process (tunable set) does not loop
    assert len(calls) == 1
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")    # a user's own tunables win
    monkeypatch.setenv("JAXVLM_NO_HUGEPAGES", "1")
    cli._restart_with_malloc_tunables()
    assert len(calls) == 1


def test_convert_restarts_without_keeping_its_heap(monkeypatch):
    """Conversion's target is peak RSS, which a heap that never shrinks raises (1.26x -> 1.57x)."""
    calls = []
    monkeypatch.setattr(cli.os, "execv", lambda exe, args: calls.append(dict(cli.os.environ)))
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("JAXVLM_NO_HUGEPAGES", raising=False)
    for argv, want in ((["jaxvlm", "convert", "to-hf"], cli.HUGEPAGE_TUNABLE),
                       (["jaxvlm", "train", "--config", "c.py"], f"{cli.HUGEPAGE_TUNABLE}:{cli.HEAP_TUNABLES}"),
                       (["jaxvlm"], f"{cli.HUGEPAGE_TUNABLE}:{cli.HEAP_TUNABLES}")):
        monkeypatch.setattr(sys, "argv", argv)
        monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
        cli._restart_with_malloc_tunables()
        assert calls[-1]["GLIBC_TUNABLES"] == want


def test_benches_run_under_the_commands_tunables(monkeypatch):
    """`bench/timing.child_env` decides through `cli.tunables_to_set`, opt-outs included."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    try:
        import timing
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("JAXVLM_NO_HUGEPAGES", raising=False)
    assert timing.child_env()["GLIBC_TUNABLES"] == cli.malloc_tunables("train")
    monkeypatch.setenv("JAXVLM_NO_HUGEPAGES", "1")
    assert "GLIBC_TUNABLES" not in timing.child_env()
    monkeypatch.delenv("JAXVLM_NO_HUGEPAGES")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert timing.child_env()["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert cli.tunables_to_set("train", {}) is None and "GLIBC_TUNABLES" not in timing.child_env()


# Run under each command's tunables: glibc ignores a misspelt tunable silently, so check what it does.
_PROBE = """
import ctypes, ctypes.util
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.mallinfo2.restype = ctypes.c_void_p, Info
p = libc.malloc(64 << 20)
print(libc.mallinfo2().hblkhd)     # bytes in mmap'd chunks
"""


@pytest.mark.skipif(sys.platform != "linux" or not ctypes.util.find_library("c"), reason="glibc tunables are Linux-only")
def test_tunables_take_effect_in_glibc():
    """The heap-kept commands put a 64 MB block on the heap (no mmap'd chunk); `convert` still mmaps it."""
    def mmapped(command):
        env = {**os.environ, "GLIBC_TUNABLES": cli.malloc_tunables(command)}
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True)
        if out.returncode:
            pytest.skip(f"no mallinfo2 here (glibc < 2.33?): {out.stderr.strip()[-200:]}")
        return int(out.stdout)
    assert mmapped("train") == 0
    assert mmapped("convert") >= 64 << 20
