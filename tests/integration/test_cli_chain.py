"""The README's evaluate / predict / explain commands as written, through the CLI, on real
Fashion-MNIST files: evaluate --data, predict with a glob, evaluate --predictions,
explain --mistakes-from."""

import json
import os
import re
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from imgcls.checkpoint import save_checkpoint
from imgcls.cli import cli
from imgcls.config import JobConfig, ModelConfig
from imgcls.models import create_model

pytestmark = pytest.mark.integration


def run(*args):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output[-3000:]
    return result.output


def test_evaluate_predict_and_explain_as_the_readme_writes_them(ray_cluster, fmnist_root, tmp_path):
    classes = sorted(d for d in os.listdir(fmnist_root) if os.path.isdir(os.path.join(fmnist_root, d)))
    data = tmp_path / "fm"
    for c in classes:  # 5 real images per class
        (data / c).mkdir(parents=True)
        for name in sorted(os.listdir(os.path.join(fmnist_root, c)))[:5]:
            shutil.copy(os.path.join(fmnist_root, c, name), data / c / name)
    model = str(tmp_path / "ckpt")
    torch.manual_seed(0)  # untrained: plenty of confident mistakes to explain
    save_checkpoint(model, create_model("small_cnn", 10), JobConfig(model=ModelConfig(arch="small_cnn", image_size=28)),
                    classes, history=[])

    out = run("evaluate", "--model", model, "--data", str(data), "--output", str(tmp_path / "eval"))
    metrics = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert metrics["num_samples"] == 50 and 0 <= metrics["accuracy"] <= 1 and "top5_accuracy" in metrics
    assert sum(map(sum, metrics["confusion_matrix"])) == 50 and "accuracy" in out
    for name in ("report.html", "confusion_matrix.png", "predictions.parquet"):
        assert os.path.getsize(tmp_path / "eval" / name) > 0

    run("predict", "--model", model, "--input", f"{data}/*/*.png", "--output", str(tmp_path / "labels"))
    labels = pq.read_table(str(tmp_path / "labels")).to_pandas()
    assert len(labels) == 50 and labels["path"].is_unique and (labels["status"] == "ok").all()

    run("evaluate", "--model", model, "--predictions", str(tmp_path / "labels"), "--output", str(tmp_path / "eval2"))
    again = json.load(open(tmp_path / "eval2" / "metrics.json"))
    # True labels from each file's parent folder: the same metrics as evaluate --data.
    assert again["num_samples"] == 50 and again["confusion_matrix"] == metrics["confusion_matrix"]

    out = run("explain", "--model", model, "--mistakes-from", str(tmp_path / "eval"), "--top", "3",
              "--output", str(tmp_path / "gradcam"))
    explained = json.loads(out[out.index("["):])
    assert len(explained) == 3 and len(os.listdir(tmp_path / "gradcam")) == 3
    assert all(os.path.dirname(e["overlay"]) == str(tmp_path / "gradcam") for e in explained)


def test_predict_output_is_imgcls_lines_only_unless_verbose(checkpoint_28, fmnist_root, tmp_path):
    """A user's terminal or job log shows the devices chosen, labelling progress and the
    summary once; Ray's own INFO logs and Ray Data's progress reports only with --verbose."""
    import subprocess
    import sys

    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    outputs = {}
    for verbose in (False, True):
        cmd = [sys.executable, "-m", "imgcls.cli", *(["--verbose"] if verbose else []), "predict", "--model",
               checkpoint_28, "--input", os.path.join(fmnist_root, "bag"), "--output", str(tmp_path / f"o{verbose}"),
               "--num-cpus", "2"]
        outputs[verbose] = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert outputs[verbose].returncode == 0, outputs[verbose].stderr[-3000:]
    quiet = outputs[False]
    assert quiet.stdout.startswith("devices: labelling runs on CPUs") and quiet.stdout.count('"files"') == 1
    assert not re.search(r"\sINFO\s", quiet.stderr) and "labelled 200 / 200 files (100%)" in quiet.stderr
    assert re.search(r"\sINFO\s", outputs[True].stderr)  # Ray's own logs are there when asked for


@pytest.fixture(scope="module")
def checkpoint_28(tmp_path_factory, fmnist_root):
    folder = str(tmp_path_factory.mktemp("ckpt28"))
    classes = sorted(d for d in os.listdir(fmnist_root) if os.path.isdir(os.path.join(fmnist_root, d)))
    torch.manual_seed(0)
    save_checkpoint(folder, create_model("small_cnn", 10), JobConfig(model=ModelConfig(arch="small_cnn", image_size=28)),
                    classes, history=[])
    return folder
