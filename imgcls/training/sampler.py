"""``--class-balance sampler``: a fresh class-balanced draw over the cached training images every epoch.

The cache holds each training image once, whatever the class balance; what is balanced
is the order the workers read it in. Every epoch draws as many images as the training
split holds (as torch's ``WeightedRandomSampler`` with ``num_samples=len(dataset)``, so
an epoch takes as many steps as without the sampler), every class equally often: a
class 100 times rarer than the largest has each of its images drawn about 100 times
that epoch, and the largest class gives a different subset of its images each epoch.

The draw depends only on the labels, the run's seed and the epoch: every worker draws
the same epoch and takes its own equal part of it (``worker_range``, as the unweighted
path splits the cache), and a resumed run draws the epochs it would have drawn.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from imgcls.training.cache import ImageCache, load_shard, worker_range

SAMPLER_STREAM = 0x5A  # keeps the draw's random stream apart from other uses of (seed, epoch)
WINDOW_ROWS = 2048  # streamed: rows pooled from the shards read before a pool is shuffled into batches


def balanced_epoch(labels: np.ndarray, num_classes: int, seed: int, epoch: int) -> np.ndarray:
    """The cache indices that epoch ``epoch`` trains on, in training order.

    ``len(labels)`` indices, every class present equally often (``n // C`` each, one more
    for ``n % C`` classes chosen at random). A class's draws go through its images in
    successive shuffles, so each image is drawn floor or ceil(quota / count) times: the
    exact balance of a per-class draw, without the spread that independent draws with
    replacement would give an image's count. The result is shuffled.

    Args:
        labels: (N,) class index of every cached training image, in cache order.
        num_classes: Number of classes; a class with no images is left out.
        seed: The run's seed.
        epoch: The epoch (from 0); each draws afresh.
    """
    rng = np.random.default_rng([seed, epoch, SAMPLER_STREAM])
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    by_class = [idx for idx in by_class if len(idx)]
    n = len(labels)
    quota = np.full(len(by_class), n // max(1, len(by_class)))
    quota[rng.choice(len(by_class), n % max(1, len(by_class)), replace=False)] += 1
    drawn = []
    for idx, q in zip(by_class, quota):
        rounds = -(-q // len(idx))
        shuffles = np.argsort(rng.random((rounds, len(idx))), axis=1)  # (rounds, count): one shuffle a row
        drawn.append(idx[shuffles].ravel()[:q])
    return rng.permutation(np.concatenate(drawn)) if drawn else np.zeros(0, np.int64)


def worker_sample(labels: np.ndarray, num_classes: int, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """Worker ``rank``'s part of ``balanced_epoch``: ceil(N / world) indices, the parts of
    all workers together the whole epoch (the last wrapping around to its start)."""
    epoch_indices = balanced_epoch(labels, num_classes, seed, epoch)
    return epoch_indices[worker_range(len(epoch_indices), rank, world, equal=True)]


def sampled_batches(cache: ImageCache, indices: np.ndarray, batch_size: int, seed: int,
                    window_rows: int = WINDOW_ROWS) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of the cached images at ``indices`` (repeats allowed) for a worker that
    streams the cache: each shard is read once, in a random order, and the rows it
    gives are pooled with those of the shards read before until the pool holds
    ``window_rows``; the pool is then shuffled into batches (the remainder waits for the
    next pool). Memory: the shards of one pool, however often their images repeat.

    A class whose few images sit in one shard comes in the batches of that shard's pool
    more than elsewhere: the resident path, which holds the whole split, has no such runs.
    """
    starts = np.cumsum([0] + [s["count"] for s in cache.shards])
    shard_of = np.searchsorted(starts, indices, side="right") - 1
    uris = cache.shard_uris()
    rng = np.random.default_rng([seed, SAMPLER_STREAM])
    order = rng.permutation(np.unique(shard_of))
    loaded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    pool = np.zeros(0, np.int64)  # positions into ``indices``
    for i, shard in enumerate(order):
        loaded[int(shard)] = load_shard(uris[shard])
        pool = np.concatenate([pool, np.flatnonzero(shard_of == shard)])
        last = i == len(order) - 1
        if len(pool) < window_rows and not last:
            continue
        pool = rng.permutation(pool)
        cut = len(pool) if last else len(pool) - len(pool) % batch_size
        for lo in range(0, cut, batch_size):
            yield _gather(loaded, pool[lo:lo + batch_size], indices, shard_of, starts)
        pool = pool[cut:]
        waiting = set(shard_of[pool].tolist())  # the remainder's shards stay loaded
        loaded = {s: v for s, v in loaded.items() if s in waiting}


def _gather(loaded: dict, positions: np.ndarray, indices: np.ndarray, shard_of: np.ndarray,
            starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    first = next(iter(loaded.values()))[0]
    images = np.empty((len(positions), *first.shape[1:]), np.uint8)
    labels = np.empty(len(positions), np.int64)
    for shard in np.unique(shard_of[positions]):
        where = np.flatnonzero(shard_of[positions] == shard)
        local = indices[positions[where]] - starts[shard]
        shard_images, shard_labels = loaded[int(shard)]
        images[where], labels[where] = shard_images[local], shard_labels[local]
    return torch.from_numpy(images), torch.from_numpy(labels)
