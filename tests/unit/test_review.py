"""Review queues: which predictions a person should look at first."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from imgcls.evaluation.review import STRATEGIES, review_predictions, select, topk_matrix, uncertainty


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


@pytest.fixture(scope="module")
def labelling_run(fmnist_root, tmp_path_factory):
    """Real labelling output with embeddings (an untrained small CNN over 10 Fashion-MNIST
    files a class and one corrupt file, labelled in process with the pipeline's own
    stage), its rows repeated three times under distinct paths, so that every uncertainty
    ties thrice, and written as four parts of unequal sizes: (folder, whole table)."""
    import os

    import pyarrow.parquet as pq
    import torch

    from imgcls.checkpoint import save_checkpoint
    from imgcls.config import JobConfig, ModelConfig
    from imgcls.inference.pipeline import predict_here
    from imgcls.models import create_model

    tmp = tmp_path_factory.mktemp("review-run")
    classes = sorted(d for d in os.listdir(fmnist_root) if os.path.isdir(os.path.join(fmnist_root, d)))
    torch.manual_seed(0)
    save_checkpoint(str(tmp / "ckpt"), create_model("small_cnn", 10), JobConfig(model=ModelConfig(image_size=28)),
                    classes, history=[])
    paths = [os.path.join(fmnist_root, c, name) for c in classes for name in sorted(os.listdir(os.path.join(
        fmnist_root, c)))[:10]]
    (tmp / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rows = predict_here(paths + [str(tmp / "corrupt.png")], str(tmp / "ckpt"), embeddings=True)
    assert pc.sum(pc.equal(rows.column("status"), "ok")).as_py() == 100
    whole = pa.concat_tables([rows.set_column(0, "path", pc.binary_join_element_wise(
        f"/copy{j}", rows.column("path"), "")) for j in range(3)])
    folder = tmp / "labels"
    folder.mkdir()
    for part, (lo, hi) in enumerate([(0, 50), (50, 51), (51, 200), (200, whole.num_rows)]):
        pq.write_table(whole.slice(lo, hi - lo), folder / f"part-{part:06d}.parquet")
    return str(folder), whole


def whole_table_picks(whole, strategy, n, per_class=False, dedup=None, seed=0):
    """The picks as review made them before it read in batches: every ok row in one
    frame, sorted whole (kept here as the reference the batched reading must equal)."""
    df = whole.filter(pc.equal(whole.column("status"), "ok")).to_pandas()
    scores = uncertainty(topk_matrix(pa.array(df["topk_scores"])), strategy, seed)
    order = np.argsort(-scores, kind="stable")
    if per_class:
        labels = df["label"].to_numpy()[order]
        order = order[np.lexsort((np.arange(len(order)), pd.Series(labels).groupby(labels).cumcount().to_numpy()))]
    if dedup is None:
        picked = order[:n]
    else:
        emb = np.stack(df["embedding"].to_numpy()).astype(np.float32)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        picked, kept = [], np.zeros((0, emb.shape[1]), np.float32)
        for i in order:
            if len(picked) == n:
                break
            if not len(kept) or float((kept @ emb[i]).max()) <= dedup:
                picked.append(i)
                kept = np.vstack([kept, emb[i]])
    return df["path"].to_numpy()[np.array(picked, dtype=np.int64)].tolist(), scores[picked]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batched_reading_picks_what_sorting_the_whole_table_picks(labelling_run, strategy, monkeypatch):
    """Batches of 7 rows over four parts, ties in every uncertainty: the same picks in the
    same order as sorting all rows at once, per class and with --dedup too (where the
    repeated rows' identical embeddings skip two rows of every three, so the rows kept at
    first run out and review keeps more, its walk reading embeddings 5 rows at a time)."""
    from imgcls.evaluation import review

    monkeypatch.setattr(review, "EMBEDDING_ROWS", 5)
    folder, whole = labelling_run
    for n, per_class, dedup in [(1, False, None), (25, False, None), (25, True, None), (1000, False, None),
                                (12, False, 0.999), (40, True, 0.999), (40, False, 0.5)]:
        picks, rows = review_predictions(folder, strategy, n, per_class=per_class, dedup=dedup, seed=3, batch_rows=7)
        paths, scores = whole_table_picks(whole, strategy, n, per_class=per_class, dedup=dedup, seed=3)
        assert rows == 300 and picks["path"].tolist() == paths, (n, per_class, dedup)
        assert np.array_equal(picks["uncertainty"].to_numpy(), scores)
    assert len(review_predictions(folder, strategy, 40, dedup=0.999, batch_rows=7)[0]) == 40  # 100 distinct rows
