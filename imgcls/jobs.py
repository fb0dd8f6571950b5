"""Whole jobs composed from the library: what the CLI commands and jobs/ scripts run."""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import asdict
from typing import Optional

from imgcls import storage
from imgcls.bulk import label_images
from imgcls.config import DataConfig, JobConfig, ModelConfig, PredictConfig, TrainConfig
from imgcls.checkpoint import load_checkpoint, read_model_info
from imgcls.data import LabelledImages, list_labelled_images
from imgcls.finished import members
from imgcls.evaluate import COL_TRUE, evaluate_images, report_from_predictions, scorable_rows, topk_key
from imgcls.reader import source_file
from imgcls.train import fit

TEST_METRICS_FILE = "test_metrics.json"


def run_training(job: JobConfig) -> dict:
    """Trains ``job``, evaluates the best checkpoint on the test split, returns a summary.

    The test metrics are written beside the run's checkpoints as test_metrics.json.
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
        if job.train.init_from:  # the model it started from, on the same test split
            known = set(read_model_info(job.train.init_from).classes)  # new classes: the old model cannot say them
            keep = [i for i, c in enumerate(test.labels) if c in known]
            old, _ = evaluate_images(job.train.init_from, LabelledImages([test.paths[i] for i in keep],
                                                                         [test.labels[i] for i in keep]))
            summary["init_from_test"] = {k: old[k] for k in ("accuracy", "macro_f1", "num_samples")}
            print(f"test accuracy {old['accuracy']:.4f}  macro F1 {old['macro_f1']:.4f}  on "
                  f"{old['num_samples']} images for --init-from {job.train.init_from} (new: {report['accuracy']:.4f})",
                  flush=True)
    summary["reference"] = write_reference(result.best_checkpoint, result.splits["val"])
    return summary


REFERENCE_FILE = "reference.parquet"


def write_frame(df, uri: str) -> None:
    """Writes a frame of prediction rows as Parquet at ``uri`` with pyarrow, without
    pandas' metadata: that records the list columns as pandas' Arrow-backed dtypes, which
    pandas cannot read back ("data type 'list<item: string>[pyarrow]' not understood");
    without it they read back as lists."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with storage.open_uri(uri, "wb") as f:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(None), f)


def write_reference(checkpoint: str, images: LabelledImages) -> str:
    """The checkpoint's own predictions (with embeddings) of ``images``, its validation
    split, saved as ``reference.parquet`` in the checkpoint: the reference that
    ``imgcls monitor --reference CHECKPOINT`` compares later labelling runs with."""
    from imgcls.evaluate import predict_labelled

    uri = storage.join(checkpoint, REFERENCE_FILE)
    write_frame(predict_labelled(checkpoint, images, embeddings=True), uri)
    return uri


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
    from imgcls.train import prepare_splits

    for path in prepare_splits(job)[0]["test"].paths:
        shutil.copy(path, os.path.join(inbox, os.path.basename(path)))
    with open(os.path.join(inbox, "corrupt.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    output = os.path.join(workdir, "predictions")
    shutil.rmtree(output, ignore_errors=True)
    labelled = label_images(PredictConfig(model=summary["checkpoint"], input=inbox, output=output))
    summary["predict"] = asdict(labelled)
    return summary


PREDICTIONS_FILE = "predictions.parquet"


def run_evaluation(model: str, output: str, data: str | None = None, predictions: str | None = None,
                   tta: str = "none") -> dict:
    """Evaluates ``model`` on labelled ``data`` (runs inference) or on existing ``predictions``.

    ``model`` may be an ensemble (comma-separated checkpoints; ``tta`` 'flip' adds the
    mirrored view): the curves and the training-overlap count come from its first member.

    Writes metrics.json, the PNG plots, report.html and predictions.parquet to ``output``.
    Predictions whose true label the model does not know are left out (counted in
    ``unknown_true_label``; ``evaluate.scorable_rows``), as are error rows (``errors``);
    DataError when none is left. Returns the headline metrics, those counts, ``num_samples``
    (rows scored) and the files written.
    """
    import pyarrow.parquet as pq

    from imgcls.report import write_report

    first = members(model)[0]
    classes = read_model_info(first).classes
    overlap = {}
    if data:
        images = list_labelled_images(data)
        overlap = {"training_overlap": max(training_overlap(m, images.paths) for m in members(model))}
        report, df = evaluate_images(model, images, embeddings=True, tta=tta)  # for the report's embedding map
    else:
        fs, path = storage.filesystem(predictions)
        df = pq.read_table(path, filesystem=fs).to_pandas()
        if COL_TRUE not in df.columns:
            # the parent folder of each file (of the tar, for tar members)
            df[COL_TRUE] = df["path"].map(source_file).str.rsplit("/", n=2).str[-2]
        df, left_out = scorable_rows(df, classes)
        report = {**report_from_predictions(df, classes), **left_out}
    os.makedirs(output, exist_ok=True)
    write_frame(df, os.path.join(output, PREDICTIONS_FILE))
    history = load_checkpoint(first).history
    files = write_report(output, report, df, COL_TRUE, history=history)
    counts = {k: report[k] for k in ("num_samples", "errors", "unknown_true_label", "unknown_true_labels")
              if k in report}
    return {**{k: report[k] for k in ("accuracy", topk_key(report), "macro_f1")}, **counts, **overlap, **files}


def training_overlap(model: str, paths: list[str]) -> int:
    """How many of ``paths`` are in the checkpoint's saved training split (0 when it saved none)."""
    from imgcls.checkpoint import split_manifest

    try:
        train = list_labelled_images(split_manifest(model, "train"), check_paths=False)
    except FileNotFoundError:
        return 0
    seen = {os.path.normpath(p) for p in train.paths}
    return sum(os.path.normpath(p) in seen for p in paths)


def worst_mistakes(evaluation_folder: str, n: int) -> list[str]:
    """Paths of the ``n`` most confident wrong predictions of an evaluation run."""
    import pyarrow.parquet as pq

    # Only the columns needed, without the pandas metadata: the file holds list columns
    # whose pyarrow-backed pandas dtypes pandas cannot read back ("data type
    # 'list<item: string>[pyarrow]' not understood").
    columns = ["path", "status", "label", "score", COL_TRUE]
    path = os.path.join(evaluation_folder, PREDICTIONS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{evaluation_folder} holds no {PREDICTIONS_FILE}: give the --output folder of an "
                                "imgcls evaluate run")
    df = pq.read_table(path, columns=columns).to_pandas(ignore_metadata=True)
    wrong = df[(df["status"] == "ok") & df[COL_TRUE].notna() & (df["label"] != df[COL_TRUE])]
    return wrong.sort_values("score", ascending=False).head(n)["path"].tolist()
