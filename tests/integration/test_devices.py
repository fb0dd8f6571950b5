"""Device choice on a real local Ray cluster without GPUs: each branch of the decision."""

import pytest

from imgcls.devices import autoscaler_gpu_types, choose_gpu

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
