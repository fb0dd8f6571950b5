"""Labelled images: listing a class-per-folder tree or a path,label manifest, and stratified splits.

Shared by training (the splits it trains and validates on) and evaluation (the images it
scores). Nothing here starts Ray or touches a GPU.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from imgcls import storage
from imgcls.manifest import MANIFEST_EXTENSIONS, ManifestError, manifest_folder, read_manifest, resolve_paths
from imgcls.paths import members

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """The input data cannot be used as given; the message says why."""


@dataclass(frozen=True)
class LabelledImages:
    """Image paths with their class names."""

    paths: list[str]
    labels: list[str]

    def __len__(self):
        return len(self.paths)


def is_image_path(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def list_labelled_images(root: str) -> LabelledImages:
    """Lists an ImageFolder tree or a path,label manifest, on any fsspec filesystem.

    A manifest's paths are not checked here: that would be one request per row, one
    after the other, on the driver (a million HEAD requests on S3 before training
    starts). The parallel tasks that read them report a missing one by name instead
    (``training.cache.write_shard``; ``evaluation.evaluate.evaluate_images``).

    Args:
        root: A folder whose subfolders name the classes, or a ``.csv``/``.parquet``
            manifest with ``path`` and ``label`` columns: files, or tar members named
            ``TAR#MEMBER`` (as ``imgcls predict`` and ``review.csv`` name them).
            Relative manifest paths are taken relative to the manifest's folder.
            Several, comma-separated, are listed together; a file in two takes its
            label from the later one.

    Raises:
        DataError: empty folder, missing manifest column or label, or fewer than two classes.
    """
    if not root:
        raise DataError("no data given: set --root (or root in the YAML file's data section) to an ImageFolder "
                        "tree or a manifest")
    roots = members(root)
    if len(roots) > 1:  # listed one by one, then checked together
        # A file in two of them takes its label from the later one (a corrected row).
        labels: dict[str, str] = {}
        for part in (_list_one(r) for r in roots):
            labels.update(zip(part.paths, part.labels))
        images = LabelledImages(list(labels), list(labels.values()))
    else:
        images = _list_one(roots[0])
    classes = sorted(set(images.labels))
    if len(classes) < 2:
        raise DataError(f"{root} has a single class {classes}; classification needs at least two")
    return images


def _list_one(root: str) -> LabelledImages:
    fs, path = storage.filesystem(root)
    if root.lower().endswith(MANIFEST_EXTENSIONS):
        images = _read_manifest(root)
    else:
        if not fs.isdir(path):
            raise DataError(f"{root} is neither a folder nor a .csv/.parquet manifest")
        base = path.rstrip("/") + "/"
        files = sorted(f for f in fs.find(path) if is_image_path(f) and not storage.hidden_below(path, f))
        nested = [f for f in files if "/" in f[len(base):]]
        if not nested:
            raise DataError(f"{root} has no images in class subfolders (expected ROOT/<class>/<image>)")
        images = LabelledImages(
            paths=[storage.unstrip(root, f) for f in nested],
            labels=[f[len(base):].split("/", 1)[0] for f in nested],
        )
    return images


def _read_manifest(uri: str) -> LabelledImages:
    try:
        table = read_manifest(uri, ["path", "label"])
    except ManifestError as e:
        raise DataError(str(e)) from None
    if not table.num_rows:
        raise DataError(f"manifest {uri} is empty")
    labels = table.column("label").to_pylist()
    paths = [str(p) for p in table.column("path").to_pylist()]
    unlabelled = [p for p, label in zip(paths, labels) if not label]
    if unlabelled:
        raise DataError(f"manifest {uri} has rows without a label, e.g. {unlabelled[0]}")
    return LabelledImages(paths=resolve_paths(manifest_folder(uri), paths), labels=labels)


def encode_labels(labels: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Maps class names to indices of ``classes``; unknown names raise DataError."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise DataError(f"unknown label(s) {unknown[:10]}; the model knows {list(classes)}")
    return np.array([index[label] for label in labels], dtype=np.int64)


def split_stratified(
    images: LabelledImages,
    val_fraction: float,
    test_fraction: float,
    seed: int = 0,
    max_per_class: Optional[int] = None,
) -> dict[str, LabelledImages]:
    """Splits every class in the same proportions; the result depends only on the inputs.

    Each class is sorted, shuffled with a per-class seed, optionally capped, then cut
    into test, val and train. Classes with at least 3 images get at least one val and
    one test image when the fractions are non-zero.
    """
    by_class: dict[str, list[str]] = {}
    for p, label in zip(images.paths, images.labels):
        by_class.setdefault(label, []).append(p)
    out = {s: ([], []) for s in SPLITS}
    for label in sorted(by_class):
        paths = sorted(by_class[label])
        random.Random(f"{seed}:{label}").shuffle(paths)
        if max_per_class:
            paths = paths[:max_per_class]
        n = len(paths)
        n_test = _share(n, test_fraction)
        n_val = _share(n - n_test, val_fraction / (1 - test_fraction)) if val_fraction else 0
        cuts = {"test": paths[:n_test], "val": paths[n_test:n_test + n_val], "train": paths[n_test + n_val:]}
        for s, ps in cuts.items():
            out[s][0].extend(ps)
            out[s][1].extend([label] * len(ps))
    return {s: LabelledImages(paths=ps, labels=ls) for s, (ps, ls) in out.items()}


def _share(n: int, fraction: float) -> int:
    if fraction <= 0 or n < 3:
        return 0
    return min(max(1, round(n * fraction)), n - 1)


def class_counts(labels: Sequence[str], classes: Sequence[str]) -> list[int]:
    counts = Counter(labels)
    return [counts.get(c, 0) for c in classes]


def balanced_resample(images: LabelledImages, seed: int = 0) -> LabelledImages:
    """Draws with replacement so that every class is as frequent as the largest one."""
    rng = random.Random(seed)
    by_class: dict[str, list[str]] = {}
    for p, label in zip(images.paths, images.labels):
        by_class.setdefault(label, []).append(p)
    target = max(len(v) for v in by_class.values())
    paths, labels = [], []
    for label in sorted(by_class):
        of_class = by_class[label]
        extra = [rng.choice(of_class) for _ in range(target - len(of_class))]
        paths.extend(of_class + extra)
        labels.extend([label] * target)
    order = list(range(len(paths)))
    rng.shuffle(order)
    return LabelledImages([paths[i] for i in order], [labels[i] for i in order])
