"""The main job on a small real dataset (Fashion-MNIST): fetch, train, evaluate, bulk-label."""

import sys

from imgcls.cli import cli

if __name__ == "__main__":
    cli(["demo", *sys.argv[1:]])
