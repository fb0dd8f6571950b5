"""The GPU path, measured side by side in one run on one GPU machine.

On real photos written as JPEGs of realistic size (``bench/photos.py``: sides 400-640 px,
``--files`` in all), for ResNet-50 and MobileNetV3-Large at 224 px:
- ``model_only``: the bound: the forward imgcls runs (``models.inference_model``:
  BatchNorm folded, channels_last) in the inference precision (bf16 where the GPU has
  it), on uint8 batches already on the device and normalised there, no I/O; the rate
  at each batch size and the best;
- ``gpu_decode_only``: ``torchvision.io.decode_jpeg(device="cuda")`` in batches, then
  the eval resize and centre crop on the device;
- ``cpu_decode_only``: imgcls's CPU decoder (read, PIL draft-mode decode, resize, crop)
  in one process per core;
- ``imgcls``: ``imgcls predict --use-gpu`` end to end on a fresh local Ray cluster, over
  half the files and over all of them: ``seconds`` (the job's own timer),
  ``process_seconds`` (interpreter start to exit) and the steady rate,
  (extra files) / (extra seconds), free of the fixed start-up;
- ``imgcls_gpu_decode``: the same with ``--gpu-decode`` (the decode pool only reads; the
  model actor decodes JPEGs with nvjpeg), for ResNet-50: whether it should be the default;
- ``imgcls_program``: the same with ``--program export`` and ``--program compile``
  (``process_seconds`` shows what each costs to start), for ResNet-50.
Then training, ResNet-18 and ResNet-50 at 224 px (``standard`` augmentation, bf16
autocast, channels_last): the in-memory bound (``bench/train_baselines.py``: decoded
once to one uint8 tensor on the device, the same batched augmentation) and
``imgcls train --use-gpu`` with one worker; steady images/s of each.

``ratios``: ``resnet50_end_to_end_vs_model_only`` (imgcls's steady rate over the bound,
same precision) and ``resnet50_end_to_end_images_per_s``, and the same for the others.

The photos are built from 8 source photos (``bench/photos.py``); on a machine without
network, carry the folder that a run with network leaves in ``out/bench/photo-sources``
(3 MB; or point IMGCLS_PHOTO_SOURCES at a copy). Run on the GPU machine, alone
(``--smoke`` runs every part at toy sizes on whatever device there is, to check the script):
    .venv/bin/python bench/gpu.py [--files 20000] [--workdir out/bench/gpu] [--out bench/results/gpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from photos import SOURCES, build_photo_set  # noqa: E402
from recipe import last_json  # noqa: E402
from train_baselines import run_subprocess  # noqa: E402

ARCHS = ("resnet50", "mobilenet_v3_large")
TRAIN_ARCHS = ("resnet18", "resnet50")
SIZE = 224


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only(arch: str, device, batch_sizes: list[int], seconds: float) -> dict:
    """images/s of the inference forward at each batch size, normalisation on the device included."""
    import torch

    from imgcls.inference.model_stage import inference_dtype
    from imgcls.preprocess import ScaleNormalize
    from imgcls.models import create_model, get_spec, inference_model

    spec = get_spec(arch)
    dtype = inference_dtype("auto", device)
    model = inference_model(create_model(arch, len(SOURCES), image_size=SIZE), SIZE, device)
    model = model.to(dtype) if dtype is not None else model
    normalize = ScaleNormalize(spec.mean, spec.std).to(device)
    rates = {}
    for batch in batch_sizes:
        images = torch.randint(0, 256, (batch, SIZE, SIZE, 3), dtype=torch.uint8, device=device)
        with torch.inference_mode():
            def step():
                x = normalize.batch_hwc(images)
                logits, feats = model(x if dtype is None else x.to(dtype))
                return logits.float().softmax(1), feats.float()

            for _ in range(3):
                step()
            _sync(device)
            began, n = time.perf_counter(), 0
            while time.perf_counter() - began < seconds:
                step()
                n += batch
            _sync(device)
            rates[batch] = n / (time.perf_counter() - began)
    best = max(rates, key=rates.get)
    return {"arch": arch, "precision": str(dtype or "float32"), "images_per_s_by_batch": rates,
            "best_batch": best, "images_per_s": rates[best]}


def gpu_decode_only(files: list[str], device, batch: int = 256) -> dict:
    """torchvision's batched nvJPEG decode, then the eval resize and crop on the device."""
    import torch
    from torchvision.io import decode_jpeg

    from imgcls.preprocess import resize_center_crop

    datas = []
    for path in files:
        with open(path, "rb") as f:
            datas.append(torch.frombuffer(bytearray(f.read()), dtype=torch.uint8))
    short = int(SIZE / 0.875)  # the eval geometry: resize to 256, crop 224
    decode_jpeg(datas[:8], device=device)  # initialise the decoder
    _sync(device)
    began = time.perf_counter()
    for lo in range(0, len(datas), batch):
        decoded = decode_jpeg(datas[lo:lo + batch], device=device)
        for image in decoded:  # sizes differ: resized one by one, on the device
            resize_center_crop(image, short, SIZE)
    _sync(device)
    seconds = time.perf_counter() - began
    return {"files": len(files), "batch": batch, "seconds": seconds, "images_per_s": len(files) / seconds}


