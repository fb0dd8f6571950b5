"""Review queues: the predictions of a labelling run that a person should look at first.

In: a predictions folder or file (``imgcls predict``'s Parquet; error rows are left
out). Out: ``review.csv``, a manifest of the picks (``path``, ``predicted_label``,
``score``, ``uncertainty``, and an empty ``label`` column for the person to fill in; a
filled-in manifest is training input, ``--root review.csv``), and ``review.html``, a
contact sheet of the picks with their predicted labels and scores. The predictions are
read in batches (``evaluation.scan``), only the columns review needs, keeping the rows
first in review order (``ReviewQueue``): a run of 10 million rows takes the memory of
one of a million.

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

from imgcls.evaluation.scan import BATCH_ROWS, OK_ROWS, open_predictions, scan
from imgcls.inference.schema import COL_EMBEDDING, COL_LABEL, COL_PATH, COL_SCORE, COL_TOPK_SCORES

STRATEGIES = ("margin", "entropy", "least-confident", "random")


class ReviewError(ValueError):
    """Predictions that cannot be reviewed as asked (none ok, no embeddings for --dedup)."""

REVIEW_FILE, SHEET_FILE = "review.csv", "review.html"


def topk_matrix(topk_scores: pa.Array | pa.ChunkedArray | pd.Series) -> np.ndarray:
    """(n, k) scores, highest first; rows with fewer than k scores padded with zeros."""
    if isinstance(topk_scores, pa.ChunkedArray):
        lists = topk_scores.combine_chunks()
    else:
        lists = topk_scores if isinstance(topk_scores, pa.Array) else pa.array(topk_scores)
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    k = int(lengths.max()) if len(lengths) else 0
    out = np.zeros((len(lengths), k), np.float64)
    flat = pc.list_flatten(lists).to_numpy(zero_copy_only=False)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, cols] = flat
    return out


def uncertainty(topk: np.ndarray, strategy: str, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Higher is more worth a look; ``topk`` as ``topk_matrix`` gives it.

    ``random`` draws one number a row from ``seed``; given a Generator, it goes on drawing
    from it, so that batches in turn get the numbers one call over all their rows would.
    """
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


def _rank_in_class(labels: np.ndarray) -> np.ndarray:
    """Each row's count of rows of its class before it: 0 for a class's first, 1 for its second."""
    return pd.Series(labels).groupby(labels).cumcount().to_numpy()


