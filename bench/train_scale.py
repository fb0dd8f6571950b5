"""Training from manifests on S3 at 10,000 and 200,000 rows, in one run: the driver's
memory, the time to the first step, and the cache-writing rate beside ``imgcls predict``'s
rate over the same objects.

Set-up: the loopback S3 server of the tests (moto's ``ThreadedMotoServer`` in this
process, as ``tests/conftest.py``'s ``s3_server``; this process only waits while the
commands run). The images are real Fashion-MNIST PNGs (28 px, the Debian package
through ``imgcls.datasets``; 70,000 distinct, in a seeded shuffled order), stored once
under distinct keys ``rows/{i:07d}.png``: row ``i`` holds image ``i % 70,000``, so past
70,000 rows an image comes again under a new key (every object is fetched and decoded
all the same). They are written straight into the server's store (``upload_rows``: over
HTTP, moto's PUTs would take an hour here); every read goes through its S3 API. Each
size has its manifest, ``s3://bench/manifest-{N}.parquet`` (``path``, ``label``: the
image's class).

Per size, two commands as a user runs them, each in its own process with its own local
Ray cluster (``--num-cpus``, all the machine's CPUs):
1. ``imgcls train --root s3://bench/manifest-{N}.parquet``: the small CNN at 28 px, one
   epoch, 5% validation, no test split (its evaluation would be a labelling run more),
   run folder and cache on local disk. Figures: ``driver_peak_rss_mb`` (the largest
   ``VmHWM`` of the ``imgcls train`` process itself, the Ray driver, sampled every 0.2 s:
   ``bench/scale.py``'s ``ProcessWatch``); ``seconds_to_first_step`` (from the command's
   start to the first optimisation step, the run's own ``first_step_time``);
   ``cache_images``, ``cache_seconds`` and ``cache_images_per_s`` (the train and val
   caches' one-time read and decode, from the command's ``... cache: decoded N images
   ... in S s`` lines); ``cache_wait_seconds`` (how long the first epoch waited for it);
   ``process_seconds``.
2. ``imgcls predict --input s3://bench/manifest-{N}.parquet`` with an untrained small CNN
   at 28 px (``bench/scale.py``'s ``run_predict``), which reads and decodes the same
   objects: its ``images_per_s`` (rows over the job's own seconds) and
   ``read_decode_images_per_s`` (rows over its seconds after planning, the figure the
   ratio divides by: the cache's seconds do not count the listing either).

``ratios``: ``train_driver_memory_200k_vs_10k`` (target at most 1.3) and
``cache_write_vs_predict_read_decode`` (at 200,000 rows; target at least 0.8), with the
same ratio at 10,000 rows and the time to the first step at both sizes beside the
decode's seconds (the first epoch waits for the whole decode: the time to the first step
grows with the rows, at the cache-writing rate). Sections keep their names (``rows_10k``,
``rows_200k``) at whatever sizes the command line gives; ``rows`` in each says what ran.

Run alone on a quiet machine (every read goes through one Python S3 server, at a few
hundred requests a second: 200,000 rows, read twice, take tens of minutes):
    .venv/bin/python bench/train_scale.py [--workdir out/bench-train-scale] [--out bench/results/train_scale.json]
A smoke run at small sizes:
    .venv/bin/python bench/train_scale.py --small 500 --large 2000 --out out/bench-train-scale/smoke.json

What the figures say: helpers' test runs shared the machine for much of the committed
run (load 9 to 20), so the rates are lower than on a quiet one; the ratios set figures
of the same run side by side. The first epoch waits for the whole decode: the time to
the first step is Ray's and Ray Train's start-up plus the rows over the cache-writing
rate, so it grows linearly with the data (20x the rows, 20x the wait).
"""

import argparse
import json
import os
import random
import re
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipe import last_json  # noqa: E402
from scale import machine, make_small_checkpoint, run_predict, run_watched, write  # noqa: E402