def _cpu_decode(paths: list[str]) -> int:
    import torch

    from imgcls.inference.decode import Decoder

    torch.set_num_threads(1)
    decoder = Decoder(SIZE, 64_000_000, 64)
    import numpy as np

    return sum(int((chunk["status"] == "ok").sum()) for chunk in decoder.chunks(np.array(paths, dtype=object)))


def cpu_decode_only(files: list[str], processes: int) -> dict:
    """imgcls's CPU decoder, one process per core, each on a slice of the files."""
    parts = [files[i::processes] for i in range(processes)]
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_cpu_decode, [p[:4] for p in parts]))  # start and import first
        began = time.perf_counter()
        ok = sum(pool.map(_cpu_decode, parts))
        seconds = time.perf_counter() - began
    return {"files": len(files), "ok": ok, "processes": processes, "seconds": seconds,
            "images_per_s": len(files) / seconds}


def save_random_checkpoint(arch: str, folder: str) -> str:
    """A checkpoint of ``arch`` with random weights: throughput does not depend on them."""
    import torch

    from imgcls.checkpoint import save_checkpoint
    from imgcls.config import JobConfig, ModelConfig
    from imgcls.models import create_model

    torch.manual_seed(0)
    save_checkpoint(folder, create_model(arch, len(SOURCES), image_size=SIZE),
                    JobConfig(model=ModelConfig(arch=arch, image_size=SIZE)), sorted(SOURCES), history=[])
    return folder


def imgcls_predict(model: str, manifest: str, output: str, use_gpu: bool, flags: tuple = ()) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    cmd = [sys.executable, "-m", "imgcls.cli", "predict", "--model", model, "--input", manifest, "--output", output,
           "--use-gpu" if use_gpu else "--no-use-gpu", "--num-cpus", str(os.cpu_count()), *flags]
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    process_seconds = time.perf_counter() - began
    if proc.returncode:
        raise RuntimeError(f"imgcls predict failed:\n{proc.stderr[-4000:]}")
    summary = last_json(proc.stdout)
    return {"files": summary["files"], "rows": summary["rows"], "errors": summary["errors"],
            "seconds": summary["seconds"], "process_seconds": process_seconds,
            "images_per_s": summary["images_per_s"]}


def write_manifest(files: list[str], path: str) -> str:
    import pandas as pd

    pd.DataFrame({"path": files}).to_csv(path, index=False)
    return path


