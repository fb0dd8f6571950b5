"""Bulk labelling: inputs -> sharded, atomic, resumable Parquet output, written by the workers.

The inputs are planned once into shards (``imgcls.inference.inputs``: at most ``files_per_shard``
files, or one tar, each). One shard is one unit of work: the actor that labels it
writes ``part-{shard:06d}.parquet`` itself, through a hidden temporary name and a
rename, and returns only a summary row (shard, rows, ok, errors, node). Prediction
rows never reach the driver, which holds one small row per shard.

- CPU layout (one pool): each actor reads, decodes and labels its shard, then writes it.
- Separate decode pool (the GPU layout): decode actors turn a shard into chunks of
  decoded images; model actors label each chunk and write it under ``_staging/``;
  once a shard's rows are all staged, a small Ray task merges them into its part.

A rerun with the same output skips every shard whose part exists and is complete; the
job is done when the set of parts written equals the set planned. ``_job.json`` holds
the inputs' hash, the model's id and every setting that changes a row
(``finished.fingerprint``), so that a rerun with other inputs, another model or another
such setting is refused, naming it, rather than mixed into the same output. A job holds
the folder's lease (``lease``) from before it deletes a killed run's leftovers to its
end, so that a second job started meanwhile fails instead of deleting the first's files.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy, ExecutionResources

from imgcls import storage
from imgcls.config import PredictConfig
from imgcls.devices import choose_gpu, node_requests, renew_requests, runs_here
from imgcls.inference.decode import Decoder, DecodeShards
from imgcls.inference.finished import JOB_FILE, fingerprint, refusal
from imgcls.inference.inputs import InputPlan, OutputFolderError, plan_inputs
from imgcls.inference.lease import Lease
from imgcls.inference.model_stage import Classifier, ModelPayload
from imgcls.inference.pipeline import actor_pool, model_batch_size, pool_plan, starting_actors
from imgcls.inference.program import build_program
from imgcls.inference.read import MAX_FILE_BYTES, is_tar, read_shard, read_shard_list
from imgcls.inference.schema import COL_ROW, COL_SHARD, COL_SHARD_ROWS, output_schema
from imgcls.inference.sink import (
    commit_shard,
    done_shards,
    finish_part,
    part_counts,
    remove_staging,
    staging_uri,
    summary_columns,
    summary_row,
    write_part_atomic,
)
from imgcls.progress import eta_text

SUMMARY_FILE = "_summary.json"
MODEL_DIR = "_model"  # the prepared model program the actors load
AUTO_PRECISION_ON = "auto_precision_on"  # in _job.json: 'GPUs' or 'CPUs', whose dtype --precision auto gave the rows


@dataclass
class LabelSummary:
    files: int  # input files in this job (a tar counts once)
    rows: int  # rows in the output, all shards
    ok: int
    errors: int
    shards: int
    shards_skipped: int  # already done by an earlier run
    seconds: float
    images_per_s: float  # rows written by this run per second
    output: str
    plan_seconds: float = 0.0  # listing or reading the inputs into shards (0 when reused)
    shards_by_node: dict = field(default_factory=dict)  # node id -> shards labelled there by this run


class LabelShards:
    """CPU layout: one actor reads, decodes and labels each shard it is given, ``max_images``
    at a time, then writes the shard's part; input rows ``shard``, ``list``."""

    def __init__(self, payload: ModelPayload, output: str, max_pixels: int, max_images: int = 64,
                 max_bytes: int = MAX_FILE_BYTES, **classifier_kwargs):
        self.decoder = Decoder(payload.image_size, max_pixels, max_images, max_bytes)
        self.classify = Classifier(payload, **classifier_kwargs)
        self.output = output

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return summary_columns([self.label_shard(int(shard), uri) for shard, uri in zip(batch[COL_SHARD], batch["list"])])

    def label_shard(self, shard: int, list_uri: str) -> dict:
        """Labels the files that ``list_uri`` lists and writes them as part ``shard``;
        returns the summary row."""
        began = time.perf_counter()
        tables = [self.classify.label(chunk) for chunk in self.decoder.chunks(*read_shard(list_uri))]
        counts = write_part_atomic(finish_part(pa.concat_tables(tables), self.classify.schema), self.output, shard)
        return summary_row(shard, counts, time.perf_counter() - began)


