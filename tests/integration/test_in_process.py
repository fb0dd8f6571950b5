"""Small jobs' one-off passes run in the calling process (``devices.IN_PROCESS_MAX_IMAGES``)
and must give exactly what the Ray tasks and actor pools give for the same files."""

import numpy as np
import pandas as pd
import pytest

from imgcls import devices
from imgcls.training.cache import build_cache, load_shard
from imgcls.checkpoint import save_checkpoint
from imgcls.config import JobConfig, ModelConfig
from imgcls.labelled import LabelledImages, list_labelled_images
from imgcls.evaluation.evaluate import predict_labelled
from imgcls.models import create_model

pytestmark = pytest.mark.integration


def test_cache_decoded_here_equals_the_cache_decoded_by_ray_tasks(ray_cluster, fmnist_root, tmp_path, monkeypatch):
    images = list_labelled_images(fmnist_root)
    keep = [i for i, label in enumerate(images.labels) if label in ("bag", "coat", "sandal")][::4]
    images = LabelledImages([images.paths[i] for i in keep], [images.labels[i] for i in keep])
    classes = sorted(set(images.labels))
    here = build_cache(images, classes, str(tmp_path / "here"), 36, 32, seed=3)
    monkeypatch.setattr(devices, "IN_PROCESS_MAX_IMAGES", 0)  # the same split through Ray tasks
    tasks = build_cache(images, classes, str(tmp_path / "tasks"), 36, 32, seed=3)
    assert here.key == tasks.key and here.shards == tasks.shards and len(here.shards) >= 2
    for a, b in zip(here.shard_uris(), tasks.shard_uris()):
        (images_a, labels_a), (images_b, labels_b) = load_shard(a), load_shard(b)
        assert images_a.shape[1:] == (32, 32, 3) and np.array_equal(images_a, images_b)
        assert np.array_equal(labels_a, labels_b)


def test_evaluation_here_labels_like_the_actor_pool(ray_cluster, fmnist_root, tmp_path):
    """The same rows, error rows included, whichever way a labelled set is evaluated."""
    import torch

    images = list_labelled_images(fmnist_root)
    paths = images.paths[::40]
    broken = tmp_path / "bag" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    labelled = LabelledImages([*paths, str(broken)], [*images.labels[::40], "bag"])
    classes = sorted(set(images.labels))
    torch.manual_seed(1)
    model = str(tmp_path / "model")
    save_checkpoint(model, create_model("small_cnn", len(classes)), JobConfig(model=ModelConfig(arch="small_cnn",
                                                                                                  image_size=28)),
                    classes, history=[])
    here = predict_labelled(model, labelled, in_process=True)
    pool = predict_labelled(model, labelled, in_process=False)
    assert len(here) == len(labelled) and here["path"].tolist() == pool["path"].tolist()
    assert (here["status"] == "error").sum() == 1 and here.loc[here.status == "error", "path"].item() == str(broken)
    columns = ["path", "status", "error_type", "label", "true_label", "model_id"]
    pd.testing.assert_frame_equal(here[columns], pool[columns])
    assert np.allclose(here["score"].fillna(-1), pool["score"].fillna(-1), atol=1e-6)
    assert here["topk_labels"].map(list).tolist() == pool["topk_labels"].map(list).tolist()


def test_background_decode_is_waited_for_and_its_failure_stops_the_waiters(ray_cluster, fmnist_root, tmp_path):
    """``fit`` decodes on a driver thread while the workers start: the manifest planned up
    front is the one written, a waiter returns once it is; a broken training image fails
    the decode with the image named, and a worker waiting on a later cache is stopped
    rather than left waiting."""
    import threading
    import time

    from imgcls.training.cache import FAILED_FILE, plan_cache, read_manifest, wait_for_cache
    from imgcls.labelled import DataError
    from imgcls.training.trainer import CacheDecode

    images = list_labelled_images(fmnist_root)
    images = LabelledImages(images.paths[::20], images.labels[::20])
    classes = sorted(set(images.labels))
    plans = {"train": plan_cache(images, classes, str(tmp_path / "ok" / "train"), 32, 28),
             "val": plan_cache(images, classes, str(tmp_path / "ok" / "val"), 28, 28)}
    planned = {name: plan.cache.to_dict() for name, plan in plans.items()}
    assert read_manifest(plans["train"].cache.uri) is None  # nothing decoded yet
    waited = {}
    waiter = threading.Thread(target=lambda: waited.update(s=wait_for_cache(plans["val"].cache)))
    waiter.start()
    time.sleep(0.3)
    decode = CacheDecode(plans, background=True)
    decode.wait()
    waiter.join(timeout=30)
    assert waited["s"] >= 0.3
    for name, plan in plans.items():
        written = read_manifest(plan.cache.uri)
        assert written.key == planned[name]["key"] and written.shards == planned[name]["shards"]

    broken = tmp_path / "data" / "bag" / "broken.png"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a png")
    bad = LabelledImages(images.paths + [str(broken)], images.labels + ["bag"])
    plans = {"train": plan_cache(bad, classes, str(tmp_path / "bad" / "train"), 32, 28),
             "val": plan_cache(images, classes, str(tmp_path / "bad" / "val"), 28, 28)}
    decode = CacheDecode(plans, background=True)
    with pytest.raises(RuntimeError, match="decoding the cache .* failed: DataError: cannot read training image"):
        wait_for_cache(plans["val"].cache, timeout=60)
    with pytest.raises(DataError, match="broken.png"):
        decode.wait()
    assert (tmp_path / "bad" / "train" / FAILED_FILE).exists() and read_manifest(plans["train"].cache.uri) is None
