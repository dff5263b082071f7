"""`jaxvlm train --config configs/train_tiny.py --set train.steps=20 --set mesh.fsdp=4`.

Multi-host: `jax.distributed.initialize()` runs when the environment says this is one process of
many (JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID, as launch/gpu_slurm.sh sets;
or a TPU VM pod slice, where jax finds the coordinator itself). Metrics go to
<workdir>/metrics.jsonl (and TensorBoard when tensorboardX / torch.utils.tensorboard imports).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="Python file defining get_config()")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set optim.default_lr=3e-5")
    parser.add_argument("--workdir", default=None, help="shortcut for --set train.workdir=...")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _multi_process_env() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") and int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
        return True
    # TPU VM pod slice: more than one worker host
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def maybe_initialize_distributed() -> None:
    import jax
    if not _multi_process_env():
        return
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]),
                                   process_id=int(env["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()   # TPU: coordinator and ids come from the TPU metadata


def main(args: argparse.Namespace) -> int:
    from jaxvlm.train.config import apply_overrides, load_config
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)   # orbax logs every file it renames
    try:
        cfg = load_config(args.config)
        overrides = list(args.overrides) + ([f"train.workdir={args.workdir}"] if args.workdir else [])
        cfg = apply_overrides(cfg, overrides)
    except (FileNotFoundError, KeyError, TypeError, ValueError) as e:
        print(f"jaxvlm train: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    maybe_initialize_distributed()
    from jaxvlm.train.loop import NonFiniteError, train
    try:
        summary = train(cfg, progress=not args.no_progress)
    except NonFiniteError as e:
        print(f"jaxvlm train: {e}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError) as e:
        print(f"jaxvlm train: {e}", file=sys.stderr)
        return 2
    print({k: v for k, v in summary.items()})
    return 0