def _spread(order: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``order`` re-ranked so that predicted classes take turns, each in its own order."""
    rank_in_class = _rank_in_class(labels[order])
    return order[np.lexsort((np.arange(len(order)), rank_in_class))]


def _label_codes(labels: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """One integer a predicted class (-1 for none), for ranking within classes."""
    codes = pc.dictionary_encode(labels)
    codes = codes.combine_chunks() if isinstance(codes, pa.ChunkedArray) else codes
    return codes.indices.fill_null(-1).to_numpy(zero_copy_only=False)


def _first(scores: np.ndarray, codes: Optional[np.ndarray], m: int) -> np.ndarray:
    """Positions of the ``m`` rows first in review order (highest ``scores`` first, ties
    in row order), or with ``codes``, of each class's first ``m``."""
    order = np.argsort(-scores, kind="stable")
    if codes is None:
        return order[:m]
    return order[_rank_in_class(codes[order]) < m]


class _Dedup:
    """Rows walked in review order, each picked unless its embedding has cosine similarity
    above ``threshold`` with one picked before it, until ``n`` are picked. Only the picked
    rows' embeddings stay, so the walk can go on over embeddings read a chunk at a time."""

    def __init__(self, n: int, threshold: float):
        self.n, self.threshold = n, threshold
        self.rows: list[int] = []
        self.picked: Optional[np.ndarray] = None  # (len(rows), F), unit rows

    @property
    def done(self) -> bool:
        return len(self.rows) == self.n

    def walk(self, rows: np.ndarray, emb: np.ndarray) -> None:
        """Walks on over ``rows`` (ids, in review order) with their embeddings ``emb``."""
        emb = emb.astype(np.float32)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        for row, e in zip(rows, emb):
            if self.done:
                break
            if self.picked is None or float((self.picked @ e).max()) <= self.threshold:
                self.rows.append(int(row))
                self.picked = e[None] if self.picked is None else np.vstack([self.picked, e])


class ReviewQueue:
    """The rows first in review order, kept as prediction rows stream past in batches.

    Review order is uncertainty, highest first, ties in row order, and with ``per_class``
    the classes taking turns. Its first ``keep`` rows are the first ``keep`` of the rows
    kept so far and of a new batch, so a bounded set of rows (``keep``, or ``keep`` a
    class) carries the picks whatever the number of rows: the same picks as sorting the
    whole table. The rows kept carry their position among the ok rows (``_row``), their
    uncertainty, and their part and position among its ok rows (``_part``,
    ``_part_row``) for a second pass over their embeddings.
    """

    def __init__(self, strategy: str, keep: int, per_class: bool = False, seed: int = 0):
        self.strategy, self.keep, self.per_class = strategy, keep, per_class
        self.rng = np.random.default_rng(seed)  # one stream over all batches, as over one table
        self.rows = 0
        self.kept: Optional[pa.Table] = None

    def add(self, batch: pa.RecordBatch | pa.Table, part: int = 0, part_row: int = 0) -> None:
        """Takes the next rows (columns path, label, score, topk_scores), which are row
        ``part_row`` on of part ``part``'s ok rows."""
        scores = uncertainty(topk_matrix(batch.column(COL_TOPK_SCORES)), self.strategy, self.rng)
        first = np.sort(self._first(scores, batch.column(COL_LABEL)))
        new = pa.table({c: batch.column(c).take(first) for c in (COL_PATH, COL_LABEL, COL_SCORE)})
        new = new.append_column("_row", pa.array(self.rows + first)).append_column(
            "_uncertainty", pa.array(scores[first])).append_column(
            "_part", pa.array(np.full(len(first), part))).append_column("_part_row", pa.array(part_row + first))
        self.rows += batch.num_rows
        merged = new if self.kept is None else pa.concat_tables([self.kept, new])
        self.kept = merged.take(np.sort(self._first(merged.column("_uncertainty").to_numpy(),
                                                    merged.column(COL_LABEL))))

    def _first(self, scores: np.ndarray, labels) -> np.ndarray:
        return _first(scores, _label_codes(labels) if self.per_class else None, self.keep)

    def order(self) -> np.ndarray:
        """Positions in ``kept`` in review order: the first rows of the whole review order."""
        order = np.argsort(-self.kept.column("_uncertainty").to_numpy(), kind="stable")
        return _spread(order, _label_codes(self.kept.column(COL_LABEL))) if self.per_class else order

    @property
    def complete(self) -> bool:
        """Whether every row is kept, so that review order has no rows beyond them."""
        return self.kept.num_rows == self.rows


def _picks(kept: pa.Table, positions: np.ndarray) -> pd.DataFrame:
    """review.csv's rows: the rows at ``positions`` of ``kept``, in that order."""
    rows = kept.take(positions)
    out = rows.select([COL_PATH, COL_LABEL, COL_SCORE]).to_pandas().rename(columns={COL_LABEL: "predicted_label"})
    out["uncertainty"] = rows.column("_uncertainty").to_numpy()
    out["label"] = ""
    return out


def select(df: pd.DataFrame, strategy: str, n: int, per_class: bool = False, dedup: Optional[float] = None,
           seed: int = 0) -> pd.DataFrame:
    """The ``n`` rows to review, most uncertain first.

    Args:
        df: Prediction rows (path, label, score, topk_scores; embedding with ``dedup``).
        strategy: One of STRATEGIES.
        n: How many to pick (fewer when there are fewer rows).
        per_class: Predicted classes take turns, so that each gets its share of the picks.
        dedup: Skip a row whose embedding has cosine similarity above this with one
            already picked (near-duplicates need one look, not several).
        seed: Seed of ``random``.
    """
    if n < 1:
        raise ValueError("n must be positive")
    queue = ReviewQueue(strategy, n if dedup is None else len(df), per_class, seed)
    queue.add(pa.Table.from_pandas(df[[COL_PATH, COL_LABEL, COL_SCORE, COL_TOPK_SCORES]], preserve_index=False))
    order = queue.order()
    if dedup is None:
        return _picks(queue.kept, order[:n])
    walk = _Dedup(n, dedup)
    walk.walk(order, np.stack(df[COL_EMBEDDING].to_numpy()[queue.kept.column("_row").to_numpy()[order]]))
    return _picks(queue.kept, np.array(walk.rows, dtype=np.int64))


DEDUP_KEEP = 4  # --dedup keeps this many rows a pick at first, 4 times more each time the walk runs past them
EMBEDDING_ROWS = 16_384  # --dedup's walk reads the embeddings of this many rows at a time


def review_predictions(uri: str, strategy: str, n: int, per_class: bool = False, dedup: Optional[float] = None,
                       seed: int = 0, batch_rows: int = BATCH_ROWS) -> tuple[pd.DataFrame, int]:
    """``select`` over the ok rows of a predictions folder or file, read in batches.

    Only the columns review needs are read, keeping the first ``n`` rows of review order
    (``ReviewQueue``). With ``dedup`` the walk reads the embeddings of the rows it reaches
    only, a chunk at a time from their parts; when near-duplicates skip it past the rows
    kept, it keeps more and walks on. Memory holds a batch and the rows kept (with
    ``dedup``, the rows walked past, path and scores, as no embeddings), whatever the
    number of rows. Returns (picks, ok rows read).
    """
    if n < 1:
        raise ValueError("n must be positive")
    dataset = open_predictions(uri)
    if dedup is not None and COL_EMBEDDING not in dataset.schema.names:
        raise ReviewError(f"{uri} has no embeddings: label with --embeddings, or review without --dedup")
    keep, walked = (n if dedup is None else DEDUP_KEEP * n), 0
    walk = _Dedup(n, dedup) if dedup is not None else None
    while True:
        queue, part_rows = ReviewQueue(strategy, keep, per_class, seed), {}
        for part, batch in scan(dataset, [COL_PATH, COL_LABEL, COL_SCORE, COL_TOPK_SCORES], OK_ROWS,
                                batch_rows=batch_rows):
            queue.add(batch, part, part_rows.get(part, 0))
            part_rows[part] = part_rows.get(part, 0) + batch.num_rows
        if not queue.rows:
            raise ReviewError(f"{uri} has no prediction rows with status ok")
        order = queue.order()
        if dedup is None:
            return _picks(queue.kept, order[:n]), queue.rows
        # The rows walked before are this order's first (a longer prefix of the same order).
        ids = queue.kept.column("_row").to_numpy()
        for lo in range(walked, len(order), EMBEDDING_ROWS):
            if walk.done:
                break
            chunk = order[lo:lo + EMBEDDING_ROWS]
            walk.walk(ids[chunk], _embeddings_of(dataset, queue.kept.take(chunk), batch_rows))
        walked = len(order)
        if walk.done or queue.complete:
            position = {row: i for i, row in enumerate(ids)}
            return _picks(queue.kept, np.array([position[r] for r in walk.rows], dtype=np.int64)), queue.rows
        keep *= DEDUP_KEEP


def _embeddings_of(dataset, rows: pa.Table, batch_rows: int) -> np.ndarray:
    """(len(rows), F) embeddings of ``rows`` (``ReviewQueue``'s), read from their parts only."""
    part, part_row = rows.column("_part").to_numpy(), rows.column("_part_row").to_numpy()
    out: list = [None] * rows.num_rows
    offsets: dict[int, int] = {}
    for number, batch in scan(dataset, [COL_EMBEDDING], OK_ROWS, parts=set(part.tolist()), batch_rows=batch_rows):
        lo = offsets.get(number, 0)
        offsets[number] = lo + batch.num_rows
        wanted = np.flatnonzero((part == number) & (part_row >= lo) & (part_row < lo + batch.num_rows))
        values = batch.column(COL_EMBEDDING).take(part_row[wanted] - lo).to_numpy(zero_copy_only=False)
        for i, value in zip(wanted, values):
            out[i] = value
    return np.stack(out)


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


def write_review(picks: pd.DataFrame, output: str, strategy: str, predictions: str = "") -> dict:
    """Writes review.csv and review.html under ``output``; returns their paths and the count.
    ``predictions`` (and the model of the job that wrote them) are named at the sheet's top."""
    from imgcls.inference.finished import job_model
    from imgcls.web import report_header

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
                + report_header(f"{len(picks)} predictions to review ({strategy})",
                                job_model(predictions) if predictions else None, predictions)
                + f"<p>Answer them on the labelling page (<code>imgcls label {REVIEW_FILE}</code>), or fill in "
                f"the <code>label</code> column of {REVIEW_FILE}; the answered file is training input "
                "(<code>imgcls train --root review.csv</code>).</p>" + "".join(cells))
    return {"picks": len(picks), "manifest": csv, "contact_sheet": sheet}


def run_review(predictions: str, output: str, strategy: str = "margin", n: int = 100, per_class: bool = False,
               dedup: Optional[float] = None, seed: int = 0) -> dict:
    picks, rows = review_predictions(predictions, strategy, n, per_class=per_class, dedup=dedup, seed=seed)
    return {**write_review(picks, output, strategy, predictions), "strategy": strategy, "rows": rows,
            "mean_uncertainty": float(picks["uncertainty"].mean())}
