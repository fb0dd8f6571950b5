"""Real-time classification: imgcls serve against the in-process bound and a plain FastAPI app, in one run.

The same real JPEGs (``bench/photos.py``: crops of real photos, sides of 400-640 px)
and EfficientNet-Lite0 at 224 px with its packaged ImageNet weights (a new 8-class head),
on this machine:

- ``in_process``: the bound. The program the replicas run (``inference.program``:
  BatchNorm folded, traced) and their decode (``inference.decode.Decoder``), in this
  process with all cores, ``--max-batch-size`` images a call, over the photos' bytes.
- ``plain_fastapi``: what a user writes first: one uvicorn process with one FastAPI
  route that decodes the body and runs one forward per request (the same decode and
  program, so only the serving differs).
- ``imgcls_serve``: ``imgcls serve`` (its own local Ray cluster, one replica with all
  cores' threads: on 2 cores a second replica would only split them), dynamic batching
  at ``--max-batch-size``.

The load generator is open-loop: an asyncio client (httpx) sends each request at its
scheduled time, whether or not the earlier ones were answered, and measures latency
from that scheduled time, so a slow server cannot hide its queue (coordinated
omission). It targets 127.0.0.1 only, and each phase stops after a bounded count and time.

For each server: saturation throughput (a closed loop of ``--concurrency`` clients for
``--seconds``: answers per second), then open-loop phases at 25%, 50% and 75% of it
(p50, p99, p99.9 latency) and at 2x (the share of 503s and the accepted requests'
p99). For imgcls serve, a model update under the 50% load: failed requests (anything
but 200) from the update's start until the answers carry the new model_id.

Run alone on a quiet machine (the client and Serve's proxy share the cores):
    .venv/bin/python bench/serve.py [--seconds 20] [--out bench/results/serve.json]

What the figures say (bench/results/serve.json, 2 cores): on 2 CPU cores batching buys
little. The in-process bound at 16 images a call is only 1.24x the plain app's one
forward a request, so no server here can reach 1.5x the plain app; the client, the
server and the model share the same two cores. ``imgcls serve`` runs Serve's throughput
mode (``RAY_SERVE_THROUGHPUT_OPTIMIZED``: the replica answers HTTP itself, no proxy hop):
behind Serve's proxy, the run before it saturated at 54.9 answers/s, 0.69x the plain app.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def make_checkpoints(folder: str) -> list[str]:
    """Two EfficientNet-Lite0 checkpoints (packaged ImageNet weights, 8-class heads of two
    seeds): the served model and the update's."""
    import torch

    from imgcls.checkpoint import save_checkpoint
    from imgcls.config import JobConfig, ModelConfig
    from photos import SOURCES

    from imgcls.models import create_model

    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = os.path.join(folder, f"lite0-{seed}")
        save_checkpoint(path, create_model("efficientnet_lite0", len(SOURCES), weights="packaged"),
                        JobConfig(model=ModelConfig(arch="efficientnet_lite0", weights="packaged", image_size=224)),
                        sorted(SOURCES), history=[])
        out.append(path)
    return out


def in_process_rate(model: str, photos: list[bytes], batch: int, seconds: float) -> float:
    """Images per second of decode + model in this process, ``batch`` at a time."""
    import torch

    from imgcls.inference.decode import Decoder
    from imgcls.inference.model_stage import Classifier
    from imgcls.inference.program import build_program

    torch.set_num_threads(os.cpu_count())
    payload = build_program(model)
    classifier = Classifier(payload, embeddings=True)
    decoder = Decoder(payload.image_size, 64_000_000, max_images=batch)
    named = [(str(i), data) for i, data in enumerate(photos)]
    classifier.label(decoder.decode(named[:batch]))  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        chunk = [named[(done + i) % len(named)] for i in range(batch)]
        classifier.label(decoder.decode(chunk))
        done += batch
    return done / (time.perf_counter() - start)


