"""Evaluation of a trained model on labelled images, through the inference pipeline.

In: a model (checkpoint, ensemble or export) and labelled images (a folder, a manifest
or a checkpoint's test split), or an earlier predictions table. Out: metrics.json, the
predictions with their true labels, and the report (``evaluation.report``).
``evaluate_images`` labels with exactly the batch-inference code (``inference.pipeline``),
so that evaluation scores what ``imgcls predict`` outputs.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import ray

from imgcls import storage
from imgcls.checkpoint import load_checkpoint, read_model_info
from imgcls.devices import runs_here
from imgcls.evaluation.metrics import classification_report, confusion_matrix
from imgcls.paths import members
from imgcls.inference.pipeline import input_rows, predict, predict_here
from imgcls.inference.read import source_file
from imgcls.inference.schema import COL_LABEL, COL_PATH, COL_STATUS, COL_TOPK_LABELS, STATUS_OK
from imgcls.labelled import DataError, LabelledImages, encode_labels, list_labelled_images

COL_TRUE = "true_label"


def predict_labelled(model: str, images: LabelledImages, batch_size: Optional[int] = None, runtime: str = "torch",
                     num_actors: Optional[int] = None, in_process: Optional[bool] = None,
                     embeddings: bool = False, tta: str = "none") -> pd.DataFrame:
    """Predictions for ``images`` with a ``true_label`` column, one row per image.

    ``in_process`` labels them in this process with the pipeline's own stages
    (``pipeline.predict_here``) instead of an actor pool; None does so up to
    ``devices.IN_PROCESS_MAX_IMAGES`` images, where starting the pool would take longer.
    """
    if in_process is None:
        in_process = runs_here(len(images)) and num_actors is None
    if in_process:
        # Through Ray Data's own conversion, so that the columns have the pool's dtypes.
        df = ray.data.from_arrow(predict_here(images.paths, model, batch_size=batch_size, runtime=runtime,
                                              embeddings=embeddings, tta=tta)).to_pandas()
    else:
        df = predict(input_rows(images.paths), model, batch_size=batch_size, runtime=runtime,
                     num_actors=num_actors, embeddings=embeddings, tta=tta).to_pandas()
    truth = dict(zip(images.paths, images.labels))
    df[COL_TRUE] = df[COL_PATH].map(truth)
    return df.sort_values(COL_PATH).reset_index(drop=True)


def topk_key(report: dict) -> str:
    """The report's top-k accuracy key: 'top5_accuracy', or 'top2_accuracy' for 2 classes."""
    return f"top{report['top_k']}_accuracy"


def scorable_rows(df: pd.DataFrame, classes: Sequence[str]) -> tuple[pd.DataFrame, dict]:
    """The rows of ``df`` that can be scored against ``classes`` (and its error rows, which
    ``report_from_predictions`` counts), plus what was left out: ``unknown_true_label``
    (rows read fine whose true label the model does not know, such as the parent folder
    ``inbox`` of unlabelled files) and ``unknown_true_labels`` (up to 10 such labels, with
    their row counts).

    Raises DataError when no row is left to score.
    """
    ok = df[COL_STATUS] == STATUS_OK
    known = df[COL_TRUE].astype(str).isin(set(classes))
    unknown = df[ok & ~known][COL_TRUE].astype(str).value_counts()
    if not (ok & known).any():
        found = ", ".join(f"{label!r}: {n}" for label, n in unknown.head(5).items())
        raise DataError(
            f"no row to score: of {len(df)} predictions, {int((~ok).sum())} are error rows and {int(unknown.sum())} "
            f"have a true label the model does not know ({found or 'none'}); the model knows {list(classes)}; "
            "true labels come from a 'true_label' column, else from each file's parent folder name")
    left_out = {"unknown_true_label": int(unknown.sum()),
                "unknown_true_labels": {str(k): int(v) for k, v in unknown.head(10).items()}}
    return df[~ok | known], left_out


def left_out_line(report: dict) -> str | None:
    """One line saying which rows a report left out and why, or None when none."""
    errors, unknown = report.get("errors", 0), report.get("unknown_true_label", 0)
    if not errors and not unknown:
        return None
    reasons = []
    if unknown:
        labels = ", ".join(f"{label!r}: {n}" for label, n in report.get("unknown_true_labels", {}).items())
        reasons.append(f"{unknown} whose true label the model does not know ({labels})")
    if errors:
        reasons.append(f"{errors} error row(s) (files that could not be read)")
    return f"scored {report['num_samples']} rows; left out {' and '.join(reasons)}"


def report_from_predictions(df: pd.DataFrame, classes: Sequence[str]) -> dict:
    """Accuracy, top-k (``topk_key``), per-class and macro P/R/F1 and the confusion matrix.

    Rows whose image could not be read are counted in ``errors`` and left out of the
    metrics. Raises DataError on a true label the model does not know (``scorable_rows``
    leaves such rows out first).
    """
    import torch

    ok = df[df[COL_STATUS] == STATUS_OK]
    y = encode_labels(ok[COL_TRUE].astype(str).tolist(), classes)
    pred = encode_labels(ok[COL_LABEL].astype(str).tolist(), classes)
    cm = confusion_matrix(torch.from_numpy(y), torch.from_numpy(pred), len(classes))
    report = classification_report(cm, classes)
    k = min(5, len(classes))  # top-5, or top-k for fewer classes: the key names its k
    hits = [t in list(top)[:k] for t, top in zip(ok[COL_TRUE], ok[COL_TOPK_LABELS])]
    report["top_k"] = k
    report[topk_key(report)] = float(np.mean(hits)) if hits else 0.0
    report["errors"] = int(len(df) - len(ok))
    report["classes"] = list(classes)
    return report


def evaluate_images(model: str, images: LabelledImages, **kwargs) -> tuple[dict, pd.DataFrame]:
    """Runs the model (or comma-separated ensemble) over ``images`` and returns (metrics
    report, predictions)."""
    classes = read_model_info(members(model)[0]).classes
    encode_labels(images.labels, classes)  # fail fast on unknown labels, before any inference
    df = predict_labelled(model, images, **kwargs)
    return report_from_predictions(df, classes), df


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

    uri = storage.join(checkpoint, REFERENCE_FILE)
    write_frame(predict_labelled(checkpoint, images, embeddings=True), uri)
    return uri


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

    from imgcls.evaluation.report import write_report

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


def worst_mistakes(evaluation_folder: str, n: int, with_truth: bool = False) -> list:
    """Paths of the ``n`` most confident wrong predictions of an evaluation run; with
    ``with_truth``, (path, true label) pairs."""
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
    worst = wrong.sort_values("score", ascending=False).head(n)
    if with_truth:
        return list(zip(worst["path"].tolist(), worst[COL_TRUE].astype(str).tolist()))
    return worst["path"].tolist()