BUCKET = "bench"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
CACHE_LINE = re.compile(r"^(train|val) cache: decoded (\d+) images .* in ([0-9.]+) s$")


def start_s3_server():
    """moto's ThreadedMotoServer on loopback, in this process (as the tests' ``s3_server``),
    with the bucket made; returns (the server, its endpoint)."""
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update({**S3_ENV, "FSSPEC_S3_ENDPOINT_URL": endpoint})  # the commands and their Ray workers inherit it
    s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir(BUCKET)
    return server, endpoint


def source_images(workdir: str) -> list[tuple[str, str]]:
    """(file, class) of every real Fashion-MNIST image, in a fixed shuffled order (so that
    any first rows hold every class)."""
    from imgcls.datasets import fetch_fashion_mnist

    root = fetch_fashion_mnist(os.path.join(workdir, "fashion-mnist"))
    images = [(os.path.join(root, c, f), c) for c in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, c))
              for f in sorted(os.listdir(os.path.join(root, c)))]
    random.Random(0).shuffle(images)
    return images


def upload_rows(sources: list[tuple[str, str]], rows: int, done: int) -> float:
    """Stores rows ``done`` .. ``rows`` - 1 as ``rows/{i:07d}.png`` (image ``i % len(sources)``)
    straight into the server's store, which this process holds; returns the seconds it
    took. Not over HTTP: moto takes about 50-150 PUT requests a second on 2 busy cores,
    an hour for 200,000 objects, and the upload is not what is measured. Reads, the
    measured part, all go through the server's S3 API."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    store = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    began = time.perf_counter()
    for i in range(done, rows):
        with open(sources[i % len(sources)][0], "rb") as f:
            store.put_object(BUCKET, f"rows/{i:07d}.png", f.read())
    return time.perf_counter() - began


def write_manifest(fs, sources: list[tuple[str, str]], rows: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    uri = f"s3://{BUCKET}/manifest-{rows}.parquet"
    table = pa.table({"path": [f"s3://{BUCKET}/rows/{i:07d}.png" for i in range(rows)],
                      "label": [sources[i % len(sources)][1] for i in range(rows)]})
    with fs.open(uri, "wb") as f:
        pq.write_table(table, f)
    return uri


def run_train(name: str, manifest: str, work: str, num_cpus: int, logs: str) -> dict:
    """``imgcls train`` on ``manifest`` in its own process and Ray cluster, watched."""
    runs = os.path.join(work, f"runs-{name}")
    shutil.rmtree(runs, ignore_errors=True)
    cmd = [sys.executable, "-m", "imgcls.cli", "train", "--num-cpus", str(num_cpus), "--root", manifest,
           "--arch", "small_cnn", "--image-size", "28", "--augment", "light", "--epochs", "1", "--batch-size", "128",
           "--num-workers", "2", "--val-fraction", "0.05", "--test-fraction", "0", "--storage-path", runs,
           "--name", name]
    stdout, watch, process_seconds, began_wall = run_watched(name, "imgcls train", cmd, runs, logs)
    summary = last_json(stdout)
    with open(os.path.join(summary["latest_checkpoint"], "history.json")) as f:
        history = json.load(f)
    caches = {m.group(1): (int(m.group(2)), float(m.group(3)))
              for m in map(CACHE_LINE.match, stdout.splitlines()) if m}
    cache_images, cache_seconds = sum(n for n, _ in caches.values()), sum(s for _, s in caches.values())
    first = history[0]
    return {
        "driver_peak_rss_mb": watch.driver_hwm_kb / 1024, "tree_peak_rss_mb": watch.tree_rss_kb / 1024,
        "proc_samples": watch.samples,
        "seconds_to_first_step": first["first_step_time"] - began_wall,
        "cache_images": cache_images, "cache_seconds": cache_seconds,
        "cache_images_per_s": cache_images / cache_seconds if cache_seconds else None,
        "caches": {k: {"images": n, "seconds": s} for k, (n, s) in caches.items()},
        "decode_overlapped": bool(first.get("decode_overlapped")),
        "cache_wait_seconds": first.get("cache_wait_seconds", 0.0), "resident": first.get("resident"),
        "first_epoch_images_per_s": first.get("images_per_s"), "process_seconds": process_seconds,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", type=int, default=10_000, help="rows of the smaller manifest")
    p.add_argument("--large", type=int, default=200_000, help="rows of the larger manifest")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--workdir", default="out/bench-train-scale")
    p.add_argument("--out", default="bench/results/train_scale.json")
    args = p.parse_args()
    began = time.perf_counter()
    work = os.path.abspath(args.workdir)
    logs = os.path.join(work, "logs")
    os.makedirs(work, exist_ok=True)

    import s3fs

    server, endpoint = start_s3_server()
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "settings": {
        "num_cpus": args.num_cpus, "model": {"arch": "small_cnn", "image_size": 28},
        "train": "1 epoch, 2 workers, batch 128, light augmentation, 5% validation, no test split",
        "images": "real Fashion-MNIST PNGs (28 px), 70,000 distinct, each row under its own key",
        "s3": "moto ThreadedMotoServer on loopback, in the benchmark's process; objects stored straight into it"}, "setup": {}}

    def save(done: bool) -> None:
        results["complete"] = done
        results["total_seconds"] = time.perf_counter() - began
        write(results, args.out)

    try:
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        sources = source_images(work)
        ckpt = make_small_checkpoint(os.path.join(work, "ckpt-small_cnn-28"), "small_cnn", 28, None)
        uploaded = 0
        for key, rows in (("rows_10k", args.small), ("rows_200k", args.large)):
            seconds = upload_rows(sources, rows, uploaded)
            results["setup"][f"{key}_upload"] = {"objects": rows - uploaded, "seconds": seconds,
                                                 "objects_per_s": (rows - uploaded) / seconds if seconds else None}
            uploaded = max(uploaded, rows)
            manifest = write_manifest(fs, sources, rows)
            results[key] = case = {"rows": rows, "distinct_images": min(rows, len(sources)), "manifest": manifest}
            case["train"] = run_train(key, manifest, work, args.num_cpus, logs)
            save(False)
            case["predict"] = run_predict(f"{key}_predict", manifest, ckpt, os.path.join(work, f"out-{key}"),
                                          args.num_cpus, None, logs)
            predicted = case["predict"]
            assert predicted["rows"] == predicted["ok"] == rows, predicted
            # Its labelling after the plan: planning reads the manifest through Ray Data
            # (about 9 s whatever its size), where training lists it before its decode.
            predicted["read_decode_images_per_s"] = rows / (predicted["seconds"] - predicted["plan_seconds"])
            case["cache_write_vs_predict_read_decode"] = \
                case["train"]["cache_images_per_s"] / predicted["read_decode_images_per_s"]
            save(False)
    except Exception as e:  # recorded with the cases before it, then raised
        results["failed"] = str(e)[-4000:]
        save(False)
        raise
    finally:
        server.stop()
    small, large = results["rows_10k"], results["rows_200k"]
    results["ratios"] = {
        "train_driver_memory_200k_vs_10k": large["train"]["driver_peak_rss_mb"] / small["train"]["driver_peak_rss_mb"],
        "cache_write_vs_predict_read_decode": large["cache_write_vs_predict_read_decode"],
        "cache_write_vs_predict_read_decode_10k": small["cache_write_vs_predict_read_decode"],
        "seconds_to_first_step_10k": small["train"]["seconds_to_first_step"],
        "seconds_to_first_step_200k": large["train"]["seconds_to_first_step"],
        "cache_seconds_10k": small["train"]["cache_seconds"],
        "cache_seconds_200k": large["train"]["cache_seconds"],
        "rows_200k_vs_10k": large["rows"] / small["rows"],
    }
    save(True)
    print(json.dumps(results["ratios"], indent=2))


if __name__ == "__main__":
    main()
