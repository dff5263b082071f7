"""jaxvlm checkpoint -> HF safetensors + config.json (same as `jaxvlm convert to-hf`).

    python checkpoints_convert/jaxvlm_to_hf.py ckpt/llava-7b llava-7b-hf/ --max-shard-size 5GB
"""
import argparse
import sys

from jaxvlm.conversion import cli

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_arguments(parser)
    sys.exit(cli.main(parser.parse_args(["to-hf", *sys.argv[1:]])))
