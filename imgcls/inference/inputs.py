"""The inputs of a bulk-labelling job, planned once into shards, without a driver funnel.

An input is a folder or prefix on any fsspec store, a glob, a single file, or a
manifest (.csv or .parquet with a ``path`` column; relative paths are relative to the
manifest's folder). ``plan_inputs`` turns it into shards under ``OUTPUT/_inputs/``:

- ``lists/*.parquet``: one small Parquet file of paths per shard, at most
  ``files_per_shard`` plain files, or one tar (whose members are its rows), with each
  file's size where a listing gave it (null in a manifest's), so that a reader refuses
  a file over the byte cap without a request;
- ``shards.parquet``: the plan, one row per shard (``shard``, ``list``, ``files``);
- ``_plan.json``: written last, so that a plan without it is rebuilt; it holds the
  inputs' hash, which the job's fingerprint records.

The paths never pass through the driver: a manifest is read by Ray Data's readers and
each block writes its own shard lists; a folder is listed in parallel, one Ray Data task
per sub-folder (sub-prefix), each writing the lists of what it found. The files directly
under the folder (a flat prefix) and the files a glob matches are listed by the driver,
a page at a time (``storage.iter_files``), each shard list written as soon as it is
full: neither the driver nor a task holds a listing whole. The driver only collects
one small row per shard. A rerun reads the plan instead of listing again,
so the shards, and the output parts named after them, stay the same; files added to
the folder after the first run are not picked up by a rerun (use a new output folder).
"""

from __future__ import annotations

import hashlib
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from imgcls import storage
from imgcls.inference.finished import PLAN_DIR, PLAN_FILE, source_stat
from imgcls.inference.read import LIST_SIZE, is_tar
from imgcls.inference.schema import COL_PATH, COL_SHARD
from imgcls.manifest import manifest_dataset, manifest_folder, resolve_paths

LOCAL_PROTOCOLS = ("file", "local")  # listed by threads in this process; other stores by Ray tasks, per sub-prefix

SHARDS_FILE = "shards.parquet"
SHARD_ORDER = [("first", "ascending"), ("list", "ascending")]  # shards are numbered by their first path
SHARDS_PER_CPU = 4  # a small job is cut into at least this many shards per CPU of the cluster...
MIN_SHARD_FILES = 16  # ... of at least this many files
RECUT_MAX_FILES = 200_000  # ... when it has at most this many files (the driver re-reads their paths)


class OutputFolderError(ValueError):
    """An output folder that holds the output of another labelling job (other inputs, or
    another model): a job's output is never mixed with another's."""


@dataclass
class InputPlan:
    input: str
    files: int  # input files (a tar counts once)
    shards: int
    files_per_shard: int
    sha256: str  # of every path, in shard order
    uri: str  # the plan's folder
    seconds: float = 0.0
    reused: bool = False

    def shard_table(self) -> pa.Table:
        with storage.open_uri(storage.join(self.uri, SHARDS_FILE), "rb") as f:
            return pq.read_table(f)


def iter_runs(items: Iterable, size: int, path=lambda item: item) -> Iterator[list]:
    """Consecutive runs of at most ``size`` items (paths, or what ``path`` takes the path
    of), each tar in a run of its own, as ``items`` arrive."""
    current = []
    for item in items:
        if is_tar(path(item)):
            yield [item]
            continue
        current.append(item)
        if len(current) == size:
            yield current
            current = []
    if current:
        yield current


def cut_runs(paths: list[str], size: int) -> list[list[str]]:
    """Consecutive runs of at most ``size`` paths, each tar in a run of its own."""
    return list(iter_runs(paths, size))


