"""``--class-balance sampler`` on a real cache at a 100:1 imbalance: each epoch's draw, the
workers' parts of it, and the batches the resident and streamed workers make of them."""

import os

import numpy as np
import pytest
import torch

from imgcls.training.cache import ImageCache, load_indices, load_labels, load_shard, write_shard
from imgcls.training.loop import ResidentSplit
from imgcls.training.sampler import balanced_epoch, sampled_batches, worker_sample

CLASSES = ["bag", "coat"]
COUNTS = (200, 2)  # 100:1
SHARD = 64  # images per shard: four shards, as a cache of a larger split has many


@pytest.fixture(scope="module")
def imbalanced_cache(fmnist_root, tmp_path_factory):
    """200 real bag images and 2 coat images, shuffled once and written as the trainer's
    cache writes them (``write_shard``): each image once, in shards."""
    paths, labels = [], []
    for c, (label, n) in enumerate(zip(CLASSES, COUNTS)):
        names = sorted(os.listdir(os.path.join(fmnist_root, label)))[:n]
        paths += [os.path.join(fmnist_root, label, name) for name in names]
        labels += [c] * n
    order = np.random.default_rng(0).permutation(len(paths))
    folder = tmp_path_factory.mktemp("imbalanced-cache")
    shards = []
    for i, lo in enumerate(range(0, len(order), SHARD)):
        idx = order[lo:lo + SHARD]
        name = f"shard-{i:05d}.npz"
        write_shard([paths[j] for j in idx], np.array(labels)[idx], str(folder / name), 28, 28)
        shards.append({"file": name, "count": len(idx)})
    return ImageCache(uri=str(folder), key="k", short_side=28, side=28, shards=shards)


def test_each_epoch_draws_the_classes_equally_from_images_stored_once(imbalanced_cache):
    cache = imbalanced_cache
    labels = load_labels(cache)
    assert cache.num_images == len(labels) == sum(COUNTS) and np.bincount(labels).tolist() == list(COUNTS)
    assert labels.tolist() == np.concatenate([load_shard(u)[1] for u in cache.shard_uris()]).tolist()
    images, _ = load_indices(cache, np.arange(cache.num_images))
    assert len({image.tobytes() for image in images}) == cache.num_images  # no image stored twice
    coat = np.flatnonzero(labels == 1)
    epochs = []
    for epoch in range(3):
        sample = balanced_epoch(labels, len(CLASSES), seed=0, epoch=epoch)
        assert len(sample) == cache.num_images  # an epoch as long as the split
        assert np.bincount(labels[sample], minlength=2).tolist() == [101, 101]
        drawn = np.bincount(sample, minlength=cache.num_images)
        assert sorted(drawn[coat].tolist()) == [50, 51]  # each rare image equally often
        assert drawn[labels == 0].max() == 1  # the largest class: a subset, each at most once
        epochs.append(sample)
    bags = [set(s[labels[s] == 0].tolist()) for s in epochs]
    assert bags[0] != bags[1] != bags[2] and not np.array_equal(epochs[0], epochs[1])  # drawn afresh
    # The draw is the seed's and the epoch's alone: a resumed run draws the same epoch 1.
    assert np.array_equal(balanced_epoch(labels, 2, seed=0, epoch=1), epochs[1])
    assert not np.array_equal(balanced_epoch(labels, 2, seed=1, epoch=1), epochs[1])


def test_an_uneven_split_gives_the_remainder_to_random_classes():
    labels = np.array([0] * 50 + [1] * 5 + [2] * 2)  # 57 = 3 * 19: even; one image more is not
    sample = balanced_epoch(np.append(labels, 0), 3, seed=4, epoch=0)
    counts = np.bincount(np.append(labels, 0)[sample], minlength=3)
    assert counts.sum() == 58 and sorted(counts.tolist()) == [19, 19, 20]
    assert np.bincount(labels[balanced_epoch(labels, 4, seed=4, epoch=0)]).tolist() == [19, 19, 19]  # class 3: none


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_workers_split_the_epoch_into_equal_parts(imbalanced_cache, world):
    labels = load_labels(imbalanced_cache)
    sample = balanced_epoch(labels, 2, seed=0, epoch=2)
    parts = [worker_sample(labels, 2, 0, 2, rank, world) for rank in range(world)]
    per = -(-len(labels) // world)
    assert all(len(p) == per for p in parts)  # DDP: the same number of steps on every worker
    together = np.concatenate(parts)
    assert np.array_equal(together[:len(sample)], sample)  # the epoch, in its order
    assert np.array_equal(together[len(sample):], sample[:len(together) - len(sample)])  # wrapped


@pytest.mark.parametrize("window_rows", [2048, 40])
def test_resident_and_streamed_batches_hold_the_drawn_images(imbalanced_cache, window_rows):
    """A resident worker holds the whole split and batches its part in the drawn order; a
    streamed one reads each shard once and gives the same images, in pools' order."""
    cache = imbalanced_cache
    labels = load_labels(cache)
    part = worker_sample(labels, 2, 0, 0, 1, 2)
    want_images, want_labels = load_indices(cache, part)
    whole = ResidentSplit(*map(torch.from_numpy, load_indices(cache, np.arange(cache.num_images))))
    resident = list(whole.batches(16, order=torch.from_numpy(part)))
    assert [len(y) for _, y in resident] == [16] * 6 + [5]
    assert np.array_equal(torch.cat([x for x, _ in resident]).numpy(), want_images)
    assert np.array_equal(torch.cat([y for _, y in resident]).numpy(), want_labels)
    streamed = list(sampled_batches(cache, part, 16, seed=3, window_rows=window_rows))
    assert sum(len(y) for _, y in streamed) == len(part) and all(len(y) == 16 for _, y in streamed[:-1])
    rows = sorted((x.numpy().tobytes(), int(y)) for xs, ys in streamed for x, y in zip(xs, ys))
    assert rows == sorted((x.tobytes(), int(y)) for x, y in zip(want_images, want_labels))
    again = list(sampled_batches(cache, part, 16, seed=3, window_rows=window_rows))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(streamed, again))  # seeded: a resumed epoch repeats
