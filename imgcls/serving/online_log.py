"""The online log: every answer of ``imgcls serve`` as a predictions row, written by the replicas.

Rows are the predictions table's (``inference.schema.output_schema`` with embeddings),
plus ``timestamp`` (when the answer was made, UTC) and ``request_id``, so that the
readers of bulk labelling's output read this folder as they read a labelling run:
``imgcls monitor --current LOG_DIR`` and ``imgcls review --predictions LOG_DIR``.

Each replica buffers its rows and writes them as one Parquet part
(``part-{replica}-{seq}.parquet``) through a hidden name and a rename
(``sink.write_table_atomic``), so a reader never sees half a part, and no driver is in
the way: replicas on many nodes write side by side. A part is written once the buffer
holds ``flush_rows`` rows or its oldest row is ``flush_s`` old, when the model changes
(a part holds one model's rows) and when the replica stops.

With ``images``, each request's bytes are kept under ``LOG_DIR/_images/`` and the row's
path names that file (``review``'s contact sheet then shows it); without, the path is
``request:{request_id}``: the server never names a client's file, as it never reads one.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Optional

import pyarrow as pa

from imgcls import storage
from imgcls.inference.schema import output_schema

COL_TIMESTAMP = "timestamp"
COL_REQUEST_ID = "request_id"
IMAGES_DIR = "_images"  # "_": Parquet dataset readers skip it when they read the log


def log_schema() -> pa.Schema:
    return output_schema(embeddings=True).append(pa.field(COL_TIMESTAMP, pa.timestamp("ms", tz="UTC"))) \
        .append(pa.field(COL_REQUEST_ID, pa.string()))


def request_path(request_id: str) -> str:
    """A row's path when the image is not kept."""
    return f"request:{request_id}"


def image_extension(data: bytes) -> str:
    """The file extension of an image's bytes, from its header ('.bin' for what is not an
    image), so that a kept request is listed as an image by the folder readers."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
    except Exception:  # noqa: BLE001 - not an image: its row is an error row anyway
        return ".bin"
    return {"JPEG": ".jpg", "TIFF": ".tif"}.get(fmt, f".{fmt.lower()}" if fmt else ".bin")


class OnlineLog:
    """One replica's buffer of answered rows; thread-safe (the batch runs in a thread)."""

    def __init__(self, folder: str, flush_rows: int = 1000, flush_s: float = 30.0, images: bool = False):
        self.folder, self.flush_rows, self.flush_s, self.images = folder, flush_rows, flush_s, images
        self.replica = uuid.uuid4().hex[:12]
        self.seq = 0
        self.rows: list[pa.Table] = []
        self.buffered = 0
        self.oldest: Optional[float] = None
        self.lock = threading.Lock()
        storage.makedirs(folder)
        if images:
            storage.makedirs(storage.join(folder, IMAGES_DIR))

    def image_uri(self, request_id: str, data: bytes) -> str:
        """Keeps a request's bytes (with ``images``) and returns the row's path."""
        if not self.images:
            return request_path(request_id)
        uri = storage.join(self.folder, IMAGES_DIR, request_id + image_extension(data))
        with storage.open_uri(uri, "wb") as f:
            f.write(data)
        return uri

    def append(self, table: pa.Table, request_ids: list[str]) -> None:
        """Adds answered rows (the model stage's columns, embeddings included)."""
        now = pa.array([int(time.time() * 1000)] * table.num_rows, pa.timestamp("ms", tz="UTC"))
        table = table.append_column(COL_TIMESTAMP, now).append_column(COL_REQUEST_ID, pa.array(request_ids, pa.string()))
        with self.lock:
            self.rows.append(table.cast(log_schema()))
            self.buffered += table.num_rows
            self.oldest = self.oldest or time.monotonic()
            due = self.buffered >= self.flush_rows
        if due:
            self.flush()

    def due(self) -> bool:
        return self.oldest is not None and time.monotonic() - self.oldest >= self.flush_s

    def flush(self) -> Optional[str]:
        """Writes the buffered rows as one part; returns its URI (None: nothing buffered)."""
        from imgcls.inference.sink import write_table_atomic

        with self.lock:
            if not self.rows:
                return None
            table, self.rows, self.buffered, self.oldest = pa.concat_tables(self.rows), [], 0, None
            self.seq += 1
            name = f"part-{self.replica}-{self.seq:06d}.parquet"
        return write_table_atomic(table, self.folder, name)
