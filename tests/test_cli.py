"""The `jaxvlm` console command restarts itself once with its malloc tunables (see `jaxvlm.cli`)."""
import sys

from jaxvlm import cli


def test_console_command_restarts_once_with_hugepages(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.os, "execv", lambda exe, args: calls.append((exe, args, dict(cli.os.environ))))
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(sys, "argv", ["jaxvlm", "eval", "--help"])
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("JAXVLM_NO_HUGEPAGES", raising=False)
    cli._restart_with_hugepages()
    (exe, args, env), = calls
    assert args == [sys.executable, "-m", "jaxvlm.cli", "eval", "--help"]
    assert env["GLIBC_TUNABLES"] == f"{cli.HUGEPAGE_TUNABLE}:{cli.HEAP_TUNABLES}"   # eval keeps its heap
    cli._restart_with_hugepages()            # the restarted process (tunable set) does not loop
    assert len(calls) == 1
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")    # a user's own tunables win
    monkeypatch.setenv("JAXVLM_NO_HUGEPAGES", "1")
    cli._restart_with_hugepages()
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
        cli._restart_with_hugepages()
        assert calls[-1]["GLIBC_TUNABLES"] == want
    assert "mmap_max=0" in cli.HEAP_TUNABLES and "trim_threshold" in cli.HEAP_TUNABLES