def write_entries(entries: Iterable[tuple[str, Optional[int]]], lists_uri: str, prefix: str,
                  files_per_shard: int) -> dict[str, list]:
    """Writes the shard lists of ``entries`` ((path, size or None), consumed as they come:
    a listing's pages) as ``{prefix}-{j:06d}.parquet``; returns one row per list (list
    URI, files, first path, sha256 of its paths). Names depend only on the paths, so a
    retried task writes the same files again."""
    rows = {"list": [], "files": [], "first": [], "sha256": []}
    for j, run in enumerate(iter_runs(entries, files_per_shard, path=lambda entry: entry[0])):
        paths = [p for p, _ in run]
        uri = storage.join(lists_uri, f"{prefix}-{j:06d}.parquet")
        with storage.open_uri(uri, "wb") as f:
            pq.write_table(pa.table({COL_PATH: pa.array(paths, pa.string()),
                                     LIST_SIZE: pa.array([s for _, s in run], pa.int64())}), f)
        rows["list"].append(uri)
        rows["files"].append(len(run))
        rows["first"].append(paths[0])
        rows["sha256"].append(hashlib.sha256("\n".join(paths).encode()).hexdigest())
    return rows


def write_lists(paths: Iterable[str], lists_uri: str, prefix: str, files_per_shard: int) -> dict[str, list]:
    """``write_entries`` of paths whose sizes are not known (a manifest's)."""
    return write_entries(((p, None) for p in paths), lists_uri, prefix, files_per_shard)


def manifest_block_lists(batch: pa.Table, base: str, lists_uri: str, files_per_shard: int) -> dict[str, list]:
    """Ray Data stage: a batch of manifest rows -> its shard lists (``write_lists``), named
    after a hash of its paths."""
    paths = resolve_paths(base, [p for p in batch.column(COL_PATH).cast(pa.string()).to_pylist() if p])
    if not paths:
        return {"list": [], "files": [], "first": [], "sha256": []}
    prefix = "m" + hashlib.sha256("\n".join(paths).encode()).hexdigest()[:20]
    return write_lists(paths, lists_uri, prefix, files_per_shard)


def _base(uri: str) -> str:
    """``uri`` as its listing's URIs begin (local paths absolute, no trailing '/'): the
    folder below which ``storage.hidden_below`` looks for hidden parts."""
    return storage.unstrip(uri, storage.strip(uri).rstrip("/"))


def visible(base: str, entries: Iterable[tuple[str, Optional[int]]]) -> Iterator[tuple[str, Optional[int]]]:
    """The (URI, size) entries of a listing of ``base`` without the hidden ones."""
    return (entry for entry in entries if not storage.hidden_below(base, entry[0]))


def list_prefix(uri: str) -> list[str]:
    """Every non-hidden file under ``uri`` (recursively), as URIs, sorted."""
    return [path for path, _ in visible(_base(uri), storage.iter_files(uri, recursive=True))]


def prefix_lists(batch: dict, lists_uri: str, files_per_shard: int) -> dict[str, list]:
    """Ray Data stage: sub-prefixes (``index``, ``prefix``) -> the shard lists of the files
    under each (listed a page at a time), named after the sub-prefix's index."""
    out = {"list": [], "files": [], "first": [], "sha256": []}
    for index, prefix in zip(batch["index"], batch["prefix"]):
        prefix = str(prefix)
        entries = visible(_base(prefix), storage.iter_files(prefix, recursive=True))
        for key, values in write_entries(entries, lists_uri, f"p{int(index):06d}", files_per_shard).items():
            out[key].extend(values)
    return out


def glob_files(uri: str) -> Iterator[tuple[str, Optional[int]]]:
    """(URI, size) of the non-hidden files that the glob ``uri`` matches, sorted, from a
    paged listing of the folder before its first wildcard (``storage.iter_files``): to
    the pattern's depth, server-side filtered by the name's stem up to the wildcard, and
    matched as ``fs.glob`` matches (``fsspec.utils.glob_translate``). Folders that match
    are not inputs: only files are."""
    from fsspec.utils import glob_translate

    path = storage.strip(uri)
    cut = min(path.find(ch) for ch in "*?[" if ch in path)
    root, _, stem = path[:cut].rpartition("/")
    depth = None if "**" in path else path[len(root) + 1:].count("/") + 1
    pattern = re.compile(glob_translate(path))
    skip = len(storage.unstrip(uri, ""))  # the protocol's "s3://" before each listed path
    root_uri = storage.unstrip(uri, root)
    return (entry for entry in visible(root_uri, storage.iter_files(root_uri, recursive=True, maxdepth=depth,
                                                                    stem=stem))
            if pattern.match(entry[0], skip))


