"""What the workers of a command's own local Ray cluster (``imgcls ... --num-cpus N``,
``cli.init_ray``) run first.

Ray Train's placement-group cleaner, an actor of every training run, watches the run's
controller through the State API. The API client finds its cluster from RAY_ADDRESS, or
else by looking for the Ray clusters running on the machine: with two (a command's own
beside a `ray start` one), it finds both, cannot choose, and its thread dies with a
traceback in the run's output. ``name_own_cluster`` sets RAY_ADDRESS in each worker of
the private cluster to that cluster, so the cleaner watches the right one.

``set_environment`` sets what the processes of a cluster a command starts on this machine
read when they start (``TRAIN_ENVIRONMENT``; ``imgcls serve`` adds
``serving.deploy.SERVE_ENVIRONMENT``).
"""

import os
from typing import Mapping

SETUP_HOOK = "imgcls.local_cluster.name_own_cluster"  # a runtime_env worker_process_setup_hook


def name_own_cluster() -> None:
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


# Ray Train's controller asks its workers how they are every 2 s by default, so it notices
# a run's workers starting and finishing up to 2 s late each: a one-epoch run of the main
# job's recipe on 300 images took 23.9-25.8 s, and 21.3-22.2 s asking every 0.5 s. A
# controller on one machine can afford the calls; a cluster started otherwise (``ray
# start``, the launcher, KubeRay) keeps Ray's default unless its nodes set the variable.
TRAIN_ENVIRONMENT = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def set_environment(environment: Mapping[str, str] = TRAIN_ENVIRONMENT) -> None:
    """Sets ``environment`` in this process's environment, where not set already, so that
    a Ray cluster started from here (and every process of it) runs so."""
    for name, value in environment.items():
        os.environ.setdefault(name, value)
