"""Evaluation of a trained model on labelled images, through the inference pipeline.

In: a model (checkpoint, ensemble or export) and labelled images (a folder, a manifest
or a checkpoint's test split), or an earlier predictions table. Out: metrics.json, the
predictions with their true labels, and the report (``evaluation.report``).
``evaluate_images`` labels with exactly the batch-inference code (``inference.pipeline``),
so that evaluation scores what ``imgcls predict`` outputs.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray

from imgcls import storage
from imgcls.checkpoint import load_checkpoint, read_model_info
from imgcls.devices import runs_here
from imgcls.evaluation.metrics import classification_report
from imgcls.evaluation.scan import BATCH_ROWS, open_predictions, scan
from imgcls.paths import members
from imgcls.inference.pipeline import input_rows, predict, predict_here
from imgcls.inference.read import TAR_MEMBER_SEP, source_file
from imgcls.inference.schema import (COL_EMBEDDING, COL_ERROR, COL_LABEL, COL_PATH, COL_SCORE, COL_STATUS,
                                     COL_TOPK_LABELS, STATUS_OK)
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
    """The report's top-k accuracy key, named by the k of the top-k lists the rows carry
    (``imgcls predict --top-k``, at most the number of classes): 'top5_accuracy' by
    default, 'top2_accuracy' for 2 classes, 'top1_accuracy' for predictions made with
    ``--top-k 1``."""
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
    unknown = Counter(df[ok & ~known][COL_TRUE].astype(str))
    if not (ok & known).any():
        raise no_row_to_score(len(df), int((~ok).sum()), unknown, classes)
    return df[~ok | known], left_out(unknown)


def no_row_to_score(rows: int, errors: int, unknown: Counter, classes: Sequence[str]) -> DataError:
    """The error of predictions with no row to score: ``rows`` in all, ``errors`` of them
    error rows, ``unknown`` the counts of the true labels the model does not know."""
    found = ", ".join(f"{label!r}: {n}" for label, n in unknown.most_common(5))
    return DataError(
        f"no row to score: of {rows} predictions, {errors} are error rows and {sum(unknown.values())} "
        f"have a true label the model does not know ({found or 'none'}); the model knows {list(classes)}; "
        "true labels come from a 'true_label' column, else from each file's parent folder name")


def left_out(unknown: Counter) -> dict:
    """``unknown_true_label`` and ``unknown_true_labels`` (the 10 commonest) of the counts
    of true labels the model does not know."""
    return {"unknown_true_label": sum(unknown.values()),
            "unknown_true_labels": {str(k): int(v) for k, v in unknown.most_common(10)}}


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
    tally = Tally(classes)
    tally.add(pa.Table.from_pandas(df[[COL_STATUS, COL_LABEL, COL_TOPK_LABELS, COL_TRUE]], preserve_index=False))
    return tally.report()


class Tally:
    """``report_from_predictions``'s counts, taken batch by batch: the confusion matrix,
    the top-k hits and the error rows, so that a table of any size is scored in the
    memory of one batch."""

    def __init__(self, classes: Sequence[str]):
        self.classes = list(classes)
        self.cm = np.zeros((len(classes), len(classes)), np.int64)  # (true, predicted)
        self.hits = self.k = self.errors = 0

    def add(self, rows: pa.Table | pa.RecordBatch) -> None:
        """Counts ``rows`` (columns status, label, topk_labels, true_label)."""
        ok = rows.filter(pc.fill_null(pc.equal(rows.column(COL_STATUS), STATUS_OK), False))
        self.errors += rows.num_rows - ok.num_rows
        true, pred = _as_strings(ok.column(COL_TRUE)), _as_strings(ok.column(COL_LABEL))
        n = len(self.classes)
        self.cm += np.bincount(_encode(true, self.classes) * n + _encode(pred, self.classes),
                               minlength=n * n).reshape(n, n)
        topk = ok.column(COL_TOPK_LABELS)
        topk = topk.combine_chunks() if isinstance(topk, pa.ChunkedArray) else topk
        if len(topk):
            self.k = max(self.k, pc.max(pc.list_value_length(topk)).as_py() or 0)
        # A hit: the true label among the row's top-k labels (each listed once).
        parents = pc.list_parent_indices(topk)
        same = pc.fill_null(pc.equal(_as_strings(pc.list_flatten(topk)), true.take(parents)), False)
        self.hits += len(np.unique(parents.filter(same).to_numpy()))

    def report(self) -> dict:
        report = classification_report(self.cm, self.classes)
        # The k the rows carry; with none, imgcls predict's default --top-k.
        report["top_k"] = self.k or min(5, len(self.classes))
        report[topk_key(report)] = self.hits / report["num_samples"] if report["num_samples"] else 0.0
        report["errors"] = self.errors
        report["classes"] = self.classes
        return report


def _as_strings(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    return values if values.type == pa.string() else values.cast(pa.string())


def _encode(labels: pa.Array, classes: Sequence[str]) -> np.ndarray:
    """``encode_labels`` of an Arrow column: indices of ``classes``; unknown names raise DataError."""
    index = pc.index_in(labels, value_set=pa.array(classes, pa.string()))
    if index.null_count:
        encode_labels([str(v) for v in pc.unique(labels.filter(pc.is_null(index))).to_pylist()], classes)
    return index.to_numpy(zero_copy_only=False).astype(np.int64)


def evaluate_images(model: str, images: LabelledImages, **kwargs) -> tuple[dict, pd.DataFrame]:
    """Runs the model (or comma-separated ensemble) over ``images`` and returns (metrics
    report, predictions).

    An image that cannot be decoded is an error row, counted in ``errors``; one that is
    missing (a file, a tar or a tar member: nothing checked the listing) fails the
    evaluation with a DataError naming it, found by the tasks that read the images.
    """
    classes = read_model_info(members(model)[0]).classes
    encode_labels(images.labels, classes)  # fail fast on unknown labels, before any inference
    df = predict_labelled(model, images, **kwargs)
    missing = df[df[COL_ERROR].fillna("").str.startswith(f"{FileNotFoundError.__name__}:")]
    if len(missing):
        raise DataError(f"{len(missing)} of the {len(df)} labelled images cannot be found, e.g. "
                        f"{missing[COL_PATH].iloc[0]} ({missing[COL_ERROR].iloc[0]})")
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
    DataError when none is left. ``predictions`` are read and written back a batch at a
    time (``score_predictions``). Returns the headline metrics, those counts, ``num_samples``
    (rows scored) and the files written.
    """
    from imgcls.evaluation.report import write_report

    first = members(model)[0]
    classes = read_model_info(first).classes
    overlap, counts = {}, None
    if data:
        images = list_labelled_images(data)
        overlap = {"training_overlap": max(training_overlap(m, images.paths) for m in members(model))}
        report, df = evaluate_images(model, images, embeddings=True, tta=tta)  # for the report's embedding map
        os.makedirs(output, exist_ok=True)
        write_frame(df, os.path.join(output, PREDICTIONS_FILE))
    else:
        made = not os.path.isdir(output)
        os.makedirs(output, exist_ok=True)
        try:
            report, df, counts = score_predictions(predictions, classes, os.path.join(output, PREDICTIONS_FILE))
        except BaseException:
            if made:
                shutil.rmtree(output, ignore_errors=True)
            raise
    history = load_checkpoint(first).history
    files = write_report(output, report, df, COL_TRUE, history=history, class_counts=counts, model=model,
                         data=data or predictions)
    counts = {k: report[k] for k in ("num_samples", "errors", "unknown_true_label", "unknown_true_labels")
              if k in report}
    return {**{k: report[k] for k in ("accuracy", topk_key(report), "macro_f1")}, **counts, **overlap, **files}


