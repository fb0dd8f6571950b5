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


def test_yaml_numbers_in_scientific_notation_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) loads ``1e-3`` as the string '1e-3': values are coerced by type."""
    from imgcls.options import load_yaml

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: 1e-2\n  epochs: '5'\n  ema_decay: 9.99e-1\n"
                    "data:\n  in_memory: yes\n  max_per_class: null\n")
    raw = load_yaml(str(path))
    train = resolve(TrainConfig, raw["train"], {})
    assert (train.lr, train.weight_decay, train.epochs, train.ema_decay) == (0.001, 0.01, 5, 0.999)
    assert isinstance(train.lr, float) and isinstance(train.epochs, int)
    data = resolve(DataConfig, raw["data"], {})
    assert data.in_memory is True and data.max_per_class is None


@pytest.mark.parametrize("section,values,message", [
    (TrainConfig, {"weight_decay": "1e-2x"}, "--weight-decay: expected a number, got '1e-2x'"),
    (TrainConfig, {"epochs": 2.5}, "--epochs: expected a whole number"),
    (TrainConfig, {"compile": "maybe"}, "--compile: expected true or false"),
    (TrainConfig, {"lr": 0}, "--lr must be positive"),
    (DataConfig, {"val_fraction": 0.6, "test_fraction": 0.5}, "--val-fraction + --test-fraction must leave"),
    (TrainConfig, {"learning_rate": 0.1}, "unknown TrainConfig key(s) ['learning_rate']"),
])
def test_errors_name_the_flag(section, values, message):
    import click

    with pytest.raises(click.UsageError) as e:
        resolve(section, values, {})
    assert message in e.value.message
    assert "train." not in e.value.message and "data." not in e.value.message


def test_a_misspelt_section_is_refused_by_name(tmp_path):
    import click

    from imgcls.options import load_yaml

    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(click.BadParameter, match=r"unknown section\(s\) \['trian'\]; valid sections: \['data'"):
        load_yaml(str(path))
