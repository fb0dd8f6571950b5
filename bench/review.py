"""Driver memory and wall time of `imgcls review` and `imgcls evaluate --predictions` over
runs of 1 and 10 million prediction rows.

The rows are real labelling output: a small CNN trained here for a few epochs (plain
torch, as the tests' model) on Fashion-MNIST files labels `--images` other files with
the labelling stage itself (`pipeline.predict_here`, what `imgcls predict` runs in its
actors), with embeddings. Those rows are repeated under distinct paths
(`/r<copy><path>`, so each keeps its class folder as its true label) to 1,000,000 and
10,000,000 rows without embeddings, and to 1,000,000 with them, written as parts of
100,000 rows as a labelling job writes its parts.

Each command runs in a process of its own from its start (imports included); its peak
resident memory is the process's maximum RSS (``getrusage`` of a small launcher's
children; neither command starts Ray here, so the process is the whole driver), its
wall time the process's.
Cases: `review --n 100` (margin) on 1M and 10M, `review --n 100 --dedup 0.99` on 1M with
embeddings, `evaluate --predictions` on 1M and 10M (and 1M with embeddings, which it
copies into its predictions.parquet).

    python bench/review.py            # bench/results/review.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

PART_ROWS = 100_000


def train(root: str, folder: str, per_class: int, epochs: int) -> tuple[str, set]:
    """A small CNN trained on the first ``per_class`` files a class (the tests'
    ``train_small_cnn``), saved as an imgcls checkpoint at ``folder``; returns it and the
    files it was trained on."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from plain_training import train_small_cnn

    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files = {c: sorted(os.listdir(os.path.join(root, c)))[:per_class] for c in classes}
    return train_small_cnn(root, files, folder, epochs), {os.path.join(root, c, n) for c in classes for n in files[c]}