MISTAKES = 16  # rows of report.plot_confident_mistakes
MAP_POINTS = 5000  # points of report.plot_embedding_map
PANDAS_INDEX = re.compile(r"__index_level_\d+__")  # an index pandas wrote as a column, not a column of the rows


def score_predictions(uri: str, classes: Sequence[str], output_file: str,
                      batch_rows: int = BATCH_ROWS) -> tuple[dict, pd.DataFrame, dict[str, int]]:
    """``evaluate --predictions``: the predictions folder or file at ``uri`` scored against
    ``classes`` in batches, in the memory of one batch whatever the number of rows.

    Each batch gets its true labels (``true_labels``, where no ``true_label`` column has
    them), loses the rows whose true label the model does not know (counted, as
    ``scorable_rows`` counts them), and is written to ``output_file`` (Parquet, the rows
    with their true labels) and counted (``Tally``). Kept for the report's pictures: the
    most confident mistakes, and a uniform sample of MAP_POINTS rows with embeddings (all
    of them when fewer).

    Returns (report with ``left_out``'s counts, the rows kept for the pictures, rows per
    true label); DataError when no row is left to score (``output_file`` not written).
    """
    import pyarrow.parquet as pq

    dataset = open_predictions(uri)
    names = [n for n in dataset.schema.names if not PANDAS_INDEX.fullmatch(n)]
    fields = [dataset.schema.field(n) for n in names]
    if COL_TRUE not in names:
        fields.append(pa.field(COL_TRUE, pa.string()))
    picture_columns = [COL_PATH, COL_STATUS, COL_LABEL, COL_SCORE, COL_TRUE] + \
        ([COL_EMBEDDING] if COL_EMBEDDING in names else [])
    tally, unknown, counts = Tally(classes), Counter(), Counter()
    rows = errors = scored_rows = 0
    mistakes, sample = _Firsts(MISTAKES), _Firsts(MAP_POINTS)
    rng = np.random.default_rng(0)
    partial = output_file + ".partial"
    try:
        with pq.ParquetWriter(partial, pa.schema(fields)) as writer:
            for _, batch in scan(dataset, names, batch_rows=batch_rows):
                if COL_TRUE not in names:
                    batch = batch.append_column(COL_TRUE, true_labels(batch.column(COL_PATH)))
                ok = pc.fill_null(pc.equal(batch.column(COL_STATUS), STATUS_OK), False)
                true = _as_strings(batch.column(COL_TRUE))
                known = pc.is_in(true, value_set=pa.array(classes, pa.string()))
                rows, errors = rows + batch.num_rows, errors + batch.num_rows - pc.sum(ok).as_py()
                _count(unknown, true.filter(pc.and_not(ok, known)))
                batch = batch.filter(pc.or_(pc.invert(ok), known))
                writer.write_batch(batch)
                tally.add(batch)
                _count(counts, batch.column(COL_TRUE))
                kept = pa.Table.from_batches([batch.select(picture_columns)]).append_column(
                    "_row", pa.array(np.arange(scored_rows, scored_rows + batch.num_rows)))
                scored_rows += batch.num_rows
                scored = pc.fill_null(pc.equal(kept.column(COL_STATUS), STATUS_OK), False)
                wrong = kept.filter(pc.and_(scored, pc.not_equal(kept.column(COL_LABEL), kept.column(COL_TRUE))))
                mistakes.add(wrong.drop_columns([c for c in (COL_EMBEDDING,) if c in wrong.column_names]),
                             -wrong.column(COL_SCORE).to_numpy(zero_copy_only=False).astype(np.float64))
                if COL_EMBEDDING in names:  # random keys, the smallest kept: a uniform sample
                    mapped = kept.filter(pc.and_(scored, pc.is_valid(kept.column(COL_EMBEDDING))))
                    sample.add(mapped, rng.random(mapped.num_rows))
        if not tally.cm.sum():
            raise no_row_to_score(rows, errors, unknown, classes)
        os.replace(partial, output_file)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    report = {**tally.report(), **left_out(unknown)}
    return report, _pictures(mistakes.table, sample.table), {c: counts.get(c, 0) for c in classes}


