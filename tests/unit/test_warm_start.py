"""--init-from: a retrain starts from an earlier checkpoint's weights."""

import pytest
import torch

from imgcls.checkpoint import save_checkpoint
from imgcls.config import DataConfig, JobConfig, ModelConfig, TrainConfig
from imgcls.labelled import DataError
from imgcls.models import create_model
from imgcls.training.trainer import check_init_from
from imgcls.training.loop import warm_start


@pytest.fixture
def old(tmp_path):
    torch.manual_seed(0)
    model = create_model("small_cnn", 3, image_size=28)
    folder = str(tmp_path / "old")
    save_checkpoint(folder, model, JobConfig(model=ModelConfig(arch="small_cnn", image_size=28)),
                    ["bag", "coat", "sneaker"], history=[])
    return folder, model


def test_head_rows_follow_class_names_and_new_classes_keep_fresh_rows(old):
    folder, old_model = old
    torch.manual_seed(1)
    model = create_model("small_cnn", 4, image_size=28)
    fresh = model.fc.weight.detach().clone()
    new = warm_start(model, folder, ["ankle_boot", "bag", "coat", "sneaker"])
    assert new == ["ankle_boot"]
    assert torch.equal(model.fc.weight[1:], old_model.fc.weight) and torch.equal(model.fc.bias[1:], old_model.fc.bias)
    assert torch.equal(model.fc.weight[0], fresh[0])  # the new class's row as initialised
    body = {k: v for k, v in old_model.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in body.items())


def test_a_class_the_model_knows_must_be_in_the_data(old):
    folder, _ = old
    job = JobConfig(data=DataConfig(root="x"), model=ModelConfig(arch="small_cnn", image_size=28),
                    train=TrainConfig(init_from=folder))
    assert check_init_from(job, ["bag", "coat", "sandal", "sneaker"]) == ["bag", "coat", "sneaker"]
    with pytest.raises(DataError, match=r"knows class\(es\) \['coat'\] that the data lacks"):
        check_init_from(job, ["bag", "sneaker"])
    other = JobConfig(data=DataConfig(root="x"), model=ModelConfig(arch="small_cnn", image_size=32),
                      train=TrainConfig(init_from=folder))
    with pytest.raises(DataError, match="is small_cnn at 28 px; this run trains small_cnn at 32 px"):
        check_init_from(other, ["bag", "coat", "sneaker"])
