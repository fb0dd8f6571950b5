"""Small jobs' one-off passes run in the calling process (``cache.IN_PROCESS_MAX_IMAGES``)
and must give exactly what the Ray tasks and actor pools give for the same files."""

import numpy as np
import pandas as pd
import pytest

from imgcls import cache as cache_module
from imgcls.cache import build_cache, load_shard
from imgcls.checkpoint import save_checkpoint
from imgcls.config import JobConfig, ModelConfig
from imgcls.data import LabelledImages, list_labelled_images
from imgcls.evaluate import predict_labelled
from imgcls.models import create_model

pytestmark = pytest.mark.integration


def test_cache_decoded_here_equals_the_cache_decoded_by_ray_tasks(ray_cluster, fmnist_root, tmp_path, monkeypatch):
    images = list_labelled_images(fmnist_root)
    keep = [i for i, label in enumerate(images.labels) if label in ("bag", "coat", "sandal")][::4]
    images = LabelledImages([images.paths[i] for i in keep], [images.labels[i] for i in keep])
    classes = sorted(set(images.labels))
    here = build_cache(images, classes, str(tmp_path / "here"), 36, 32, seed=3)
    monkeypatch.setattr(cache_module, "IN_PROCESS_MAX_IMAGES", 0)  # the same split through Ray tasks
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
