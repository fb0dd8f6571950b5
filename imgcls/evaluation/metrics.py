"""Classification metrics as pure functions of tensors / arrays. Nothing here logs."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def accuracy(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """Fraction of rows whose target is among the top-k logits, for each k."""
    maxk = min(max(topk), output.shape[1])
    pred = output.topk(maxk, dim=1).indices  # (B, maxk)
    correct = pred.eq(target[:, None])  # (B, maxk)
    return [correct[:, : min(k, maxk)].any(dim=1).float().mean().item() for k in topk]


def confusion_matrix(target: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts; rows are true classes, columns predicted classes."""
    idx = target.to(torch.int64) * num_classes + pred.to(torch.int64)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_report(cm: np.ndarray | torch.Tensor, classes: Sequence[str]) -> dict:
    """Accuracy, per-class and macro precision/recall/F1 from a confusion matrix.

    scikit-learn's definitions (``precision_recall_fscore_support`` with
    ``zero_division=0``, labels from the data): a class with no predictions has
    precision 0, one with no support recall 0, and the macro averages are over the
    classes that occur in the targets or the predictions, so a class absent from both
    (a 10-class model evaluated on 3 classes' images) does not pull them down. Per-class
    figures are given for every class.
    """
    cm = np.asarray(cm.cpu() if isinstance(cm, torch.Tensor) else cm, dtype=np.float64)
    tp = np.diag(cm)
    predicted = cm.sum(axis=0)
    support = cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    total = cm.sum()
    present = (support > 0) | (predicted > 0)
    macro = (lambda v: float(v[present].mean())) if present.any() else (lambda v: 0.0)  # noqa: E731
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_precision": macro(precision),
        "macro_recall": macro(recall),
        "macro_f1": macro(f1),
        "macro_classes": int(present.sum()),  # classes the macro averages are over
        "num_samples": int(total),
        "per_class": {
            c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
        "confusion_matrix": cm.astype(np.int64).tolist(),
    }


def inverse_frequency_weights(counts: Sequence[int]) -> torch.Tensor:
    """Loss weights ``N / (C * n_c)``: 1.0 for every class when balanced."""
    counts_t = torch.tensor(counts, dtype=torch.float32).clamp(min=1)
    return counts_t.sum() / (len(counts) * counts_t)
