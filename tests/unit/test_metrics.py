import numpy as np
import pytest
import torch

from imgcls.evaluation.metrics import accuracy, classification_report, confusion_matrix, inverse_frequency_weights


def test_accuracy_topk():
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    target = torch.tensor([1, 1, 0])
    top1, top2 = accuracy(logits, target, topk=(1, 2))
    assert top1 == pytest.approx(1 / 3) and top2 == pytest.approx(2 / 3)


def test_report_matches_hand_computation():
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    p = torch.tensor([0, 0, 1, 1, 2, 2])
    cm = confusion_matrix(y, p, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    r = classification_report(cm, ["a", "b", "c"])
    assert r["accuracy"] == 4 / 6
    # precision a=2/2, b=1/2, c=1/2; recall a=2/3, b=1/2, c=1/1
    assert np.isclose(r["per_class"]["a"]["precision"], 1.0)
    assert np.isclose(r["per_class"]["b"]["recall"], 0.5)
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 * 1 / 1.5]
    assert np.isclose(r["macro_f1"], np.mean(f1))
    assert r["per_class"]["c"]["support"] == 1


def test_class_without_predictions_scores_zero():
    r = classification_report(np.array([[3, 0], [2, 0]]), ["x", "y"])
    assert r["per_class"]["y"]["precision"] == 0.0 and r["per_class"]["y"]["f1"] == 0.0


def test_inverse_frequency_weights():
    w = inverse_frequency_weights([90, 10])
    assert torch.allclose(w, torch.tensor([100 / 180, 100 / 20]))
    assert torch.allclose(inverse_frequency_weights([5, 5, 5]), torch.ones(3))


def test_macro_averages_leave_out_classes_absent_from_targets_and_predictions():
    """scikit-learn's macro averages (labels taken from the data): a class with neither
    support nor predictions is not averaged in; one with predictions but no support is,
    with recall 0 (hand-computed: sklearn gives the same numbers)."""
    classes = ["a", "b", "c", "d", "e"]  # d: predicted once, never true; e: absent
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    p = torch.tensor([0, 1, 1, 1, 2, 3])
    r = classification_report(confusion_matrix(y, p, 5), classes)
    precision = [1.0, 2 / 3, 1.0, 0.0]  # a, b, c, d
    recall = [0.5, 1.0, 0.5, 0.0]
    f1 = [2 * pr * rc / (pr + rc) if pr + rc else 0.0 for pr, rc in zip(precision, recall)]
    assert r["macro_classes"] == 4
    assert np.isclose(r["macro_precision"], np.mean(precision)) and np.isclose(r["macro_recall"], np.mean(recall))
    assert np.isclose(r["macro_f1"], np.mean(f1))
    assert r["per_class"]["e"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert classification_report(np.zeros((2, 2)), ["x", "y"])["macro_f1"] == 0.0
