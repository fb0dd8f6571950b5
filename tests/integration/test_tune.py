"""Ray Tune over TorchTrainer trials with ASHA, on a real local cluster and real images."""

import pytest
import yaml

from imgcls.config import DataConfig, JobConfig, ModelConfig, TrainConfig
from imgcls.tune import run_tune

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_tune_reports_best_config(ray_cluster, fmnist_root, tmp_path):
    job = JobConfig(data=DataConfig(root=fmnist_root, augment="light", max_per_class=20),
                    model=ModelConfig(arch="small_cnn", image_size=28),
                    train=TrainConfig(epochs=2, num_workers=1, storage_path=str(tmp_path), name="tt"))
    summary = run_tune(job, num_samples=2, grace_period=1)
    assert len(summary.trials) == 2
    assert all(t["val_accuracy"] is not None and 1 <= t["epochs"] <= 2 for t in summary.trials)
    assert summary.best_val_accuracy == max(t["val_accuracy"] for t in summary.trials)
    best = JobConfig.from_dict(yaml.safe_load(open(summary.best_config_file)))
    assert best.train.lr == summary.best_params["lr"] and 1e-4 <= best.train.lr <= 1e-2
    assert best.data.augment_magnitude == summary.best_params["augment_magnitude"]
