import pytest

from imgcls.config import DataConfig, JobConfig, ModelConfig, PredictConfig, TrainConfig
from imgcls.options import resolve


@pytest.mark.parametrize("cls,kwargs", [
    (DataConfig, {"val_fraction": 0.6, "test_fraction": 0.5}),
    (DataConfig, {"augment": "mixup"}),
    (ModelConfig, {"unfreeze_after": 2}),  # needs freeze_backbone
    (TrainConfig, {"optimizer": "adam"}),
    (TrainConfig, {"class_balance": "smote"}),
    (TrainConfig, {"lr": 0}),
    (PredictConfig, {"runtime": "tensorrt"}),
])
def test_invalid_values_are_rejected(cls, kwargs):
    with pytest.raises(ValueError):
        cls(**kwargs)


def test_job_round_trips_through_dict():
    job = JobConfig(model=ModelConfig(arch="resnet18", freeze_backbone=True, unfreeze_after=1),
                    train=TrainConfig(epochs=3, optimizer="sgd"))
    assert JobConfig.from_dict(job.to_dict()) == job


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match="learning_rate"):
        JobConfig.from_dict({"train": {"learning_rate": 0.1}})


def test_flags_override_yaml_which_overrides_defaults():
    cfg = resolve(TrainConfig, {"epochs": 7, "lr": 0.5}, {"lr": 0.01, "batch_size": None})
    assert (cfg.epochs, cfg.lr, cfg.batch_size) == (7, 0.01, TrainConfig().batch_size)
