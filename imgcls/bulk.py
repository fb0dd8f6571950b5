"""Bulk labelling: inputs -> sharded, atomic, resumable Parquet output.

The sorted input list is cut into shards of ``files_per_shard`` files (one shard per
.tar file). Shard ``i`` is written as ``part-{i:05d}.parquet`` through a hidden
temporary name and a rename, so readers never see a half-written file. A rerun with
the same output skips every shard whose part file exists; ``_job.json`` records the
inputs and model so that a rerun against different inputs is refused rather than mixed.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgcls import storage
from imgcls.config import PredictConfig
from imgcls.predict import input_rows, list_inputs, predict, tar_alone_runs
from imgcls.reader import COL_SHARD, COL_SHARD_SIZE, COL_STATUS, STATUS_OK, output_schema

JOB_FILE = "_job.json"
SUMMARY_FILE = "_summary.json"
PART_TEMPLATE = "part-{:05d}.parquet"


@dataclass
class LabelSummary:
    files: int  # inputs in this job, all shards
    rows: int  # rows in the output, all shards
    ok: int
    errors: int
    shards: int
    shards_skipped: int  # already done by an earlier run
    seconds: float
    images_per_s: float  # rows written by this run per second
    output: str


def plan_shards(inputs: list[str], files_per_shard: int) -> list[list[str]]:
    """Consecutive runs of ``files_per_shard`` plain files; each .tar is a shard of its own."""
    return tar_alone_runs(inputs, files_per_shard)


def _fingerprint(inputs: list[str], cfg: PredictConfig) -> dict:
    digest = hashlib.sha256("\n".join(inputs).encode()).hexdigest()
    return {"inputs_sha256": digest, "files": len(inputs), "files_per_shard": cfg.files_per_shard,
            "model": cfg.model, "runtime": cfg.runtime, "embeddings": cfg.embeddings, "top_k": cfg.top_k}


def _write_part_atomic(table: pa.Table, output: str, shard: int) -> None:
    fs, folder = storage.filesystem(output)
    final = f"{folder.rstrip('/')}/{PART_TEMPLATE.format(shard)}"
    tmp = f"{folder.rstrip('/')}/.tmp-{uuid.uuid4().hex}-{PART_TEMPLATE.format(shard)}"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(tmp, final)


def done_shards(output: str) -> set[int]:
    fs, folder = storage.filesystem(output)
    if not fs.exists(folder):
        return set()
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)]
    return {int(n[5:10]) for n in names if n.startswith("part-") and n.endswith(".parquet")}


def label_images(cfg: PredictConfig) -> LabelSummary:
    """Labels every input of ``cfg`` on the running Ray cluster and writes Parquet shards."""
    start = time.perf_counter()
    inputs = list_inputs(cfg.input)
    if not inputs:
        raise ValueError(f"no files found at {cfg.input}")
    shards = plan_shards(inputs, cfg.files_per_shard)
    storage.makedirs(cfg.output)
    fs, folder = storage.filesystem(cfg.output)
    job_uri = storage.join(cfg.output, JOB_FILE)
    fingerprint = _fingerprint(inputs, cfg)
    if storage.exists(job_uri):
        previous = storage.read_json(job_uri)
        if previous != fingerprint:
            raise ValueError(f"{cfg.output} holds output of another job ({previous}); use a new output folder")
    else:
        storage.write_json(job_uri, fingerprint)
    for stale in fs.glob(f"{folder.rstrip('/')}/.tmp-*"):  # left by a killed run
        fs.rm(stale)
    skip = done_shards(cfg.output)
    schema = output_schema(cfg.embeddings)
    written = 0
    if not skip.issuperset(range(len(shards))):
        predictions = predict(input_rows(shards, skip), cfg.model, batch_size=cfg.batch_size,
                              top_k=cfg.top_k, embeddings=cfg.embeddings, runtime=cfg.runtime, use_gpu=cfg.use_gpu,
                              num_actors=cfg.num_actors, max_pixels=cfg.max_pixels, buffer_mb=cfg.buffer_mb,
                              separate_decode=cfg.separate_decode)
        pending: dict[int, list[pa.Table]] = {}
        counts: dict[int, int] = {}
        for batch in predictions.iter_batches(batch_format="pyarrow", batch_size=None):
            for shard in set(batch[COL_SHARD].to_pylist()):
                part = batch.filter(pc.equal(batch[COL_SHARD], shard))
                pending.setdefault(shard, []).append(part)
                counts[shard] = counts.get(shard, 0) + part.num_rows
                if counts[shard] == part[COL_SHARD_SIZE][0].as_py():
                    table = pa.concat_tables(pending.pop(shard)).drop_columns([COL_SHARD, COL_SHARD_SIZE])
                    table = table.cast(schema).sort_by("path")
                    _write_part_atomic(table, cfg.output, shard)
                    written += table.num_rows
        if pending:
            raise RuntimeError(f"shards {sorted(pending)} did not receive all their rows")
    total = pq.read_table(folder, filesystem=fs, columns=[COL_STATUS]) if fs.exists(folder) else None
    total_rows = total.num_rows if total is not None else 0
    total_ok = (pc.sum(pc.equal(total[COL_STATUS], STATUS_OK)).as_py() or 0) if total_rows else 0
    seconds = time.perf_counter() - start
    summary = LabelSummary(files=len(inputs), rows=total_rows, ok=total_ok, errors=total_rows - total_ok,
                           shards=len(shards), shards_skipped=len(skip), seconds=round(seconds, 2),
                           images_per_s=round(written / seconds, 2), output=cfg.output)
    storage.write_json(storage.join(cfg.output, SUMMARY_FILE), asdict(summary))
    return summary
