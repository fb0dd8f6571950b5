"""The decode-once cache's pieces that need no Ray: ranges, shard reads, keys, geometry."""

import io
import os
import re
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.training.cache import ImageCache, cache_key, images_per_shard, load_indices, resize_many, worker_range
from imgcls.labelled import LabelledImages
from imgcls.preprocess import decode_image, decode_resized, eval_geometry, resize_size, to_chw_tensor


@pytest.mark.parametrize("n,world", [(10, 1), (10, 2), (11, 2), (7, 3), (2, 4)])
def test_training_ranges_are_equal_and_cover_everything(n, world):
    ranges = [worker_range(n, r, world, equal=True) for r in range(world)]
    assert len({len(r) for r in ranges}) == 1  # DDP: every worker takes the same number of steps
    assert set(np.concatenate(ranges)) == set(range(n))


@pytest.mark.parametrize("n,world", [(10, 2), (11, 2), (7, 3), (2, 4)])
def test_evaluation_ranges_partition_exactly(n, world):
    ranges = np.concatenate([worker_range(n, r, world, equal=False) for r in range(world)])
    assert sorted(ranges) == list(range(n))


def write_cache(tmp_path, counts, side=4):
    shards, start = [], 0
    for i, count in enumerate(counts):
        ids = np.arange(start, start + count)
        images = np.broadcast_to((ids % 256).astype(np.uint8)[:, None, None, None], (count, side, side, 3)).copy()
        np.savez(tmp_path / f"shard-{i:05d}.npz", images=images, labels=ids)
        shards.append({"file": f"shard-{i:05d}.npz", "count": count})
        start += count
    return ImageCache(uri=str(tmp_path), key="k", short_side=side, side=side, shards=shards)


def test_load_indices_reads_the_named_images_in_order(tmp_path):
    cache = write_cache(tmp_path, [5, 3, 4])
    assert cache.num_images == 12 and cache.nbytes == 12 * 4 * 4 * 3
    want = np.array([11, 0, 5, 6, 4, 7])
    images, labels = load_indices(cache, want)
    assert labels.tolist() == want.tolist()
    assert images[:, 0, 0, 0].tolist() == want.tolist()


def test_load_indices_reads_only_the_shards_it_needs(tmp_path):
    cache = write_cache(tmp_path, [5, 3, 4])
    os.remove(tmp_path / "shard-00000.npz")
    images, labels = load_indices(cache, np.array([5, 6, 11]))
    assert labels.tolist() == [5, 6, 11]
    with pytest.raises(FileNotFoundError):
        load_indices(cache, np.array([0]))


def test_cache_key_follows_files_labels_and_geometry():
    images = LabelledImages(["a.png", "b.png"], ["x", "y"])
    key = cache_key(images, ["x", "y"], 32, 28, 0)
    assert key == cache_key(LabelledImages(["a.png", "b.png"], ["x", "y"]), ["x", "y"], 32, 28, 0)
    assert key != cache_key(LabelledImages(["a.png", "c.png"], ["x", "y"]), ["x", "y"], 32, 28, 0)
    assert key != cache_key(LabelledImages(["a.png", "b.png"], ["y", "x"]), ["x", "y"], 32, 28, 0)
    assert key != cache_key(images, ["x", "y"], 32, 32, 0)
    assert key != cache_key(images, ["x", "y"], 32, 28, 1)


def test_shards_are_bounded_and_spread_over_the_cpus():
    assert images_per_shard(28, 56_000, 2) == 4096  # capped
    assert images_per_shard(28, 4_000, 2) == 500  # 8 shards for 2 CPUs
    assert images_per_shard(28, 10, 2) == 64
    assert images_per_shard(1024, 10_000, 64) * 1024 * 1024 * 3 <= 64 * 2**20


