"""Transfer learning on real photos (packaged EfficientNet-Lite0 weights): the linear probe,
LP-FT, the saved splits, and a warm-started retrain. (Streamed validation counted once per
image over 2 workers: test_train.py's S3 run, whose validation split is odd-sized.)"""

import json
import os

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

import imgcls.devices
from imgcls.checkpoint import SPLITS, load_checkpoint, split_manifest
from imgcls.cli import cli
from imgcls.config import DataConfig, JobConfig, ModelConfig, TrainConfig
from imgcls.labelled import list_labelled_images
from imgcls.evaluation.evaluate import evaluate_images
from imgcls.commands import run_training
from imgcls.models import create_model, head_name
from imgcls.training.probe import PROBE_HEAD_FILE
from imgcls.training.trainer import fit, prepare_splits

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # each test trains: in CI, not in the quick loop


def lite0_job(root, tmp_path, name, per_class=40, **train):
    return JobConfig(
        data=DataConfig(root=root, augment="light", max_per_class=per_class, val_fraction=0.15, test_fraction=0.25),
        model=ModelConfig(arch="efficientnet_lite0", weights="packaged", image_size=128),
        train=TrainConfig(**{"epochs": 1, "batch_size": 16, "num_workers": 2, "storage_path": str(tmp_path / "runs"),
                             "name": name, **train}))


def test_linear_probe_is_a_normal_checkpoint_with_its_splits(ray_cluster, dogs_cats_root, tmp_path):
    job = lite0_job(dogs_cats_root, tmp_path, "probe", linear_probe=True)
    summary = run_training(job)
    best = summary["checkpoint"]
    metrics = summary["val"]
    splits, _ = prepare_splits(job)
    assert metrics["probe_l2"] > 0 and metrics["val_samples"] == len(splits["val"]) == 11
    assert metrics["train_samples"] == len(splits["train"]) == 45 and metrics["train_accuracy"] >= 0.9
    # Saved splits: exactly the run's, in the checkpoint and the run folder, as manifests
    # that read back as data input.
    for name in SPLITS:
        back = list_labelled_images(split_manifest(best, name))
        assert sorted(back.paths) == sorted(splits[name].paths)
        assert pq.read_table(str(tmp_path / "runs" / "probe" / "splits" / f"{name}.parquet")).num_rows == len(back)
    # The probe's val accuracy, from features of the cached val images, is what the
    # inference path gives on the same files: one preprocessing for both.
    report, _ = evaluate_images(best, splits["val"])
    assert report["num_samples"] == 11
    assert abs(report["accuracy"] - metrics["val_accuracy"]) <= 1 / 11 + 1e-9  # at most one image flips
    assert summary["test"]["num_samples"] == len(splits["test"])
    loaded = load_checkpoint(best)
    assert loaded.job.train.linear_probe and loaded.history[0]["epoch"] == 0
    # The L2 strength is the one with the lowest cross-validated loss (accuracy on held-out
    # photos is measured by bench/finetune.py, over 600 test photos; 24 here say little).
    assert summary["test"]["num_samples"] == 24
    grid = json.loads(open(os.path.join(best, "probe.json")).read())["probe_grid"]
    assert metrics["probe_l2"] == min(grid, key=lambda r: r["cv_loss"])["l2"] and len(grid) >= 5

    # evaluate --split test scores exactly the held-out split; --data over the whole
    # folder warns that the training images are in it; explain --split takes the split.
    runner = CliRunner()
    out = runner.invoke(cli, ["evaluate", "--model", best, "--split", "test", "--output", str(tmp_path / "ev")])
    assert out.exit_code == 0, out.output
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["num_samples"] == len(splits["test"]) and "warning" not in out.output
    assert saved["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    subset = tmp_path / "subset.csv"
    tr, te = splits["train"], splits["test"]  # each ordered by class: take both classes of each
    both = tr.paths[:3] + tr.paths[-2:] + te.paths[:2] + te.paths[-1:]
    labels = tr.labels[:3] + tr.labels[-2:] + te.labels[:2] + te.labels[-1:]
    assert len(set(labels)) == 2
    subset.write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in zip(both, labels)))
    out = runner.invoke(cli, ["evaluate", "--model", best, "--data", str(subset), "--output", str(tmp_path / "ev2")])
    assert out.exit_code == 0, out.output
    assert "warning: 5 of the 8 images were in the checkpoint's training split" in out.output
    out = runner.invoke(cli, ["explain", "--model", best, "--split", "test", "--top", "2",
                              "--output", str(tmp_path / "cam")])
    assert out.exit_code == 0, out.output
    assert len([p for p in (tmp_path / "cam").glob("*.png") if not p.name.endswith("_input.png")]) == 2


