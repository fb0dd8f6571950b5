"""A head and two worker nodes on one machine (Ray's own ``ray.cluster_utils.Cluster``):
labelling spreads over the nodes, and losing a node loses neither labels nor training."""

import json
import os
import threading
import time

import pyarrow.parquet as pq
import pytest
import ray
import torch
from conftest import start_local_ray

from imgcls.inference.bulk import label_images
from imgcls.checkpoint import save_checkpoint
from imgcls.config import DataConfig, JobConfig, ModelConfig, PredictConfig, TrainConfig
from imgcls.models import create_model
from imgcls.training.trainer import fit

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    """A head with no CPUs (so work runs on the workers) and two 1-CPU worker nodes,
    shared by this file's tests: ``workers`` is the list of live worker nodes, which a
    test that removes a node and adds a replacement updates.

    Takes the place of the session's local cluster for the module, which is started
    again afterwards for the tests that follow."""
    from ray.cluster_utils import Cluster

    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address)
    try:
        yield c, workers
    finally:
        ray.shutdown()
        c.shutdown()
        start_local_ray(ray_cluster)  # in the folder it was first started in


def node_of(node) -> str:
    return node.node_id


def wait_for(condition, timeout=300, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise TimeoutError(what)


def test_labelling_spreads_over_nodes_and_survives_losing_one(cluster, fmnist_root, tmp_path):
    c, workers = cluster
    model = str(tmp_path / "ckpt")
    torch.manual_seed(0)
    save_checkpoint(model, create_model("small_cnn", 10), JobConfig(model=ModelConfig(arch="small_cnn", image_size=28)),
                    sorted(d for d in os.listdir(fmnist_root) if os.path.isdir(os.path.join(fmnist_root, d))), history=[])
    inputs = sorted(os.path.join(r, f) for r, _, names in os.walk(fmnist_root) for f in names if not f.startswith("."))
    assert len(inputs) >= 2000

    first = label_images(PredictConfig(model=model, input=fmnist_root, output=str(tmp_path / "a"), files_per_shard=100))
    assert first.rows == len(inputs) and first.shards == 20  # 10 class folders of 200, listed per folder
    assert set(first.shards_by_node) == {node_of(w) for w in workers}, first.shards_by_node
    df = pq.read_table(str(tmp_path / "a")).to_pandas()
    assert sorted(df["path"]) == inputs

    # A second job loses a worker node midway; a replacement node joins, as an autoscaler
    # would add one. The job finishes with one row per input, none twice.
    out = tmp_path / "b"
    result = {}

    def run():
        try:
            result["summary"] = label_images(PredictConfig(model=model, input=fmnist_root, output=str(out),
                                                           files_per_shard=50, batch_size=16))
        except Exception as e:  # noqa: BLE001 - reported below
            result["error"] = e

    job = threading.Thread(target=run)
    job.start()
    wait_for(lambda: out.exists() and len(list(out.glob("part-*.parquet"))) >= 3, what="first parts")
    c.remove_node(workers[0])
    replacement = c.add_node(num_cpus=1)
    workers[:] = [workers[1], replacement]
    job.join(timeout=600)
    assert not job.is_alive(), "the job did not finish after losing a node"
    if "error" in result:  # a job that failed with its node is finished by a rerun
        result["summary"] = label_images(PredictConfig(model=model, input=fmnist_root, output=str(out),
                                                       files_per_shard=50, batch_size=16))
    summary = result["summary"]
    df = pq.read_table(str(out)).to_pandas()
    assert len(df) == len(inputs) and df["path"].is_unique and sorted(df["path"]) == inputs
    assert summary.rows == len(inputs) and (df["status"] == "ok").all()
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]


def test_training_resumes_on_the_surviving_node(cluster, fmnist_root, tmp_path):
    c, workers = cluster
    c.wait_for_nodes()
    job = JobConfig(data=DataConfig(root=fmnist_root, augment="light", max_per_class=100),
                    model=ModelConfig(arch="small_cnn", image_size=28),
                    train=TrainConfig(epochs=4, batch_size=64, lr=3e-3, num_workers=1, max_failures=2,
                                      storage_path=str(tmp_path / "runs"), name="mn"))
    run_dir = tmp_path / "runs" / "mn"
    removed = []

    def remove_worker_node():
        # Once Ray has registered a checkpoint, its history names the node training runs on.
        wait_for(lambda: (run_dir / "checkpoint_manager_snapshot.json").exists() and list(
            run_dir.glob("checkpoint_*/history.json")), what="a checkpoint")
        with open(sorted(run_dir.glob("checkpoint_*/history.json"))[0]) as f:
            node_id = json.load(f)[-1]["node_id"]
        node = next(w for w in workers if node_of(w) == node_id)
        c.remove_node(node)
        removed.append(node_id)

    remover = threading.Thread(target=remove_worker_node, daemon=True)
    remover.start()
    result = fit(job)
    remover.join(timeout=5)
    assert removed, "the training worker's node was not removed"
    assert [h["epoch"] for h in result.history] == [0, 1, 2, 3]
    # Resumed from a checkpoint on the other node, not restarted from epoch 0.
    assert result.history[-1]["started_at_epoch"] >= 1, [h["started_at_epoch"] for h in result.history]
    survivor = next(node_of(w) for w in workers if node_of(w) not in removed)
    assert result.history[0]["node_id"] == removed[0] and result.history[-1]["node_id"] == survivor
    assert max(h["val_accuracy"] for h in result.history) > 0.5
