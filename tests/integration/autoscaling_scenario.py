"""Labelling on a cluster that Ray's own autoscaler grows and shrinks; run by
test_autoscaling.py as a process of its own, in a PID and network namespace of its own.

``ray.cluster_utils.AutoscalingCluster`` starts a head whose autoscaler runs the fake
node provider: each node it adds is a real raylet on this machine. Its ``start()`` and
``shutdown()`` run ``ray stop --force``, which stops every Ray cluster it can see, so
this script must only run where it sees no other (``unshare --pid --fork --mount-proc
--net``); the namespace's processes all end with it.

Usage: autoscaling_scenario.py MODEL INPUT GPU_INPUT OUTPUT_FOLDER RESULT_JSON
Writes what it saw to RESULT_JSON; the test asserts on it.
"""

import fcntl
import json
import os
import socket
import struct
import sys
import time

IDLE_TIMEOUT_MINUTES = 0.1  # the autoscaler removes a node idle this long (6 s)
CPU_TYPE = {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 3}
GPU_TYPE = {"resources": {"CPU": 2, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1}


def loopback_up() -> None:
    """Brings up ``lo`` of the fresh network namespace (the ioctl ``ip link set lo up`` makes)."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sh", fcntl.ioctl(s, siocgifflags, struct.pack("16sh", b"lo", 0)))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))


def cluster_config(head_resources: dict, worker_node_types: dict, **extra) -> dict:
    """The fake multi-node provider's launcher config (the wheel lacks the example file
    ``AutoscalingCluster._generate_config`` reads)."""
    return {
        "cluster_name": "imgcls-autoscaling-test",
        "max_workers": 8,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {**worker_node_types,
                                 "ray.head.default": {"resources": head_resources, "node_config": {}, "max_workers": 0}},
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        **extra,
    }


def worker_nodes() -> dict:
    """Alive nodes other than the head: node id -> resources."""
    import ray

    return {n["NodeID"]: n["Resources"] for n in ray.nodes()
            if n["Alive"] and "node:__internal_head__" not in n["Resources"]}


class NodesSeen:
    """The worker nodes alive at any time while a block runs (sampled twice a second)."""

    def __enter__(self):
        import threading

        self.nodes, self.done = {}, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.done.is_set():
            self.nodes.update(worker_nodes())
            self.done.wait(0.5)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.nodes.update(worker_nodes())


def wait_for(condition, timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(0.5)
    raise TimeoutError(f"{what} within {timeout:.0f} s")


def label_and_idle(cfg) -> dict:
    """Runs the labelling job ``cfg``, then waits for the nodes added for it to idle out;
    returns its summary, the nodes seen while it ran, and how long they took to go."""
    from imgcls.inference.bulk import label_images

    began = time.monotonic()
    with NodesSeen() as added:
        summary = label_images(cfg)
    return {"summary": summary.__dict__, "seconds": time.monotonic() - began, "nodes_added": added.nodes,
            "idle_removal_s": wait_for(lambda: not worker_nodes(), 120, "the added nodes idled out")}


def main(model: str, inputs: str, gpu_inputs: str, output: str, result_path: str) -> None:
    import ray
    from ray.cluster_utils import AutoscalingCluster

    from imgcls import devices
    from imgcls.config import PredictConfig

    loopback_up()
    devices.IN_PROCESS_MAX_IMAGES = 0  # label through the actor pool, however few the files

    class Cluster(AutoscalingCluster):
        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
            return cluster_config(head_resources, worker_node_types, **config_kwargs)

    # A head that offers the pool no CPUs, CPU workers of 2 CPUs (3 at most) and one GPU type.
    cluster = Cluster(head_resources={"CPU": 0}, worker_node_types={"cpu": CPU_TYPE, "gpu": GPU_TYPE})
    # Where the launcher leaves the config on a head, and imgcls reads the node types.
    with open(os.path.expanduser("~/ray_bootstrap_config.yaml"), "w") as f:
        json.dump(cluster._config, f)
    cluster.start()
    ray.init(address="auto")
    seen = {"before": worker_nodes(), "head": ray.get_runtime_context().get_node_id()}
    try:
        seen["cpu"] = label_and_idle(PredictConfig(model=model, input=inputs, output=os.path.join(output, "cpu"),
                                                   files_per_shard=20, use_gpu=False))
        # The GPU node type is requested and waited for; one pool (its actors take
        # their CPU path on this GPU without CUDA) keeps the job short.
        seen["gpu"] = label_and_idle(PredictConfig(model=model, input=gpu_inputs, output=os.path.join(output, "gpu"),
                                                   files_per_shard=100, separate_decode=False))
    finally:
        seen["after"] = worker_nodes()
        with open(result_path, "w") as f:
            json.dump(seen, f, indent=1, default=str)
    ray.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:6])