def test_lp_ft_starts_fine_tuning_from_the_probe_head(ray_cluster, dogs_cats_root, tmp_path, monkeypatch):
    # The probe as a Ray task, as for a split of thousands (the linear probe test runs it in the driver).
    monkeypatch.setattr(imgcls.devices, "IN_PROCESS_MAX_IMAGES", 0)
    # An lr so small that one epoch cannot move the head: the checkpoint's head is then the probe's.
    job = lite0_job(dogs_cats_root, tmp_path, "lpft", lr=1e-12, warmup_epochs=0)
    result = fit(job)
    probe = torch.load(tmp_path / "runs" / "lpft" / PROBE_HEAD_FILE, weights_only=True)
    model = load_checkpoint(result.checkpoint).model
    head = model.get_submodule(head_name(model))
    torch.testing.assert_close(head.weight.detach(), probe["weight"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(head.bias.detach(), probe["bias"], atol=1e-4, rtol=1e-4)
    fresh = create_model("efficientnet_lite0", 2, weights="packaged", image_size=128)
    assert not torch.allclose(fresh.get_submodule(head_name(fresh)).weight, probe["weight"], atol=1e-3)


def test_warm_started_retrain_on_more_labelled_data_beats_the_model_it_started_from(ray_cluster, fmnist_root,
                                                                                     tmp_path, capsys):
    """The first model saw 10 real images a class of 4 classes, saved as its train split;
    `imgcls train --init-from` retrains from it on 120 a class of those and a fifth class,
    from two roots (old data, new rows). Every file of the old splits keeps its split, and
    the report puts both models side by side on the test images neither trained on (the
    old one's classes), read back here from the saved manifests."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from imgcls.checkpoint import save_checkpoint, write_splits
    from imgcls.labelled import LabelledImages
    from imgcls.models import SmallCNN, get_spec

    old_classes, new_class = ["bag", "coat", "sneaker", "trouser"], "sandal"
    names = {c: sorted(os.listdir(os.path.join(fmnist_root, c))) for c in [*old_classes, new_class]}
    # The old data and the newly labelled rows (the new class among them) in two folders,
    # given as two roots.
    for part, (lo, hi) in (("old", (0, 60)), ("new", (60, 120))):
        for c in [*old_classes, new_class] if part == "new" else old_classes:
            (tmp_path / part / c).mkdir(parents=True)
            for n in names[c][lo:hi] if c != new_class else names[c][:120]:
                os.link(os.path.join(fmnist_root, c, n), tmp_path / part / c / n)

    def old_split(lo, hi):  # names[c][lo:hi] of the old folder as a saved split
        keys = [f"{c}/{n}" for c in old_classes for n in names[c][lo:hi]]
        return LabelledImages([str(tmp_path / "old" / k) for k in keys], [k.split("/")[0] for k in keys], keys)

    saved = {"train": old_split(0, 10), "val": old_split(10, 13), "test": old_split(13, 16)}
    spec = get_spec("small_cnn")
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB")))
                     for p in saved["train"].paths]).permute(0, 3, 1, 2).float().div(255)
    y = torch.arange(4).repeat_interleave(10)
    torch.manual_seed(0)
    first = SmallCNN(4)
    opt = torch.optim.AdamW(first.parameters(), 3e-3)
    for _ in range(5):  # its 40 training images: a weak first model
        opt.zero_grad()
        torch.nn.functional.cross_entropy(first(x.sub(mean).div(std)), y).backward()
        opt.step()
    old = str(tmp_path / "first")
    save_checkpoint(old, first.eval(), JobConfig(model=ModelConfig(arch="small_cnn", image_size=28)), old_classes, [])
    write_splits(os.path.join(old, "splits"), saved)

    roots = f"{tmp_path / 'old'},{tmp_path / 'new'}"
    job = JobConfig(data=DataConfig(root=roots, augment="light", val_fraction=0.1, test_fraction=0.25),
                    model=ModelConfig(arch="small_cnn", image_size=28),
                    train=TrainConfig(epochs=2, batch_size=32, lr=3e-3, num_workers=2, init_from=old,
                                      storage_path=str(tmp_path / "runs"), name="retrain"))
    summary = run_training(job)
    test, before = summary["test"], summary["init_from_test"]
    best = summary["checkpoint"]
    manifest = {name: set(pq.read_table(os.path.join(best, "splits", f"{name}.parquet")).column("path").to_pylist())
                for name in SPLITS}
    for name, part in saved.items():  # every file of the old splits kept its split
        assert set(part.paths) <= manifest[name], name
    old_train = set(pq.read_table(os.path.join(old, "splits", "train.parquet")).column("path").to_pylist())
    compared = pq.read_table(before["manifest"]).to_pydict()
    assert not set(compared["path"]) & old_train and not set(compared["path"]) & manifest["train"]
    assert set(compared["path"]) <= manifest["test"] and new_class not in compared["label"]
    assert test["num_samples"] == len(manifest["test"]) == before["untrained_test_images"]
    new_class_tests = sum(f"/{new_class}/" in p for p in manifest["test"])  # the old model cannot score them
    assert before["num_samples"] == len(compared["path"]) == len(manifest["test"]) - new_class_tests > 0
    assert (f"test images neither model trained on: {len(manifest['test'])} of {len(manifest['test'])}"
            in capsys.readouterr().out)
    assert before["new_accuracy"] > before["accuracy"] + 0.1, before
    assert load_checkpoint(best).classes == sorted([*old_classes, new_class])

