"""Training end to end on a real local Ray cluster with real Fashion-MNIST files."""

import os
import signal
import threading
import time

import pytest

from imgcls.checkpoint import load_checkpoint
from imgcls.config import DataConfig, JobConfig, ModelConfig, TrainConfig
from imgcls.train import fit, prepare_splits

pytestmark = pytest.mark.integration


def small_job(root, tmp_path, **train):
    defaults = dict(epochs=2, batch_size=64, lr=3e-3, num_workers=2, storage_path=str(tmp_path / "runs"), name="t")
    return JobConfig(data=DataConfig(root=root, augment="light", max_per_class=100),
                     model=ModelConfig(arch="small_cnn", image_size=28), train=TrainConfig(**{**defaults, **train}))


def test_fit_checkpoints_every_epoch_and_resumes(ray_cluster, fmnist_root, tmp_path):
    job = small_job(fmnist_root, tmp_path)
    result = fit(job)
    assert [h["epoch"] for h in result.history] == [0, 1]
    # Validation covers the whole val split over both workers, not rank 0's half.
    n_val = len(prepare_splits(job)[0]["val"])
    assert n_val - 1 <= result.metrics["val_samples"] <= n_val
    run_dir = tmp_path / "runs" / "t"
    assert len([p for p in run_dir.glob("checkpoint_*") if p.is_dir()]) == 2
    assert result.best_checkpoint == str(run_dir / "best") and load_checkpoint(result.best_checkpoint).classes
    loaded = load_checkpoint(result.checkpoint)
    assert loaded.classes == result.classes and len(loaded.classes) == 10
    assert loaded.job == job  # resolved config saved beside the checkpoint
    assert os.path.exists(tmp_path / "runs" / "t" / "config.yaml")

    # A rerun with the same name and storage resumes from the latest checkpoint.
    longer = small_job(fmnist_root, tmp_path, epochs=3)
    resumed = fit(longer)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    assert resumed.history[:2] == result.history


def _train_worker_pids():
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"RayTrainWorker" in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def test_killed_worker_does_not_lose_training(ray_cluster, fmnist_root, tmp_path):
    job = small_job(fmnist_root, tmp_path, epochs=3, max_failures=2, name="ft")
    run_dir = tmp_path / "runs" / "ft"
    killed = []

    def kill_after_first_checkpoint():
        deadline = time.time() + 600
        while time.time() < deadline:
            if run_dir.exists() and any(p.is_dir() for p in run_dir.glob("checkpoint_*")):
                pids = _train_worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    result = fit(job)
    killer.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert result.metrics["val_accuracy"] > 0.3
