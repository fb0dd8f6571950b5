"""Entry point for `ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/fashion_mnist.yaml`."""

import sys

from imgcls.cli import cli

if __name__ == "__main__":
    cli(["train", *sys.argv[1:]])
