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

    Classes with no predictions (or no support) get precision (or recall) 0, the
    convention scikit-learn uses with ``zero_division=0``.
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
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
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
