"""Which devices a job runs on, decided once at its start and logged with the reason.

A job that reads ``ray.cluster_resources()`` alone runs on CPUs whenever the GPU nodes
of an autoscaling cluster are scaled to zero (cluster/aws.yaml and gcp.yaml start with
none). So:

- ``use_gpu=False``: CPUs.
- GPUs in the cluster now: GPUs.
- ``use_gpu=True``, or ``None`` on a cluster whose autoscaler can add GPU nodes (its
  launcher config, ``~/ray_bootstrap_config.yaml`` on the head, lists a node type with
  GPUs): GPUs are requested from the autoscaler (``request_nodes``) and the job waits
  for them, up to ``IMGCLS_GPU_WAIT_S`` seconds (default 900). Then an explicit
  ``--use-gpu`` fails with a message, and ``None`` falls back to CPUs, saying so.
- Otherwise CPUs.

The Ray autoscaler keeps a request until it is replaced, so nodes it started for one
would never idle out: a job runs inside ``node_requests()``, which withdraws whatever it
requested when the job ends, fails or is interrupted (and each request expires on its
own, should the driver be killed outright).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import ray

log = logging.getLogger("imgcls")
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def autoscaler_node_types(config_path: str = BOOTSTRAP_CONFIG) -> dict[str, dict]:
    """The worker node types the cluster's autoscaler may start, by name:
    ``{"resources": {...}, "min_workers": int, "max_workers": int}``, each type's
    ``max_workers`` capped by the cluster's. Read from the launcher's config on the
    head (``config_path``), else from what an autoscaler v2 reported to the GCS
    (KubeRay); empty on a cluster that no autoscaler grows."""
    import yaml

    path = os.path.expanduser(config_path)
    if os.path.exists(path):
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
        cap = int(cfg.get("max_workers", 10**6))
        types = {name: {"resources": dict(t.get("resources") or {}), "min_workers": int(t.get("min_workers", 0)),
                        "max_workers": min(cap, int(t.get("max_workers", 0)))}
                 for name, t in (cfg.get("available_node_types") or {}).items() if name != cfg.get("head_node_type")}
    elif ray.is_initialized():
        from imgcls.ray_internals import reported_node_types

        try:
            reported = reported_node_types()
        except Exception as e:  # noqa: BLE001 - a Ray that moved it: sized as without an autoscaler
            log.warning("the autoscaler's node types could not be read from Ray: %s", e)
            reported = {}
        types = {name: dict(t, max_workers=10**6 if t["max_workers"] < 0 else t["max_workers"])
                 for name, t in reported.items()}
    else:
        types = {}
    return {name: t for name, t in types.items() if t["max_workers"] > 0}


def autoscaler_gpu_types(config_path: str = BOOTSTRAP_CONFIG) -> list[str]:
    """Node types of the autoscaler's config that have GPUs and may be started."""
    return sorted(name for name, t in autoscaler_node_types(config_path).items()
                  if float(t["resources"].get("GPU", 0)) > 0)


def autoscaler_capacity(resource: str, config_path: str = BOOTSTRAP_CONFIG) -> float:
    """How much of ``resource`` the autoscaler's node types hold at their max_workers
    (0 on a cluster that no autoscaler grows)."""
    return sum(t["max_workers"] * float(t["resources"].get(resource, 0))
               for t in autoscaler_node_types(config_path).values())


_requester = None  # this process's open request to the autoscaler, if any
_last_request: Optional[tuple[list[dict], float, float]] = None  # (bundles, expire_s, sent at)


def request_nodes(bundles: list[dict], expire_s: float) -> None:
    """Asks the Ray autoscaler for nodes that fit ``bundles``, until ``withdraw_requests``
    or ``expire_s`` seconds from now, whichever is first.

    Through Ray Data's autoscaling coordinator where this Ray has it: the coordinator
    sends the autoscaler the merged requests of its requesters every 20 s, replacing
    the cluster's whole request, so a plain ``ray.autoscaler.sdk.request_resources``
    lasted only until its next round after any Ray Data pipeline had run.
    """
    global _requester, _last_request
    if _requester is None:
        try:
            from imgcls.ray_internals import autoscaler_requester

            _requester = autoscaler_requester(f"imgcls-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        except (ImportError, AttributeError):  # a Ray without the coordinator: the autoscaler's own call
            _requester = _PlainRequest()
    _requester.request_resources(bundles, expire_after_s=expire_s)
    _last_request = (bundles, expire_s, time.monotonic())


def renew_requests(every_s: float = 60.0) -> None:
    """Sends this process's last request again once ``every_s`` seconds have passed since
    it was sent, restarting its expiry: a job that runs longer than a request lives
    keeps its nodes, while a driver killed outright lets them go one expiry later."""
    if _last_request is not None and time.monotonic() - _last_request[2] >= every_s:
        request_nodes(*_last_request[:2])


def withdraw_requests() -> None:
    """Withdraws this process's request to the autoscaler, if it made one."""
    global _requester, _last_request
    if _requester is not None and ray.is_initialized():
        _requester.cancel_request()
    _requester, _last_request = None, None


@contextmanager
def node_requests() -> Iterator[None]:
    """Runs a job whose node requests (``request_nodes``) are withdrawn when it ends,
    fails or is interrupted, so that the nodes started for it idle out."""
    try:
        yield
    finally:
        withdraw_requests()


class _PlainRequest:
    """``request_nodes`` without Ray Data's coordinator: one cluster-wide request."""

    def request_resources(self, bundles: list[dict], expire_after_s: float) -> None:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)

    def cancel_request(self) -> None:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])


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
    # Kept past the wait for the job's start; withdrawn by ``node_requests`` at its end.
    request_nodes([{"GPU": 1}] * gpus, expire_s=wait_s + 600)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if cluster_gpus() > 0:
            say(f"devices: {what} runs on GPUs ({cluster_gpus()} joined)")
            return True
        time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
    withdraw_requests()
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
