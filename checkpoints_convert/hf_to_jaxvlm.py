"""HF checkpoint -> jaxvlm checkpoint (same as `jaxvlm convert to-jaxvlm`).

    python checkpoints_convert/hf_to_jaxvlm.py llava-v1.5-7b/ ckpt/llava-7b \
        --vision-tower clip-vit-large-patch14-336/ --dtype bfloat16
"""
import argparse
import sys

from jaxvlm.conversion import cli

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_arguments(parser)
    sys.exit(cli.main(parser.parse_args(["to-jaxvlm", *sys.argv[1:]])))
