"""Labelling on a cluster that Ray's own autoscaler grows from no workers and shrinks
again (``ray.cluster_utils.AutoscalingCluster``, its fake node provider starting real
raylets on this machine): the pool grows onto the nodes the autoscaler adds, and the
nodes go once the job is done, the GPU node it requested included.

The cluster runs in ``autoscaling_scenario.py``, a process in PID and network
namespaces of its own (``unshare``): AutoscalingCluster stops every Ray cluster it can
see (``ray stop --force``), which there is only its own, never the suite's."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from imgcls.checkpoint import save_checkpoint
from imgcls.config import JobConfig, ModelConfig
from imgcls.models import create_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCENARIO = Path(__file__).with_name("autoscaling_scenario.py")
NAMESPACES = ["unshare", "--pid", "--fork", "--mount-proc", "--net"]


def namespaces_missing() -> str:
    """Why the scenario cannot run in namespaces of its own here ('' when it can)."""
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux)"
    probe = subprocess.run(NAMESPACES + ["true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"needs PID and network namespaces (root): {probe.stderr.strip()}"
    return ""


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    """6,000 real Fashion-MNIST files in 300 shards: more than one node's actors hold
    (4 shards each), so the pool starts actors that fit no node yet; about 25 s of work on
    an idle 2-core machine, time for the added nodes' actors to start and take shards."""
    from imgcls.datasets import fetch_fashion_mnist

    return fetch_fashion_mnist(str(tmp_path_factory.mktemp("fmnist6k")), per_class=600)


def files_under(root) -> list[str]:
    return sorted(os.path.join(r, f) for r, _, names in os.walk(root) for f in names if not f.startswith("."))


def test_labelling_grows_the_cluster_and_its_nodes_idle_out(many_images, tmp_path):
    missing = namespaces_missing()
    if missing:
        pytest.skip(missing)
    classes = sorted(d for d in os.listdir(many_images) if os.path.isdir(os.path.join(many_images, d)))
    model = str(tmp_path / "ckpt")
    torch.manual_seed(0)
    save_checkpoint(model, create_model("small_cnn", len(classes), image_size=64),
                    JobConfig(model=ModelConfig(arch="small_cnn", image_size=64)), classes, history=[])
    gpu_inputs = tmp_path / "few"  # the GPU job only has to run: 240 files
    for c in classes:
        (gpu_inputs / c).mkdir(parents=True)
        for name in sorted(os.listdir(os.path.join(many_images, c)))[:24]:
            (gpu_inputs / c / name).symlink_to(os.path.join(many_images, c, name))
    out, result = tmp_path / "out", tmp_path / "seen.json"
    home = tmp_path / "home"  # the head's ~/ray_bootstrap_config.yaml goes here
    home.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="rayas", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = dict(os.environ, HOME=str(home), RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled",
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    try:
        run = subprocess.run(NAMESPACES + [sys.executable, str(SCENARIO), model, many_images, str(gpu_inputs),
                                           str(out), str(result)], env=env, capture_output=True, text=True, timeout=540)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    seen = json.loads(result.read_text())
    assert seen["before"] == {}, "the cluster starts with no workers"

    # The CPU job made the autoscaler add nodes and spread its shards over them.
    cpu = seen["cpu"]["summary"]
    inputs = files_under(many_images)
    assert seen["head"] not in cpu["shards_by_node"], cpu["shards_by_node"]  # the head offers no CPUs
    assert len(cpu["shards_by_node"]) >= 2, cpu["shards_by_node"]
    assert set(cpu["shards_by_node"]) <= set(seen["cpu"]["nodes_added"])
    df = pq.read_table(str(out / "cpu")).to_pandas()
    assert len(df) == len(inputs) and df["path"].is_unique and sorted(df["path"]) == inputs
    assert cpu["rows"] == cpu["ok"] == len(inputs)

    # The GPU job requested the GPU node type, labelled on it, and let it go.
    gpu = seen["gpu"]["summary"]
    gpu_nodes = [n for n, res in seen["gpu"]["nodes_added"].items() if res.get("GPU")]
    assert gpu_nodes and set(gpu["shards_by_node"]) <= set(gpu_nodes), (gpu_nodes, gpu["shards_by_node"])
    assert gpu["rows"] == gpu["ok"] == len(files_under(gpu_inputs))

    # Once idle, every added node went (idle_timeout_minutes 0.1: 6 s): no request kept them.
    assert seen["cpu"]["idle_removal_s"] < 60 and seen["gpu"]["idle_removal_s"] < 60
    assert seen["after"] == {}
