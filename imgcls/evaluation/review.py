"""Review queues: the predictions of a labelling run that a person should look at first.

In: a predictions folder or file (``imgcls predict``'s Parquet; error rows are left
out). Out: ``review.csv``, a manifest of the picks (``path``, ``predicted_label``,
``score``, ``uncertainty``, and an empty ``label`` column for the person to fill in; a
filled-in manifest is training input, ``--root review.csv``), and ``review.html``, a
contact sheet of the picks with their predicted labels and scores.

Uncertainty is computed from the top-k scores every prediction row carries:
- ``margin``: 1 - (p1 - p2), the classic margin sampling (Scheffer et al. 2001);
- ``least-confident``: 1 - p1;
- ``entropy``: the entropy of the top-k scores, with the probability left outside the
  top k counted as one more outcome (exact when k covers all classes);
- ``random``: a seeded random order, the baseline the others must beat.
"""

from __future__ import annotations

import base64
import html
import io
import os
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from imgcls import storage

STRATEGIES = ("margin", "entropy", "least-confident", "random")


class ReviewError(ValueError):
    """Predictions that cannot be reviewed as asked (none ok, no embeddings for --dedup)."""

REVIEW_FILE, SHEET_FILE = "review.csv", "review.html"


def read_predictions(uri: str, embeddings: bool = False) -> pd.DataFrame:
    """The ok rows of a predictions folder or file, with only the columns review needs."""
    import pyarrow.dataset as ds

    fs, path = storage.filesystem(uri)
    dataset = ds.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=True)
    columns = ["path", "status", "label", "score", "topk_scores"]
    if embeddings and "embedding" not in dataset.schema.names:
        raise ReviewError(f"{uri} has no embeddings: label with --embeddings, or review without --dedup")
    table = dataset.to_table(columns=columns + (["embedding"] if embeddings else []),
                             filter=pc.field("status") == "ok")
    return table.to_pandas()


def topk_matrix(topk_scores: pa.Array | pd.Series) -> np.ndarray:
    """(n, k) scores, highest first; rows with fewer than k scores padded with zeros."""
    lists = pa.array(topk_scores) if not isinstance(topk_scores, pa.Array) else topk_scores
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    k = int(lengths.max()) if len(lengths) else 0
    out = np.zeros((len(lengths), k), np.float64)
    flat = pc.list_flatten(lists).to_numpy(zero_copy_only=False)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, cols] = flat
    return out


def uncertainty(topk: np.ndarray, strategy: str, seed: int = 0) -> np.ndarray:
    """Higher is more worth a look; ``topk`` as ``topk_matrix`` gives it."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    n = len(topk)
    p1 = topk[:, 0] if topk.shape[1] else np.zeros(n)
    if strategy == "random":
        return np.random.default_rng(seed).random(n)
    if strategy == "least-confident":
        return 1 - p1
    if strategy == "margin":
        p2 = topk[:, 1] if topk.shape[1] > 1 else np.zeros(n)
        return 1 - (p1 - p2)
    rest = np.clip(1 - topk.sum(1, keepdims=True), 0, 1)
    p = np.concatenate([topk, rest], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0).sum(1)


def _spread(order: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``order`` re-ranked so that predicted classes take turns, each in its own order."""
    rank_in_class = pd.Series(labels[order]).groupby(labels[order]).cumcount().to_numpy()
    return order[np.lexsort((np.arange(len(order)), rank_in_class))]


def select(df: pd.DataFrame, strategy: str, n: int, per_class: bool = False, dedup: Optional[float] = None,
           seed: int = 0) -> pd.DataFrame:
    """The ``n`` rows to review, most uncertain first.

    Args:
        df: Prediction rows (``read_predictions``).
        strategy: One of STRATEGIES.
        n: How many to pick (fewer when there are fewer rows).
        per_class: Predicted classes take turns, so that each gets its share of the picks.
        dedup: Skip a row whose embedding has cosine similarity above this with one
            already picked (near-duplicates need one look, not several).
        seed: Seed of ``random``.
    """
    if n < 1:
        raise ValueError("n must be positive")
    scores = uncertainty(topk_matrix(df["topk_scores"]), strategy, seed)
    order = np.argsort(-scores, kind="stable")
    if per_class:
        order = _spread(order, df["label"].to_numpy())
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
        picked = np.array(picked, dtype=np.int64)
    out = df.iloc[picked][["path", "label", "score"]].rename(columns={"label": "predicted_label"})
    out["uncertainty"] = scores[picked]
    out["label"] = ""
    return out.reset_index(drop=True)


def _thumbnails(paths: list[str], side: int = 128) -> dict[str, str]:
    """A data: URI per path of ``paths`` (files or tar members), '' for an unreadable one.

    Read as labelling reads (``read.iter_inputs``): each tar streamed once for all of its
    picks, not once per pick; only the small thumbnails are kept.
    """
    from PIL import Image

    from imgcls.inference.read import iter_inputs

    out = {}
    for path, data in iter_inputs(paths):
        try:
            if isinstance(data, BaseException):
                raise data
            image = Image.open(io.BytesIO(data)).convert("RGB")
            image.thumbnail((side, side))
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=85)
            out[path] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        except Exception:  # noqa: BLE001 - a file gone since labelling shows as a blank cell
            out[path] = ""
    return out


def write_review(picks: pd.DataFrame, output: str, strategy: str) -> dict:
    """Writes review.csv and review.html under ``output``; returns their paths and the count."""
    os.makedirs(output, exist_ok=True)
    csv = os.path.join(output, REVIEW_FILE)
    picks.to_csv(csv, index=False)
    cells = []
    thumbnails = _thumbnails(picks["path"].tolist())
    for row in picks.itertuples():
        src = thumbnails.get(row.path, "")
        image = f'<img src="{src}" alt="">' if src else "<div class=missing>unreadable</div>"
        cells.append(f'<figure>{image}<figcaption>{html.escape(str(row.predicted_label))} '
                     f'{row.score:.3f}<br><small>{html.escape(os.path.basename(row.path))}</small></figcaption></figure>')
    sheet = os.path.join(output, SHEET_FILE)
    with open(sheet, "w") as f:
        f.write("<!doctype html><meta charset=utf-8><title>imgcls review</title><style>"
                "body{font-family:sans-serif}figure{display:inline-block;margin:6px;width:140px;"
                "vertical-align:top}img{max-width:128px}figcaption{font-size:12px}</style>"
                f"<h1>{len(picks)} predictions to review ({html.escape(strategy)})</h1>"
                f"<p>Fill in the <code>label</code> column of {REVIEW_FILE}; the filled-in file "
                "is training input (<code>imgcls train --root review.csv</code>).</p>" + "".join(cells))
    return {"picks": len(picks), "manifest": csv, "contact_sheet": sheet}


def run_review(predictions: str, output: str, strategy: str = "margin", n: int = 100, per_class: bool = False,
               dedup: Optional[float] = None, seed: int = 0) -> dict:
    df = read_predictions(predictions, embeddings=dedup is not None)
    if df.empty:
        raise ReviewError(f"{predictions} has no prediction rows with status ok")
    picks = select(df, strategy, n, per_class=per_class, dedup=dedup, seed=seed)
    return {**write_review(picks, output, strategy), "strategy": strategy, "rows": len(df),
            "mean_uncertainty": float(picks["uncertainty"].mean())}
