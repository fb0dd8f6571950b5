"""Local paths in configs made absolute against the command's folder; URIs and weight names left alone."""

import os

import pytest

from imgcls.config import DataConfig, JobConfig, ModelConfig, PredictConfig, TrainConfig
from imgcls.paths import local_path, resolve_paths, weights_path


@pytest.mark.parametrize("given, expected", [
    ("data/fm", "/base/data/fm"),
    ("./data/../fm/", "/base/fm/"),
    ("/abs/fm", "/abs/fm"),
    ("out/data/*/*.png", "/base/out/data/*/*.png"),
    ("s3://bucket/images/", "s3://bucket/images/"),
    ("gs://b/x", "gs://b/x"),
    ("file://relative/x", "file://relative/x"),
    ("simplecache::s3://b/x", "simplecache::s3://b/x"),
    ("", ""),
    (None, None),
])
def test_local_path(given, expected):
    assert local_path(given, "/base") == expected


def test_home_is_expanded():
    assert local_path("~/fm", "/base") == os.path.expanduser("~/fm")


@pytest.mark.parametrize("given, expected", [
    (None, None), ("packaged", "packaged"), ("DEFAULT", "DEFAULT"), ("IMAGENET1K_V1", "IMAGENET1K_V1"),
    ("w.pt", "/base/w.pt"), ("weights/w.safetensors", "/base/weights/w.safetensors"),
    ("s3://b/w.pt", "s3://b/w.pt"),
])
def test_weights_path(given, expected):
    assert weights_path(given, "/base") == expected


def test_a_weights_file_without_dot_or_slash_is_a_path_when_it_is_there(tmp_path):
    (tmp_path / "mine").write_bytes(b"")
    assert weights_path("mine", str(tmp_path)) == str(tmp_path / "mine")


def test_resolve_paths_of_a_job_and_a_predict_config():
    job = JobConfig(data=DataConfig(root="data/fm", cache_path="cache"), model=ModelConfig(weights="w.pt"),
                    train=TrainConfig(storage_path="runs", resume_from="runs/x/checkpoint_1", init_from="runs/old/best"))
    got = resolve_paths(job, "/base")
    assert (got.data.root, got.data.cache_path, got.model.weights, got.train.storage_path, got.train.resume_from,
            got.train.init_from) == \
        ("/base/data/fm", "/base/cache", "/base/w.pt", "/base/runs", "/base/runs/x/checkpoint_1", "/base/runs/old/best")
    assert got.train.epochs == job.train.epochs and got.data.augment == job.data.augment
    untouched = JobConfig(data=DataConfig(root="s3://b/fm"), train=TrainConfig(storage_path="gs://b/runs"))
    assert resolve_paths(untouched, "/base") == untouched
    cfg = resolve_paths(PredictConfig(model="out/export", input="s3://b/in/", output="out/labels", top_k=3), "/base")
    assert (cfg.model, cfg.input, cfg.output, cfg.top_k) == ("/base/out/export", "s3://b/in/", "/base/out/labels", 3)


def test_default_base_is_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_paths(JobConfig(data=DataConfig(root="fm"))).data.root == str(tmp_path / "fm")
