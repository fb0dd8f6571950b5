"""Deploying, updating and stopping ``imgcls serve``'s application: Serve's config, built once.

``serve_config`` turns a ``ServeConfig`` into the config that ``serve deploy`` takes
(``imgcls serve --write-config``), and ``imgcls serve`` deploys that same config
itself. Deploying by config, not with ``serve.run``, is what makes a model update
light: Serve versions a config's application by its code (import path, args, runtime
env), so a config that differs only in ``user_config`` reaches the running replicas
through ``reconfigure`` instead of replacing them. ``serve.run`` gives every call a new
random version, and so new replicas.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Optional

from imgcls.config import ServeConfig
from imgcls.serving.app import DEPLOYMENT, TOKEN_ENV, is_loopback, token_digest

IMPORT_PATH = "imgcls.serving.app:build"
RETRY_AFTER_S = 1  # the Retry-After of a 503 when the queue is full
# Replica settings taken from ServeConfig as they are (see app.ImageClassifier).
SETTINGS = ("name", "host", "insecure", "top_k", "precision", "threads", "use_gpu", "max_batch_size", "batch_wait_ms", "max_body_mb",
            "max_pixels", "log_dir", "log_images", "log_flush_rows", "log_flush_s")


# Ray Serve's own throughput mode, set in the environment of the Ray cluster that
# ``imgcls serve`` starts on one machine (``local_cluster.set_environment``: its
# processes read it when they start). Among other things the ingress replica then answers
# HTTP itself (Serve's "direct ingress", on the same host and port) instead of behind a
# proxy actor, which on 2 cores saves a process hop the CPUs pay for: bench/serve.py's
# saturation rose from 0.69 to 0.77 of the plain FastAPI app's in the same run (54.9 to
# 59.2 answers/s), with the same 503s past the queue and no failed request during a model
# update. A cluster started otherwise (``ray start``, KubeRay:
# cluster/kuberay/rayservice.yaml) keeps Serve's proxies, which route to replicas on other
# nodes; set the variable in its nodes' environment to change that.
# A replica that answers HTTP itself is held open 30 s when it stops, by default, so that
# a load balancer in front can take it out of rotation; nothing stands in front of the
# cluster imgcls serve starts, and that hold made Ctrl-C and --shutdown take 35 s. Held
# 1 s, a stopping replica still finishes the requests it has (Serve's drain waits for them).
SERVE_ENVIRONMENT = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


class ServeError(ValueError):
    """``imgcls serve`` cannot do as asked; the message says why."""


def check_access(cfg: ServeConfig, token: Optional[str]) -> Optional[str]:
    """Refuses a non-loopback --host without a token or --insecure; returns the warning
    to print loudly when --insecure opens it."""
    if is_loopback(cfg.host) or token:
        return None
    if not cfg.insecure:
        raise ServeError(f"--host {cfg.host} opens the server beyond this machine: set {TOKEN_ENV} to a bearer token "
                         "that every request must carry, or pass --insecure to serve without one")
    return (f"WARNING: serving on {cfg.host}:{cfg.port} WITHOUT A TOKEN (--insecure): anyone who can reach this "
            f"port can classify with the model and fill the log; set {TOKEN_ENV} instead")


def user_config(cfg: ServeConfig) -> dict:
    """The part of the config an update changes: the model."""
    return {"model": cfg.model, "runtime": cfg.runtime, "tta": cfg.tta}


def serve_config(cfg: ServeConfig, token: Optional[str] = None) -> dict:
    """The Serve config (``serve deploy``'s schema) of ``cfg``'s application. The token
    itself is not in it: the replicas get its SHA-256."""
    values = asdict(cfg)
    settings = {key: values[key] for key in SETTINGS}
    settings["token_sha256"] = token_digest(token) if token else None
    deployment = {
        "name": DEPLOYMENT,
        "user_config": user_config(cfg),
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": RETRY_AFTER_S},
        "ray_actor_options": {"num_cpus": cfg.replica_cpus, "num_gpus": 1 if cfg.use_gpu else 0},
        # a replica that is stopped (scaled down, replaced) writes its buffered log rows
        "graceful_shutdown_timeout_s": 30,
    }
    if cfg.num_replicas == "auto":
        deployment["autoscaling_config"] = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                            "target_ongoing_requests": cfg.target_ongoing_requests}
    else:
        deployment["num_replicas"] = int(cfg.num_replicas)
    return {"proxy_location": "EveryNode", "http_options": {"host": cfg.host, "port": cfg.port},
            "applications": [{"name": cfg.name, "route_prefix": "/", "import_path": IMPORT_PATH,
                              "args": {"settings": settings}, "deployments": [deployment]}]}


def _client():
    from ray.serve.exceptions import RayServeException

    from imgcls.ray_internals import serve_client

    try:
        return serve_client()
    except RayServeException:
        raise ServeError("Serve does not run on this Ray cluster: no imgcls serve application to act on") from None


def _deployed_configs(client) -> dict[str, dict]:
    """The application configs deployed now, by name (apps deployed by config only)."""
    details = client.get_serve_details()
    return {name: app["deployed_app_config"] for name, app in (details.get("applications") or {}).items()
            if app.get("deployed_app_config")}


def deploy(config: dict, timeout_s: float = 300) -> None:
    """Starts Serve's proxy (``config``'s http_options) and deploys ``config``'s
    application beside the others deployed by config; waits until it answers."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    http = config["http_options"]
    serve.start(http_options={"host": http["host"], "port": http["port"]}, proxy_location=config["proxy_location"])
    client = _client()
    ours = config["applications"][0]
    apps = {**_deployed_configs(client), ours["name"]: ours}
    client.deploy_apps(ServeDeploySchema.model_validate({**config, "applications": list(apps.values())}))
    wait_running(ours["name"], ours["deployments"][0]["user_config"], timeout_s)