def test_validation_images_are_the_inference_pixels():
    """The val cache's geometry is the eval preset's: what bulk labelling decodes."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (300, 420, 3), dtype=np.uint8))
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    inference = eval_geometry(to_chw_tensor(decode_image(data, target_size=resize_size(64))), 64)
    cached = decode_resized(data, resize_size(64), 64)
    assert cached.shape == (64, 64, 3)
    assert torch.equal(torch.from_numpy(cached), inference.permute(1, 2, 0))


def test_best_checkpoint_is_replaced_without_a_reader_seeing_a_mix(tmp_path):
    """promote_best swaps whole folders: ``best`` is always there and complete, each file
    whole, old or new, while it is replaced again and again."""
    from imgcls.training.trainer import promote_best

    sources = []
    for version in range(2):
        folder = tmp_path / f"checkpoint_{version}"
        folder.mkdir()
        for name in ("model.pt", "meta.json", "classes.json", "history.json"):
            (folder / name).write_text(str(version) * 500_000)
        sources.append(str(folder))
    best = tmp_path / "best"
    promote_best(sources[0], str(best))
    seen, problems, stop = set(), [], threading.Event()

    def read_forever():
        while not stop.is_set():
            try:
                names = sorted(os.listdir(best))
                for name in names:
                    text = (best / name).read_text()
                    if len(text) != 500_000 or len(set(text)) != 1:
                        problems.append(f"{name} half-written")
                    seen.add(text[0])
            except FileNotFoundError as e:
                problems.append(f"missing: {e}")
                continue
            if names != ["classes.json", "history.json", "meta.json", "model.pt"]:
                problems.append(f"incomplete folder {names}")

    reader = threading.Thread(target=read_forever)
    reader.start()
    for i in range(30):
        # Runs replace ``best`` at most once an epoch; a reader's pass here takes about a
        # millisecond, and the copy it must never see half-done about as long.
        time.sleep(0.05)
        promote_best(sources[(i + 1) % 2], str(best))
    stop.set()
    reader.join()
    assert not problems, problems[:3]
    assert seen == {"0", "1"}
    # The replaced copy stays, hidden, until the next replacement; no other leftovers.
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left[1:] == ["best", "checkpoint_0", "checkpoint_1"] and left[0].startswith(".best-"), left


def test_best_of_picks_the_highest_validation_accuracy():
    from imgcls.training.trainer import best_of

    class C:
        def __init__(self, path):
            self.path = path

    pairs = [(C("e0"), {"epoch": 0, "val_accuracy": 0.5}), (C("e1"), {"epoch": 1, "val_accuracy": 0.8}),
             (C("e2"), {"epoch": 2, "val_accuracy": 0.7}), (C("e3"), {"epoch": 3, "val_accuracy": 0.8})]
    assert best_of(pairs) == "e1"  # the earliest of the tied best
    assert best_of([]) is None
    # A tie on accuracy goes to the lower validation loss first.
    pairs[1][1]["val_loss"], pairs[3][1]["val_loss"] = 0.6, 0.4
    assert best_of(pairs) == "e3"


def test_onecycle_and_cosine_schedules():
    from imgcls.training.loop import lr_lambda

    cos, tri = lr_lambda(10, 110, "cosine"), lr_lambda(10, 110, "onecycle")
    assert cos(0) == tri(0) == pytest.approx(0.1) and cos(9) == tri(9) == 1.0
    assert tri(60) == pytest.approx(0.5) and cos(60) == pytest.approx(0.5)
    assert tri(35) == pytest.approx(0.75) and cos(35) > 0.75  # cosine stays high longer
    assert tri(110) == cos(110) == 0.0


def test_ema_follows_the_weights_with_a_warmup():
    from imgcls.training.loop import ModelEMA

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9)
    start = ema.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[1].num_batches_tracked += 5
    ema.update(model)  # decay min(0.9, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.module[0].weight, d * start + (1 - d) * model[0].weight)
    assert ema.module[1].num_batches_tracked.item() == 5
    for _ in range(200):
        ema.update(model)
    assert torch.allclose(ema.module[0].weight, model[0].weight, atol=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_images_resized_together_are_each_as_resized_alone():
    """resize_many resizes same-sized images in one call: the pixels must not change."""
    rng = np.random.default_rng(1)
    datas = []
    for shape in [(28, 28), (40, 30), (28, 28), (64, 90), (28, 28)]:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(buf, format="PNG")
        datas.append(buf.getvalue())
    together = resize_many([decode_image(data, target_size=32) for data in datas], 32, 28)
    assert together.shape == (5, 28, 28, 3)
    for i, data in enumerate(datas):
        assert np.array_equal(together[i], decode_resized(data, 32, 28)), i


def test_a_shard_reads_files_and_tar_members_as_labelling_does(fmnist_root, tmp_path):
    """A filled-in review.csv names tar members (TAR#MEMBER) beside files: the shard
    holds each one's pixels, a path named twice (a resampled split) twice."""
    import tarfile

    from conftest import add_tar_member
    from imgcls.inference.read import member_path
    from imgcls.training.cache import load_shard, write_shard

    files = [os.path.join(fmnist_root, c, sorted(os.listdir(os.path.join(fmnist_root, c)))[0]) for c in ("bag", "coat")]
    shard = str(tmp_path / "labelled.tar")
    with tarfile.open(shard, "w") as tar:
        for i, f in enumerate(files):
            add_tar_member(tar, f"m/{i}.png", open(f, "rb").read())
    paths = [member_path(shard, "m/1.png"), files[0], member_path(shard, "m/0.png"), member_path(shard, "m/1.png")]
    assert write_shard(paths, np.arange(4), str(tmp_path / "s.npz"), 28, 28) == 4
    images, labels = load_shard(str(tmp_path / "s.npz"))
    want = [decode_resized(open(files[i], "rb").read(), 28, 28) for i in (1, 0, 0, 1)]
    assert labels.tolist() == [0, 1, 2, 3] and all(np.array_equal(a, b) for a, b in zip(images, want))


def test_a_missing_file_tar_or_member_fails_its_shard_with_its_name(fmnist_root, tmp_path):
    """Nothing checks a manifest's paths before the decode (one request a row on the
    driver): the task that reads them names the first one missing, and counts them."""
    import tarfile

    from conftest import add_tar_member
    from imgcls.inference.read import member_path
    from imgcls.labelled import DataError
    from imgcls.training.cache import write_shard

    good = os.path.join(fmnist_root, "bag", sorted(os.listdir(os.path.join(fmnist_root, "bag")))[0])
    shard = str(tmp_path / "s.tar")
    with tarfile.open(shard, "w") as tar:
        add_tar_member(tar, "a.png", open(good, "rb").read())
    for missing, why in ((str(tmp_path / "gone.png"), "FileNotFoundError"),
                         (member_path(shard, "b.png"), f"FileNotFoundError: b.png is not in {shard}"),
                         (member_path(str(tmp_path / "gone.tar"), "a.png"), "FileNotFoundError")):
        with pytest.raises(DataError, match=f"^cannot read training image {re.escape(missing)}: {re.escape(why)}"):
            write_shard([good, member_path(shard, "a.png"), missing], np.arange(3), str(tmp_path / "x.npz"), 28, 28)
    with pytest.raises(DataError, match=r"gone-1\.png: .*\(2 of this shard's 3 images cannot be read\)"):
        write_shard([str(tmp_path / f"gone-{i}.png") for i in (1, 2)] + [good], np.arange(3), str(tmp_path / "x.npz"),
                    28, 28)
    assert not os.path.exists(tmp_path / "x.npz")