def imgcls_end_to_end(arch: str, files: list[str], workdir: str, use_gpu: bool, flags: tuple = ()) -> dict:
    model = save_random_checkpoint(arch, os.path.join(workdir, f"ckpt-{arch}"))
    tag = "".join(flags).replace("-", "")
    half = imgcls_predict(model, write_manifest(files[: len(files) // 2], os.path.join(workdir, "half.csv")),
                          os.path.join(workdir, f"labels-half-{arch}{tag}"), use_gpu, flags)
    full = imgcls_predict(model, write_manifest(files, os.path.join(workdir, "all.csv")),
                          os.path.join(workdir, f"labels-{arch}{tag}"), use_gpu, flags)
    steady = (full["files"] - half["files"]) / max(1e-9, full["seconds"] - half["seconds"])
    return {"half": half, "all": full, "steady_images_per_s": steady}


def imgcls_train(root: str, arch: str, epochs: int, batch_size: int, workdir: str) -> dict:
    runs = os.path.join(workdir, f"runs-{arch}")
    shutil.rmtree(runs, ignore_errors=True)
    cmd = [sys.executable, "-m", "imgcls.cli", "train", "--num-cpus", str(os.cpu_count()), "--root", root,
           "--arch", arch, "--image-size", str(SIZE), "--augment", "standard", "--batch-size", str(batch_size),
           "--lr", "1e-3", "--epochs", str(epochs), "--num-workers", "1", "--use-gpu", "--storage-path", runs,
           "--name", "bench"]
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"imgcls train failed:\n{proc.stderr[-4000:]}")
    summary = last_json(proc.stdout)
    with open(os.path.join(summary["latest_checkpoint"], "history.json")) as f:
        history = json.load(f)
    rates = [h["images_per_s"] for h in history]
    return {"epochs": epochs, "epoch_images_per_s": rates, "steady_images_per_s": statistics.median(rates[1:]),
            "device": history[0].get("device"), "amp": history[0].get("amp"),
            "process_seconds": time.perf_counter() - began}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=20000)
    p.add_argument("--workdir", default="out/bench/gpu")
    p.add_argument("--out", default="bench/results/gpu.json")
    p.add_argument("--smoke", action="store_true", help="toy sizes on any device: checks that every part runs")
    args = p.parse_args()

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        sys.exit("no CUDA device: this benchmark measures the GPU path (--smoke checks the script on CPU)")
    files_n = 64 if args.smoke else args.files
    os.makedirs(args.workdir, exist_ok=True)
    per_class = -(-files_n // len(SOURCES))
    root = build_photo_set(os.path.join(args.workdir, f"photos-{per_class}"), per_class=per_class)
    files = sorted(os.path.join(r, f) for r, _, names in os.walk(root) for f in names if f.endswith(".jpg"))
    batch_sizes = [8, 16] if args.smoke else [128, 256, 512, 1024]
    seconds = 0.5 if args.smoke else 10.0
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke run)",
           "cpus": os.cpu_count(), "torch": torch.__version__, "files": len(files), "image_size": SIZE,
           "photos": "bench/photos.py crops, sides 400-640 px, JPEG quality 90"}
    out["model_only"] = {a: model_only(a, device, batch_sizes, seconds) for a in ARCHS}
    print(json.dumps(out["model_only"], default=str), flush=True)
    if device.type == "cuda":
        out["gpu_decode_only"] = gpu_decode_only(files, device)
    out["cpu_decode_only"] = cpu_decode_only(files, os.cpu_count())
    print(json.dumps({k: out[k] for k in ("gpu_decode_only", "cpu_decode_only") if k in out}), flush=True)
    out["imgcls"] = {a: imgcls_end_to_end(a, files, args.workdir, device.type == "cuda") for a in ARCHS}
    print(json.dumps(out["imgcls"]), flush=True)
    out["imgcls_gpu_decode"] = {"resnet50": imgcls_end_to_end("resnet50", files, args.workdir, device.type == "cuda",
                                                              ("--gpu-decode", "--separate-decode"))}
    print(json.dumps(out["imgcls_gpu_decode"]), flush=True)
    out["imgcls_program"] = {form: imgcls_end_to_end("resnet50", files, args.workdir, device.type == "cuda",
                                                     ("--program", form)) for form in ("export", "compile")}
    print(json.dumps(out["imgcls_program"]), flush=True)
    epochs = 2 if args.smoke else 3
    out["training"] = {}
    for arch in (("resnet18",) if args.smoke else TRAIN_ARCHS):
        batch = 8 if args.smoke else 128
        bound = run_subprocess("in_memory", root, arch=arch, image_size=SIZE, augment="standard", epochs=epochs,
                               batch_size=batch, lr=1e-3, threads=os.cpu_count(), channels_last=True,
                               device=str(device), amp=device.type == "cuda")
        run = imgcls_train(root, arch, epochs, batch, args.workdir) if device.type == "cuda" else None
        out["training"][arch] = {"in_memory": bound, "imgcls_1_worker": run}
        print(arch, json.dumps({"bound": bound["steady_images_per_s"], "imgcls": run and run["steady_images_per_s"]}),
              flush=True)
    ratios = {}
    for arch in ARCHS:
        e2e = out["imgcls"][arch]["steady_images_per_s"]
        ratios[f"{arch}_end_to_end_vs_model_only"] = e2e / out["model_only"][arch]["images_per_s"]
        ratios[f"{arch}_end_to_end_images_per_s"] = e2e
    ratios["resnet50_gpu_decode_vs_cpu_decode_end_to_end"] = (
        out["imgcls_gpu_decode"]["resnet50"]["steady_images_per_s"] / out["imgcls"]["resnet50"]["steady_images_per_s"])
    for form, run in out["imgcls_program"].items():
        ratios[f"resnet50_{form}_vs_torchscript_end_to_end"] = (
            run["steady_images_per_s"] / out["imgcls"]["resnet50"]["steady_images_per_s"])
    for arch, t in out["training"].items():
        if t["imgcls_1_worker"]:
            ratios[f"{arch}_training_vs_in_memory"] = (t["imgcls_1_worker"]["steady_images_per_s"]
                                                      / t["in_memory"]["steady_images_per_s"])
    out["ratios"] = ratios
    if not args.smoke:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2, default=str)
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
