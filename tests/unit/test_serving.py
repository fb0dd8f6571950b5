"""imgcls serve without a cluster: its config, the access rule, the Open Inference
Protocol's request parsing, and the RayService manifest."""

import base64
import importlib
import json
import struct
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from imgcls.cli import cli
from imgcls.config import ServeConfig
from imgcls.serving import deploy
from imgcls.serving.app import token_digest, v2_bytes_input

ROOT = Path(__file__).resolve().parents[2]


def test_the_rayservice_runs_what_write_config_writes(tmp_path):
    """cluster/kuberay/rayservice.yaml's serveConfigV2 is imgcls serve's own config for
    the flags its header names, passes Serve's schema, and names an importable builder;
    every pod takes the token from the Secret and runs the Dockerfile's image."""
    from ray.serve.schema import ServeDeploySchema

    manifest = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    shipped = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    out = tmp_path / "serve.yaml"
    result = CliRunner().invoke(cli, ["serve", "--model", "s3://my-bucket/imgcls/runs/fashion-mnist/best",
                                      "--host", "0.0.0.0", "--log-dir", "s3://my-bucket/imgcls/serve-log",
                                      "--write-config", str(out)])
    assert result.exit_code == 0, result.output
    assert "IMGCLS_SERVE_TOKEN" in result.output  # the warning: an open host needs the nodes' token
    assert yaml.safe_load(out.read_text()) == shipped
    ServeDeploySchema.model_validate(shipped)
    [app] = shipped["applications"]
    module, name = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), name))
    assert set(app["args"]["settings"]) == set(deploy.SETTINGS) | {"token_sha256"}
    spec = manifest["spec"]["rayClusterConfig"]
    assert spec["rayVersion"] == "2.60.0"
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    containers = [c for p in pods for c in p["template"]["spec"]["containers"]]
    tag = next(line.split(" -t ")[1].split()[0] for line in (ROOT / "cluster" / "Dockerfile").read_text().splitlines()
               if "docker build" in line)
    assert {c["image"] for c in containers} == {tag}
    assert all(any(e["name"] == "IMGCLS_SERVE_TOKEN" and "secretKeyRef" in e["valueFrom"] for e in c["env"])
               for c in containers)


def test_an_open_host_needs_a_token_or_insecure():
    with pytest.raises(deploy.ServeError, match="IMGCLS_SERVE_TOKEN"):
        deploy.check_access(ServeConfig(model="m", host="0.0.0.0"), None)
    assert deploy.check_access(ServeConfig(model="m", host="0.0.0.0"), "secret") is None
    assert "WITHOUT A TOKEN" in deploy.check_access(ServeConfig(model="m", host="0.0.0.0", insecure=True), None)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert deploy.check_access(ServeConfig(model="m", host=host), None) is None


def test_the_cli_refuses_an_open_host_before_ray_starts(tmp_path):
    """In a process of its own (the suite's may already hold a Ray cluster): refused, and
    Ray never started."""
    import subprocess
    import sys

    script = ("import sys, ray; from click.testing import CliRunner; from imgcls.cli import cli; "
              "r = CliRunner().invoke(cli, ['serve', '--model', sys.argv[1], '--host', '0.0.0.0']); "
              "print(r.exit_code, ray.is_initialized()); print(r.output)")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("IMGCLS_SERVE_TOKEN", "RAY_ADDRESS")}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=120)
    status, output = done.stdout.split("\n", 1)
    assert status == "2 False", done.stdout + done.stderr
    assert "IMGCLS_SERVE_TOKEN" in output and "--insecure" in output


def test_the_config_carries_the_tokens_digest_not_the_token():
    config = deploy.serve_config(ServeConfig(model="m"), "secret")
    settings = config["applications"][0]["args"]["settings"]
    assert settings["token_sha256"] == token_digest("secret") and "secret" not in json.dumps(config)
    fixed = deploy.serve_config(ServeConfig(model="m", num_replicas="3"))["applications"][0]["deployments"][0]
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    auto = deploy.serve_config(ServeConfig(model="m"))["applications"][0]["deployments"][0]
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}


@pytest.mark.parametrize("bad", [{"num_replicas": "0"}, {"num_replicas": "many"}, {"min_replicas": 5},
                                 {"max_body_mb": 0}, {"top_k": 0}])
def test_serve_config_refuses_bad_values(bad):
    with pytest.raises(ValueError):
        ServeConfig(model="m", **bad)


def test_open_inference_protocol_bytes_inputs():
    images = [b"\xff\xd8first", b"\x89PNGsecond"]
    as_json = json.dumps({"id": "r1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                                                   "data": [base64.b64encode(i).decode() for i in images]}]})
    assert v2_bytes_input(as_json.encode(), None) == ("r1", images)
    elements = b"".join(struct.pack("<I", len(i)) + i for i in images)
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                                     "parameters": {"binary_data_size": len(elements)}}]}).encode()
    assert v2_bytes_input(header + elements, str(len(header))) == (None, images)
    for bad in ({"inputs": []}, {"inputs": [{"name": "x", "datatype": "FP32", "data": [1.0]}]},
                {"inputs": [{"name": "image", "datatype": "BYTES", "data": [1, 2]}]},
                {"inputs": [{"name": "image", "datatype": "BYTES", "data": ["not base64!"]}]},
                {"inputs": [{"name": "image", "datatype": "BYTES", "data": []}]}):
        with pytest.raises(ValueError):
            v2_bytes_input(json.dumps(bad).encode(), None)
