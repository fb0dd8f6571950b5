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


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_configs_pass_rays_own_schema(name):
    """Ray's cluster-launcher schema check (what ``ray up`` runs first); a misspelt or
    misplaced key fails here."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load(name)))
    broken = load(name)
    broken["available_node_types"][broken["head_node_type"]]["max_workerz"] = 1
    with pytest.raises(Exception, match="max_workerz"):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_dashboard_listens_on_the_heads_loopback_only(name):
    """The dashboard serves Ray's job-submission API, which runs whatever it is sent: the
    head binds it to 127.0.0.1, reached through ``ray dashboard``'s SSH tunnel."""
    cfg = load(name)
    [start] = [c for c in cfg["head_start_ray_commands"] if " start --head" in c]
    assert "--dashboard-host=127.0.0.1" in start.split(), start
    assert not [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "0.0.0.0" in c]
    text = (ROOT / "cluster" / name).read_text() + (ROOT / "docs" / "clusters.md").read_text()
    assert f"ray dashboard cluster/{name}" in text


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_ships_the_repository_without_local_artefacts(name):
    cfg = load(name)
    assert {".venv", "out", ".git"} <= set(cfg["rsync_exclude"])
    extras = [re.search(r"install\.sh (\S+)", c).group(1) for c in cfg["setup_commands"] if "install.sh" in c]
    assert extras == ["all"], "nodes need every runtime extra (onnxruntime, packaged weights, plots, stores)"


def test_image_installs_every_runtime_extra_without_local_artefacts():
    """The KubeRay image must run the fine-tune config (packaged weights) and
    ``--runtime onnxruntime``, at the tested versions, and not ship the local venv."""
    import tomllib

    docker = (ROOT / "cluster" / "Dockerfile").read_text()
    [install] = [line for line in docker.splitlines() if line.startswith("RUN pip install")]
    assert "-e " not in install and "--constraint constraints.txt" in install and '".[all]"' in install
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"cloud", "onnx", "pretrained", "report"} <= set(re.findall(r"\w+", extras["all"][0].split("[")[1]))
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "out", ".git"} <= set(ignored)
    tag = re.search(r"docker build .* -t (\S+) \.", docker).group(1)
    for name in ("kuberay/rayjob-train.yaml", "kuberay/rayjob-predict.yaml"):
        images = re.findall(r"image: (\S+)", (ROOT / "cluster" / name).read_text())
        assert images and set(images) == {tag}, f"{name} runs {set(images)}, the Dockerfile builds {tag}"


@pytest.mark.parametrize("name,script", [("kuberay/rayjob-train.yaml", "jobs/train.py"),
                                         ("kuberay/rayjob-predict.yaml", "jobs/predict.py")])
def test_kuberay_rayjobs(name, script):
    job = load(name)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert script in job["spec"]["entrypoint"]
    check_job_command(job["spec"]["entrypoint"])
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == "2.60.0"
    # Pods have no local data: every path is under the documented object-store variable.
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert re.match(r"^(s3|gs|az)://", env["IMGCLS_BUCKET"])
    paths = [v for f, v in zip(shlex.split(job["spec"]["entrypoint"]), shlex.split(job["spec"]["entrypoint"])[1:])
             if f in ("--root", "--storage-path", "--model", "--input", "--output")]
    assert paths and all(p.startswith("$IMGCLS_BUCKET/") for p in paths), paths
    workers = spec["workerGroupSpecs"]
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for w in workers for c in w["template"]["spec"]["containers"])
