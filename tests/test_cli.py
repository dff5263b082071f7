"""The `jaxvlm` console command restarts itself once with huge-page malloc (see `jaxvlm.cli`)."""
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
    assert env["GLIBC_TUNABLES"] == cli.HUGEPAGE_TUNABLE
    cli._restart_with_hugepages()            # the restarted process (tunable set) does not loop
    assert len(calls) == 1
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")    # a user's own tunables win
    monkeypatch.setenv("JAXVLM_NO_HUGEPAGES", "1")
    cli._restart_with_hugepages()
    assert len(calls) == 1
