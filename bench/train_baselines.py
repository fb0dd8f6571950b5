"""The two training cases of the training benchmark that do not use imgcls's trainer.

Both train the same model (``imgcls.models.create_model``, random init from ``--seed``) with
AdamW and cross-entropy on the same ImageFolder tree, in one process, without Ray:

- ``plain``: the best plain PyTorch script a good engineer would write: torchvision
  ``ImageFolder`` + ``DataLoader`` (one worker per core, persistent workers, a few
  batches prefetched, pinned memory only for a GPU), each JPEG decoded in PIL's draft
  mode at the smallest scale the augmentation can use, and the per-image torchvision
  transforms of ``imgcls.labelled.ClassificationPresetTrain``.
- ``in_memory``: the bound on the data path: every image decoded once, to the cached
  training geometry (``imgcls.training.augment.stored_geometry``), into one uint8 tensor
  (N, H, W, 3); each epoch then draws a random permutation, slices batches out of the
  tensor and augments them whole with ``imgcls.training.augment.BatchAugment``. No workers, no
  decoding during training; optionally channels_last and ``torch.compile``.

Measured per case: images/s of every epoch (from the epoch's first batch request to
its last step; the first epoch includes starting the DataLoader workers or compiling),
the first epoch's rate and the steady rate (median of the later epochs), the seconds
from the call to the end of the first optimisation step, the decode seconds (in-memory
only: from the call until the tensor is ready, listing included) and peak resident
memory from ``getrusage`` (see ``peak_rss`` for what its worker figure means). The step loop never calls
``.item()``: the loss is summed on the device and read once an epoch.

Each case should run in a fresh process, one after the other, so that no two share
memory, threads or warm caches; ``run_subprocess`` does that. By hand:
    .venv/bin/python bench/train_baselines.py plain|in_memory --root DIR [--arch small_cnn] [--image-size 28]
        [--augment light] [--epochs 3] [--batch-size 128] [--lr 1e-3] [--threads 2] [--limit N]
        [--channels-last] [--compile]     (the last two: in_memory only)
It prints one JSON line with the result.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder

from imgcls.preprocess import ClassificationPresetTrain
from imgcls.preprocess import decode_image, decode_resized, resize_size, to_chw_tensor
from imgcls.models import create_model, get_spec

# Everything is imported up front, so that the cases' timers, which start when they are
# called, leave out the imports (torchvision's alone takes seconds); ``run_subprocess``'s
# process_seconds has them.
try:
    from imgcls.training.augment import BatchAugment, stored_geometry
except ModuleNotFoundError as e:
    if e.name != "imgcls.training.augment":
        raise
    BatchAugment = stored_geometry = None

PREFETCH_FACTOR = 4  # batches queued per worker: absorbs a slow batch without stalling a step
RANDOM_CROP_MIN_AREA = 0.35  # ClassificationPresetTrain's RandomResizedCrop scale=(0.35, 1.0)


def draft_size(image_size: int, augment: str) -> int:
    """Shorter side down to which a JPEG may be decoded (PIL draft mode) for the train preset.

    "none" and "light" start by resizing the shorter side to ``resize_size``, so nothing
    larger is needed. RandomResizedCrop keeps at least 35% of the area at an aspect of
    3/4 to 4/3, so a crop's shorter side can be sqrt(0.35 * 3/4) of the image's; decoding
    that much larger means even the smallest crop is never upsampled.
    """
    if augment in ("none", "light"):
        return resize_size(image_size)
    return math.ceil(image_size / math.sqrt(RANDOM_CROP_MIN_AREA * 3 / 4))


def load_chw(path: str, target_size: Optional[int] = None) -> torch.Tensor:
    """Reads and decodes one image file to a (3, H, W) uint8 tensor (JPEGs in draft mode)."""
    with open(path, "rb") as f:
        return to_chw_tensor(decode_image(f.read(), target_size=target_size))


def list_images(root: str, limit: Optional[int] = None, seed: int = 0) -> tuple[list[tuple[str, int]], list[str]]:
    """The (path, class index) pairs of an ImageFolder tree, as torchvision lists them.

    Args:
        root: ImageFolder tree.
        limit: Keep a random ``limit`` of the images (the same ones in every case).
        seed: Seed of that choice.

    Returns:
        The samples in torchvision's order and the class names.
    """
    folder = ImageFolder(root)
    samples = folder.samples
    if limit is not None and limit < len(samples):
        samples = [samples[i] for i in sorted(random.Random(seed).sample(range(len(samples)), limit))]
    return samples, folder.classes


def peak_rss() -> dict:
    """Peak resident memory so far, in MB: this process, and its largest finished child.

    ``getrusage`` counts only children that have exited and been waited for, so the
    DataLoader workers must be shut down first. On Linux a forked child's peak starts
    at its parent's RSS at the fork and keeps the pages it shares with the parent, so
    the child figure is at least the parent's size then: even without workers it is
    about the size of a process that has imported torch, which forks ``ldconfig``
    during the import. Main + workers x child is therefore only an upper bound; the
    machine's used memory around the whole process (as bench/predict.py measures it)
    counts shared pages once.
    """
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KB
    child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": self_mb, "peak_rss_child_mb": child_mb}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_epochs(model: nn.Module, forward: Callable, lr: float, epochs: int, epoch_batches: Callable[[int], Iterable],
                device: torch.device, start: float, amp: bool = False) -> dict:
    """Trains ``model`` through ``forward`` (the model itself, or compiled) for ``epochs``, timing it.

    ``epoch_batches(epoch)`` yields (images, labels) on the device. ``amp`` runs the
    forward under autocast (bf16 on CPU, fp16 on GPU), as imgcls does by default where
    the hardware has it.

    Returns per-epoch images/s and mean loss, the first and steady (median of the later
    epochs) rates and the seconds from ``start`` to the end of the first step.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    model.train()
    rates, losses, first_step = [], [], None
    for epoch in range(epochs):
        began = time.perf_counter()
        total, images, steps = torch.zeros((), device=device), 0, 0
        for x, y in epoch_batches(epoch):
            with torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16,
                                enabled=amp):
                loss = criterion(forward(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            images, steps = images + len(y), steps + 1
            if first_step is None:
                _sync(device)
                first_step = time.perf_counter() - start
        mean_loss = (total / max(steps, 1)).item()  # also waits for the device to finish the epoch
        rates.append(images / (time.perf_counter() - began))
        losses.append(mean_loss)
    return {
        "epoch_images_per_s": rates,
        "first_epoch_images_per_s": rates[0],
        "steady_images_per_s": statistics.median(rates[1:]) if len(rates) > 1 else None,
        "seconds_to_first_step": first_step,
        "epoch_losses": losses,
    }


def _check(images: int, batch_size: int, epochs: int) -> None:
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if images < batch_size:
        # Full batches only (drop_last): a ragged last batch would recompile a compiled
        # model and give BatchNorm a tiny batch.
        raise ValueError(f"{images} images do not fill one batch of {batch_size}")


def train_plain(root: str, arch: str, image_size: int, augment: str, epochs: int, batch_size: int, lr: float,
                threads: int, limit: Optional[int] = None, num_workers: Optional[int] = None, device: str = "cpu",
                seed: int = 0, channels_last: bool = False, amp: bool = False) -> dict:
    """The plain PyTorch training script: ImageFolder + DataLoader + per-image transforms.

    Args:
        root: ImageFolder tree.
        arch: Architecture name for ``imgcls.models.create_model``.
        image_size: Training image side in pixels.
        augment: Augmentation preset of ``ClassificationPresetTrain`` ("none", "light", ...).
        epochs: Passes over the images.
        batch_size: Images a step; the last partial batch of an epoch is dropped.
        lr: AdamW learning rate.
        threads: Torch threads of the training process (each worker uses one).
        limit: Train on a fixed random ``limit`` of the images only.
        num_workers: DataLoader workers; None is one per core.
        device: Where the model trains.
        seed: Seed of the model's initial weights, the shuffling and ``limit``.
        channels_last: Model and inputs in the channels_last layout.
        amp: Autocast the forward (bf16 on CPU).

    Returns:
        The timings of ``_run_epochs`` plus the image count, worker settings and ``peak_rss``.
    """
    start = time.perf_counter()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    spec = get_spec(arch)
    dataset = ImageFolder(root, transform=ClassificationPresetTrain(image_size, spec.mean, spec.std, augment),
                          loader=functools.partial(load_chw, target_size=draft_size(image_size, augment)))
    num_classes = len(dataset.classes)
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, sorted(random.Random(seed).sample(range(len(dataset)), limit)))
    _check(len(dataset), batch_size, epochs)
    workers = os.cpu_count() if num_workers is None else num_workers
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        persistent_workers=workers > 0, prefetch_factor=PREFETCH_FACTOR if workers else None,
                        pin_memory=dev.type == "cuda")
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(arch, num_classes, image_size=image_size).to(dev, memory_format=layout)

    def epoch_batches(_epoch):
        for x, y in loader:  # noqa: F821 (deleted below, after the last epoch)
            yield x.to(dev, non_blocking=True).contiguous(memory_format=layout), y.to(dev, non_blocking=True)

    result = _run_epochs(model, model, lr, epochs, epoch_batches, dev, start, amp=amp)
    # Shuts the persistent workers down and reaps them, so that getrusage counts them.
    del loader, epoch_batches
    return {"case": "plain", "arch": arch, "image_size": image_size, "augment": augment, "images": len(dataset),
            "batch_size": batch_size, "epochs": epochs, "threads": threads, "device": device, "workers": workers,
            "channels_last": channels_last, "amp": amp,
            "prefetch_factor": PREFETCH_FACTOR if workers else None,
            "draft_size": draft_size(image_size, augment), **result,
            "seconds": time.perf_counter() - start, **peak_rss()}


