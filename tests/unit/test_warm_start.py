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


def test_a_retrain_keeps_every_file_of_the_old_checkpoints_splits(fmnist_root, tmp_path):
    """--init-from pins each file the old checkpoint's saved splits name to its old split,
    found by its key after the data moved to another folder, and relabelled; new files
    are split as any. The old splits here were drawn with another seed, so only the pins
    can keep them."""
    import os

    from imgcls.checkpoint import write_splits
    from imgcls.labelled import list_labelled_images, split_stratified
    from imgcls.training.trainer import prepare_splits

    classes = ["bag", "coat", "sneaker"]
    names = {c: sorted(os.listdir(os.path.join(fmnist_root, c))) for c in classes}
    for place, n in (("before", 60), ("moved", 90)):  # the same 60 a class, moved, with 30 new ones
        for c in classes:
            (tmp_path / place / c).mkdir(parents=True)
            for name in names[c][:n]:
                os.link(os.path.join(fmnist_root, c, name), tmp_path / place / c / name)
    saved = split_stratified(list_labelled_images(str(tmp_path / "before")), 0.2, 0.2, seed=5)
    folder = str(tmp_path / "old")
    save_checkpoint(folder, create_model("small_cnn", 3, image_size=28),
                    JobConfig(model=ModelConfig(arch="small_cnn", image_size=28)), classes, history=[])
    write_splits(os.path.join(folder, "splits"), saved)
    old_split = {k: name for name, part in saved.items() for k in part.keys}
    fixed = [f"{c}/{n}" for c in classes for n in names[c][:4]]  # review corrections: each to the next class
    with open(tmp_path / "fixes.csv", "w") as f:
        f.write("path,label\n" + "".join(f"{tmp_path / 'moved' / k},{classes[(classes.index(k.split('/')[0]) + 1) % 3]}\n"
                                         for k in fixed))
    data = DataConfig(root=f"{tmp_path / 'moved'},{tmp_path / 'fixes.csv'}", val_fraction=0.2, test_fraction=0.2)
    job = JobConfig(data=data, model=ModelConfig(arch="small_cnn", image_size=28), train=TrainConfig(init_from=folder))
    splits, _ = prepare_splits(job)
    new_split = {k: name for name, part in splits.items() for k in part.keys}
    assert len(new_split) == 270 and all(p.startswith(str(tmp_path / "moved")) for p in splits["train"].paths)
    assert {k: new_split[k] for k in old_split} == old_split
    relabelled = dict(zip(splits["test"].keys + splits["val"].keys + splits["train"].keys,
                          splits["test"].labels + splits["val"].labels + splits["train"].labels))
    assert all(relabelled[k] != k.split("/")[0] for k in fixed)
    # Without --init-from the same data splits by its own draws: other splits than the seed-5 ones.
    unpinned, _ = prepare_splits(JobConfig(data=data, model=job.model))
    assert sum(name != old_split.get(k, name) for name, part in unpinned.items() for k in part.keys) > 20
