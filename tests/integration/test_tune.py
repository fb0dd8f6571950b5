"""Ray Tune over TorchTrainer trials with ASHA, on a real local cluster and real images."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray import tune
from ray.util import placement_group_table

from imgcls.config import DataConfig, JobConfig, ModelConfig, TrainConfig
from imgcls.training.tune import TrialsFailedError, run_tune

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def live_placement_groups() -> set[str]:
    return {i for i, g in placement_group_table().items() if g["state"] != "REMOVED"}


def test_tune_reports_best_config(ray_cluster, mlflow_server, mlflow_experiment, fmnist_root, tmp_path):
    """The sweep is tracked too: one MLflow parent run, one child run per trial, the best tagged."""
    before = live_placement_groups()
    job = JobConfig(data=DataConfig(root=fmnist_root, augment="light", max_per_class=20),
                    model=ModelConfig(arch="small_cnn", image_size=28),
                    train=TrainConfig(epochs=2, num_workers=1, storage_path=str(tmp_path), name="tt",
                                      tracking_uri=mlflow_server))
    # Optuna's TPE: two random start-up trials, then one it proposes from their results
    # (the random search runs in the README test's `imgcls tune`).
    summary = run_tune(job, num_samples=3, grace_period=1, search="optuna")
    assert len(summary.trials) == 3 and summary.search == "optuna"
    assert len({t["params"]["lr"] for t in summary.trials}) == 3
    assert all(t["val_accuracy"] is not None and 1 <= t["epochs"] <= 2 for t in summary.trials)
    assert summary.best_val_accuracy == max(t["val_accuracy"] for t in summary.trials)
    best = JobConfig.from_dict(yaml.safe_load(open(summary.best_config_file)))
    assert best.train.lr == summary.best_params["lr"] and 1e-4 <= best.train.lr <= 1e-2
    assert best.data.augment_magnitude == summary.best_params["augment_magnitude"]
    from imgcls.tracking import client

    c = client(mlflow_server)
    runs = c.search_runs([c.get_experiment_by_name(mlflow_experiment).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 4, [r.data.tags for r in runs]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3 and all(r.info.status != "RUNNING" for r in runs)
    best_runs = [r for r in children if r.data.tags.get("imgcls.best_trial") == "true"]
    assert len(best_runs) == 1 and parent.data.tags["imgcls.best_run_id"] == best_runs[0].info.run_id
    assert best_runs[0].data.metrics["val_accuracy"] == summary.best_val_accuracy \
        == parent.data.metrics["best_val_accuracy"]
    assert sorted(float(r.data.params["train.lr"]) for r in children) == sorted(t["params"]["lr"] for t in summary.trials)
    # Every trial's workers gave their CPUs back: Tune kills a trial's actor, and before
    # ReleaseWorkerGroups each trial's placement group stayed reserved (on 2 CPUs, the
    # eighth trial of `imgcls tune --num-samples 8` waited for ever).
    deadline = time.monotonic() + 30
    while live_placement_groups() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert live_placement_groups() - before == set()


def test_all_trials_failing_is_one_clear_error(ray_cluster, fmnist_root, tmp_path):
    """Not Ray's 'No best trial found': the error says all trials failed, and why the first did."""
    job = JobConfig(data=DataConfig(root=fmnist_root, augment="light", max_per_class=20),
                    model=ModelConfig(arch="small_cnn", image_size=28),
                    train=TrainConfig(epochs=1, num_workers=1, storage_path=str(tmp_path), name="failing"))
    # A batch size of 0 is refused by each trial's config, before its trainer starts.
    with pytest.raises(TrialsFailedError, match=r"^all 2 trials failed; the first trial's error: ValueError: epochs, "
                                                r"batch_size and num_workers must be positive \(trial folder: "):
        run_tune(job, num_samples=2, space={"batch_size": tune.choice([0])})


def imgcls(*args, cwd):
    """The imgcls command as a user runs it, in the folder ``cwd``, with its own local Ray cluster."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(Path(sys.executable).parent / "imgcls"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_tune_command_with_a_bad_root_fails_before_any_trial(tmp_path):
    proc = imgcls("tune", "--root", "nowhere", "--arch", "small_cnn", "--image-size", "28", "--epochs", "1",
                  "--num-samples", "2", "--storage-path", "runs", "--num-cpus", "2", cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert output.count(f"{tmp_path / 'nowhere'} is neither a folder nor a .csv/.parquet manifest") == 1, output[-3000:]
    assert "Trial" not in output and "No best trial found" not in output, output[-3000:]