LISTS_SCHEMA = pa.schema([("list", pa.string()), ("files", pa.int64()), ("first", pa.string()),
                          ("sha256", pa.string())])  # one row per shard list written


def _summary_rows(ds: ray.data.Dataset) -> pa.Table:
    tables = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    return pa.concat_tables([t.select(LISTS_SCHEMA.names).cast(LISTS_SCHEMA) for t in tables if t.num_rows]) \
        if any(t.num_rows for t in tables) else LISTS_SCHEMA.empty_table()


def _lists_table(rows: dict[str, list]) -> pa.Table:
    return pa.table({f.name: pa.array(rows[f.name], f.type) for f in LISTS_SCHEMA})


def _driver_lists(entries: Iterable[tuple[str, Optional[int]]], lists_uri: str, files_per_shard: int) -> pa.Table:
    """The shard lists of ``entries`` (sorted), written here as they arrive."""
    return _lists_table(write_entries(entries, lists_uri, "d", files_per_shard))


def _recut_small(summary: pa.Table, lists_uri: str, files_per_shard: int, cpus: Optional[float] = None) -> pa.Table:
    """A job with fewer shards than ``SHARDS_PER_CPU`` per CPU would leave actors idle
    (a shard is one actor's work): its lists are cut again into smaller shards, once, at
    planning time. Only small jobs qualify, as the driver reads every path here.
    ``summary`` is in SHARD_ORDER, and so is what this returns."""
    files = int(pc.sum(summary["files"]).as_py())
    if cpus is None:
        cpus = float(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1.0
    want = int(SHARDS_PER_CPU * max(1.0, cpus))
    per_shard = max(MIN_SHARD_FILES, -(-files // want))
    if summary.num_rows >= want or files > RECUT_MAX_FILES or per_shard >= files_per_shard:
        return summary
    ordered = summary["list"].to_pylist()  # one row per list, in shard order
    entries = []
    for uri in ordered:
        with storage.open_uri(uri, "rb") as f:
            table = pq.read_table(f)
        entries.extend(zip(table[COL_PATH].to_pylist(), table[LIST_SIZE].to_pylist()))
    fs, _ = storage.filesystem(lists_uri)
    for uri in ordered:
        fs.rm(storage.strip(uri))
    return _driver_lists(entries, lists_uri, per_shard).sort_by(SHARD_ORDER)


def plan_inputs(input_uri: str, output_uri: str, files_per_shard: int, cpus: Optional[float] = None) -> InputPlan:
    """Plans ``input_uri`` into shards under ``output_uri``/_inputs, or reuses the plan there.

    ``cpus`` (default: the running cluster's) sets how many shards a small job is cut into.

    Raises:
        FileNotFoundError: nothing at ``input_uri``, or no files under it.
        OutputFolderError: the output folder holds the plan of other inputs.
        ManifestError: a manifest has no ``path`` column.
    """
    start = time.perf_counter()
    uri = storage.join(output_uri, PLAN_DIR)
    plan_file = storage.join(uri, PLAN_FILE)
    stat = source_stat(input_uri)
    if storage.exists(plan_file):
        found = storage.read_json(plan_file)
        if found["input"] != input_uri or found["files_per_shard"] != files_per_shard or \
                found.get("source_stat") != stat:
            raise OutputFolderError(f"{output_uri} holds the output of other inputs ({found['input']}, "
                                    f"{found['files_per_shard']} files per shard, source "
                                    f"{found.get('source_stat')}); use a new output folder")
        plan = InputPlan(**{k: v for k, v in found.items() if k != "source_stat"}, uri=uri, reused=True)
        plan.seconds = time.perf_counter() - start
        return plan
    fs, path = storage.filesystem(uri)
    if fs.exists(path):  # a plan begun by a killed run
        fs.rm(path, recursive=True)
    lists_uri = storage.join(uri, "lists")
    storage.makedirs(lists_uri)
    in_fs, in_path = storage.filesystem(input_uri)
    if stat is not None and in_fs.isfile(in_path):
        ds = manifest_dataset(input_uri, [COL_PATH]).map_batches(
            manifest_block_lists, fn_kwargs={"base": manifest_folder(input_uri), "lists_uri": lists_uri, "files_per_shard": files_per_shard},
            batch_format="pyarrow", batch_size=files_per_shard * 32, num_cpus=0.25)
        summary = _summary_rows(ds)
    elif any(ch in in_path for ch in "*?["):
        summary = _driver_lists(glob_files(input_uri), lists_uri, files_per_shard)
    elif storage.is_folder(input_uri):
        # The files directly under the folder (all of a flat prefix's) are written here as
        # the listing's pages come; its sub-folders are listed by tasks or threads.
        base, found = _base(input_uri), []
        parts = [_driver_lists(visible(base, storage.iter_files(input_uri, subdirs=found)), lists_uri,
                               files_per_shard)]
        subdirs = sorted(d for d in found if not storage.hidden_below(base, d))
        if subdirs and storage.protocol(input_uri) in LOCAL_PROTOCOLS:
            # A local disk lists in milliseconds, less than starting Ray tasks takes (300
            # files in 10 folders on 2 cores: 3.4 s through tasks); threads here.
            with ThreadPoolExecutor(8) as pool:
                lists = list(pool.map(lambda item: prefix_lists(
                    {"index": [item[0]], "prefix": [item[1]]}, lists_uri, files_per_shard), enumerate(subdirs)))
            parts.append(pa.concat_tables([_lists_table(rows) for rows in lists]))
        elif subdirs:
            items = [{"index": i, "prefix": d} for i, d in enumerate(subdirs)]
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                prefix_lists, fn_kwargs={"lists_uri": lists_uri, "files_per_shard": files_per_shard}, batch_size=1,
                num_cpus=0.25)
            parts.append(_summary_rows(ds))
        summary = pa.concat_tables(parts) if parts else None
    elif in_fs.isfile(in_path):
        summary = _driver_lists([(input_uri, None)], lists_uri, files_per_shard)
    else:
        raise FileNotFoundError(f"no input at {input_uri}")
    if summary is None or summary.num_rows == 0:
        raise FileNotFoundError(f"no files found at {input_uri}")
    # One row per shard list; a list written twice (two identical manifest blocks, or a
    # retried task) counts once. Shards are numbered in the order of their first path.
    agg = summary.group_by("list").aggregate([("files", "max"), ("first", "min"), ("sha256", "min")])
    summary = pa.table({"list": agg["list"], "files": agg["files_max"], "first": agg["first_min"],
                        "sha256": agg["sha256_min"]}).sort_by(SHARD_ORDER)
    summary = _recut_small(summary, lists_uri, files_per_shard, cpus)
    digest = hashlib.sha256("\n".join(summary.column("sha256").to_pylist()).encode()).hexdigest()
    shards = pa.table({COL_SHARD: pa.array(range(summary.num_rows), pa.int64()), "list": summary.column("list"),
                       "files": summary.column("files")})
    with storage.open_uri(storage.join(uri, SHARDS_FILE), "wb") as f:
        pq.write_table(shards, f)
    plan = InputPlan(input=input_uri, files=int(pc.sum(shards.column("files")).as_py()),
                     shards=shards.num_rows, files_per_shard=files_per_shard, sha256=digest, uri=uri)
    record = {k: v for k, v in asdict(plan).items() if k not in ("uri", "seconds", "reused")}
    storage.write_json(plan_file, {**record, "source_stat": stat})
    plan.seconds = time.perf_counter() - start
    return plan