PLAIN_APP = '''
import os, sys
import torch
from fastapi import FastAPI, Request
from imgcls.inference.decode import Decoder
from imgcls.inference.model_stage import Classifier
from imgcls.inference.program import build_program

torch.set_num_threads(os.cpu_count())
payload = build_program(os.environ["BENCH_MODEL"])
classifier = Classifier(payload, embeddings=True)
decoder = Decoder(payload.image_size, 64_000_000, max_images=1)
app = FastAPI()

@app.post("/v1/classify")
async def classify(request: Request):
    row = classifier.label(decoder.decode([("request", await request.body())])).to_pylist()[0]
    return {"label": row["label"], "score": row["score"], "model_id": row["model_id"]}
'''


class Server:
    """A server process and its URL; stops it on exit."""

    def __init__(self, argv: list[str], url: str, env: dict, ready_timeout: float = 600):
        self.url, self.log = url, tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        import httpx

        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv} exited: {open(self.log.name).read()[-3000:]}")
            try:
                if httpx.post(f"{url}/v1/classify", content=b"", timeout=5).status_code in (200, 422):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{argv} is not answering after {ready_timeout} s")

    def output(self) -> str:
        return open(self.log.name).read()

    def stop(self):
        self.proc.send_signal(2)  # Ctrl-C: imgcls serve shuts its application down
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def closed_loop(url: str, photos: list[bytes], concurrency: int, seconds: float) -> float:
    """Answers per second with ``concurrency`` clients sending back to back."""
    import httpx

    done, stop = 0, time.perf_counter() + seconds

    async def client(i: int):
        nonlocal done
        j = i
        while time.perf_counter() < stop:
            r = await http.post(f"{url}/v1/classify", content=photos[j % len(photos)])
            done += r.status_code == 200
            j += concurrency

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(concurrency)))
        return done / (time.perf_counter() - start)


async def open_loop(url: str, photos: list[bytes], rate: float, seconds: float, during=None) -> dict:
    """Sends at ``rate`` per second for ``seconds`` (at most rate*seconds requests), each
    at its scheduled time; latency counts from the schedule. ``during`` (a coroutine
    function taking the results list) runs alongside, e.g. a model update."""
    import httpx

    n = int(rate * seconds)
    results: list[tuple[float, float, int, str]] = []  # (scheduled, latency s, status, model_id)

    async def send(i: int, scheduled: float):
        try:
            r = await http.post(f"{url}/v1/classify", content=photos[i % len(photos)])
            status, model_id = r.status_code, (r.json().get("model_id") if r.status_code == 200 else "")
        except httpx.HTTPError:
            status, model_id = 0, ""
        results.append((scheduled, time.perf_counter() - scheduled, status, model_id))

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=2000)) as http:
        start, tasks = time.perf_counter(), []
        side = asyncio.create_task(during(results)) if during else None
        for i in range(n):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(i, scheduled)))
        await asyncio.gather(*tasks)
        extra = await side if side else None
    ok = np.array([lat for _, lat, status, _ in results if status == 200]) * 1000
    statuses = [status for _, _, status, _ in results]
    out = {"rate": rate, "sent": n, "ok": int(len(ok)), "share_503": statuses.count(503) / max(n, 1),
           "failed_other": sum(s not in (200, 503) for s in statuses)}
    if len(ok):
        out.update({f"p{q}_ms": float(np.percentile(ok, q)) for q in (50, 99, 99.9)})
    if extra is not None:
        out["during"] = extra
    return out


