"""What the workers of a command's own local Ray cluster (``imgcls ... --num-cpus N``,
``cli.init_ray``) run first.

Ray Train's placement-group cleaner, an actor of every training run, watches the run's
controller through the State API. The API client finds its cluster from RAY_ADDRESS, or
else by looking for the Ray clusters running on the machine: with two (a command's own
beside a `ray start` one), it finds both, cannot choose, and its thread dies with a
traceback in the run's output. ``name_own_cluster`` sets RAY_ADDRESS in each worker of
the private cluster to that cluster, so the cleaner watches the right one.
"""

import os

SETUP_HOOK = "imgcls.local_cluster.name_own_cluster"  # a runtime_env worker_process_setup_hook


def name_own_cluster() -> None:
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
