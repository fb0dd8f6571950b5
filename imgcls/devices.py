"""Which devices a job runs on, decided once at its start and logged with the reason.

A job that reads ``ray.cluster_resources()`` alone runs on CPUs whenever the GPU nodes
of an autoscaling cluster are scaled to zero (cluster/aws.yaml and gcp.yaml start with
none). So:

- ``use_gpu=False``: CPUs.
- GPUs in the cluster now: GPUs.
- ``use_gpu=True``, or ``None`` on a cluster whose autoscaler can add GPU nodes (its
  launcher config, ``~/ray_bootstrap_config.yaml`` on the head, lists a node type with
  GPUs): GPUs are requested from the autoscaler (``ray.autoscaler.sdk.request_resources``)
  and the job waits for them, up to ``IMGCLS_GPU_WAIT_S`` seconds (default 900). Then an
  explicit ``--use-gpu`` fails with a message, and ``None`` falls back to CPUs, saying so.
- Otherwise CPUs.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional

import ray

log = logging.getLogger("imgcls")
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def autoscaler_gpu_types(config_path: str = BOOTSTRAP_CONFIG) -> list[str]:
    """Node types of the autoscaler's config that have GPUs and may be started."""
    import yaml

    path = os.path.expanduser(config_path)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    types = cfg.get("available_node_types") or {}
    return sorted(name for name, t in types.items()
                  if float((t.get("resources") or {}).get("GPU", 0)) > 0 and int(t.get("max_workers", 0)) > 0)


def choose_gpu(use_gpu: Optional[bool], gpus: int = 1, what: str = "the job",
               config_path: str = BOOTSTRAP_CONFIG, wait_s: Optional[float] = None,
               say: Callable[[str], None] = print) -> bool:
    """Whether ``what`` runs on GPUs (``gpus`` of them wanted), waiting for an autoscaler
    to add them when it can; prints the decision and its reason."""
    if use_gpu is False:
        say(f"devices: {what} runs on CPUs (--no-use-gpu)")
        return False
    have = cluster_gpus()
    if have > 0:
        say(f"devices: {what} runs on GPUs ({have} in the cluster)")
        return True
    types = autoscaler_gpu_types(config_path)
    if use_gpu is None and not types:
        say(f"devices: {what} runs on CPUs (no GPUs in the cluster, and its autoscaler cannot add any; "
            "--use-gpu waits for GPUs)")
        return False
    reason = "--use-gpu" if use_gpu else f"the autoscaler can add GPU node types {types}"
    wait_s = float(os.environ.get("IMGCLS_GPU_WAIT_S", 900)) if wait_s is None else wait_s
    say(f"devices: no GPUs in the cluster yet; requesting {gpus} ({reason}) and waiting up to {wait_s:.0f} s")
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": 1}] * gpus)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if cluster_gpus() > 0:
            say(f"devices: {what} runs on GPUs ({cluster_gpus()} joined)")
            return True
        time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
    request_resources(bundles=[])  # withdraw the request
    if use_gpu:
        raise RuntimeError(f"--use-gpu: no GPU joined the cluster within {wait_s:.0f} s "
                           "(IMGCLS_GPU_WAIT_S sets the wait)")
    say(f"devices: {what} runs on CPUs (no GPU joined within {wait_s:.0f} s)")
    return False


# Up to this many images, a job's one-off passes over them (decoding a split into its
# cache, the linear probe's features, evaluating a test split) run in the calling
# process instead of in new Ray worker processes, whose start-up (importing torch: 6-15 s
# of CPU each) would take longer than the work: on 2 cores, 240 Fashion-MNIST images
# decoded in 7.9 s through a Ray task and in 0.2 s in the driver, and a 30-image test
# split was labelled in 38 s by an actor pool and in under 5 s in the driver.
IN_PROCESS_MAX_IMAGES = 1000


def runs_here(num_images: int) -> bool:
    """Whether a one-off pass over ``num_images`` images runs in the calling process
    (read at each call, so that one setting governs every such pass)."""
    return num_images <= IN_PROCESS_MAX_IMAGES
