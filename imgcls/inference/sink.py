"""The output side of bulk labelling: each worker writes its shard's Parquet part itself.

A part is written under a hidden name and renamed (``write_part_atomic``), so it only
ever appears complete; its footer records its counts (rows, ok, errors), which the
driver reads instead of the rows. With a separate decode pool, model actors stage each
chunk under ``_staging/{shard}/`` and ``commit_shard`` merges a shard's chunks into its
part. Completion is the set of parts written (``done_shards``) against the set planned.
"""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from imgcls import storage
from imgcls.inference.finished import COUNTS_KEY, PART_NAME, PART_TEMPLATE, STAGING_DIR
from imgcls.inference.schema import COL_PATH, COL_ROW, COL_STATUS, STATUS_OK

SUMMARY_COLUMNS = ("shard", "rows", "ok", "errors", "node", "seconds")


def part_name(shard: int) -> str:
    return PART_TEMPLATE.format(shard)


def write_part_atomic(table: pa.Table, output: str, shard: int) -> dict:
    """Writes one shard's rows as its part, through a hidden name then a rename; returns
    its counts, which the part's footer also records."""
    ok = int(pc.sum(pc.equal(table[COL_STATUS], STATUS_OK)).as_py() or 0)
    counts = {"rows": table.num_rows, "ok": ok, "errors": table.num_rows - ok}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), COUNTS_KEY: json.dumps(counts).encode()})
    write_table_atomic(table, output, part_name(shard))
    return counts


def write_table_atomic(table: pa.Table, folder_uri: str, name: str) -> str:
    """Writes ``table`` as ``folder_uri/name`` through a hidden name (``.tmp-*``, which
    Parquet readers skip) then a rename, so that a reader sees the whole file or none;
    returns its URI."""
    fs, folder = storage.filesystem(folder_uri)
    final = f"{folder.rstrip('/')}/{name}"
    tmp = f"{folder.rstrip('/')}/.tmp-{uuid.uuid4().hex}-{name}"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(tmp, final)
    return storage.unstrip(folder_uri, final)


def done_shards(output: str) -> set[int]:
    """Shards whose part exists (parts only ever appear complete)."""
    fs, folder = storage.filesystem(output)
    fs.invalidate_cache(folder)  # workers wrote there: a cached listing would miss their parts
    if not fs.exists(folder):
        return set()
    names = (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False))
    return {int(m.group(1)) for m in map(PART_NAME.match, names) if m}


def part_counts(output: str, shards) -> list[dict]:
    """The counts recorded in the footers of these shards' parts, read concurrently."""
    fs, folder = storage.filesystem(output)

    def one(shard: int) -> dict:
        with fs.open(f"{folder.rstrip('/')}/{part_name(shard)}", "rb") as f:
            meta = pq.read_metadata(f).metadata or {}
        return json.loads(meta[COUNTS_KEY])

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, shards))


def summary_row(shard: int, counts: dict, seconds: float) -> dict:
    return {"shard": shard, **counts, "node": ray.get_runtime_context().get_node_id(), "seconds": seconds}


def summary_columns(rows: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.array([r[k] for r in rows], dtype=object if k == "node" else None) for k in SUMMARY_COLUMNS}


def finish_part(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A shard's rows as written: the output columns only, sorted by path."""
    return table.select(schema.names).cast(schema).sort_by(COL_PATH)


def staging_uri(output: str, shard: int) -> str:
    return storage.join(output, STAGING_DIR, f"{shard:06d}")


@ray.remote(num_cpus=0.1, max_retries=3)
def commit_shard(output: str, shard: int, shard_rows: int, schema: pa.Schema) -> dict:
    """Merges a shard's staged chunks into its part (rows staged twice by a retried batch
    count once), then removes them."""
    began = time.perf_counter()
    fs, folder = storage.filesystem(staging_uri(output, shard))
    fs.invalidate_cache(folder)  # other workers staged there
    tables = []
    for name in sorted(fs.ls(folder, detail=False)):
        with fs.open(name, "rb") as f:
            tables.append(pq.read_table(f))
    table = pa.concat_tables(tables)
    _, first = np.unique(table[COL_ROW].to_numpy(), return_index=True)
    if len(first) != shard_rows:
        raise RuntimeError(f"shard {shard}: {len(first)} of {shard_rows} rows staged")
    counts = write_part_atomic(finish_part(table.take(pa.array(first)), schema), output, shard)
    fs.rm(folder, recursive=True)
    return summary_row(shard, counts, time.perf_counter() - began)


def remove_staging(output: str) -> None:
    """Removes ``_staging/``: what a killed run left, or the emptied folders of a finished one."""
    fs, folder = storage.filesystem(storage.join(output, STAGING_DIR))
    if fs.exists(folder):
        fs.rm(folder, recursive=True)