def train_in_memory(root: str, arch: str, image_size: int, augment: str, epochs: int, batch_size: int, lr: float,
                    threads: int, channels_last: bool = False, compile: bool = False, limit: Optional[int] = None,
                    device: str = "cpu", seed: int = 0, amp: bool = False) -> dict:
    """The in-memory bound: decode everything once, then batched augmentation on one tensor.

    Args:
        root: ImageFolder tree.
        arch: Architecture name for ``imgcls.models.create_model``.
        image_size: Training image side in pixels.
        augment: Augmentation preset of ``imgcls.training.augment.BatchAugment``.
        epochs: Passes over the images.
        batch_size: Images a step; the last partial batch of an epoch is dropped.
        lr: AdamW learning rate.
        threads: Torch threads, and the threads that decode the images up front.
        channels_last: Model and inputs in the channels_last layout (else NCHW, as ``plain``).
        compile: Run the model through ``torch.compile`` (compiled on the first step).
        limit: Train on a fixed random ``limit`` of the images only (the same as ``plain``'s).
        device: Where the model trains and the image tensor lives.
        seed: Seed of the model's initial weights, the permutations, the augmentation and ``limit``.
        amp: Autocast the forward (bf16 on CPU).

    Returns:
        The timings of ``_run_epochs`` plus the image count, ``decode_seconds`` (from the
        call until the tensor is ready), the stored geometry, the tensor's MB and ``peak_rss``.
    """
    start = time.perf_counter()
    if BatchAugment is None:
        raise RuntimeError("imgcls.training.augment (BatchAugment, stored_geometry) is not available")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    spec = get_spec(arch)
    samples, classes = list_images(root, limit, seed)
    _check(len(samples), batch_size, epochs)
    short, crop = stored_geometry(image_size, augment)
    images = torch.empty((len(samples), crop, crop, 3), dtype=torch.uint8)

    def decode(i):
        with open(samples[i][0], "rb") as f:
            images[i] = torch.from_numpy(decode_resized(f.read(), short, crop))

    # PIL and the resize release the GIL, so threads decode in parallel; each resizes
    # one image on one torch thread rather than all threads fighting over small images.
    torch.set_num_threads(1)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(decode, range(len(samples))))
    torch.set_num_threads(threads)
    images = images.to(dev)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64, device=dev)
    decode_seconds = time.perf_counter() - start

    augmenter = BatchAugment(image_size, spec.mean, spec.std, augment)
    generator = torch.Generator(device=dev).manual_seed(seed)
    model = create_model(arch, len(classes), image_size=image_size).to(dev)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    forward = torch.compile(model) if compile else model

    def epoch_batches(_epoch):
        order = torch.randperm(len(images), generator=generator, device=dev)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            index = order[i:i + batch_size]
            yield augmenter(images[index], generator=generator).contiguous(memory_format=layout), labels[index]

    result = _run_epochs(model, forward, lr, epochs, epoch_batches, dev, start, amp=amp)
    return {"case": "in_memory", "arch": arch, "image_size": image_size, "augment": augment, "images": len(samples),
            "batch_size": batch_size, "epochs": epochs, "threads": threads, "device": device,
            "channels_last": channels_last, "compile": compile, "amp": amp, "stored_geometry": [short, crop],
            "tensor_mb": images.numel() / 2**20, "decode_seconds": decode_seconds, **result,
            "seconds": time.perf_counter() - start, **peak_rss()}


