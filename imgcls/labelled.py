"""Labelled images: listing a class-per-folder tree or a path,label manifest, and stratified splits.

Shared by training (the splits it trains and validates on) and evaluation (the images it
scores). Nothing here starts Ray or touches a GPU.

Every listed file has a split key, its path relative to its root (``file_key``), and its
split is drawn from a hash of the seed and that key alone (``split_stratified``): adding
files, moving the data to another folder or bucket, or relabelling a file leaves every
other file where it was.
"""

from __future__ import annotations

import hashlib
import posixpath
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

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
    """Image paths with their class names, and, when listed from a root, their split keys."""

    paths: list[str]
    labels: list[str]
    keys: Optional[list[str]] = None  # each path relative to its root (file_key); None: the paths themselves

    def __len__(self):
        return len(self.paths)

    def split_keys(self) -> list[str]:
        """What each file's split is drawn from: its key, or its path when it has none."""
        return self.keys if self.keys is not None else self.paths


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
            label from the later one and its key (``file_key``) from the first.

    Raises:
        DataError: empty folder, missing manifest column or label, or fewer than two classes.
    """
    if not root:
        raise DataError("no data given: set --root (or root in the YAML file's data section) to an ImageFolder "
                        "tree or a manifest")
    roots = members(root)
    if len(roots) > 1:  # listed one by one, then checked together
        # A file in two of them takes its label from the later one (a corrected row), and
        # its key from the first (where the file lives), so that a correction keeps its split.
        labels: dict[str, str] = {}
        keys: dict[str, str] = {}
        for part in (_list_one(r) for r in roots):
            labels.update(zip(part.paths, part.labels))
            for p, k in zip(part.paths, part.split_keys()):
                keys.setdefault(p, k)
        images = LabelledImages(list(labels), list(labels.values()), [keys[p] for p in labels])
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
            keys=[f[len(base):] for f in nested],
        )
    return images


def file_key(folder: str, path: str) -> str:
    """A file's split key: its path relative to ``folder``, the root it was listed from.

    For an ImageFolder tree that is the path below the root (``class/img.jpg``); for a
    manifest, the path relative to the manifest's folder, as written when it was written
    relative (normalised: ``./a/1.png`` is ``a/1.png``), and ``../`` where it leads out of
    it; a tar member keeps its ``#MEMBER``. Neither the root's location nor its scheme or
    bucket is part of it, so a tree (or a manifest with its files) copied from a local
    folder to ``s3://bucket/x/`` gives every file the key, and so the split, it had. A
    path on another filesystem than the manifest (an ``s3://`` path in a local manifest)
    cannot be made relative: its key is the path as written.
    """
    if not storage.is_absolute(path):
        return posixpath.normpath(path)
    if storage.protocol(path) != storage.protocol(folder):
        return path
    return posixpath.relpath(storage.strip(path), storage.strip(folder) or ".")


def _read_manifest(uri: str) -> LabelledImages:
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
    folder = manifest_folder(uri)
    keys = [file_key(folder, p) for p in paths]
    return LabelledImages(paths=resolve_paths(folder, paths), labels=labels, keys=keys)


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
    pinned: Optional[Mapping[str, str]] = None,
) -> dict[str, LabelledImages]:
    """Splits every class in the same proportions, each file by a hash of its own key.

    A file's split depends only on ``seed`` and its key (``LabelledImages.keys``: its path
    relative to its root, see ``file_key``), not on the other files, its label or where
    the root is: ``split_draw`` maps them to a number in [0, 1), and a file below
    ``test_fraction`` is a test image, below ``test_fraction + val_fraction`` a
    validation image, and a training image otherwise. So adding files moves no file
    already there, a relabelled file (same path, another class) keeps its split, and a
    tree copied to a bucket splits as it did. Each class gets its fractions in
    expectation (a class of 1,000 at 10% has about 100 test images, not exactly 100).

    The one exception: a class of 3 or more files gets at least one test and one
    validation image (for non-zero fractions) and one training image. Only where a
    class would otherwise have none, the file drawn nearest that split's range moves
    into it: the lowest draw to test; the lowest training draw to validation (else the
    highest test draw); the highest draw to training. Classes of fewer than 3 files
    train on all of them. So in classes that small, adding files can move a file: a
    later run may draw a new file into that split and give the moved one back, and a
    class that grows to 3 files splits its first ones by their draws. ``pinned`` is how
    a retrain keeps every earlier file where it was, whatever the class's size
    (``pin_to_saved_splits``).

    Args:
        images: The labelled files; their order does not matter.
        val_fraction: Expected share of each class for validation.
        test_fraction: Expected share of each class for test.
        seed: Another seed draws other splits.
        max_per_class: Keeps at most this many files a class: the pinned ones first,
            then by a draw of their own (so the cap keeps each split's share).
        pinned: Path to split name for files that must keep a split (a retrain's files
            named in the old model's saved splits); they are never moved.

    Returns:
        ``train``, ``val`` and ``test`` LabelledImages (with their keys), each class's
        files in the order of their draws.
    """
    pinned = {p: s for p, s in (pinned or {}).items() if s in SPLITS}
    by_class: dict[str, list[tuple[str, str]]] = {}
    for p, k, label in zip(images.paths, images.split_keys(), images.labels):
        by_class.setdefault(label, []).append((p, k))
    out: dict[str, tuple[list, list, list]] = {s: ([], [], []) for s in SPLITS}
    for label in sorted(by_class):
        files = sorted(by_class[label])
        if max_per_class and len(files) > max_per_class:
            files = sorted(files, key=lambda f: (f[0] not in pinned, split_draw(seed, f[1], "keep"), f))
            files = files[:max_per_class]
        draws = {p: split_draw(seed, k) for p, k in files}
        small = len(files) < 3
        split = {p: pinned.get(p) or ("train" if small else _drawn_split(draws[p], val_fraction, test_fraction))
                 for p, _ in files}
        if not small:
            _fill_empty_splits(split, draws, set(pinned), val_fraction, test_fraction)
        for p, k in sorted(files, key=lambda f: (draws[f[0]], f)):
            paths, labels, keys = out[split[p]]
            paths.append(p)
            labels.append(label)
            keys.append(k)
    return {s: LabelledImages(paths=ps, labels=ls, keys=ks) for s, (ps, ls, ks) in out.items()}


def split_draw(seed: int, key: str, purpose: str = "split") -> float:
    """A number in [0, 1) fixed by ``seed``, ``key`` and ``purpose``, uniform over keys
    (the first 8 bytes of a BLAKE2b hash): the same on every machine and Python."""
    digest = hashlib.blake2b(f"{purpose}\0{seed}\0{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _drawn_split(draw: float, val_fraction: float, test_fraction: float) -> str:
    if draw < test_fraction:
        return "test"
    return "val" if draw < test_fraction + val_fraction else "train"


def _fill_empty_splits(split: dict[str, str], draws: dict[str, float], pinned: set[str],
                       val_fraction: float, test_fraction: float) -> None:
    """Moves into each wanted split that one class left empty the unpinned file drawn
    nearest its range, from a split that keeps at least one (see ``split_stratified``)."""
    wanted = [s for s, fraction in (("test", test_fraction), ("val", val_fraction)) if fraction > 0] + ["train"]
    nearest = {
        "test": lambda p: draws[p],
        "val": lambda p: (split[p] != "train", draws[p] if split[p] == "train" else -draws[p]),
        "train": lambda p: -draws[p],
    }
    for name in wanted:
        counts = Counter(split.values())
        if counts[name]:
            continue
        donors = [p for p in split if p not in pinned and counts[split[p]] > 1]
        if donors:
            split[min(donors, key=lambda p: (nearest[name](p), p))] = name


def pin_to_saved_splits(images: LabelledImages, saved: Mapping[str, LabelledImages]) -> dict[str, str]:
    """The split each of ``images`` had in ``saved`` (an earlier run's split manifests),
    by path or, failing that, by key: a file moved to another root, or relabelled, is
    still found. Files in none of them are left out (they are new)."""
    by_path: dict[str, str] = {}
    by_key: dict[str, str] = {}
    for name, part in saved.items():
        by_path.update(dict.fromkeys(part.paths, name))
        if part.keys is not None:
            by_key.update(dict.fromkeys(part.keys, name))
    pins = {p: by_path.get(p) or by_key.get(k) for p, k in zip(images.paths, images.split_keys())}
    return {p: s for p, s in pins.items() if s}


def class_counts(labels: Sequence[str], classes: Sequence[str]) -> list[int]:
    counts = Counter(labels)
    return [counts.get(c, 0) for c in classes]
