"""Decode once: a labelled split read, decoded and resized a single time, kept as uint8.

Training used to run the whole read -> decode -> per-image transform pipeline again
every epoch. The deterministic part of it (read, decode, resize to the training
geometry) does not change between epochs, so it runs once per job here, in parallel Ray
tasks that each write one shard (a small split in the calling process), and every epoch
after reads the uint8 shards:

    <cache uri>/shard-00000.npz ...   images (n, H, W, 3) uint8, labels (n,) int64
    <cache uri>/_cache.json           key, geometry, shard file names and counts

The manifest is written last, so a cache is valid exactly when its manifest exists
and its key matches: the key covers the file list and labels, the class list, the
geometry and ``CACHE_VERSION`` (bump it when the preprocessing changes). A rerun or a
resume with the same data finds the cache and skips decoding; changed data rebuilds it.
Images are shuffled once (seeded) before they are cut into shards, so any contiguous
range of the cache is a random sample: workers take ranges of it.

How a worker then reads its part (``imgcls.training.loop``):
- resident: it loads its range of the shards once and keeps it in memory (on its GPU
  when it has one) for all epochs, the fast path while the split fits;
- streamed: a Ray Dataset over the shards (``cache_dataset``), materialized in the
  object store when it fits there, otherwise read from the shards every epoch.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
import ray
import torch

from imgcls import storage
from imgcls.devices import runs_here
from imgcls.errors import error_text
from imgcls.inference.read import iter_inputs
from imgcls.labelled import DataError, LabelledImages, encode_labels
from imgcls.preprocess import ImageDecodeError, decode_image, resize_center_crop

CACHE_VERSION = 2  # of the decode and resize below; part of every cache key (2: float and 16-bit images scaled by their range)
MANIFEST_FILE = "_cache.json"
FAILED_FILE = "_failed.json"  # written instead of the manifest when building the cache failed
SHARD_TEMPLATE = "shard-{:05d}.npz"
SHARD_BYTES = 64 * 2**20  # uint8 bytes per shard at most: a task's memory and the unit of reading
MIN_SHARD_IMAGES, MAX_SHARD_IMAGES = 64, 4096


@dataclass
class ImageCache:
    """A built (or found) cache of one split."""

    uri: str
    key: str
    short_side: int  # the shorter side after the resize
    side: int  # the centre crop kept: images are (side, side, 3)
    shards: list[dict] = field(default_factory=list)  # {"file": name, "count": n} in order
    reused: bool = False  # found valid, nothing decoded
    seconds: float = 0.0  # spent building (or checking) it

    @property
    def num_images(self) -> int:
        return sum(s["count"] for s in self.shards)

    @property
    def nbytes(self) -> int:
        return self.num_images * self.side * self.side * 3

    def shard_uris(self) -> list[str]:
        return [storage.join(self.uri, s["file"]) for s in self.shards]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ImageCache":
        return cls(**d)


def cache_key(images: LabelledImages, classes: Sequence[str], short_side: int, side: int, seed: int) -> str:
    """What the cache's content depends on, hashed."""
    h = hashlib.sha256(f"v{CACHE_VERSION} {short_side} {side} {seed} {json.dumps(list(classes))}\n".encode())
    for path, label in zip(images.paths, images.labels):
        h.update(f"{path}\t{label}\n".encode())
    return h.hexdigest()[:32]


