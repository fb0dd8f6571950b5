"""imgcls's metrics against scikit-learn's, on a real model's predictions of real images.

imgcls computes its report from a confusion matrix (so that a table of any size is
scored batch by batch) and claims scikit-learn's definitions (``zero_division=0``,
macro averages over the classes in the targets or predictions); scikit-learn is the
reference here. The model is a small CNN trained for a moment on 6 Fashion-MNIST
classes: weak enough that it confuses classes, so that every cell of the definitions
counts (precision 0, recall 0, classes predicted but absent from the targets).
"""

import os

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import train_small_cnn
from imgcls.datasets import FASHION_MNIST_CLASSES
from imgcls.evaluation.evaluate import COL_TRUE, report_from_predictions
from imgcls.evaluation.metrics import accuracy, classification_report, confusion_matrix
from imgcls.inference.pipeline import predict_here
from imgcls.inference.schema import COL_LABEL, COL_PATH, COL_TOPK_LABELS, COL_TOPK_SCORES

metrics = pytest.importorskip("sklearn.metrics")

KNOWN = 6  # classes the model is trained on: the first 6 of the 10


@pytest.fixture(scope="module")
def predictions(fmnist_root, tmp_path_factory):
    """(10 class names, predictions table, a class the model predicts that has no images):
    the model's top-6 labels and scores (every class it knows, ranked) of 30 unseen images
    of each of classes 0-7 but one (6-7: classes it does not know, so never predicted).
    The class left out is the known class it predicts most often for other classes'
    images: predicted, yet absent from the targets. 8-9 have neither images nor predictions."""
    classes = list(FASHION_MNIST_CLASSES)
    names = {c: sorted(os.listdir(os.path.join(fmnist_root, c))) for c in classes}
    folder = train_small_cnn(fmnist_root, {c: names[c][:60] for c in classes[:KNOWN]},
                             str(tmp_path_factory.mktemp("metrics-sklearn") / "model"), epochs=2, width=16)
    test = {os.path.join(fmnist_root, c, n): c for c in classes[:8] for n in names[c][100:130]}
    df = predict_here(list(test), folder, top_k=KNOWN).to_pandas()
    df[COL_TRUE] = df[COL_PATH].map(test)
    wrong = df[COL_LABEL][df[COL_LABEL] != df[COL_TRUE]].value_counts()
    absent = wrong.index[0]
    return classes, df[df[COL_TRUE] != absent].reset_index(drop=True), absent


def _scores(df: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """(N, 6) softmax scores, columns in class order, from each row's ranked top-6 lists."""
    out = np.zeros((len(df), KNOWN))
    for i, (labels, scores) in enumerate(zip(df[COL_TOPK_LABELS], df[COL_TOPK_SCORES])):
        out[i, [classes.index(c) for c in labels]] = scores
    return out


def _assert_report_matches(report: dict, y: np.ndarray, p: np.ndarray, classes: list[str]) -> None:
    """``report`` (imgcls) against scikit-learn's, per class over ``classes`` and macro
    averaged over the labels in the data, as sklearn's report takes them."""
    labels = list(range(len(classes)))
    precision, recall, f1, support = metrics.precision_recall_fscore_support(y, p, labels=labels, average=None,
                                                                             zero_division=0)
    for i, c in enumerate(classes):
        got = report["per_class"][c]
        assert got["precision"] == pytest.approx(precision[i], abs=1e-12), c
        assert got["recall"] == pytest.approx(recall[i], abs=1e-12), c
        assert got["f1"] == pytest.approx(f1[i], abs=1e-12), c
        assert got["support"] == support[i], c
    ref = metrics.classification_report(y, p, output_dict=True, zero_division=0)  # labels from the data
    assert report["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
    assert report["accuracy"] == pytest.approx(metrics.accuracy_score(y, p), abs=1e-12)
    for ours, theirs in (("macro_precision", "precision"), ("macro_recall", "recall"), ("macro_f1", "f1-score")):
        assert report[ours] == pytest.approx(ref["macro avg"][theirs], abs=1e-12), ours
    assert report["macro_classes"] == len(set(y) | set(p)) and report["num_samples"] == ref["macro avg"]["support"]
    assert report["confusion_matrix"] == metrics.confusion_matrix(y, p, labels=labels).tolist()


def test_report_of_the_model_classes_matches_sklearn(predictions):
    """The evaluation path (predictions table -> Tally -> report) over the 6 classes the
    model knows, on the images of those classes (one predicted but without images, others
    never predicted): accuracy, per-class
    and macro P/R/F1, the confusion matrix, and top-3 accuracy, as scikit-learn gives them."""
    classes, df, absent = predictions
    known = classes[:KNOWN]
    df = df[df[COL_TRUE].isin(known)]
    report = report_from_predictions(df, known)
    y = np.array([known.index(c) for c in df[COL_TRUE]])
    p = np.array([known.index(c) for c in df[COL_LABEL]])
    a = known.index(absent)
    assert a not in y and a in p and set(range(KNOWN)) - set(p)  # predicted without images; never predicted
    _assert_report_matches(report, y, p, known)
    scores = _scores(df, known)
    assert (scores.argmax(1) == p).all()
    ref = [metrics.top_k_accuracy_score(y, scores, k=k, labels=range(KNOWN)) for k in (1, 3)]
    # metrics.accuracy (training's val accuracy) averages in float32: equal to float32's precision.
    assert accuracy(torch.from_numpy(scores), torch.from_numpy(y), topk=(1, 3)) == pytest.approx(ref, abs=1e-6)
    report = report_from_predictions(df.assign(**{COL_TOPK_LABELS: df[COL_TOPK_LABELS].map(lambda v: v[:3])}), known)
    assert report["top3_accuracy"] == pytest.approx(ref[1], abs=1e-12)


def test_report_over_the_full_class_list_matches_sklearn(predictions):
    """metrics.confusion_matrix and classification_report over all 10 classes, with the
    images of two classes the model does not know (support, never predicted), one class it
    predicts without images (no support) and two with neither: per class over the 10,
    macro averages over the classes in the data, as scikit-learn gives them."""
    classes, df, absent = predictions
    y = np.array([classes.index(c) for c in df[COL_TRUE]])
    p = np.array([classes.index(c) for c in df[COL_LABEL]])
    a = classes.index(absent)
    assert {6, 7} <= set(y) - set(p) and a in set(p) - set(y) and not {8, 9} & (set(y) | set(p))
    cm = confusion_matrix(torch.from_numpy(y), torch.from_numpy(p), len(classes))
    assert cm.tolist() == metrics.confusion_matrix(y, p, labels=range(len(classes))).tolist()
    _assert_report_matches(classification_report(cm, classes), y, p, classes)