def label(root: str, model: str, used: set, images: int):
    """Real labelling output (with embeddings) of ``images`` files the model did not see."""
    from imgcls.inference.pipeline import predict_here

    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    per_class = -(-images // len(classes))
    paths = []
    for c in classes:
        unseen = [p for p in (os.path.join(root, c, n) for n in sorted(os.listdir(os.path.join(root, c))))
                  if p not in used]
        paths += unseen[:per_class]
    return predict_here(paths[:images], model, embeddings=True)


def repeat(rows, total: int, folder: str, embeddings: bool) -> str:
    """``rows`` repeated under distinct paths to ``total`` rows, as parts of PART_ROWS rows."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not embeddings:
        rows = rows.drop_columns(["embedding"])
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for part, lo in enumerate(range(0, total, PART_ROWS)):
        index = np.arange(lo, min(lo + PART_ROWS, total))
        chunk = rows.take(pa.array(index % rows.num_rows))
        copy = pc.cast(pa.array(index // rows.num_rows), pa.string())
        chunk = chunk.set_column(0, "path", pc.binary_join_element_wise("/r", copy, chunk.column("path"), ""))
        pq.write_table(chunk, os.path.join(folder, f"part-{part:06d}.parquet"))
    return folder


# Runs the command and prints its peak RSS (KiB). The command is forked from this small
# process, not from the benchmark's: Linux carries a process's peak RSS across fork and
# exec, so a child of the benchmark (torch and the labelled rows loaded) would start at
# the benchmark's own peak.
LAUNCHER = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def measure(name: str, args: list[str], workdir: str) -> dict:
    """Wall time and peak RSS of ``imgcls *args`` in a process of its own."""
    out, err = os.path.join(workdir, "cmd.out"), os.path.join(workdir, "cmd.err")
    with open(out, "w") as stdout, open(err, "w") as stderr:
        began = time.perf_counter()
        code = subprocess.call([sys.executable, "-c", LAUNCHER, sys.executable, "-m", "imgcls.cli", *args],
                               stdout=stdout, stderr=stderr)
        seconds = time.perf_counter() - began
    if code != 0:
        raise RuntimeError(f"imgcls {' '.join(args)} failed:\n{open(err).read()[-3000:]}")
    summary = open(out).read()
    result = {"seconds": seconds, "peak_rss_mb": int(open(err).read().split()[-1]) / 1024}  # KiB on Linux
    print(f"{name}: {seconds:.1f} s, peak {result['peak_rss_mb']:.0f} MB", flush=True)
    return {**result, "summary": _without_paths(summary)}


def _without_paths(output: str):
    """A command's summary without the paths of its files: review's JSON, evaluate's line."""
    if "{" in output:
        return {k: v for k, v in json.loads(output[output.index("{"):]).items()
                if not (isinstance(v, str) and os.path.isabs(v))}
    return re.sub(r"\s+report\s+\S+", "", output.strip())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="out/bench/review")
    p.add_argument("--images", type=int, default=2000, help="files labelled, whose rows are repeated")
    p.add_argument("--rows", type=int, nargs=2, default=[1_000_000, 10_000_000], help="the small and the large run")
    p.add_argument("--embedding-rows", type=int, default=1_000_000, help="rows of the run with embeddings (--dedup)")
    p.add_argument("--n", type=int, default=100, help="review --n")
    p.add_argument("--dedup", type=float, default=0.99, help="review --dedup on the run with embeddings")
    p.add_argument("--keep", action="store_true", help="keep the runs written under --workdir")
    p.add_argument("--out", default="bench/results/review.json")
    args = p.parse_args()

    from imgcls.datasets import fetch_fashion_mnist

    began = time.perf_counter()
    os.makedirs(args.workdir, exist_ok=True)
    root = fetch_fashion_mnist(os.path.join(args.workdir, "data"), per_class=300 + -(-args.images // 10))
    model, used = train(root, os.path.join(args.workdir, "model"), per_class=300, epochs=3)
    rows = label(root, model, used, args.images)
    ok = rows.filter(rows.column("status").to_numpy(zero_copy_only=False) == "ok")
    accuracy = float(np.mean([p.split("/")[-2] == label for p, label in
                              zip(ok.column("path").to_pylist(), ok.column("label").to_pylist())]))
    print(f"labelled {rows.num_rows} files, accuracy {accuracy:.3f}", flush=True)
    small, large = args.rows
    runs = {"1m": (small, False), "10m": (large, False), "1m_embeddings": (args.embedding_rows, True)}
    results, sizes = {}, {}
    try:
        for name, (total, embeddings) in runs.items():
            folder = repeat(rows, total, os.path.join(args.workdir, f"run-{name}"), embeddings)
            sizes[name] = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
            out = os.path.join(args.workdir, f"out-{name}")
            review = ["review", "--predictions", folder, "--output", os.path.join(out, "review"), "--n", str(args.n)]
            results[name] = {"rows": total, "embeddings": embeddings, "bytes": sizes[name],
                             "review": measure(f"review {name}", review, args.workdir)}
            if embeddings:
                results[name]["review_dedup"] = measure(f"review --dedup {name}", review + ["--dedup", str(args.dedup)],
                                                          args.workdir)
            results[name]["evaluate"] = measure(f"evaluate {name}", ["evaluate", "--model", model, "--predictions", folder,
                                                 "--output", os.path.join(out, "eval")], args.workdir)
            if not args.keep:
                shutil.rmtree(folder)
                shutil.rmtree(out)
    finally:
        if not args.keep:
            for name in runs:
                shutil.rmtree(os.path.join(args.workdir, f"run-{name}"), ignore_errors=True)
    memory = {cmd: results["10m"][cmd]["peak_rss_mb"] / results["1m"][cmd]["peak_rss_mb"]
              for cmd in ("review", "evaluate")}
    result = {
        "machine": {"cpus": os.cpu_count()}, "date": time.strftime("%Y-%m-%d"),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "labelled_files": rows.num_rows, "accuracy": accuracy,
        "embedding_size": len(ok.column("embedding")[0]),
        "runs": results,
        "targets": {"review_driver_memory_10m_vs_1m_max": 1.5, "evaluate_driver_memory_10m_vs_1m_max": 1.5,
                    "review_10m_seconds_max": 120},
        "ratios": {"review_driver_memory_10m_vs_1m": memory["review"],
                   "evaluate_driver_memory_10m_vs_1m": memory["evaluate"],
                   "review_10m_seconds": results["10m"]["review"]["seconds"],
                   "review_10m_seconds_vs_target": results["10m"]["review"]["seconds"] / 120},
        "seconds": time.perf_counter() - began,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["ratios"]), flush=True)


if __name__ == "__main__":
    main()
