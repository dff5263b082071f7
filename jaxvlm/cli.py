"""The `jaxvlm` command: one subcommand per module, imported only when used.

Each subcommand module defines `add_arguments(parser)` and `main(args) -> int | None`.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Mapping

# XLA:CPU writes large intermediates into freshly mmap'd memory on every call, and first-touching
# those pages is a third of causal attention's time: 32-36 ms a layer at T=1024 that way, 20-23 ms
# without it (session 16's AVX2 box). glibc reads its tunables only at start-up, hence a re-exec with
# - transparent huge pages behind malloc (`hugetlb=1`: forward 1.1-1.25x, train step ~1.13x faster on
#   earlier boxes), and
# - a heap that keeps what it has (`HEAP_TUNABLES`: no mmap'd chunks, no trimming), so each call reuses
#   the last call's pages. Session 16, in alternating processes: the LLaVA forward bench 1.06-1.13x
#   torch at MFU 0.87-0.89 (huge pages alone: 0.97x, 0.82), Qwen2.5-VL 1.07-1.18x (0.97x), the demo's
#   train step +7-11%. The price is memory never handed back, so `convert`, whose target is peak RSS (1.26x of the
#   checkpoint with huge pages alone, 1.57x with the heap kept), gets huge pages only.
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
HEAP_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296"
LEAN_COMMANDS = ("convert",)


def malloc_tunables(command: str) -> str:
    """The `GLIBC_TUNABLES` value the `jaxvlm <command>` process restarts with."""
    return HUGEPAGE_TUNABLE if command in LEAN_COMMANDS else f"{HUGEPAGE_TUNABLE}:{HEAP_TUNABLES}"


def tunables_to_set(command: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """`malloc_tunables(command)`, or None where none are to be set: off Linux, when the user set
    `GLIBC_TUNABLES` (theirs win), or with `JAXVLM_NO_HUGEPAGES`. The command and the benches
    (`bench/timing.child_env`) both decide here."""
    if sys.platform != "linux" or "GLIBC_TUNABLES" in environ or environ.get("JAXVLM_NO_HUGEPAGES"):
        return None
    return malloc_tunables(command)


def _restart_with_malloc_tunables() -> None:
    """Re-exec this command once with `tunables_to_set` in `GLIBC_TUNABLES` (the restarted process
    has them set, so it does not loop)."""
    tunables = tunables_to_set(sys.argv[1] if len(sys.argv) > 1 else "")
    if tunables is None:
        return
    os.environ["GLIBC_TUNABLES"] = tunables
    try:
        os.execv(sys.executable, [sys.executable, "-m", "jaxvlm.cli", *sys.argv[1:]])
    except OSError:
        del os.environ["GLIBC_TUNABLES"]       # carry on without

SUBCOMMANDS = {
    "demo": ("jaxvlm.demo", "Embedded default: shapes world -> train tiny VLM -> decode -> evaluate."),
    "generate": ("jaxvlm.generate.cli", "Decode answers for images + prompts with a converted checkpoint."),
    "train": ("jaxvlm.train.cli", "Train from a Python config with --set overrides."),
    "eval": ("jaxvlm.eval.cli", "Score a predictions JSONL (CHAIR, POPE, METEOR, REC, VQA, ...)."),
    "convert": ("jaxvlm.conversion.cli", "Convert Hugging Face checkpoints to jaxvlm and back."),
    "sc-tune": ("jaxvlm.methods.sc_tune_cli", "SC-Tune: describer PPO / locator SFT phases on Qwen-VL-Chat."),
}


def main(argv: list[str] | None = None) -> int:
    """The console command (argv None) prints bad input's error as one message and exits 2; a call from
    Python (argv given) raises it."""
    console = argv is None
    if console:
        _restart_with_malloc_tunables()
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="jaxvlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    # Only the chosen subcommand's module is imported (jax/torch imports are slow).
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    run = importlib.import_module(SUBCOMMANDS[args.command][0]).main
    if not console or os.environ.get("JAXVLM_TRACEBACK"):
        return int(run(args) or 0)
    try:
        return int(run(args) or 0)
    except (FileNotFoundError, ValueError, NotImplementedError) as e:
        # Bad input (a path, a record, an image, a flag's value): the message names it; a traceback
        # would bury it.
        print(f"jaxvlm {args.command}: {e}\n(JAXVLM_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
