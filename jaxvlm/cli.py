"""The `jaxvlm` command: one subcommand per module, imported only when used.

Each subcommand module defines `add_arguments(parser)` and `main(args) -> int | None`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": ("jaxvlm.demo", "Embedded default: shapes world -> train tiny VLM -> decode -> evaluate."),
    "generate": ("jaxvlm.generate.cli", "Decode answers for images + prompts with a converted checkpoint."),
    "train": ("jaxvlm.train.cli", "Train from a Python config with --set overrides."),
    "eval": ("jaxvlm.eval.cli", "Score a predictions JSONL (CHAIR, POPE, METEOR, REC, VQA, ...)."),
    "convert": ("jaxvlm.conversion.cli", "Convert Hugging Face checkpoints to jaxvlm and back."),
}


def main(argv: list[str] | None = None) -> int:
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
    rc = importlib.import_module(SUBCOMMANDS[args.command][0]).main(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