def load_profile(url: str, photos: list[bytes], args, update=None) -> dict:
    saturation = asyncio.run(closed_loop(url, photos, args.concurrency, args.seconds))
    out = {"saturation_per_s": saturation}
    for share in (0.25, 0.5, 0.75, 2.0):
        out[f"load_{int(share * 100)}pct"] = asyncio.run(open_loop(url, photos, share * saturation, args.seconds))
        print(json.dumps({url: out[f"load_{int(share * 100)}pct"]}), flush=True)
    if update is not None:
        # long enough for the update (a new program built in the replica) to land inside the phase
        out["update"] = asyncio.run(open_loop(url, photos, 0.5 * saturation, max(args.seconds, 30), during=update))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="Length of each load phase.")
    parser.add_argument("--photos", type=int, default=64, help="Distinct photos sent (cycled).")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32, help="Closed-loop clients for the saturation rate.")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "out", "bench-serve"))
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "serve.json"))
    args = parser.parse_args()

    from photos import build_photo_set

    os.makedirs(args.workdir, exist_ok=True)
    folder = build_photo_set(os.path.join(args.workdir, "photos"), per_class=max(1, args.photos // 8))
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".jpg"))
    photos = [open(f, "rb").read() for f in files[:args.photos]]
    models = make_checkpoints(args.workdir)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": ROOT}
    results = {"machine": {"cpus": os.cpu_count()}, "date": time.strftime("%Y-%m-%d"), "photos": len(photos),
               "model": "efficientnet_lite0 @ 224 px",
               "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms, "seconds": args.seconds}

    results["in_process"] = {"images_per_s": in_process_rate(models[0], photos, args.max_batch_size, args.seconds)}
    print(json.dumps({"in_process": results["in_process"]}), flush=True)

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        app = os.path.join(tmp, "plain_app.py")
        with open(app, "w") as f:
            f.write(PLAIN_APP)
        plain = Server([sys.executable, "-m", "uvicorn", "--app-dir", tmp, "plain_app:app", "--host", LOOPBACK,
                        "--port", str(port), "--log-level", "warning"], f"http://{LOOPBACK}:{port}",
                       {**env, "BENCH_MODEL": models[0]})
        try:
            results["plain_fastapi"] = load_profile(plain.url, photos, args)
        finally:
            plain.stop()

    port = free_port()
    served = Server([sys.executable, "-m", "imgcls.cli", "serve", "--model", models[0], "--port", str(port),
                     "--num-cpus", str(os.cpu_count()), "--num-replicas", "1", "--replica-cpus", "1",
                     "--threads", str(os.cpu_count()), "--max-batch-size", str(args.max_batch_size),
                     "--batch-wait-ms", str(args.batch_wait_ms), "--max-ongoing-requests", "64",
                     "--max-queued-requests", "128"], f"http://{LOOPBACK}:{port}", env)

    async def update(results_so_far: list) -> dict:
        """Swaps to the second model 5 s into the phase; counts the
        requests that failed from then until the answers carry the new model_id."""
        await asyncio.sleep(5)
        address = re.search(r"Ray cluster is at (\S+):", served.output())
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "imgcls.cli", "serve", "--update", "--model", models[1],
            env={**env, "RAY_ADDRESS": address.group(1)}, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        finished = time.perf_counter()
        await asyncio.sleep(max(0.0, max(args.seconds, 30) - 5 - (finished - started) - 1))
        old = results_so_far[0][3]
        new_at = [s for s, _, status, m in results_so_far if status == 200 and m != old]
        window = [r for r in results_so_far if r[0] >= started and (not new_at or r[0] <= min(new_at) + 1)]
        return {"update_exit": proc.returncode, "update_seconds": finished - started,
                "new_model_after_s": (min(new_at) - started) if new_at else None,
                "failed_requests": sum(status != 200 for _, _, status, _ in window), "requests_in_window": len(window),
                "stderr_tail": err.decode()[-300:] if proc.returncode else ""}

    try:
        results["imgcls_serve"] = load_profile(served.url, photos, args, update=update)
    finally:
        served.stop()

    serve, plain = results["imgcls_serve"], results["plain_fastapi"]
    upd = serve["update"]["during"]
    results["ratios"] = {
        "serve_saturation_vs_in_process": serve["saturation_per_s"] / results["in_process"]["images_per_s"],
        "serve_saturation_vs_plain_fastapi": serve["saturation_per_s"] / plain["saturation_per_s"],
        "serve_p99_ms_at_half_load": serve["load_50pct"].get("p99_ms"),
        "failed_requests_during_update": upd["failed_requests"] + serve["update"]["failed_other"],
    }
    results["targets"] = {"serve_saturation_vs_in_process": ">= 0.7", "serve_saturation_vs_plain_fastapi": ">= 1.5",
                          "serve_p99_ms_at_half_load": "<= 250", "failed_requests_during_update": "== 0"}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results["ratios"], indent=2))


if __name__ == "__main__":
    main()
