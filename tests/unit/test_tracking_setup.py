"""MLflow tracking and registry helpers that need no server, and the promise that without
a tracking URI or a models:/ URI nothing imports mlflow. (The real server's tests are
tests/integration/test_tracking.py, test_train.py's killed worker and test_tune.py.)"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from imgcls.checkpoint import load_checkpoint, save_checkpoint
from imgcls.cli import cli
from imgcls.config import JobConfig, ModelConfig, TrainConfig
from imgcls.inference.finished import model_id
from imgcls.models import create_model
from imgcls.paths import is_uri, local_path, resolve_paths, tracking_path
from imgcls.tracking import REGISTERED_FILE, flat_params, numeric_metrics, registered_id


def small_checkpoint(folder: str) -> str:
    torch.manual_seed(0)
    save_checkpoint(folder, create_model("small_cnn", 2), JobConfig(model=ModelConfig(arch="small_cnn", image_size=32)),
                    ["cat", "dog"], history=[])
    return folder


def test_without_a_tracking_uri_no_command_imports_mlflow(tmp_path):
    """A run of a real command (export loads the checkpoint through the same hooks as
    predict and train), a finished-output check and the training driver's tracking
    step, in a fresh process without MLFLOW_TRACKING_URI: mlflow is never imported."""
    checkpoint = small_checkpoint(str(tmp_path / "ckpt"))
    script = textwrap.dedent(f"""
        import sys
        from click.testing import CliRunner
        from imgcls.cli import cli
        from imgcls.config import JobConfig
        from imgcls.inference.finished import model_id
        from imgcls.training.trainer import start_training
        import imgcls.commands, imgcls.inference.bulk, imgcls.training.tune, imgcls.evaluation.monitor
        result = CliRunner().invoke(cli, ["export", "--model", {checkpoint!r}, "--output", {str(tmp_path / 'out')!r},
                                          "--format", "safetensors"])
        assert result.exit_code == 0, result.output
        assert start_training(JobConfig(), "runs/x", resuming=False) is None
        model_id({checkpoint!r}, "torch")
        print("mlflow" in sys.modules, [m for m in sys.modules if m.startswith("mlflow")][:3])
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "False []", proc.stdout
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")


def test_relative_sqlite_tracking_uris_are_made_absolute_and_models_uris_are_not_paths():
    assert tracking_path("sqlite:///out/mlflow.db", "/work") == "sqlite:////work/out/mlflow.db"
    assert tracking_path("sqlite:////abs/mlflow.db", "/work") == "sqlite:////abs/mlflow.db"
    assert tracking_path("http://127.0.0.1:5000", "/work") == "http://127.0.0.1:5000"
    assert tracking_path(None) is None
    job = resolve_paths(JobConfig(train=TrainConfig(tracking_uri="sqlite:///out/mlflow.db",
                                                    init_from="models:/m@champion")), base="/work")
    assert job.train.tracking_uri == "sqlite:////work/out/mlflow.db"
    assert job.train.init_from == "models:/m@champion"
    assert is_uri("models:/m/3") and local_path("models:/m@champion", "/work") == "models:/m@champion"


def test_params_are_the_flattened_config_and_metrics_only_finite_numbers():
    params = flat_params(JobConfig(train=TrainConfig(lr=0.003)).to_dict())
    assert params["train.lr"] == "0.003" and params["train.tracking_uri"] == "" and params["model.arch"] == "small_cnn"
    assert numeric_metrics({"epoch": 2, "val_accuracy": 0.5, "resident": True, "device": "cpu", "first_step_time": None,
                            "loss": float("nan"), "counts": [1, 2]}, "x_") == {"x_epoch": 2.0, "x_val_accuracy": 0.5}


def test_a_registered_version_is_identified_by_its_uri_in_the_driver_and_in_finished(tmp_path):
    """predict's rerun check (finished.model_id, no torch) and the program the driver
    builds (load_checkpoint) give a downloaded version the same id, models:/NAME/VERSION."""
    import json

    folder = small_checkpoint(str(tmp_path / "ckpt"))
    plain = model_id(folder, "torch")
    assert load_checkpoint(folder).model_id == plain and len(plain) == 16
    with open(os.path.join(folder, REGISTERED_FILE), "w") as f:
        json.dump({"model_id": "models:/fashion/3", "run_id": "abc"}, f)
    assert registered_id(folder) == model_id(folder, "torch") == load_checkpoint(folder).model_id == "models:/fashion/3"


def test_registry_uris_parse_and_bad_ones_are_refused():
    from imgcls.registry import RegistryError, parse

    assert parse("models:/fashion@champion") == ("fashion", "champion", None)
    assert parse("models:/fashion/12") == ("fashion", None, "12")
    with pytest.raises(RegistryError, match="models:/NAME@ALIAS or models:/NAME/VERSION"):
        parse("models:/fashion")


def test_register_flags_are_checked_before_anything_runs(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "--root", ".", "--register", "fashion"])
    assert result.exit_code == 2 and "--register needs a tracking URI" in result.output
    result = runner.invoke(cli, ["tune", "--root", ".", "--register", "fashion", "--tracking-uri", "sqlite:///x.db"])
    assert result.exit_code == 2 and "a sweep registers no model" in result.output
    result = runner.invoke(cli, ["train", "--root", ".", "--register-alias", "champion"])
    assert result.exit_code == 2 and "--register-alias needs --register: the registered model" in result.output
