"""MLflow tracking and the model registry against a real ``mlflow server`` (SQLite, with
artifacts on the loopback S3 server): registered versions taken by ``models:/`` URIs,
evaluate's run linked to the model's. Training's and Tune's runs are checked in
test_train.py and test_tune.py, on the runs those tests make anyway."""

import json
import os
import shutil

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from imgcls.checkpoint import save_checkpoint
from imgcls.cli import cli
from imgcls.config import JobConfig, ModelConfig
from imgcls.models import create_model

pytestmark = pytest.mark.integration


def invoke(*args) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def printed_document(stdout: str) -> dict:
    """The JSON object a command printed. The suite's process is itself a Ray driver, which
    prints the cluster's log lines (an earlier test's Serve shutdown, say) to whatever
    sys.stdout is at the time, CliRunner's included; they may come before the object."""
    lines = stdout.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("{"))
    return json.JSONDecoder().raw_decode("".join(lines[start:]))[0]


def test_register_alias_predict_then_move_the_alias_and_predict_again(ray_cluster, mlflow_server, mlflow_experiment,
                                                                       dogs_cats_root, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_MODEL_CACHE", str(tmp_path / "model-cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the commands are given --tracking-uri
    images = tmp_path / "images"
    for label in ("cat", "dog"):
        (images / label).mkdir(parents=True)
        for name in sorted(os.listdir(os.path.join(dogs_cats_root, label)))[:3]:
            shutil.copy(os.path.join(dogs_cats_root, label, name), images / label / name)
    checkpoints = []
    for seed in (0, 1):  # two models that label differently
        torch.manual_seed(seed)
        folder = str(tmp_path / f"model-{seed}")
        save_checkpoint(folder, create_model("small_cnn", 2), JobConfig(model=ModelConfig(arch="small_cnn",
                                                                                          image_size=32)),
                        ["cat", "dog"], history=[])
        checkpoints.append(folder)
    name = f"m-{mlflow_experiment[-6:]}"
    first = printed_document(invoke("register", "--model", checkpoints[0], "--name", name, "--alias", "champion",
                                    "--tracking-uri", mlflow_server))
    second = printed_document(invoke("register", "--model", checkpoints[1], "--name", name,
                                     "--tracking-uri", mlflow_server))
    assert (first["version"], second["version"]) == (1, 2) and first["uri"] == f"models:/{name}/1"

    def predict(output) -> pd.DataFrame:
        invoke("predict", "--model", f"models:/{name}@champion", "--input", images, "--output", output,
               "--tracking-uri", mlflow_server)
        return pq.read_table(str(output)).to_pandas()

    before = predict(tmp_path / "out-1")
    invoke("alias", "--name", name, "--alias", "champion", "--version", 2, "--tracking-uri", mlflow_server)
    after = predict(tmp_path / "out-2")
    # Each output names the version that labelled it, and records it in _job.json with its run.
    assert set(before["model_id"]) == {f"models:/{name}/1"} and set(after["model_id"]) == {f"models:/{name}/2"}
    assert len(before) == len(after) == 6
    assert not (before.sort_values("path")["score"].values == after.sort_values("path")["score"].values).all()
    for output, version in ((tmp_path / "out-1", first), (tmp_path / "out-2", second)):
        job = json.loads((output / "_job.json").read_text())
        assert job["model"] == version["uri"] and job["model_id"] == version["uri"]
        assert job["model_run_id"] == version["run_id"]

    # The version round-trips the checkpoint byte for byte (model.pt: the same weights' hash),
    # and MLflow's pyfunc flavour loads it and labels like imgcls predict.
    [cached] = (tmp_path / "model-cache").glob(f"*/{name}/1")  # under a folder of this registry's own
    for file in ("model.pt", "meta.json", "classes.json", "config.yaml"):
        assert (cached / file).read_bytes() == open(os.path.join(checkpoints[0], file), "rb").read()
    import mlflow.pyfunc

    mlflow.set_tracking_uri(mlflow_server)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/1")
    labelled = pyfunc.predict(pd.DataFrame({"path": sorted(before["path"])}))
    assert list(labelled["label"]) == list(before.sort_values("path")["label"])

    # evaluate logs a run tagged with (and nested under) the run the version came from.
    invoke("evaluate", "--model", f"models:/{name}@champion", "--data", images, "--output", tmp_path / "eval",
           "--tracking-uri", mlflow_server)
    from imgcls.tracking import client

    c = client(mlflow_server)
    experiment = c.get_experiment_by_name(mlflow_experiment).experiment_id
    runs = c.search_runs([experiment], "tags.`imgcls.command` = 'evaluate'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["imgcls.model_run_id"] == second["run_id"] == run.data.tags["mlflow.parentRunId"]
    assert run.data.tags["imgcls.registered_model"] == f"models:/{name}/2"
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert run.data.metrics["accuracy"] == pytest.approx(metrics["accuracy"])
    assert {"metrics.json", "report.html"} <= {a.path for a in c.list_artifacts(run.info.run_id)}
