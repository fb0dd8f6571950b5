"""Every private Ray name imgcls reaches into, in one module.

Ray keeps no promise for these between releases, so none is imported anywhere else:
a Ray upgrade that removes one fails ``tests/unit/test_ray_internals.py`` by the name
in ``INTERNALS``, instead of failing a training run, a Tune search or a labelling job
on a cluster. Each use below says what imgcls does without it where it can go on.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

# What imgcls uses, as "module:attribute" (or "module" for a whole module), and why.
INTERNALS = {
    # Tune's ReleaseWorkerGroups removes an ended trial's placement group by the id
    # its workers reported (a hex string); the public PlacementGroup takes the id type.
    "ray._raylet:PlacementGroupID": "placement group ids from their hex form",
    # Ray Train V2 logs every ray.train.report on a logger named by this module's file.
    "ray.train.v2._internal.execution.context": "the logger of Ray Train's per-report INFO lines",
    # Ray Data sends every pipeline's node requests to the Ray autoscaler through this
    # coordinator, which replaces the cluster's whole request with the merged requests
    # of its requesters at least every 20 s: a request made beside it with
    # ray.autoscaler.sdk.request_resources is overwritten, so imgcls requests through it.
    "ray.data._internal.cluster_autoscaler:DefaultAutoscalingCoordinator": "node requests beside Ray Data's",
    # The node types and their max counts, where an autoscaler v2 (KubeRay) reported them.
    "ray._private.state:state": "the autoscaler's node types from the GCS",
    # imgcls serve deploys its config through Serve's controller client, as `serve
    # deploy` does through the dashboard's REST API, which a cluster started without a
    # dashboard lacks: deploying by config is what lets an update only reconfigure.
    "ray.serve.context:_get_global_client": "Serve's controller client, to deploy a config",
}


def resolve(name: str) -> Any:
    """The object ``name`` ("module:attribute" or "module") of ``INTERNALS`` names."""
    module, _, attribute = name.partition(":")
    found = importlib.import_module(module)
    return getattr(found, attribute) if attribute else found


def placement_group(group_hex: str):
    """The ``ray.util.placement_group.PlacementGroup`` whose id is ``group_hex``."""
    from ray.util.placement_group import PlacementGroup

    return PlacementGroup(resolve("ray._raylet:PlacementGroupID")(bytes.fromhex(group_hex)))


def train_report_logger_name() -> Optional[str]:
    """The name of the logger of Ray Train's per-report INFO lines; None on a Ray Train
    that has no such module (nothing to quiet there)."""
    try:
        return resolve("ray.train.v2._internal.execution.context").__file__
    except ImportError:
        return None


def autoscaler_requester(requester_id: str):
    """A client of Ray Data's autoscaling coordinator for ``requester_id``: its
    ``request_resources(bundles, expire_after_s=...)`` and ``cancel_request()`` ask
    the Ray autoscaler for nodes alongside Ray Data's own pipelines."""
    return resolve("ray.data._internal.cluster_autoscaler:DefaultAutoscalingCoordinator")(requester_id)


def reported_node_types() -> dict[str, dict]:
    """The node types an autoscaler reported to the GCS (autoscaler v2, as KubeRay runs
    it): name -> {"resources", "min_workers", "max_workers"}; empty where none did (the
    launcher's autoscaler v1 reports none: its config file is read instead)."""
    config = resolve("ray._private.state:state").get_cluster_config()
    if config is None:
        return {}
    return {group.name: {"resources": dict(group.resources), "min_workers": int(group.min_count),
                         "max_workers": int(group.max_count)}
            for group in config.node_group_configs}


def serve_client():
    """Serve's controller client (``ServeControllerClient``: ``deploy_apps``,
    ``get_serve_details``); raises ``RayServeException`` where Serve does not run."""
    return resolve("ray.serve.context:_get_global_client")()
