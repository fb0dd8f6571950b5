"""Evaluation of a trained model on labelled images, through the inference pipeline.

``evaluate_images`` labels a LabelledImages set with exactly the batch-inference code
path (its actor pool, or for a few hundred images its stage in this process), then
``report_from_predictions`` turns predictions plus true labels into metrics. Plots live
in ``imgcls.report``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
import ray

from imgcls.cache import runs_here
from imgcls.checkpoint import read_model_info
from imgcls.data import DataError, LabelledImages, encode_labels
from imgcls.metrics import classification_report, confusion_matrix
from imgcls.predict import input_rows, predict, predict_here
from imgcls.reader import COL_LABEL, COL_PATH, COL_STATUS, COL_TOPK_LABELS, STATUS_OK

COL_TRUE = "true_label"


def predict_labelled(model: str, images: LabelledImages, batch_size: Optional[int] = None, runtime: str = "torch",
                     num_actors: Optional[int] = None, in_process: Optional[bool] = None,
                     embeddings: bool = False, tta: str = "none") -> pd.DataFrame:
    """Predictions for ``images`` with a ``true_label`` column, one row per image.

    ``in_process`` labels them in this process with the pipeline's own stages
    (``predict.predict_here``) instead of an actor pool; None does so up to
    ``cache.IN_PROCESS_MAX_IMAGES`` images, where starting the pool would take longer.
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
    from imgcls.finished import members

    classes = read_model_info(members(model)[0]).classes
    encode_labels(images.labels, classes)  # fail fast on unknown labels, before any inference
    df = predict_labelled(model, images, **kwargs)
    return report_from_predictions(df, classes), df
