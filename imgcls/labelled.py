"""Labelled images: listing a class-per-folder tree or a path,label manifest, and stratified splits.

Shared by training (the splits it trains and validates on) and evaluation (the images it
scores). Nothing here starts Ray or touches a GPU.
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from imgcls import storage
from imgcls.manifest import (MANIFEST_EXTENSIONS, ManifestError, manifest_columns, manifest_folder, read_manifest,
                             resolve_paths)
from imgcls.paths import members

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLITS = ("train", "val", "test")
# A review file (``imgcls review``'s review.csv, answered on the labelling page) has this
# column: ``skipped`` or ``none-of-these`` on a pick a person gave no class, empty
# otherwise. As a manifest, its rows without a label are left out, and counted.
REVIEW_COLUMN, REVIEW_SKIPPED, REVIEW_NONE = "review", "skipped", "none-of-these"


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


def list_labelled_images(root: str, check_paths: bool = True) -> LabelledImages:
    """Lists an ImageFolder tree or a path,label manifest, on any fsspec filesystem.

    Args:
        root: A folder whose subfolders name the classes, or a ``.csv``/``.parquet``
            manifest with ``path`` and ``label`` columns. Relative manifest paths are
            taken relative to the manifest's folder. Several, comma-separated, are
            listed together; a file in two takes its label from the later one.
        check_paths: Whether to check that every manifest path exists.

    Raises:
        DataError: empty folder, missing manifest column or path, or fewer than two classes.
    """
    if not root:
        raise DataError("no data given: set --root (or root in the YAML file's data section) to an ImageFolder "
                        "tree or a manifest")
    roots = members(root)
    if len(roots) > 1:  # listed one by one, then checked together
        # A file in two of them takes its label from the later one (a corrected row).
        labels: dict[str, str] = {}
        for part in (_list_one(r, check_paths) for r in roots):
            labels.update(zip(part.paths, part.labels))
        images = LabelledImages(list(labels), list(labels.values()))
    else:
        images = _list_one(roots[0], check_paths)
    classes = sorted(set(images.labels))
    if len(classes) < 2:
        raise DataError(f"{root} has a single class {classes}; classification needs at least two")
    return images


def _list_one(root: str, check_paths: bool) -> LabelledImages:
    fs, path = storage.filesystem(root)
    if root.lower().endswith(MANIFEST_EXTENSIONS):
        images = _read_manifest(root, check_paths)
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


def _read_manifest(uri: str, check_paths: bool) -> LabelledImages:
    try:
        review = REVIEW_COLUMN in manifest_columns(uri)
        table = read_manifest(uri, ["path", "label"] + ([REVIEW_COLUMN] if review else []))
    except ManifestError as e:
        raise DataError(str(e)) from None
    if not table.num_rows:
        raise DataError(f"manifest {uri} is empty")
    labels = table.column("label").to_pylist()
    paths = [str(p) for p in table.column("path").to_pylist()]
    unlabelled = [p for p, label in zip(paths, labels) if not label]
    if unlabelled and review:
        answers = Counter(a or "not answered" for a, label in zip(table.column(REVIEW_COLUMN).to_pylist(), labels)
                          if not label)
        print(f"imgcls: {uri}: {len(unlabelled)} review pick(s) without a label left out "
              f"({', '.join(f'{n} {a}' for a, n in sorted(answers.items()))})", file=sys.stderr, flush=True)
        paths, labels = [p for p, label in zip(paths, labels) if label], [label for label in labels if label]
        if not paths:
            raise DataError(f"review file {uri} has no labelled pick yet")
    elif unlabelled:
        raise DataError(f"manifest {uri} has rows without a label, e.g. {unlabelled[0]}")
    paths = resolve_paths(manifest_folder(uri), paths)
    if check_paths:
        fs, _ = storage.filesystem(paths[0])
        missing = [p for p in paths if not fs.exists(storage.strip(p))]
        if missing:
            raise DataError(f"manifest {uri} names {len(missing)} missing file(s), e.g. {missing[:3]}")
    return LabelledImages(paths=paths, labels=labels)


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