class LabelChunks:
    """Separate-decode layout, model stage: labels decoded chunks (``DecodeShards``) and
    writes each shard's rows of a batch under ``_staging/{shard}/``, named by their first
    row, so that a retried batch rewrites the same file. Returns per file: shard, the
    row indices it holds and, on a shard's last chunk, its row count."""

    def __init__(self, payload: ModelPayload, output: str, **classifier_kwargs):
        self.classify = Classifier(payload, **classifier_kwargs)
        self.output = output

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        table = self.classify(batch)
        out = {"shard": [], "rows": [], "shard_rows": []}
        for shard in np.unique(batch[COL_SHARD]):
            part = table.filter(pc.equal(table[COL_SHARD], shard))
            row_ids = part[COL_ROW].to_numpy()
            uri = storage.join(staging_uri(self.output, int(shard)), f"{int(row_ids.min()):09d}.parquet")
            with storage.open_uri(uri, "wb") as f:
                pq.write_table(part, f)
            out["shard"].append(int(shard))
            out["rows"].append(row_ids.tolist())
            out["shard_rows"].append(int(part[COL_SHARD_ROWS].to_numpy().max()))
        return out


class Progress:
    """What a person watching a labelling job sees: files done of the total, shards, rate
    and ETA, one line on stderr at most every ``every`` seconds and once at the end, so a
    terminal and a job's log read the same."""

    def __init__(self, todo: pa.Table, every: float = 10.0):
        self.files = dict(zip(todo[COL_SHARD].to_pylist(), todo["files"].to_pylist()))
        self.total, self.shards = sum(self.files.values()), len(self.files)
        self.done = self.shards_done = 0
        self.every, self.start = every, time.monotonic()
        self.last = self.start

    def line(self) -> str:
        rate = self.done / max(1e-9, time.monotonic() - self.start)
        eta = eta_text(self.done, self.total, rate)
        return (f"labelled {self.done:,} / {self.total:,} files ({100 * self.done / max(1, self.total):.0f}%), "
                f"{self.shards_done} / {self.shards} shards, {rate:.0f} files/s, {eta}")

    def shard_done(self, shard: int) -> None:
        self.done += self.files.get(shard, 0)
        self.shards_done += 1
        now = time.monotonic()
        if now - self.last >= self.every or self.shards_done == self.shards:
            self.last = now
            print(self.line(), file=sys.stderr, flush=True)


def labels_here(plan: InputPlan, todo: pa.Table, cfg: PredictConfig, pools: dict) -> bool:
    """Whether this job is labelled in this process: a small CPU job (``devices.runs_here``
    files, none of them a tar of unknown size, no pool size asked for), for which starting
    the actors (each importing torch and preparing the model) takes longer than the work:
    ``imgcls predict`` of 300 Fashion-MNIST files on 2 cores took 12 s so, 22 s with the pool."""
    if not runs_here(plan.files) or pools["use_gpu"] or pools["decode"] is not None or cfg.num_actors is not None:
        return False
    return not any(is_tar(path) for uri in todo["list"].to_pylist() for path in read_shard_list(uri))


def _run_here(todo: pa.Table, payload: ModelPayload, cfg: PredictConfig, plan: dict) -> list[dict]:
    """The CPU pool's own stage (``LabelShards``: read, decode, label, write each shard's
    part) run here over the shards to do, on this process's threads."""
    stage = LabelShards(payload, cfg.output, max_pixels=cfg.max_pixels, max_images=cfg.batch_size,
                        max_bytes=cfg.max_file_mb * 2**20, top_k=cfg.top_k, embeddings=cfg.embeddings,
                        precision=cfg.precision)
    progress, rows = Progress(todo), []
    for shard, list_uri in zip(todo[COL_SHARD].to_pylist(), todo["list"].to_pylist()):
        rows.append(stage.label_shard(shard, list_uri))
        progress.shard_done(shard)
    return rows


def _run_one_pool(todo: pa.Table, payload: ModelPayload, cfg: PredictConfig, plan: dict) -> list[dict]:
    ds = _shard_rows(todo).map_batches(
        LabelShards, fn_constructor_kwargs={
            "payload": payload, "output": cfg.output, "max_pixels": cfg.max_pixels, "max_images": cfg.batch_size,
            "max_bytes": cfg.max_file_mb * 2**20, "top_k": cfg.top_k, "embeddings": cfg.embeddings,
            "threads": plan["threads"], "use_gpu": plan["use_gpu"], "precision": cfg.precision},
        batch_size=1, compute=actor_pool(plan, todo.num_rows), num_cpus=plan["num_cpus"],
        num_gpus=plan["num_gpus"])
    progress, rows = Progress(todo), []
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        for row in batch.to_dict("records"):
            rows.append(row)
            progress.shard_done(int(row["shard"]))
        renew_requests()
    return rows


