"""Review queues: which predictions a person should look at first."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from imgcls.evaluation.review import select, topk_matrix, uncertainty


def table(topk, labels=None, embeddings=None):
    n = len(topk)
    df = pd.DataFrame({"path": [f"/x/{i}.png" for i in range(n)], "label": labels or ["a"] * n,
                       "score": [t[0] for t in topk], "topk_scores": topk})
    if embeddings is not None:
        df["embedding"] = list(embeddings)
    return df


def test_topk_matrix_pads_short_rows_and_keeps_order():
    m = topk_matrix(pa.array([[0.7, 0.2, 0.1], [0.9], []], pa.list_(pa.float32())))
    assert m.shape == (3, 3)
    assert np.allclose(m, [[0.7, 0.2, 0.1], [0.9, 0, 0], [0, 0, 0]])


def test_uncertainty_by_hand():
    m = np.array([[0.5, 0.4, 0.1], [0.9, 0.05, 0.05], [0.4, 0.1, 0.1]])
    assert np.allclose(uncertainty(m, "margin"), [0.9, 0.15, 0.7])
    assert np.allclose(uncertainty(m, "least-confident"), [0.5, 0.1, 0.6])
    # the 0.4 left outside the third row's top 3 counts as one more outcome
    p = np.array([0.4, 0.1, 0.1, 0.4])
    assert uncertainty(m, "entropy")[2] == pytest.approx(-(p * np.log(p)).sum())
    assert uncertainty(m, "entropy")[1] < uncertainty(m, "entropy")[0]
    r = uncertainty(m, "random", seed=1)
    assert np.array_equal(r, uncertainty(m, "random", seed=1)) and not np.array_equal(r, uncertainty(m, "random", 2))
    with pytest.raises(ValueError, match="strategy must be one of"):
        uncertainty(m, "smallest")


def test_select_takes_the_most_uncertain_and_spreads_over_classes_on_request():
    topk = [[0.95, 0.05], [0.5, 0.5], [0.6, 0.4], [0.9, 0.1], [0.55, 0.45], [0.8, 0.2]]
    labels = ["a", "a", "a", "b", "a", "b"]
    picks = select(table(topk, labels), "margin", 3)
    assert picks["path"].tolist() == ["/x/1.png", "/x/4.png", "/x/2.png"]  # margins 0, 0.1, 0.2
    assert picks.columns.tolist() == ["path", "predicted_label", "score", "uncertainty", "label"]
    assert (picks["label"] == "").all() and picks["uncertainty"].is_monotonic_decreasing
    spread = select(table(topk, labels), "margin", 4, per_class=True)
    assert spread["predicted_label"].tolist() == ["a", "b", "a", "b"]
    assert spread["path"].tolist() == ["/x/1.png", "/x/5.png", "/x/4.png", "/x/3.png"]


def test_dedup_skips_near_duplicates_by_embedding():
    topk = [[0.5, 0.5], [0.51, 0.49], [0.6, 0.4], [0.7, 0.3]]
    emb = np.array([[1, 0, 0], [0.999, 0.01, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    assert select(table(topk, embeddings=emb), "margin", 3)["path"].tolist() == ["/x/0.png", "/x/1.png", "/x/2.png"]
    picks = select(table(topk, embeddings=emb), "margin", 3, dedup=0.98)
    assert picks["path"].tolist() == ["/x/0.png", "/x/2.png", "/x/3.png"]
