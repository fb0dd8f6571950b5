"""Whole jobs composed from the feature packages: what the CLI commands and jobs/ scripts run.

``run_training`` trains (``training``), scores the test split and writes the reference
predictions (``evaluation``); ``run_demo`` does the same on a Fashion-MNIST subset it
fetches first.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import asdict
from typing import Optional

from imgcls import storage
from imgcls.checkpoint import read_model_info
from imgcls.config import DataConfig, JobConfig, ModelConfig, PredictConfig, TrainConfig
from imgcls.evaluation.evaluate import evaluate_images, topk_key, write_reference
from imgcls.inference.bulk import label_images
from imgcls.labelled import LabelledImages
from imgcls.training.trainer import fit

TEST_METRICS_FILE = "test_metrics.json"
INIT_FROM_TEST_FILE = "init_from_test.parquet"  # the test images an --init-from run compares both models on


def run_training(job: JobConfig) -> dict:
    """Trains ``job``, evaluates the best checkpoint on the test split, returns a summary.

    The test metrics are written beside the run's checkpoints as test_metrics.json. A
    tracked run (``train.tracking_uri``) then logs them, the splits, the history and the
    report to its MLflow run, and ``train.register`` registers the best checkpoint.
    """
    result = fit(job)
    summary = {"checkpoint": result.best_checkpoint, "latest_checkpoint": result.checkpoint,
               "classes": result.classes, "val": result.metrics}
    test = result.splits["test"]
    if len(test):
        report, _ = evaluate_images(result.best_checkpoint, test)
        summary["test"] = {k: report[k] for k in ("accuracy", topk_key(report), "macro_precision",
                                                   "macro_recall", "macro_f1", "num_samples")}
        storage.write_json(storage.join(result.best_checkpoint, TEST_METRICS_FILE), report)
        print(f"test accuracy {report['accuracy']:.4f}  macro F1 {report['macro_f1']:.4f}  "
              f"on {report['num_samples']} images", flush=True)
        if job.train.init_from:  # the model it started from, on the test images neither trained on
            summary["init_from_test"] = compare_with_init_from(job.train.init_from, result.best_checkpoint,
                                                               test, result.splits["train"])
    summary["reference"] = write_reference(result.best_checkpoint, result.splits["val"])
    t = job.train
    if result.mlflow_run_id:
        from imgcls.tracking import finish_training

        summary["mlflow_run_id"] = result.mlflow_run_id
        report = storage.join(result.best_checkpoint, TEST_METRICS_FILE) if len(test) else None
        finish_training(t.tracking_uri, result.mlflow_run_id, summary, result.run, result.best_checkpoint, report)
    if t.register:
        from imgcls.registry import register

        summary["registered"] = register(result.best_checkpoint, t.register, t.register_alias, t.tracking_uri)
        print(f"registered {summary['registered']['uri']}"
              + (f" as models:/{t.register}@{t.register_alias}" if t.register_alias else ""), flush=True)
    return summary


def compare_with_init_from(old: str, new: str, test: LabelledImages, train: LabelledImages) -> dict:
    """The old (``--init-from``) and the new model side by side on the test images
    neither trained on, of the classes the old model knows; prints how many there are.

    Neither model's training images count: the new model's ``train`` split, and the old
    one's saved training split (matched by path or by key, as ``prepare_splits`` pins
    files). A retrain keeps every earlier file's split, so those are usually all of the
    test split; an old checkpoint that saved no splits cannot say what it trained on,
    and the line says so. The images compared on are written beside the new model's
    test metrics as ``init_from_test.parquet``, a manifest to score them again.
    """
    from imgcls.checkpoint import read_split, write_manifest

    try:
        old_train = read_split(old, "train")
    except FileNotFoundError:
        old_train = None
    seen = set(train.paths) | set(train.split_keys())
    if old_train is not None:
        seen |= set(old_train.paths) | set(old_train.split_keys())
    untrained = [i for i, (p, k) in enumerate(zip(test.paths, test.split_keys())) if p not in seen and k not in seen]
    known = set(read_model_info(old).classes)  # new classes: the old model cannot say them
    keep = [i for i in untrained if test.labels[i] in known]
    compared = LabelledImages([test.paths[i] for i in keep], [test.labels[i] for i in keep],
                              [test.split_keys()[i] for i in keep])
    manifest = storage.join(new, INIT_FROM_TEST_FILE)
    write_manifest(manifest, compared)
    note = "" if old_train is not None else f" ({old} saved no training split: the images it trained on are not known)"
    print(f"test images neither model trained on: {len(untrained)} of {len(test)}{note}; "
          f"{len(keep)} of them of the {len(known)} classes --init-from {old} knows", flush=True)
    out = {"num_samples": len(keep), "untrained_test_images": len(untrained), "test_images": len(test),
           "manifest": manifest}
    if not len(compared):
        return out
    before, _ = evaluate_images(old, compared)
    after, _ = evaluate_images(new, compared)
    print(f"test accuracy {before['accuracy']:.4f}  macro F1 {before['macro_f1']:.4f}  on those {len(keep)} images "
          f"for --init-from {old} (new: {after['accuracy']:.4f}  macro F1 {after['macro_f1']:.4f})", flush=True)
    return {"accuracy": before["accuracy"], "macro_f1": before["macro_f1"], "new_accuracy": after["accuracy"],
            "new_macro_f1": after["macro_f1"], **out}


def demo_job(data_root: str, runs: str, epochs: Optional[int] = None) -> JobConfig:
    """The main job's recipe: the small CNN on 28x28 Fashion-MNIST with 2 CPU workers.

    The recipe that reached the accuracy target in the least wall time in bench/recipe.py
    (its trials are in bench/results/recipe.json); jobs/configs/fashion_mnist.yaml holds
    the same settings. ``epochs`` None keeps the recipe's.
    """
    recipe = TrainConfig(epochs=7, batch_size=128, lr=4e-3, weight_decay=0.05, warmup_epochs=1, schedule="onecycle",
                         label_smoothing=0.05, num_workers=2, storage_path=runs, name="fashion-mnist")
    return JobConfig(
        data=DataConfig(root=data_root, augment="none", val_fraction=0.1, test_fraction=0.1),
        model=ModelConfig(arch="small_cnn", image_size=28),
        train=dataclasses.replace(recipe, epochs=epochs or recipe.epochs),
    )


def run_demo(workdir: str, per_class: int = 1500, epochs: Optional[int] = None) -> dict:
    """Fetches Fashion-MNIST, trains and evaluates, then bulk-labels a folder to Parquet.

    The folder to label holds the test split's images plus one corrupt file, to show
    that every file gets a row.
    """
    from imgcls.datasets import fetch_fashion_mnist

    data = fetch_fashion_mnist(os.path.join(workdir, "data", "fashion-mnist"), per_class=per_class)
    job = demo_job(data, os.path.join(workdir, "runs"), epochs)
    # The demo starts afresh each time it runs (its decoded cache is kept).
    summary = run_training(dataclasses.replace(job, train=dataclasses.replace(job.train, overwrite=True)))
    inbox = os.path.join(workdir, "inbox")
    shutil.rmtree(inbox, ignore_errors=True)
    os.makedirs(inbox)
    from imgcls.training.trainer import prepare_splits

    for path in prepare_splits(job)[0]["test"].paths:
        shutil.copy(path, os.path.join(inbox, os.path.basename(path)))
    with open(os.path.join(inbox, "corrupt.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    output = os.path.join(workdir, "predictions")
    shutil.rmtree(output, ignore_errors=True)
    labelled = label_images(PredictConfig(model=summary["checkpoint"], input=inbox, output=output))
    summary["predict"] = asdict(labelled)
    return summary
