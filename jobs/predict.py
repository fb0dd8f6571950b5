"""Entry point for `ray job submit --working-dir . -- python jobs/predict.py --model CKPT --input URI --output URI`."""

import sys

from imgcls.cli import cli

if __name__ == "__main__":
    cli(["predict", *sys.argv[1:]])
