"""Training end to end on a real local Ray cluster with real Fashion-MNIST files."""

import dataclasses
import json
import math
import os
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import requires_gpu

from imgcls.training.cache import load_shard, read_manifest, write_shard
from imgcls.checkpoint import load_checkpoint
from imgcls.config import DataConfig, JobConfig, ModelConfig, TrainConfig
from imgcls.training.trainer import RunFolderError, fit, prepare_splits

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # each test trains: in CI, not in the quick loop


def small_job(root, tmp_path, data=None, **train):
    """A short real run; the augment presets are spread over the training tests' runs
    (standard, trivialaugment and randaugment here, light in test_multinode), each in one."""
    defaults = dict(epochs=2, batch_size=64, lr=3e-3, num_workers=2, storage_path=str(tmp_path / "runs"), name="t")
    return JobConfig(data=DataConfig(**{"root": root, "augment": "light", "max_per_class": 100, **(data or {})}),
                     model=ModelConfig(arch="small_cnn", image_size=28), train=TrainConfig(**{**defaults, **train}))


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


def test_fit_checkpoints_every_epoch_survives_a_killed_worker_and_resumes(ray_cluster, mlflow_server,
                                                                          mlflow_experiment, fmnist_root, tmp_path):
    """One run of the whole checkpoint life: a worker killed mid-run, training resumed
    from the checkpoint and its cache, the best checkpoint kept, then a rerun refused
    without --resume or with other settings. (A rerun with --resume continues the S3
    test's run, whose cache is streamed: finding the decoded cache and the checkpoint is
    the driver's part, the same for both.)

    Only one checkpoint is kept besides the latest: ``best`` must still be the best of
    the run. (At lr 0.01 with no warm-up this run stayed near chance, at most 0.36 in
    three runs on two machines, and failed the accuracy check; at 0.005 it reaches 0.67.)

    The run is tracked: its 2 workers make one MLflow run, whose per-epoch metrics are
    history.json's, each epoch once although a worker was killed and the group resumed.
    """
    job = small_job(fmnist_root, tmp_path, data={"augment": "standard"}, epochs=3, max_failures=2, lr=0.005,
                    warmup_epochs=0, num_to_keep=1, tracking_uri=mlflow_server)
    run_dir = tmp_path / "runs" / "t"
    killed = []

    def kill_after_first_checkpoint():
        deadline = time.time() + 600
        while time.time() < deadline:
            # Ray writes its checkpoint manager's snapshot once it has registered a
            # checkpoint; a folder alone may be one it never got to register.
            if (run_dir / "checkpoint_manager_snapshot.json").exists():
                pids = _train_worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append((pids[-1], time.time()))
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    result = fit(job)
    killer.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    # Resumed, not restarted: the workers after the kill began from a checkpoint, not epoch 0.
    assert result.history[0]["started_at_epoch"] == 0
    assert result.history[-1]["started_at_epoch"] >= 1, [h["started_at_epoch"] for h in result.history]
    # ... and read the cache decoded before the first epoch: nothing was written to it since.
    cache = run_dir / "cache" / "train"
    first_checkpoint = min(p.stat().st_mtime for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert max(p.stat().st_mtime for p in cache.iterdir()) < first_checkpoint
    accuracies = [h["val_accuracy"] for h in result.history]
    assert max(accuracies) > 0.3, accuracies  # 10 classes: three times chance
    meta = json.loads(open(os.path.join(result.best_checkpoint, "meta.json")).read())
    assert meta["epoch"] == accuracies.index(max(accuracies)), accuracies
    # Ray keeps the best and the latest (num_to_keep 1); a checkpoint written before the
    # kill can stay unregistered beside them (the one the group resumed from), none after.
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    kept = {r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]}
    assert len(kept) <= 2, kept
    left = [p for p in run_dir.glob("checkpoint_*") if p.is_dir() and p.name not in kept]
    assert all(p.stat().st_mtime <= killed[0][1] for p in left), (left, kept)

    from imgcls.tracking import client, resumed_run_id

    c = client(mlflow_server)
    runs = c.search_runs([c.get_experiment_by_name(mlflow_experiment).experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == result.mlflow_run_id == meta["mlflow_run_id"]
    history = json.loads(open(os.path.join(result.checkpoint, "history.json")).read())
    for key in ("train_loss", "val_accuracy", "val_loss", "lr", "started_at_epoch"):
        logged = c.get_metric_history(result.mlflow_run_id, key)
        assert [(m.step, m.value) for m in sorted(logged, key=lambda m: m.step)] == \
            [(h["epoch"], pytest.approx(h[key])) for h in history], key
    assert runs[0].data.params["train.lr"] == "0.005" and runs[0].data.params["data.augment"] == "standard"
    assert resumed_run_id(str(run_dir)) == result.mlflow_run_id  # what --resume continues

    # Validation covers the whole val split over both workers, not rank 0's half.
    n_val = len(prepare_splits(job)[0]["val"])
    assert result.metrics["val_samples"] == n_val
    assert result.best_checkpoint == str(run_dir / "best") and load_checkpoint(result.best_checkpoint).classes
    loaded = load_checkpoint(result.checkpoint)
    assert loaded.classes == result.classes and len(loaded.classes) == 10
    assert loaded.job == job  # resolved config saved beside the checkpoint
    assert os.path.exists(run_dir / "config.yaml")
    # Decoded once into the run's cache, on the driver while the workers started; small
    # enough that each worker holds its part.
    assert result.resident and not result.caches["train"].reused
    assert result.history[0]["decode_overlapped"] and result.history[0]["cache_wait_seconds"] >= 0
    # A worker group's first epoch counts its own set-up (model, DDP), reported apart.
    assert 0 < result.history[0]["setup_seconds"] < result.history[0]["epoch_seconds"]
    assert [h["epoch"] for h in result.history if "setup_seconds" in h] == \
        [h["epoch"] for h in result.history if h["epoch"] == h["started_at_epoch"]]
    assert result.caches["train"].num_images == len(prepare_splits(job)[0]["train"])
    assert result.caches["val"].num_images == n_val and os.path.isdir(run_dir / "cache" / "train")

    # Rerun with the same name: refused without --resume (a new experiment must not
    # silently continue an old one), and --resume with other settings names them.
    longer = dataclasses.replace(job, train=dataclasses.replace(job.train, epochs=4))
    with pytest.raises(RunFolderError, match="--resume to continue it, --overwrite to start it afresh"):
        fit(longer)
    with pytest.raises(RunFolderError, match=r"--lr 0\.005 -> 0\.02"):
        fit(dataclasses.replace(longer, train=dataclasses.replace(longer.train, lr=0.02, resume=True)))
    assert yaml.safe_load(open(run_dir / "config.yaml"))["train"]["lr"] == 0.005  # not overwritten
    assert {p.name for p in run_dir.glob("checkpoint_*") if p.is_dir()} == kept | {p.name for p in left}  # none added


def test_a_broken_training_image_fails_the_run_with_its_name(ray_cluster, fmnist_root, tmp_path):
    """The decode runs while the workers start: its error, naming the file, is the run's
    error, and the workers waiting for the cache stop instead of waiting on."""
    from imgcls.labelled import DataError

    data = tmp_path / "data"
    for label in ("bag", "coat"):
        (data / label).mkdir(parents=True)
        for name in sorted(os.listdir(os.path.join(fmnist_root, label)))[:30]:
            os.link(os.path.join(fmnist_root, label, name), data / label / name)
    (data / "coat" / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    job = small_job(str(data), tmp_path, epochs=1, num_workers=1, name="broken",
                    data={"val_fraction": 0.2, "test_fraction": 0.0, "max_per_class": None})
    with pytest.raises(DataError, match="cannot read training image .*zz-broken.png"):
        fit(job)


def test_trains_from_s3_manifest_with_streamed_cache_on_s3(ray_cluster, s3_server, fmnist_root, tmp_path):
    """Source images and the decoded cache on the loopback S3 server; the cache streamed
    through Ray Data rather than held; MixUp, CutMix and EMA on; a rerun resumes.

    The validation split has an odd number of images (13 + 10 + 9 + 15): Ray's equal
    split of a dataset over 2 workers would drop the remainder, so the workers read their
    shares of it themselves and every image counts once."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    rows = []
    for i, label in enumerate(sorted(d for d in os.listdir(fmnist_root) if not d.startswith("."))[:4]):
        for name in sorted(os.listdir(os.path.join(fmnist_root, label)))[:46 if i == 3 else 40]:
            rows.append({"path": f"{label}/{name}", "label": label})
    fs.put([os.path.join(fmnist_root, r["path"]) for r in rows], [f"imgcls/fm/{r['path']}" for r in rows])  # at once
    assert len(fs.find("imgcls/fm")) == len(rows) == 166
    with fs.open("imgcls/fm/manifest.csv", "w") as f:
        pd.DataFrame(rows).to_csv(f, index=False)
    job = small_job("s3://imgcls/fm/manifest.csv", tmp_path, epochs=1, batch_size=16, name="s3", mixup_alpha=0.2,
                    cutmix_alpha=1.0,
                    ema_decay=0.99, data={"cache_path": "s3://imgcls/cache/s3-run", "in_memory": False,
                                          "max_per_class": None, "augment": "trivialaugment",
                                          "val_fraction": 0.25, "test_fraction": 0.0})
    result = fit(job)
    assert not result.resident and not result.caches["train"].reused
    assert fs.exists("imgcls/cache/s3-run/train/_cache.json") and fs.exists("imgcls/cache/s3-run/val/_cache.json")
    assert [h["resident"] for h in result.history] == [False]
    n_val = len(prepare_splits(job)[0]["val"])
    assert n_val == 47 and result.history[-1]["val_samples"] == n_val
    state = torch.load(os.path.join(result.checkpoint, "train_state.pt"), weights_only=True)
    assert "raw_model" in state and state["ema_updates"] > 0  # the average is saved as the model

    # A rerun with --resume continues from the latest checkpoint, keeps the history, and
    # finds the decoded cache: nothing is decoded again.
    resumed = fit(dataclasses.replace(job, train=dataclasses.replace(job.train, epochs=2, resume=True)))
    assert [h["epoch"] for h in resumed.history] == [0, 1] and resumed.history[1]["started_at_epoch"] == 1
    assert resumed.history[:1] == result.history
    assert resumed.caches["train"].reused and resumed.caches["val"].reused

    # What the workers streamed is the split's images with their labels: the validation
    # cache on S3 holds (shuffled once) the source files' pixels as decoded here, each
    # with its own class. (Whether the model learns is the other tests' question: 15
    # steps under MixUp, CutMix and TrivialAugment on 120 images gave 0.33-0.6 from run
    # to run.)
    splits, classes = prepare_splits(job)
    val = splits["val"]
    cache = read_manifest("s3://imgcls/cache/s3-run/val")
    streamed = [(image.tobytes(), int(label)) for uri in cache.shard_uris() for image, label in zip(*load_shard(uri))]
    here = str(tmp_path / "here.npz")
    write_shard(val.paths, np.array([classes.index(label) for label in val.labels]), here, cache.short_side, cache.side)
    decoded = [(image.tobytes(), int(label)) for image, label in zip(*load_shard(here))]
    assert len(streamed) == len(val) == 47 and sorted(streamed) == sorted(decoded)
    assert len({label for _, label in streamed}) == 4


def test_the_sampler_caches_each_image_once_and_the_probe_folds_share_none(ray_cluster, fmnist_root, tmp_path):
    """At a 100:1 imbalance: the sampler's training cache holds the train split's images,
    each once (no copies of the rare class), and the linear probe, which fits that cache
    in this order, weights the classes instead: its cross-validation folds never hold one
    image on both sides. (Fitting the probe itself takes half a minute here: not run.)
    Then workers that stream the cache train on both classes equally often each epoch
    (the CLI test below holds it in memory)."""
    from imgcls.training.cache import shard_batches
    from imgcls.training.probe import CV_FOLDS, _folds
    from imgcls.training.trainer import prepare_data, probe_class_weight

    data = tmp_path / "rare"
    for label, n in (("bag", 200), ("coat", 2)):
        (data / label).mkdir(parents=True)
        for name in sorted(os.listdir(os.path.join(fmnist_root, label)))[:n]:
            os.link(os.path.join(fmnist_root, label, name), data / label / name)
    job = small_job(str(data), tmp_path, name="rare", class_balance="sampler",
                    data={"max_per_class": None, "val_fraction": 0.01, "test_fraction": 0.0})
    prepared = prepare_data(job)
    prepared.wait_decoded()
    split = prepared.splits["train"]
    bags = split.labels.count("bag")  # about 198: the split is drawn by a hash of each file's path
    assert bags >= 190 and split.labels.count("coat") == 2
    cache = prepared.caches["train"]
    batches = list(shard_batches(cache, 0, 1, 64))  # the probe's order of the train cache
    images = [x.numpy().tobytes() for xs, _ in batches for x in xs]
    labels = torch.cat([y for _, y in batches])
    assert cache.num_images == len(split) == len(set(images)) and torch.bincount(labels).tolist() == [bags, 2]
    fold = _folds(labels, CV_FOLDS).tolist()
    folds_of = {}
    for image, f in zip(images, fold):
        folds_of.setdefault(image, set()).add(f)
    assert all(len(f) == 1 for f in folds_of.values())  # no image on both sides of a fold
    weights = probe_class_weight(job, prepared.splits, prepared.classes)
    assert weights[1] / weights[0] == pytest.approx(bags / 2)  # the rare class weighs as much as the whole

    result = fit(dataclasses.replace(job, data=dataclasses.replace(job.data, in_memory=False)))
    assert result.caches["train"].reused  # decoded above, once
    drawn = 2 * math.ceil(len(split) / 2)  # each of the 2 workers draws ceil(n / 2) images an epoch
    assert [h["resident"] for h in result.history] == [False, False]
    for counts in (h["sampled_class_counts"] for h in result.history):  # both classes equally often
        assert sum(counts) == drawn and abs(counts[0] - counts[1]) <= 2, counts


def test_frozen_backbone_sgd_balanced_sampler_and_resume_from_through_the_cli(ray_cluster, fmnist_root, tmp_path):
    """The README's training flags as a user gives them to ``imgcls train``, on real images
    with imbalanced classes (train split 98/14/1): the backbone stays as initialised for
    the frozen first epoch and trains after --unfreeze-after, the balanced sampler trains
    on every class equally often from a cache that holds each image once, and
    --resume-from continues another run's checkpoint (with --class-balance loss)."""
    from click.testing import CliRunner

    from imgcls.cli import cli
    from imgcls.models import create_model, head_name

    data = tmp_path / "imbalanced"
    for label, n in (("bag", 140), ("coat", 20), ("sneaker", 1)):
        (data / label).mkdir(parents=True)
        for name in sorted(os.listdir(os.path.join(fmnist_root, label)))[:n]:
            os.link(os.path.join(fmnist_root, label, name), data / label / name)
    runs = tmp_path / "runs"
    flags = ["--root", str(data), "--arch", "small_cnn", "--image-size", "28", "--batch-size", "16",
             "--num-workers", "2", "--optimizer", "sgd", "--lr", "0.05", "--freeze-backbone", "--unfreeze-after", "1",
             "--class-balance", "sampler", "--augment", "randaugment", "--val-fraction", "0.2",
             "--test-fraction", "0.1", "--storage-path", str(runs)]

    def train(*extra):
        result = CliRunner().invoke(cli, ["train", *flags, *extra], catch_exceptions=False)
        assert result.exit_code == 0, result.output[-3000:]
        return result.output

    out = train("--name", "flags", "--epochs", "2")
    assert "epoch 2/2" in out and '"accuracy"' in out  # epoch lines, then the test split's metrics
    run = runs / "flags"
    by_epoch = {json.loads((p / "meta.json").read_text())["epoch"]: p
                for p in run.glob("checkpoint_*") if p.is_dir()}
    assert sorted(by_epoch) == [0, 1]
    torch.manual_seed(0)  # the worker's seed, then the same model: the initial weights
    initial = create_model("small_cnn", 3, image_size=28)
    head = head_name(initial) + "."
    first, second = (load_checkpoint(str(by_epoch[e])).model for e in (0, 1))
    for (name, p0), p1, p2 in zip(initial.named_parameters(), first.parameters(), second.parameters()):
        if name.startswith(head):
            assert not torch.equal(p0, p1), name  # the head trains from the first step
        else:
            assert torch.equal(p0, p1), name  # frozen for epoch 0
    body = [(p0, p2) for (name, p0), p2 in zip(initial.named_parameters(), second.parameters())
            if not name.startswith(head)]
    assert any(not torch.equal(p0, p2) for p0, p2 in body)  # unfrozen from epoch 1
    cache = read_manifest(str(run / "cache" / "train"))
    labels = torch.cat([torch.as_tensor(load_shard(uri)[1]) for uri in cache.shard_uris()])
    split = pd.read_parquet(run / "splits" / "train.parquet")["label"].value_counts().sort_index()
    assert torch.bincount(labels).tolist() == split.tolist()  # the split, each image once
    assert split.tolist()[0] > 5 * split.tolist()[1] and split.tolist()[2] == 1  # about 98/14/1 (splits by hash)
    # Each epoch the workers drew 2 x ceil(n / 2) images, every class equally often.
    history = json.loads((by_epoch[1] / "history.json").read_text())
    for h in history:
        drawn = h["sampled_class_counts"]
        assert sum(drawn) == 2 * math.ceil(split.sum() / 2) and max(drawn) - min(drawn) <= 2, drawn

    # Another run continues from that checkpoint, weighting the loss by class instead.
    train("--name", "continued", "--epochs", "3", "--resume-from", str(by_epoch[1]), "--class-balance", "loss")
    history = json.loads((runs / "continued" / "best" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2] and history[2]["started_at_epoch"] == 2, history


@pytest.mark.gpu
@requires_gpu
def test_trains_on_a_gpu_with_amp_and_resumes(ray_cluster, fmnist_root, tmp_path):
    """One worker on the GPU: bf16 autocast, channels_last, the cache resident on the
    device, batched augmentation there; a rerun with --resume continues at epoch 3."""
    job = small_job(fmnist_root, tmp_path, data={"augment": "standard"}, epochs=2, num_workers=1, use_gpu=True,
                    name="gpu")
    result = fit(job)
    assert [h["device"].split(":")[0] for h in result.history] == ["cuda", "cuda"]
    assert all(h["amp"] and h["channels_last"] and h["resident"] for h in result.history)
    assert result.metrics["val_accuracy"] >= 0.3  # 10 classes (chance 0.1), 100 validation images
    resumed = fit(dataclasses.replace(job, train=dataclasses.replace(job.train, epochs=3, resume=True)))
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2] and resumed.history[2]["started_at_epoch"] == 2
