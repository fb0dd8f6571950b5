"""The labelling page: a person answers ``imgcls review``'s picks in a browser, one at a time.

``imgcls label review.csv`` (or ``imgcls review ... --serve``) serves a page on
loopback that shows each pick large (small images scaled up by whole factors with
nearest neighbour), the model's top-k classes and scores, a button per class (number
keys for the first nine), "Skip" and "Not any of these", back and forward, and the
progress. Every answer rewrites ``review.csv`` at once, atomically (a file written
beside it, then renamed over it), so a closed tab or a killed server loses nothing,
and the page reopens at the first pick not answered yet.

Answers are kept in two columns: ``label`` (the class chosen) and ``review``
(``skipped`` or ``none-of-these``, empty otherwise). A review file, one with the
``review`` column, is a training manifest: its rows without a label are left out
(``labelled.REVIEW_COLUMN``). Images are read here, through imgcls's readers (local
files, store URIs, ``TAR#MEMBER`` paths), and sent to the page by their index in the
file: no path is ever served.

What the page shows besides the file's own columns comes from ``review.json``, written
beside ``review.csv`` by ``imgcls review`` (``write_context``): the classes of the
model that made the predictions, its name, and each pick's top-k scores. Standard
library HTTP server, no Ray, no torch.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, urlparse

import pandas as pd

from imgcls import storage
from imgcls.labelled import REVIEW_COLUMN, REVIEW_NONE, REVIEW_SKIPPED
from imgcls.web import page, version

CONTEXT_FILE = "review.json"  # beside review.csv: classes, model, top-k per pick
# Formats a browser shows as they are; any other (TIFF, PPM, ...) is sent as PNG.
BROWSER_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}


class LabelError(ValueError):
    """A review file that cannot be labelled as asked: not a local CSV, no ``path`` column."""


# -- the context: classes, model, top-k ---------------------------------------------------

def _model_classes(model: str) -> Optional[list[str]]:
    """The classes of ``model`` (a checkpoint or export folder; an ensemble's first member)."""
    from imgcls.checkpoint import CLASSES_FILE
    from imgcls.paths import members

    uri = storage.join(members(model)[0], CLASSES_FILE)
    return storage.read_json(uri) if storage.exists(uri) else None


def write_context(review_csv: str, predictions: str) -> str:
    """Writes ``review.json`` beside ``review_csv``: the classes (of the model named by the
    predictions' ``_job.json``; else every class in their top-k lists), that model, and
    each pick's top-k (label, score) pairs, read once from ``predictions``."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    paths = pd.read_csv(review_csv, dtype=str, keep_default_na=False)["path"].tolist()
    fs, path = storage.filesystem(predictions)
    dataset = ds.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=True)
    table = dataset.to_table(columns=["path", "topk_labels", "topk_scores"],
                             filter=pc.field("path").isin(paths) & (pc.field("status") == "ok"))
    topk = {row["path"]: [[label, round(float(score), 6)] for label, score in
                          zip(row["topk_labels"], row["topk_scores"])] for row in table.to_pylist()}
    from imgcls.inference.finished import job_model

    model = job_model(predictions)
    classes = _model_classes(model) if model else None
    if classes is None:  # an online log: no job record; the classes the model ever ranked
        seen = dataset.to_table(columns=["topk_labels"], filter=pc.field("status") == "ok").column("topk_labels")
        classes = sorted(pc.unique(pc.list_flatten(seen)).to_pylist())
    context = {"predictions": predictions, "model": model, "classes": classes, "topk": topk}
    out = os.path.join(os.path.dirname(os.path.abspath(review_csv)), CONTEXT_FILE)
    _replace(out, json.dumps(context, indent=1).encode())
    return out


# -- the review file ----------------------------------------------------------------------

def _replace(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically: a file beside it, flushed, then renamed
    over it, so a reader (or a crash) sees the old file or the new one, never half."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".review-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class ReviewFile:
    """``review.csv`` in memory, written back whole after every answer (a few hundred rows:
    milliseconds)."""

    path: str
    rows: pd.DataFrame
    classes: list[str]
    model: Optional[str] = None
    topk: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, path: str, classes: Optional[list[str]] = None) -> "ReviewFile":
        """The review file at ``path`` (a local CSV), with its context (``review.json``)
        when there is one; ``classes`` overrides the context's."""
        if storage.protocol(path) != "file" or not path.lower().endswith(".csv"):
            raise LabelError(f"{path}: the labelling page writes a local review CSV (as imgcls review makes)")
        path = storage.strip(path)
        rows = pd.read_csv(path, dtype=str, keep_default_na=False)
        if "path" not in rows.columns:
            raise LabelError(f"{path} has no 'path' column; columns: {list(rows.columns)}")
        for column in ("label", REVIEW_COLUMN):
            if column not in rows.columns:
                rows[column] = ""
        context_path = os.path.join(os.path.dirname(os.path.abspath(path)), CONTEXT_FILE)
        context = json.load(open(context_path)) if os.path.isfile(context_path) else {}
        classes = list(classes or context.get("classes") or [])
        if not classes:  # no context, none given: the classes the file itself names
            classes = sorted({*rows.get("predicted_label", pd.Series(dtype=str)), *rows["label"]} - {""})
        if not classes:
            raise LabelError(f"{path}: no classes known: give --classes, or make the file with imgcls review")
        return cls(path, rows, classes, context.get("model"), context.get("topk", {}))

    def __len__(self) -> int:
        return len(self.rows)

    def first_open(self) -> Optional[int]:
        """The first pick with no answer (no label, not skipped, not 'none of these')."""
        open_ = (self.rows["label"] == "") & (self.rows[REVIEW_COLUMN] == "")
        return int(open_.to_numpy().argmax()) if open_.any() else None

    def state(self) -> dict:
        rows = self.rows
        labelled = int((rows["label"] != "").sum())
        skipped = int(((rows["label"] == "") & (rows[REVIEW_COLUMN] == REVIEW_SKIPPED)).sum())
        none = int(((rows["label"] == "") & (rows[REVIEW_COLUMN] == REVIEW_NONE)).sum())
        return {"file": os.path.basename(self.path), "picks": len(rows), "labelled": labelled, "skipped": skipped,
                "none": none, "open": len(rows) - labelled - skipped - none, "first_open": self.first_open(),
                "classes": self.classes, "model": self.model, "version": version()}

    def pick(self, i: int) -> dict:
        row = self.rows.iloc[i]
        topk = self.topk.get(row["path"])
        if topk is None and row.get("predicted_label"):  # no context: the prediction the file holds
            topk = [[row["predicted_label"], float(row.get("score") or 0)]]
        from imgcls.inference.read import split_member

        tar, member = split_member(row["path"])
        return {"index": i, "name": os.path.basename(member or tar), "topk": topk or [],
                "label": row["label"], "review": row[REVIEW_COLUMN]}

    def answer(self, i: int, label: Optional[str] = None, review: Optional[str] = None) -> dict:
        """Records the answer for pick ``i`` (a class, or a ``review`` value) and writes
        the file before returning."""
        if label is not None and label not in self.classes:
            raise LabelError(f"{label!r} is not one of the classes")
        if review not in (None, REVIEW_SKIPPED, REVIEW_NONE):
            raise LabelError(f"review must be {REVIEW_SKIPPED!r} or {REVIEW_NONE!r}")
        if (label is None) == (review is None):
            raise LabelError("give a label or a review, not both")
        with self.lock:
            self.rows.iloc[i, self.rows.columns.get_loc("label")] = label or ""
            self.rows.iloc[i, self.rows.columns.get_loc(REVIEW_COLUMN)] = review or ""
            _replace(self.path, self.rows.to_csv(index=False).encode())
            return self.state()

    def image(self, i: int) -> tuple[bytes, str]:
        """Pick ``i``'s image as (bytes, content type): as stored when a browser shows that
        format, else as PNG."""
        from PIL import Image

        from imgcls.inference.read import read_input

        from imgcls.manifest import manifest_folder, resolve_paths

        # A relative path is relative to the file's folder, as when the file is a training manifest.
        data = read_input(resolve_paths(manifest_folder(self.path), [self.rows.iloc[i]["path"]])[0])
        with Image.open(io.BytesIO(data)) as image:
            if image.format in BROWSER_FORMATS:
                return data, BROWSER_FORMATS[image.format]
            out = io.BytesIO()
            image.convert("RGBA" if "A" in image.getbands() else "RGB").save(out, format="PNG")
            return out.getvalue(), "image/png"


# -- the server ---------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    review: ReviewFile  # set on the subclass ``make_server`` builds
    server_version = "imgcls-label"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name; one line per request is noise here
        pass

    def _send(self, status: int, body: bytes, content_type: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "private, max-age=3600" if cache else "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message}, status)

    def _index(self, query: dict) -> Optional[int]:
        try:
            i = int(query.get("i", [""])[0])
        except ValueError:
            i = -1
        if not 0 <= i < len(self.review):
            self._error(404, f"no pick {query.get('i', [''])[0]!r}; there are {len(self.review)}")
            return None
        return i

    def do_GET(self):  # noqa: N802 - http.server's name
        url = urlparse(self.path)
        query = parse_qs(url.query)
        if url.path == "/":
            return self._send(200, page("label.html"), "text/html; charset=utf-8")
        if url.path == "/pages.css":
            return self._send(200, page("pages.css"), "text/css; charset=utf-8")
        if url.path == "/api/state":
            return self._json(self.review.state())
        if url.path in ("/api/pick", "/api/image"):
            i = self._index(query)
            if i is None:
                return None
            if url.path == "/api/pick":
                return self._json(self.review.pick(i))
            try:
                data, content_type = self.review.image(i)
            except Exception as e:  # noqa: BLE001 - a file gone or unreadable: the page says so, the server goes on
                from imgcls.errors import error_text

                return self._error(422, error_text(e))
            return self._send(200, data, content_type, cache=True)
        return self._error(404, f"no page {url.path}")

    def do_POST(self):  # noqa: N802
        # JSON only: a form on another site cannot send it without the browser asking
        # this server first (a CORS preflight, which it does not answer).
        if urlparse(self.path).path != "/api/answer":
            return self._error(404, f"no endpoint {self.path}")
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            return self._error(415, "send the answer as application/json")
        try:
            body = json.loads(self.rfile.read(min(int(self.headers.get("Content-Length") or 0), 65536)))
            i = int(body["index"])
            if not 0 <= i < len(self.review):
                raise IndexError(i)
            return self._json(self.review.answer(i, body.get("label"), body.get("review")))
        except (ValueError, KeyError, IndexError, TypeError) as e:
            return self._error(400, f"not an answer: {e}")


def make_server(review: ReviewFile, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """The labelling page's server for ``review``, bound (``port`` 0: any free port), not
    yet serving."""
    handler = type("Handler", (_Handler,), {"review": review})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as e:  # the port taken (another page still open?), an address not of this machine
        raise LabelError(f"cannot listen on {host}:{port}: {e.strerror}; give another --port") from None
    server.daemon_threads = True
    return server


def serve_review(path: str, host: str = "127.0.0.1", port: int = 8765, classes: Optional[list[str]] = None,
                 predictions: Optional[str] = None) -> None:
    """Serves the labelling page for the review file at ``path`` until interrupted.

    Args:
        path: ``review.csv`` (local).
        host: Address to listen on; loopback by default (the page has no login).
        port: Port; 0 picks a free one.
        classes: The classes to offer, instead of those of ``review.json``.
        predictions: Predictions to (re)write ``review.json`` from first.
    """
    if predictions:
        write_context(path, predictions)
    review = ReviewFile.open(path, classes)
    server = make_server(review, host, port)
    if host not in ("localhost", "127.0.0.1", "::1"):
        print(f"imgcls label: WARNING: the page on {host} has no login: anyone who reaches it sees the picks' "
              "images and can answer them", file=sys.stderr, flush=True)
    state = review.state()
    print(f"imgcls label: {state['labelled']} / {state['picks']} labelled in {review.path}; "
          f"answer the picks at http://{host}:{server.server_address[1]}/ (Ctrl-C stops; every answer is saved)",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