def images_per_shard(side: int, num_images: int, num_cpus: float) -> int:
    """Shard size: enough shards that every CPU gets a few, each of at least
    MIN_SHARD_IMAGES images, but never over SHARD_BYTES or MAX_SHARD_IMAGES."""
    by_bytes = max(1, SHARD_BYTES // (side * side * 3))
    by_spread = -(-num_images // max(1, int(4 * num_cpus)))
    return int(min(max(by_spread, MIN_SHARD_IMAGES), MAX_SHARD_IMAGES, by_bytes))


def read_manifest(uri: str) -> Optional[ImageCache]:
    manifest = storage.join(uri, MANIFEST_FILE)
    if not storage.exists(manifest):
        return None
    return ImageCache.from_dict(storage.read_json(manifest))


def resize_many(images: Sequence[np.ndarray], short_side: int, side: int) -> np.ndarray:
    """Decoded (H, W, 3) images -> (n, side, side, 3) uint8, each through ``resize_center_crop``.

    Images of one size are resized together in one call: the same pixels as one at a
    time, in a fraction of the time (28 px PNGs decoded and resized: 0.19 -> 0.10 ms each
    on one core; the call, not its arithmetic, was the cost).
    """
    out = np.empty((len(images), side, side, 3), np.uint8)
    by_shape: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)
    for idx in by_shape.values():
        batch = torch.from_numpy(np.stack([images[i] for i in idx])).permute(0, 3, 1, 2)  # (n, 3, H, W)
        out[idx] = resize_center_crop(batch, short_side, side).permute(0, 2, 3, 1).numpy()
    return out


def write_shard(paths: list[str], labels: np.ndarray, uri: str, short_side: int, side: int) -> int:
    """Reads and decodes ``paths`` into one shard file at ``uri``; returns how many images it holds.

    Read as labelling reads them (``read.iter_inputs``): files fetched a batch at a time,
    concurrently, and each tar streamed once for all of its members (``TAR#MEMBER``) in
    the shard. Nothing checked the paths before (a listing would cost one request per
    file on the driver): a file that is missing, unreadable or not an image fails the
    shard with a DataError naming it.
    """
    slots: dict[str, list[int]] = {}  # a path -> its places in the shard (resampling repeats paths)
    for i, path in enumerate(paths):
        slots.setdefault(path, []).append(i)
    decoded: list[Optional[np.ndarray]] = [None] * len(paths)
    failed: dict[int, str] = {}  # a place -> why its image is missing
    for name, data in iter_inputs(paths):
        if not slots.get(name):  # a member of a tar named whole: not a row of the split
            continue
        i = slots[name].pop()
        if isinstance(data, BaseException):  # the read's own error: missing, a broken tar, ...
            failed[i] = error_text(data)
            continue
        try:
            decoded[i] = decode_image(data, target_size=short_side)
        except (ImageDecodeError, OSError) as e:
            failed[i] = error_text(e)
    for i, image in enumerate(decoded):
        if image is None and i not in failed:  # its rows were the members: a tar named whole
            failed[i] = "a tar archive, not an image (a manifest names its images as TAR#MEMBER)"
    if failed:
        first = min(failed)
        more = f" ({len(failed)} of this shard's {len(paths)} images cannot be read)" if len(failed) > 1 else ""
        raise DataError(f"cannot read training image {paths[first]}: {failed[first]}{more}")
    buf = io.BytesIO()
    np.savez(buf, images=resize_many(decoded, short_side, side), labels=labels)
    with storage.open_uri(uri, "wb") as f:
        f.write(buf.getbuffer())
    return len(paths)


@ray.remote
def _write_shard(*args) -> int:
    torch.set_num_threads(1)  # one task per core; more threads only contend
    return write_shard(*args)


@dataclass
class CachePlan:
    """A cache to build: its manifest-to-be (shard names and counts are known before any
    image is decoded) and one task per shard. ``build`` decodes and writes it."""

    cache: ImageCache
    tasks: list[tuple] = field(default_factory=list)

    def build(self, task_cpus: float = 1.0) -> ImageCache:
        """Decodes every shard (Ray tasks of ``task_cpus`` CPUs each; a small split in this
        process) and writes the manifest last, which makes the cache valid."""
        start = time.perf_counter()
        if runs_here(self.cache.num_images):
            for task in self.tasks:
                write_shard(*task)
        else:
            ray.get([_write_shard.options(num_cpus=task_cpus).remote(*task) for task in self.tasks])
        self.cache.seconds += time.perf_counter() - start
        storage.write_json(storage.join(self.cache.uri, MANIFEST_FILE), self.cache.to_dict())
        return self.cache

    def fail(self, error: BaseException) -> None:
        """Marks the cache as failed, so that workers waiting for it (``wait_for_cache``) stop."""
        storage.write_json(storage.join(self.cache.uri, FAILED_FILE), {"error": f"{type(error).__name__}: {error}"})


def plan_cache(images: LabelledImages, classes: Sequence[str], uri: str, short_side: int, side: int,
               seed: int = 0) -> CachePlan:
    """The cache of ``images`` at ``uri``: found valid (a plan with no tasks, ``reused``), or
    planned afresh, the folder cleared of any stale or half-built cache. See ``build_cache``."""
    start = time.perf_counter()
    key = cache_key(images, classes, short_side, side, seed)
    found = read_manifest(uri)
    if found is not None and found.key == key:
        found.reused, found.seconds = True, time.perf_counter() - start
        return CachePlan(found)
    fs, folder = storage.filesystem(uri)
    if fs.exists(folder):  # stale or half-built: its manifest is absent or names other data
        fs.rm(folder, recursive=True)
    storage.makedirs(uri)
    labels = encode_labels(images.labels, classes)
    order = np.random.default_rng(seed).permutation(len(images))
    per_shard = images_per_shard(side, len(images), float(ray.cluster_resources().get("CPU", 1)))
    shards, tasks = [], []
    for i, lo in enumerate(range(0, len(order), per_shard)):
        idx = order[lo:lo + per_shard]
        shards.append({"file": SHARD_TEMPLATE.format(i), "count": len(idx)})
        tasks.append(([images.paths[j] for j in idx], labels[idx], storage.join(uri, shards[-1]["file"]), short_side,
                      side))
    cache = ImageCache(uri=uri, key=key, short_side=short_side, side=side, shards=shards,
                       seconds=time.perf_counter() - start)
    return CachePlan(cache, tasks)


def build_cache(images: LabelledImages, classes: Sequence[str], uri: str, short_side: int, side: int,
                seed: int = 0) -> ImageCache:
    """Decodes ``images`` once into uint8 shards under ``uri``, or reuses a valid cache there.

    Runs one Ray task per shard (the driver only hands out paths and collects counts);
    up to IN_PROCESS_MAX_IMAGES images, decodes them itself.

    Args:
        images: The split to cache.
        classes: Class names; labels are stored as indices into it.
        uri: Folder (local or fsspec) of this split's cache.
        short_side, side: Shorter side after the resize, then the centre crop kept.
        seed: Seed of the one shuffle applied before sharding.

    Raises:
        DataError: an image cannot be read or decoded (training data must be clean).
    """
    plan = plan_cache(images, classes, uri, short_side, side, seed)
    return plan.cache if plan.cache.reused else plan.build()


def wait_for_cache(cache: ImageCache, timeout: float = 24 * 3600, poll: float = 0.1) -> float:
    """Waits until the cache being built elsewhere (``CachePlan.build`` on the driver) is
    valid; returns the seconds waited. Raises if its build failed or ``timeout`` passed."""
    start = time.perf_counter()
    while True:
        found = read_manifest(cache.uri)
        if found is not None and found.key == cache.key:
            return time.perf_counter() - start
        failed = storage.join(cache.uri, FAILED_FILE)
        if storage.exists(failed):
            raise RuntimeError(f"decoding the cache {cache.uri} failed: {storage.read_json(failed)['error']}")
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"the cache {cache.uri} was not built within {timeout:.0f} s")
        time.sleep(poll)


