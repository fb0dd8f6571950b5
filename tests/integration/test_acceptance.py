"""Acceptance runs on real data: slow, few, and run in CI."""

import os

import pyarrow.parquet as pq
import pytest

from imgcls.config import DataConfig, JobConfig, ModelConfig, TrainConfig
from imgcls.commands import run_demo
from imgcls.training.trainer import fit

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_main_job_reaches_85_percent_on_fashion_mnist(ray_cluster, tmp_path):
    """The README's main job: fetch, train with 2 CPU workers, test, label a folder to Parquet."""
    # The main job's recipe on 10,000 of the images for 4 of its 7 epochs: 0.877 in 153 s
    # on 2 cores without bf16, where the demo's own 15,000 for 7 epochs take 430-530 s.
    summary = run_demo(str(tmp_path), per_class=1000, epochs=4)
    assert summary["test"]["accuracy"] >= 0.85, summary["test"]
    assert summary["test"]["num_samples"] == 1023  # each file drawn to its split: about 10% of the 10,000
    labelled = summary["predict"]
    assert labelled["rows"] == labelled["files"] == 1024 and labelled["errors"] == 1
    table = pq.read_table(labelled["output"]).to_pandas()
    assert table.loc[table.status == "error", "path"].map(os.path.basename).tolist() == ["corrupt.png"]


def transfer_job(root, tmp_path, weights, name):
    return JobConfig(
        data=DataConfig(root=root, augment="light", max_per_class=200, val_fraction=0.2, test_fraction=0.0),
        model=ModelConfig(arch="efficientnet_lite0", weights=weights, image_size=96),
        train=TrainConfig(epochs=3, batch_size=32, lr=1e-3, weight_decay=0.01, warmup_epochs=0.3,
                          num_workers=2, storage_path=str(tmp_path), name=name),
    )


def test_finetuning_pretrained_backbone_beats_random_init(ray_cluster, dogs_cats_root, tmp_path):
    """Same real photos, same recipe: only the initial weights differ.

    A short recipe, for the suite's time: on 200 photos a class for 3 epochs the pretrained
    run reached 0.675 validation accuracy (80 images) in 57 s, and from scratch it stays
    at chance (0.5). At 250 a class for 4 epochs it reached 0.77 (0.75-0.79 at 400 a class)
    in 30% more time; the full recipe's figures are in bench/results/finetune.json.
    """
    pretrained = fit(transfer_job(dogs_cats_root, tmp_path, "packaged", "pretrained")).metrics["val_accuracy"]
    scratch = fit(transfer_job(dogs_cats_root, tmp_path, None, "scratch")).metrics["val_accuracy"]
    assert pretrained >= 0.625 and pretrained >= scratch + 0.1, (pretrained, scratch)