def _run_two_pools(todo: pa.Table, payload: ModelPayload, cfg: PredictConfig, plan: dict) -> list[dict]:
    decode = plan["decode"]
    decoded = _shard_rows(todo).map_batches(
        DecodeShards, fn_constructor_kwargs={"image_size": payload.image_size, "max_pixels": cfg.max_pixels,
                                             "max_images": cfg.batch_size, "defer_jpeg": cfg.gpu_decode,
                                             "max_bytes": cfg.max_file_mb * 2**20},
        batch_size=1, compute=ActorPoolStrategy(min_size=1, max_size=decode["max_size"]), num_cpus=decode["num_cpus"])
    staged = decoded.map_batches(
        LabelChunks, fn_constructor_kwargs={"payload": payload, "output": cfg.output, "top_k": cfg.top_k,
                                            "embeddings": cfg.embeddings, "threads": plan["threads"],
                                            "use_gpu": plan["use_gpu"], "precision": cfg.precision,
                                            "max_pixels": cfg.max_pixels},
        batch_size=cfg.batch_size, compute=actor_pool(plan, todo.num_rows), num_cpus=plan["num_cpus"],
        num_gpus=plan["num_gpus"], batch_format="numpy")
    staged.context.execution_options.resource_limits = ExecutionResources.for_limits(
        object_store_memory=cfg.buffer_mb * 2**20)
    schema = output_schema(cfg.embeddings)
    covered: dict[int, set] = {}
    totals: dict[int, int] = {}
    commits, progress = [], Progress(todo)
    for batch in staged.iter_batches(batch_size=None, batch_format="pyarrow"):
        for shard, rows, shard_rows in zip(*(batch[c].to_pylist() for c in ("shard", "rows", "shard_rows"))):
            covered.setdefault(shard, set()).update(rows)
            if shard_rows >= 0:
                totals[shard] = shard_rows
            if shard in totals and len(covered[shard]) == totals[shard]:
                commits.append(commit_shard.remote(cfg.output, shard, totals.pop(shard), schema))
                del covered[shard]
                progress.shard_done(shard)
        renew_requests()
    if covered:
        raise RuntimeError(f"shards {sorted(covered)} did not receive all their rows")
    done = ray.get(commits)
    remove_staging(cfg.output)
    return done


def _shard_rows(todo: pa.Table) -> ray.data.Dataset:
    """One row per shard to label, in blocks of one shard (up to 2,000 blocks), so that
    shards spread over the actors as they free up."""
    items = [{COL_SHARD: s, "list": u} for s, u in zip(todo[COL_SHARD].to_pylist(), todo["list"].to_pylist())]
    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 2000)))


def _fingerprint(plan: InputPlan, payload: ModelPayload, cfg: PredictConfig) -> dict:
    return fingerprint({"sha256": plan.sha256, "files": plan.files, "shards": plan.shards}, payload.model_id, cfg)


def _record_auto_precision(cfg: PredictConfig, job_uri: str, use_gpu: bool, resumes: bool) -> None:
    """--precision 'auto' is bf16 on GPUs (fp16 on those without it) and float32 on CPUs:
    ``_job.json`` also records which kind of device made the rows (``AUTO_PRECISION_ON``),
    and a resume on the other kind is refused, as another --precision would be."""
    if cfg.precision != "auto" or cfg.runtime != "torch":
        return
    job = storage.read_json(job_uri)
    before, now = job.get(AUTO_PRECISION_ON), "GPUs" if use_gpu else "CPUs"
    if before == now:
        return
    if before is not None and resumes:
        dtypes = {"GPUs": "bf16, or fp16 on GPUs without it", "CPUs": "fp32"}
        flag = "--use-gpu" if before == "GPUs" else "--no-use-gpu"
        raise OutputFolderError(f"--precision auto made the rows already written in {cfg.output} on {before} "
                                f"({dtypes[before]}); here it would run on {now} ({dtypes[now]}): resume on {before} "
                                f"({flag}), or use another --output")
    storage.write_json(job_uri, {**job, AUTO_PRECISION_ON: now})


def record_model_runs(model: str, job_uri: str) -> None:
    """Adds to ``_job.json`` the MLflow run that trained the model (``model_run_id``; one
    per member of an ensemble, ``model_run_ids``), when its checkpoint names one: for
    reading only, never compared, so a resume is not refused for it (``finished.refusal``
    compares the fingerprint's keys alone)."""
    from imgcls.paths import members
    from imgcls.tracking import model_run_id

    runs = [model_run_id(m) for m in members(model)]
    if not any(runs):
        return
    job = storage.read_json(job_uri)
    extra = {"model_run_id": runs[0]} if len(runs) == 1 else {"model_run_ids": runs}
    if any(job.get(k) != v for k, v in extra.items()):
        storage.write_json(job_uri, {**job, **extra})