def load_shard(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, H, W, 3) uint8, labels (n,) int64) of one shard file."""
    with np.load(io.BytesIO(storage.read_bytes(uri))) as npz:
        return npz["images"], npz["labels"]


def load_labels(cache: ImageCache) -> np.ndarray:
    """(N,) labels of the whole cache in order, reading only each shard's ``labels`` member
    (a shard is a zip: its images are not read)."""
    parts = []
    for uri in cache.shard_uris():
        with storage.open_uri(uri, "rb") as f, np.load(f) as npz:
            parts.append(npz["labels"])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def shard_batches(cache: ImageCache, rank: int, world: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """In-order batches of the cache's shards ``rank``, ``rank + world``, ...: every image
    on exactly one worker, one shard in memory at a time."""
    for uri in cache.shard_uris()[rank::world]:
        images, labels = load_shard(uri)
        for lo in range(0, len(labels), batch_size):
            yield torch.from_numpy(images[lo:lo + batch_size]), torch.from_numpy(labels[lo:lo + batch_size])


def worker_range(num_images: int, rank: int, world: int, equal: bool) -> np.ndarray:
    """Indices into the cache that worker ``rank`` of ``world`` holds.

    ``equal`` (training): every worker gets ceil(N / world) indices, the last ranges
    wrapping around to the start, so that all workers take the same number of steps
    (DDP needs that) and no image is left out. Otherwise (evaluation) the ranges
    partition the cache exactly, so that summed metrics count every image once.
    """
    if equal:
        per = -(-num_images // world)
        return (np.arange(rank * per, (rank + 1) * per)) % max(1, num_images)
    bounds = np.linspace(0, num_images, world + 1).round().astype(int)
    return np.arange(bounds[rank], bounds[rank + 1])


def load_indices(cache: ImageCache, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cached images at ``indices`` (in that order), reading only the shards they fall in."""
    starts = np.cumsum([0] + [s["count"] for s in cache.shards])
    images = np.empty((len(indices), cache.side, cache.side, 3), np.uint8)
    labels = np.empty(len(indices), np.int64)
    shard_of = np.searchsorted(starts, indices, side="right") - 1
    for shard in np.unique(shard_of):
        where = np.nonzero(shard_of == shard)[0]
        shard_images, shard_labels = load_shard(cache.shard_uris()[shard])
        local = indices[where] - starts[shard]
        images[where] = shard_images[local]
        labels[where] = shard_labels[local]
    return images, labels


def load_shards(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data batch function: rows naming shard files -> their images and labels."""
    parts = [load_shard(uri) for uri in batch["uri"]]
    return {"image": np.concatenate([p[0] for p in parts]), "label": np.concatenate([p[1] for p in parts])}


def cache_dataset(cache: ImageCache, object_store_fraction: float = 0.3) -> ray.data.Dataset:
    """A Ray Dataset of the cache's ``image``/``label`` rows, one block per shard.

    Materialized in the object store when the uint8 images take at most
    ``object_store_fraction`` of it, so that epochs read memory; otherwise read from
    the shard files each epoch, in a fresh random shard order.
    """
    ds = ray.data.from_items([{"uri": u} for u in cache.shard_uris()], override_num_blocks=len(cache.shards))
    ds = ds.map_batches(load_shards, batch_size=1, num_cpus=0.25)
    store = float(ray.cluster_resources().get("object_store_memory", 0))
    if cache.nbytes <= object_store_fraction * store:
        return ds.materialize()
    return ds.randomize_block_order()
