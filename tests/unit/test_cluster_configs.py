"""The cluster configs parse and name entrypoints and files that exist in this repository."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from imgcls.cli import cli

ROOT = Path(__file__).resolve().parents[2]


def load(name):
    return yaml.safe_load((ROOT / "cluster" / name).read_text())


def check_job_command(command: str):
    argv = shlex.split(command)
    assert argv[0] == "python" and (ROOT / argv[1]).is_file(), command
    for flag, value in zip(argv, argv[1:]):
        if flag == "--config":
            assert (ROOT / value).is_file(), value
    # Every flag is one the command accepts.
    command_name = Path(argv[1]).stem
    known = {p for o in cli.commands[command_name].params for p in o.opts + o.secondary_opts}
    assert {a for a in argv[2:] if a.startswith("--")} <= known


@pytest.mark.parametrize("name,provider", [("aws.yaml", "aws"), ("gcp.yaml", "gcp")])
def test_launcher_configs(name, provider):
    cfg = load(name)
    assert cfg["provider"]["type"] == provider
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert any(t.get("max_workers", 0) > t.get("min_workers", 0) for t in types.values())  # autoscaling
    gpu = [t["node_config"] for n, t in types.items() if "gpu" in n]
    assert gpu, "a GPU worker type is expected"
    for cmd in cfg["setup_commands"]:
        for script in re.findall(r"scripts/\S+\.sh", cmd):
            assert (ROOT / script).is_file()
    assert cfg["file_mounts"]["~/imgcls"] == "."


def test_launcher_yaml_comments_every_key():
    for name in ("aws.yaml", "gcp.yaml"):
        for line in (ROOT / "cluster" / name).read_text().splitlines():
            if re.match(r"^\s*\w+:\s*\S", line) and not line.strip().startswith("#"):
                assert "#" in line or line.strip().startswith("- "), f"{name}: uncommented key: {line}"


@pytest.mark.parametrize("name,script", [("kuberay/rayjob-train.yaml", "jobs/train.py"),
                                         ("kuberay/rayjob-predict.yaml", "jobs/predict.py")])
def test_kuberay_rayjobs(name, script):
    job = load(name)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert script in job["spec"]["entrypoint"]
    check_job_command(job["spec"]["entrypoint"])
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == "2.60.0"
    workers = spec["workerGroupSpecs"]
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for w in workers for c in w["template"]["spec"]["containers"])