def label_images(cfg: PredictConfig) -> LabelSummary:
    """Labels every input of ``cfg`` on the running Ray cluster and writes Parquet shards,
    holding the output folder's lease throughout (``lease.Lease``: a second job fails at
    once, saying whose it is).

    The nodes requested for the job (``choose_gpu``'s GPUs) are withdrawn from the
    autoscaler when it ends, however it ends, so that they idle out."""
    start = time.perf_counter()
    storage.makedirs(cfg.output)
    with node_requests(), Lease(cfg.output) as lease:
        summary = _label_images(cfg, start)
        lease.check()
    return summary


def _label_images(cfg: PredictConfig, start: float) -> LabelSummary:
    plan = plan_inputs(cfg.input, cfg.output, cfg.files_per_shard)
    payload = build_program(cfg.model, cfg.runtime, cfg.tta, cfg.program)
    job_uri = storage.join(cfg.output, JOB_FILE)
    job = _fingerprint(plan, payload, cfg)
    if storage.exists(job_uri):
        refused = refusal(cfg.output, storage.read_json(job_uri), job)
        if refused is not None:
            raise OutputFolderError(refused)
    else:
        storage.write_json(job_uri, job)
    record_model_runs(cfg.model, job_uri)
    fs, folder = storage.filesystem(cfg.output)
    for stale in fs.glob(f"{folder.rstrip('/')}/.tmp-*"):  # left by a killed run
        fs.rm(stale)
    remove_staging(cfg.output)
    shards = plan.shard_table()
    skip = done_shards(cfg.output)
    todo = shards.filter(pc.invert(pc.is_in(shards[COL_SHARD], pa.array(sorted(skip), pa.int64()))))
    labelled: list[dict] = []
    if todo.num_rows:
        stored_name = re.sub(r"[^\w.-]", "_", payload.model_id)  # a registered version's id is models:/NAME/3
        payload = payload.stored(storage.join(cfg.output, MODEL_DIR, f"{stored_name}.bin"))
        use_gpu = choose_gpu(cfg.use_gpu, gpus=cfg.num_actors or 1, what="labelling")
        pools = pool_plan(use_gpu, cfg.num_actors, cfg.separate_decode)
        _record_auto_precision(cfg, job_uri, pools["use_gpu"], resumes=bool(skip))
        cfg = dataclasses.replace(cfg, batch_size=model_batch_size(cfg.batch_size, pools["use_gpu"]))
        if cfg.gpu_decode and pools["decode"] is None:
            print("--gpu-decode does nothing here: without a separate decode pool (GPUs, or --separate-decode) "
                  "each model actor decodes its own files", file=sys.stderr, flush=True)
        if labels_here(plan, todo, cfg, pools):
            run = _run_here
        else:
            run = _run_one_pool if pools["decode"] is None else _run_two_pools
            if pools["min_size"] < pools["max_size"]:
                print(f"pool: {pools['min_size']} to {pools['max_size']} model actors as the cluster grows, starting "
                      f"{starting_actors(pools, todo.num_rows)} (those that fit no node yet make the autoscaler add "
                      "nodes)", file=sys.stderr, flush=True)
        labelled = run(todo, payload, cfg, pools)
    missing = set(range(plan.shards)) - done_shards(cfg.output)
    if missing:
        raise RuntimeError(f"{len(missing)} planned shards have no part (first: {sorted(missing)[:5]})")
    skipped = sorted(skip & set(range(plan.shards)))
    counts = labelled + part_counts(cfg.output, skipped)
    seconds = time.perf_counter() - start
    by_node: dict[str, int] = {}
    for row in labelled:
        by_node[row["node"]] = by_node.get(row["node"], 0) + 1
    written = sum(int(r["rows"]) for r in labelled)
    summary = LabelSummary(
        files=plan.files, rows=sum(int(c["rows"]) for c in counts), ok=sum(int(c["ok"]) for c in counts),
        errors=sum(int(c["errors"]) for c in counts), shards=plan.shards, shards_skipped=len(skipped),
        seconds=round(seconds, 2), images_per_s=round(written / seconds, 2), output=cfg.output,
        plan_seconds=round(0.0 if plan.reused else plan.seconds, 2), shards_by_node=by_node)
    storage.write_json(storage.join(cfg.output, SUMMARY_FILE), asdict(summary))
    return summary