def update(name: str, new_user_config: dict, timeout_s: float = 300) -> dict:
    """Points the running application ``name`` at another model: the same config with
    only ``user_config`` changed, so that its replicas reconfigure in place."""
    from ray.serve.schema import ServeDeploySchema

    client = _client()
    apps = _deployed_configs(client)
    if name not in apps:
        raise ServeError(f"no imgcls serve application named {name!r} runs on this Ray cluster")
    app = apps[name]
    for deployment in app["deployments"]:
        if deployment["name"] == DEPLOYMENT:
            deployment["user_config"] = new_user_config
    details = client.get_serve_details()
    config = {"proxy_location": details.get("proxy_location") or "EveryNode",
              "http_options": details.get("http_options") or {}, "applications": list(apps.values())}
    client.deploy_apps(ServeDeploySchema.model_validate(config))
    wait_running(name, new_user_config, timeout_s)
    return app


def wait_running(name: str, want_user_config: dict, timeout_s: float) -> None:
    """Waits until application ``name`` runs with ``want_user_config`` on every replica."""
    client = _client()
    deadline = time.monotonic() + timeout_s
    status, message = "?", ""
    while time.monotonic() < deadline:
        app = (client.get_serve_details().get("applications") or {}).get(name) or {}
        status, message = app.get("status"), app.get("message", "")
        deployments = (app.get("deployed_app_config") or {}).get("deployments") or [{}]
        if status == "RUNNING" and deployments[0].get("user_config") == want_user_config:
            return
        if status == "DEPLOY_FAILED":
            raise ServeError(f"the application {name} failed to deploy: {message}")
        time.sleep(0.5)
    raise ServeError(f"the application {name} is not running after {timeout_s:.0f} s (status {status}: {message})")


def shutdown(name: str) -> None:
    """Deletes the application ``name`` (its replicas write their buffered log rows); when
    it was the last one, stops Serve too, so that its proxy frees the port."""
    from ray import serve

    client = _client()
    if name not in _deployed_configs(client):
        raise ServeError(f"no imgcls serve application named {name!r} runs on this Ray cluster")
    serve.delete(name)
    if not client.get_serve_details().get("applications"):
        serve.shutdown()
