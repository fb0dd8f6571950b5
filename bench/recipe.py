"""The Fashion-MNIST recipe search: which main-job recipe reaches the accuracy target in
the least wall time, measured end to end.

Each trial is the README's training command on all 70,000 images,
``imgcls train --config jobs/configs/fashion_mnist.yaml --num-cpus N <overrides>``,
run as a fresh process with a fresh run folder (so the decode-once cache is built
inside the timing), timed from the command's start to its exit: Ray start-up, listing,
decoding, training, and the test-split evaluation through the inference pipeline.
Results are appended to bench/results/recipe.json (one entry per trial, the winner
flagged by hand in jobs/configs/fashion_mnist.yaml).

Run alone on a quiet machine, data fetched first (imgcls fetch-data fashion-mnist DIR):
    .venv/bin/python bench/recipe.py --root out/data/fashion-mnist --name NAME -- --epochs 8 --width 24 ...
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time


def last_json(stdout: str) -> dict:
    """The JSON summary ``imgcls train`` prints last."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


def run_trial(root: str, overrides: list[str], workdir: str, num_cpus: int) -> dict:
    runs = os.path.join(workdir, "runs")
    shutil.rmtree(runs, ignore_errors=True)
    cmd = [sys.executable, "-m", "imgcls.cli", "train", "--config", "jobs/configs/fashion_mnist.yaml",
           "--num-cpus", str(num_cpus), "--root", root, "--storage-path", runs, *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    summary = last_json(proc.stdout)
    with open(os.path.join(summary["latest_checkpoint"], "history.json")) as f:
        history = json.load(f)
    notes = [line for line in proc.stdout.splitlines() if " cache: " in line]
    return {"overrides": overrides, "seconds": round(seconds, 1), "test": summary.get("test"),
            "cache": notes, "epochs": [{k: h[k] for k in ("epoch", "epoch_seconds", "images_per_s", "train_accuracy",
                                                          "val_accuracy")} for h in history]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="Fashion-MNIST ImageFolder tree, all 70,000 images")
    p.add_argument("--name", required=True, help="label of this trial in the results")
    p.add_argument("--workdir", default="out/bench/recipe")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--out", default="bench/results/recipe.json")
    p.add_argument("overrides", nargs="*", help="imgcls train flags after --")
    args = p.parse_args()
    result = {"name": args.name, "cpus": args.num_cpus, **run_trial(args.root, args.overrides, args.workdir,
                                                                     args.num_cpus)}
    trials = json.load(open(args.out)) if os.path.exists(args.out) else {"trials": []}
    trials["trials"].append(result)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(trials, f, indent=2)
    test = result["test"] or {}
    print(f"{args.name}: test accuracy {test.get('accuracy')} in {result['seconds']} s  ({' '.join(args.overrides)})")


if __name__ == "__main__":
    main()
