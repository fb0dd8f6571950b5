"""Training throughput and memory, every case side by side in one run on the same machine.

Two datasets:
- case A: real Fashion-MNIST PNGs (28 px, Debian package), the small CNN at 28 px,
  ``light`` augmentation (padded crop + flip), batch 128 per step;
- case B (``_photos``): real photos stored as JPEGs of realistic size (sides 400-640 px,
  distinct crops of photos that scikit-image and matplotlib ship; ``bench/photos.py``),
  the small CNN at 64 px, ``standard`` augmentation (random resized crop, flip, affine),
  batch 64 per step.

For each, with the same model, augmentation and precision (channels_last, and bf16
autocast where the CPU computes bf16 natively, imgcls's defaults here):
1. ``plain``: the best plain PyTorch script: torchvision ImageFolder + DataLoader (one
   worker per core) with the per-image torchvision transforms (``bench/train_baselines.py``);
2. ``in_memory``: the bound: all images decoded once into one uint8 tensor, the same
   batched augmentation (``imgcls.training.augment``), one process, no Ray;
3. ``imgcls_1_worker`` / ``imgcls_2_workers``: ``imgcls train`` end to end on a fresh local
   Ray cluster, with a fresh run folder (so the one-time decode is part of the run).

Reported per run: images/s per epoch (first and steady = median of the later epochs),
seconds from the command's start to the first optimisation step, peak memory (the rise
of the machine's used memory, Ray's object store included; ``bench/predict.py``'s
``PeakMemory``), and for imgcls the one-time decode, the first epoch with that decode
against a steady epoch (with and without the worker's own set-up: building the model
and DDP), and each worker's resident memory over 10 epochs (it must not grow).
imgcls's rates count the train split (80% of the images), the baselines all of them; a
rate is a rate. ``ratios`` holds the issue's figures.

With ``--before REV``, ``imgcls_before_2_workers`` is the 2-worker ``imgcls train`` of
the checkout at git revision REV (``bench/predict.py``'s ``checkout_at``), run right after
this code's on the same data: a change's rate, wall time and memory against the code
before it (``*_vs_before`` ratios), since rates differ between machines.

Run alone on a quiet machine (about 15 minutes on 2 cores, 20 with ``--before``):
    .venv/bin/python bench/train.py [--workdir out/bench/train] [--out bench/results/train.json] [--before REV]

What the figures say: on the 2-core machine without native bf16 (train.json) the
decode (13 s for either case, on the CPUs the workers leave free) runs on the driver
while Ray Train starts the workers, and they waited 0.002 s for it; what remains of the
first epoch's extra time is each worker's own start (building the model, DDP's set-up,
which imports torch._dynamo, and the first steps' warm-up). On the bf16 machine
(train_bf16.json, ``--out bench/results/train_bf16.json``), the first epoch's clock
starts with the worker's training loop; the history's ``setup_seconds`` is the part
before any data (DDP's constructor, 1.5 s with 2 workers): counting it gives 1.23x and
1.65x a steady epoch, since case B's epochs are 3 s there. Over four runs on bf16
machines, case A's steady rate was 89%, 92%, 95% and 96% of the bound and case B's
94-102%: the bound and imgcls each move by several percent from run to run. A worker's
resident memory over 10 epochs is flat from epoch 3 in case A (within 40 MB), and in
case B grows 92 MB in one step at epoch 7, then stays flat. imgcls's start-up (35-40 s
to the first step on the slower machine) is Ray's cluster and the training workers'
start-up; peak memory counts the local Ray cluster's processes and object store.
train_layout.json is the code before the layout reorganisation (c4f4ab9) against the
code after it, one after the other on one bf16 machine: the plain script, which the move
did not touch, moved as much between the two runs as imgcls did.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from photos import build_photo_set  # noqa: E402
from predict import PeakMemory, checkout_at  # noqa: E402
from recipe import last_json  # noqa: E402
from train_baselines import run_subprocess  # noqa: E402

CASES = {
    "fashion_mnist": {"arch": "small_cnn", "image_size": 28, "augment": "light", "batch_size": 128, "lr": 3e-3},
    "photos": {"arch": "small_cnn", "image_size": 64, "augment": "standard", "batch_size": 64, "lr": 3e-3},
}


def cpu_has_native_bf16() -> bool:
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def run_baseline(case: str, root: str, settings: dict, epochs: int, amp: bool) -> dict:
    with PeakMemory() as mem:
        result = run_subprocess(case, root, epochs=epochs, threads=os.cpu_count(), channels_last=True, amp=amp,
                                **settings)
    result["peak_memory_mb"] = mem.peak
    return result


def run_imgcls(root: str, settings: dict, epochs: int, workers: int, workdir: str, code: str | None = None) -> dict:
    """``imgcls train`` as a user runs it; figures from its output and the run's history.

    With ``code``, the imgcls package of that folder (an older checkout, ``checkout_at``)
    runs instead of this one: first on the path of the command and of the Ray workers it
    starts, run from that folder.
    """
    runs = os.path.abspath(os.path.join(workdir, f"runs-{workers}" + ("-before" if code else "")))
    shutil.rmtree(runs, ignore_errors=True)
    cmd = [sys.executable, "-m", "imgcls.cli", "train", "--num-cpus", str(os.cpu_count()),
           "--root", os.path.abspath(root),
           "--arch", settings["arch"], "--image-size", str(settings["image_size"]),
           "--augment", settings["augment"], "--batch-size", str(settings["batch_size"]), "--lr", str(settings["lr"]),
           "--epochs", str(epochs), "--num-workers", str(workers), "--storage-path", runs, "--name", "bench"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    if code:
        env["PYTHONPATH"] = code + os.pathsep + env.get("PYTHONPATH", "")
    with PeakMemory() as mem:
        began_wall, began = time.time(), time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=code)
        process_seconds = time.perf_counter() - began
    if proc.returncode:
        raise RuntimeError(f"imgcls train failed:\n{proc.stderr[-4000:]}")
    lines = proc.stdout.splitlines()
    summary = last_json(proc.stdout)
    with open(os.path.join(summary["latest_checkpoint"], "history.json")) as f:
        history = json.load(f)
    cache_seconds = sum(float(line.split(" in ")[-1].split(" s")[0]) for line in lines
                        if line.startswith(("train cache:", "val cache:")))
    rates = [h["images_per_s"] for h in history]
    epoch_seconds = [h["epoch_seconds"] for h in history]
    steady_epoch = statistics.median(epoch_seconds[1:])
    # The worker's first-epoch clock starts with its training loop: its set-up (building
    # the model, DDP's construction; ``setup_seconds``), then any wait for the one-time
    # decode, loading its part of the cache and the epoch. When the decode ran on the
    # driver while the workers started (``decode_overlapped``), that wait is the part of
    # it not hidden by their start-up; otherwise the whole decode came before the workers
    # and is added. ``first_epoch_vs_steady`` is the data's part (decode included, the
    # worker's set-up not: that is start-up, in ``seconds_to_first_step``);
    # ``first_epoch_with_setup_vs_steady`` counts the set-up too.
    overlapped = bool(history[0].get("decode_overlapped"))
    setup = history[0].get("setup_seconds", 0.0)
    first_with_setup = epoch_seconds[0] + (0.0 if overlapped else cache_seconds)
    first_with_decode = first_with_setup - setup
    return {
        "workers": workers, "epochs": epochs, "resident": history[0].get("resident"),
        "epoch_images_per_s": rates, "first_epoch_images_per_s": rates[0],
        "steady_images_per_s": statistics.median(rates[1:]),
        # None where the code run (an older checkout) did not record its first step
        "seconds_to_first_step": (history[0]["first_step_time"] - began_wall) if "first_step_time" in history[0]
        else None,
        "one_time_decode_seconds": cache_seconds, "decode_overlapped": overlapped,
        "cache_wait_seconds": history[0].get("cache_wait_seconds", 0.0),
        "worker_setup_seconds": setup,
        "first_epoch_with_decode_seconds": first_with_decode,
        "steady_epoch_seconds": steady_epoch,
        "first_epoch_vs_steady": first_with_decode / steady_epoch,
        "first_epoch_with_setup_vs_steady": first_with_setup / steady_epoch,
        "worker_rss_mb_by_epoch": [round(h["worker_rss_mb"], 1) for h in history],
        "worker_rss_growth_mb": history[-1]["worker_rss_mb"] - history[1]["worker_rss_mb"],
        "val_accuracy": history[-1]["val_accuracy"],
        "peak_memory_mb": mem.peak, "process_seconds": process_seconds,
    }


def run_case(name: str, root: str, epochs: int, memory_epochs: int, workdir: str, amp: bool,
             before: str | None = None) -> dict:
    """The case's runs; with ``before`` (an older checkout's folder) also its ``imgcls train``
    with 2 workers, ``imgcls_before_2_workers``, right after this code's."""
    settings = CASES[name]
    out = {"settings": settings, "root": os.path.relpath(root)}
    runs = os.path.join(workdir, "runs", name)
    cases = [
        ("plain", lambda: run_baseline("plain", root, settings, epochs, amp)),
        ("in_memory", lambda: run_baseline("in_memory", root, settings, epochs, amp)),
        ("imgcls_1_worker", lambda: run_imgcls(root, settings, epochs, 1, runs)),
        ("imgcls_2_workers", lambda: run_imgcls(root, settings, memory_epochs, 2, runs)),
    ]
    if before:
        cases.append(("imgcls_before_2_workers", lambda: run_imgcls(root, settings, memory_epochs, 2, runs, before)))
    for key, fn in cases:
        out[key] = fn()
        print(f"{name} {key}: steady {out[key]['steady_images_per_s']:.0f} images/s", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="out/bench/train")
    p.add_argument("--fmnist-per-class", type=int, default=3000, help="case A: images per class (3000: 30,000)")
    p.add_argument("--photos-per-class", type=int, default=250, help="case B: JPEGs per class (8 classes)")
    p.add_argument("--epochs", type=int, default=4, help="epochs of the baselines and the 1-worker run")
    p.add_argument("--memory-epochs", type=int, default=10, help="epochs of the 2-worker run (memory over epochs)")
    p.add_argument("--out", default="bench/results/train.json")
    p.add_argument("--before", metavar="REV",
                   help="also run imgcls train (2 workers) of this git revision: imgcls_before_2_workers")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from imgcls.datasets import fetch_fashion_mnist

    fmnist = fetch_fashion_mnist(os.path.join(args.workdir, f"fmnist-{args.fmnist_per_class}"), args.fmnist_per_class)
    photos = build_photo_set(os.path.join(args.workdir, "photos"), per_class=args.photos_per_class)
    amp = cpu_has_native_bf16()
    results = {"machine": {"cpus": os.cpu_count(), "native_bf16": amp}, "date": time.strftime("%Y-%m-%d")}
    before = None
    if args.before:
        before = checkout_at(args.before, args.workdir)
        results["before"] = {"revision": args.before, "commit": os.path.basename(before).split("-", 1)[1]}
    for name, root in (("fashion_mnist", fmnist), ("photos", photos)):
        results[name] = run_case(name, root, args.epochs, args.memory_epochs, args.workdir, amp, before)
    a, b = results["fashion_mnist"], results["photos"]
    steady = lambda case, key: case[key]["steady_images_per_s"]  # noqa: E731
    results["ratios"] = {
        "imgcls_steady_vs_in_memory": steady(a, "imgcls_2_workers") / steady(a, "in_memory"),
        "imgcls_steady_vs_in_memory_photos": steady(b, "imgcls_2_workers") / steady(b, "in_memory"),
        "imgcls_steady_vs_plain": steady(a, "imgcls_2_workers") / steady(a, "plain"),
        "imgcls_steady_vs_plain_photos": steady(b, "imgcls_2_workers") / steady(b, "plain"),
        "imgcls_1_worker_steady_vs_in_memory": steady(a, "imgcls_1_worker") / steady(a, "in_memory"),
        "imgcls_1_worker_steady_vs_in_memory_photos": steady(b, "imgcls_1_worker") / steady(b, "in_memory"),
        "first_epoch_vs_steady": a["imgcls_2_workers"]["first_epoch_vs_steady"],
        "first_epoch_vs_steady_photos": b["imgcls_2_workers"]["first_epoch_vs_steady"],
        "first_epoch_with_setup_vs_steady": a["imgcls_2_workers"]["first_epoch_with_setup_vs_steady"],
        "first_epoch_with_setup_vs_steady_photos": b["imgcls_2_workers"]["first_epoch_with_setup_vs_steady"],
    }
    if before:  # this code against the older checkout's, same data and settings, same machine and run
        for suffix, case in (("", a), ("_photos", b)):
            ours, old = case["imgcls_2_workers"], case["imgcls_before_2_workers"]
            results["ratios"][f"imgcls_steady_vs_before{suffix}"] = (ours["steady_images_per_s"]
                                                                     / old["steady_images_per_s"])
            results["ratios"][f"imgcls_process_seconds_vs_before{suffix}"] = (ours["process_seconds"]
                                                                             / old["process_seconds"])
            results["ratios"][f"imgcls_peak_memory_vs_before{suffix}"] = ours["peak_memory_mb"] / old["peak_memory_mb"]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results["ratios"], indent=2))


if __name__ == "__main__":
    main()