def _count(counter: Counter, labels: pa.Array | pa.ChunkedArray) -> None:
    """Adds the count of each of ``labels`` (null as 'None') to ``counter``."""
    counts = pc.value_counts(_as_strings(labels))
    counter.update({str(v): c for v, c in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())})


class _Firsts:
    """The ``n`` rows with the lowest keys of the rows added (ties: the first added)."""

    def __init__(self, n: int):
        self.n, self.table, self.keys = n, None, np.zeros(0)

    def add(self, rows: pa.Table, keys: np.ndarray) -> None:
        table = rows if self.table is None else pa.concat_tables([self.table, rows])
        keys = np.concatenate([self.keys, keys])
        first = np.argsort(keys, kind="stable")[:self.n]
        self.table, self.keys = table.take(first), keys[first]


def _pictures(mistakes: Optional[pa.Table], sample: Optional[pa.Table]) -> pd.DataFrame:
    """The rows the report draws, in row order: the sample with its embeddings, and the
    mistakes outside it without theirs (so that the embedding map holds the sample only)."""
    frames = [t.to_pandas() for t in (sample, mistakes) if t is not None]
    if not frames:
        return pd.DataFrame(columns=[COL_PATH, COL_STATUS, COL_LABEL, COL_SCORE, COL_TRUE])
    df = pd.concat(frames, ignore_index=True).drop_duplicates("_row")  # the sample's rows first
    return df.sort_values("_row").drop(columns="_row").reset_index(drop=True)


def true_labels(paths: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The true label a path gives: the name of its file's parent folder (of the tar, for a
    tar member; ``read.source_file``); null for a path without a folder."""
    paths = _as_strings(paths)
    members = pc.match_substring(paths, TAR_MEMBER_SEP).to_numpy(zero_copy_only=False)
    if members.any():  # only these need parsing one by one
        paths = pa.array([source_file(p) if m else p for p, m in zip(paths.to_pylist(), members)], pa.string())
    return pc.struct_field(pc.extract_regex(paths, r"(?P<folder>[^/]*)/[^/]*$"), [0])


def training_overlap(model: str, paths: list[str]) -> int:
    """How many of ``paths`` are in the checkpoint's saved training split (0 when it saved none)."""
    from imgcls.checkpoint import split_manifest

    try:
        train = list_labelled_images(split_manifest(model, "train"))
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
