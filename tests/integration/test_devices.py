"""Device choice on a real local Ray cluster without GPUs: each branch of the decision."""

import json
import os
import signal
import threading
import time

import pytest

from imgcls.devices import autoscaler_gpu_types, autoscaler_node_types, choose_gpu, node_requests
from imgcls.inference.pipeline import pool_plan

pytestmark = pytest.mark.integration

LAUNCHER = """
available_node_types:
  head: {resources: {CPU: 8}, max_workers: 0}
  gpu_workers: {resources: {CPU: 8, GPU: 1}, min_workers: 0, max_workers: 4}
  cpu_workers: {resources: {CPU: 16}, min_workers: 0, max_workers: 4}
"""


def test_autoscaler_gpu_types_are_read_from_the_launcher_config(tmp_path):
    path = tmp_path / "bootstrap.yaml"
    path.write_text(LAUNCHER)
    assert autoscaler_gpu_types(str(path)) == ["gpu_workers"]
    assert autoscaler_gpu_types(str(tmp_path / "absent.yaml")) == []
    types = autoscaler_node_types(str(path))
    assert set(types) == {"gpu_workers", "cpu_workers"}  # the head is no type the autoscaler adds
    assert types["cpu_workers"] == {"resources": {"CPU": 16}, "min_workers": 0, "max_workers": 4}


def test_cpu_cluster_without_autoscaling_gpus_runs_on_cpus_and_says_why(ray_cluster, tmp_path):
    said = []
    assert choose_gpu(None, config_path=str(tmp_path / "absent.yaml"), say=said.append) is False
    assert "no GPUs in the cluster, and its autoscaler cannot add any" in said[-1]
    assert choose_gpu(False, say=said.append) is False and "--no-use-gpu" in said[-1]


def test_gpus_are_requested_and_waited_for_when_the_autoscaler_can_add_them(ray_cluster, tmp_path):
    """No autoscaler answers here: an explicit --use-gpu fails after the wait, naming it;
    the automatic choice falls back to CPUs and says so."""
    path = tmp_path / "bootstrap.yaml"
    path.write_text(LAUNCHER)
    said = []
    assert choose_gpu(None, config_path=str(path), wait_s=0.5, say=said.append) is False
    assert "requesting 1 (the autoscaler can add GPU node types ['gpu_workers'])" in said[0]
    assert "no GPU joined within 0 s" in said[-1] or "no GPU joined within 1 s" in said[-1]
    with pytest.raises(RuntimeError, match="--use-gpu: no GPU joined the cluster"):
        choose_gpu(True, gpus=2, config_path=str(tmp_path / "absent.yaml"), wait_s=0.5, say=said.append)
    assert "requesting 2 (--use-gpu)" in said[-1]


def autoscaler_request() -> list:
    """The bundles the cluster's Ray autoscaler (v1, as ``ray.init``'s and the launcher's
    clusters run it) is asked to keep room for."""
    from ray.experimental.internal_kv import _internal_kv_get

    value = _internal_kv_get(b"autoscaler_resource_request")
    return json.loads(value) if value else []


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_an_interrupted_wait_for_gpus_withdraws_its_request(ray_cluster, tmp_path):
    """Ctrl-C while a job waits for the GPUs it asked for: the request to the autoscaler
    goes with the job (``node_requests``), or the GPU nodes would start and never idle out."""
    path = tmp_path / "bootstrap.yaml"
    path.write_text(LAUNCHER)
    requested = []

    def interrupt_once_requested():
        # Made through Ray Data's coordinator actor, which may take a while to start.
        requested.append(wait_for(lambda: {"GPU": 1} in autoscaler_request(), 120))
        os.kill(os.getpid(), signal.SIGINT)

    # Ctrl-C as a fresh command gets it: an earlier test's Ray Train run in this process
    # left its own SIGINT handler (which aborts a training run instead of raising).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=interrupt_once_requested, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            with node_requests():
                choose_gpu(None, config_path=str(path), wait_s=300, say=lambda _: None)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert requested == [True]
    assert wait_for(lambda: {"GPU": 1} not in autoscaler_request(), 30), autoscaler_request()


def test_pools_are_sized_by_what_the_autoscaler_can_add(ray_cluster):
    """On the suite's 2-CPU cluster (its head): without an autoscaler the pool is fixed,
    one actor per core; with node types to add, it runs from what fits now to what fits
    them all at their max_workers; --num-actors fixes it."""
    static = pool_plan(False, None, node_types={})
    assert (static["min_size"], static["max_size"], static["num_cpus"]) == (2, 2, 0.75)
    cpu_types = {"cpu": {"resources": {"CPU": 2}, "min_workers": 0, "max_workers": 3}}
    grows = pool_plan(False, None, node_types=cpu_types)
    assert (grows["min_size"], grows["max_size"], grows["num_cpus"]) == (2, 2 + 3 * 2, 0.75)
    fixed = pool_plan(False, 3, node_types=cpu_types)
    assert (fixed["min_size"], fixed["max_size"]) == (3, 3)
    gpu_types = {"gpu": {"resources": {"CPU": 8, "GPU": 1}, "min_workers": 0, "max_workers": 4}}
    gpus = pool_plan(True, None, node_types=gpu_types)
    assert (gpus["min_size"], gpus["max_size"], gpus["num_gpus"]) == (1, 4, 1)
    assert gpus["decode"]["max_size"] == 2 + 4 * 8 - 4 - 1  # the CPUs the GPU nodes bring decode


def test_a_growing_pool_starts_with_the_actors_its_backlog_keeps_busy(ray_cluster):
    """Actors beyond what fits the cluster now start pending, the demand the autoscaler
    adds nodes for: 4 tasks an actor, within the pool's min and max; a fixed pool is
    its size."""
    from imgcls.inference.pipeline import GROWING_TASKS_IN_FLIGHT, actor_pool, starting_actors

    grows = pool_plan(False, None, node_types={"cpu": {"resources": {"CPU": 2}, "min_workers": 0, "max_workers": 3}})
    assert GROWING_TASKS_IN_FLIGHT == 4
    assert [starting_actors(grows, shards) for shards in (1, 8, 9, 20, 300)] == [2, 2, 3, 5, 8]
    strategy = actor_pool(grows, 300)
    assert (strategy.min_size, strategy.initial_size, strategy.max_size) == (2, 8, 8)
    assert actor_pool(grows).initial_size == 2
    fixed = actor_pool(pool_plan(False, 3), 300)
    assert (fixed.min_size, fixed.max_size) == (3, 3)