CASES = {"plain": train_plain, "in_memory": train_in_memory}


def run_subprocess(case: str, root: str, **options) -> dict:
    """Runs one case in a fresh Python process through this file's command line.

    Args:
        case: "plain" or "in_memory".
        root: ImageFolder tree.
        **options: The command's options by their argument names (``image_size=224``,
            ``compile=True``, ...); True flags are passed, False ones left out.

    Returns:
        The case's result, plus ``process_seconds``: interpreter start to exit.
    """
    cmd = [sys.executable, os.path.abspath(__file__), case, "--root", root]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value not in (False, None):
            cmd += [flag, str(value)]
    began = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{case} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - began
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", choices=sorted(CASES))
    p.add_argument("--root", required=True, help="ImageFolder tree")
    p.add_argument("--arch", default="small_cnn")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--augment", default="light")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--limit", type=int, help="train on this many of the images only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, help="plain only: DataLoader workers (default: one per core)")
    p.add_argument("--channels-last", action="store_true", help="model and inputs channels_last")
    p.add_argument("--amp", action="store_true", help="autocast the forward (bf16 on CPU)")
    p.add_argument("--compile", action="store_true", help="in_memory only: torch.compile the model")
    args = p.parse_args()
    common = dict(root=args.root, arch=args.arch, image_size=args.image_size, augment=args.augment,
                  epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, threads=args.threads,
                  limit=args.limit, device=args.device, seed=args.seed, channels_last=args.channels_last,
                  amp=args.amp)
    if args.case == "plain":
        if args.compile:
            p.error("--compile applies to in_memory only")
        result = train_plain(**common, num_workers=args.num_workers)
    else:
        if args.num_workers is not None:
            p.error("--num-workers applies to plain only")
        result = train_in_memory(**common, compile=args.compile)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
