"""The CPU stage of batch inference: read each input, decode it, apply the eval geometry.

Also the one definition of the predictions table's columns, and of tar member paths.
Importing it brings no torch (``Decoder`` imports imaging when built), so the input
planning tasks (``imgcls.inputs``) start in a fraction of a second. Ray workers that run
``ReadDecodeBatch`` import only this module, imaging and storage (torch, PIL, pyarrow,
fsspec; no torchvision), so they start in about 3 s of CPU instead of about 10 s.
"""

from __future__ import annotations

import re
import tarfile

import numpy as np
import pyarrow as pa

from imgcls import storage

# Output schema: the one definition of the predictions table.
COL_PATH = "path"
COL_STATUS = "status"
COL_ERROR = "error"
COL_ERROR_TYPE = "error_type"  # one of ERROR_TYPES on error rows, null on ok rows
COL_LABEL = "label"
COL_SCORE = "score"
COL_TOPK_LABELS = "topk_labels"
COL_TOPK_SCORES = "topk_scores"
COL_MODEL_ID = "model_id"
COL_EMBEDDING = "embedding"
STATUS_OK = "ok"
STATUS_ERROR = "error"
# Values of COL_ERROR_TYPE: why an input gave an error row, a small fixed set to group by
# (the error text says more, and is the same in every run over the same files).
ERROR_READ = "read"  # could not be read: missing, permission denied, a folder, a network or store error
ERROR_EMPTY = "empty"  # a zero-byte file, or a tar that holds no files
ERROR_TOO_LARGE = "too-large"  # over the byte cap (MAX_FILE_BYTES) or the pixel cap (max_pixels: a decompression bomb)
ERROR_DECODE = "decode"  # not an image, or a corrupt or truncated one
ERROR_UNSUPPORTED = "unsupported"  # an image PIL cannot decode here: HEIC, JPEG XL, EPS without Ghostscript, a stub format
ERROR_TAR = "tar"  # a broken tar: not a tar, truncated or corrupt (the row is under the tar's own path)
ERROR_TYPES = (ERROR_READ, ERROR_EMPTY, ERROR_TOO_LARGE, ERROR_DECODE, ERROR_UNSUPPORTED, ERROR_TAR)
# Internal columns of the bulk-labelling pipeline, dropped before writing.
COL_SHARD = "shard"
COL_ROW = "row"  # index of the row within its shard
COL_SHARD_ROWS = "shard_rows"  # rows of the whole shard, on the rows of its last chunk; -1 elsewhere
# A tar member's path: the tar's URI, this separator, the member's name inside the tar,
# e.g. ``s3://bucket/shards/000001.tar#images/cat.jpg``. Not ``::``, which fsspec
# reads as URL chaining; '#' is kept as-is by s3://, gs://, az:// and local paths.
TAR_MEMBER_SEP = "#"
MAX_FILE_BYTES = 256 * 2**20  # per input file or tar member; larger ones give error rows


def output_schema(embeddings: bool = False) -> pa.Schema:
    fields = [
        pa.field(COL_PATH, pa.string(), nullable=False),
        pa.field(COL_STATUS, pa.string(), nullable=False),
        pa.field(COL_ERROR, pa.string()),
        pa.field(COL_ERROR_TYPE, pa.string()),
        pa.field(COL_LABEL, pa.string()),
        pa.field(COL_SCORE, pa.float32()),
        pa.field(COL_TOPK_LABELS, pa.list_(pa.string())),
        pa.field(COL_TOPK_SCORES, pa.list_(pa.float32())),
        pa.field(COL_MODEL_ID, pa.string(), nullable=False),
    ]
    if embeddings:
        fields.append(pa.field(COL_EMBEDDING, pa.list_(pa.float32())))
    return pa.schema(fields)


def is_tar(path: str) -> bool:
    """A WebDataset-style tar shard, whose members are the images (plain or gzipped)."""
    return path.lower().endswith((".tar", ".tar.gz", ".tgz"))


class InputError(ValueError):
    """An input that cannot be labelled for a reason found by reading it; ``error_type``
    (one of ERROR_TYPES) says which. ``imaging.ImageDecodeError`` is one."""

    error_type = ERROR_DECODE


class EmptyTarError(InputError):
    """A tar that holds no files."""

    error_type = ERROR_EMPTY


class BrokenTarError(InputError):
    """A tar that cannot be read as one: not a tar, truncated or corrupt."""

    error_type = ERROR_TAR


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # in reprs: <_io.BytesIO object at 0x7f56fc53e610>


def stable_text(text: str) -> str:
    """``text`` without what differs from run to run: the memory addresses of reprs."""
    return _ADDRESS.sub("", text)


def error_text(e: BaseException) -> str:
    """The COL_ERROR of an input's error: its type and message, the same in every run."""
    return stable_text(f"{type(e).__name__}: {e}")[:500]


def error_type(e: BaseException, default: str = ERROR_READ) -> str:
    """The COL_ERROR_TYPE of an input's error: the ``error_type`` it carries (InputError
    and ``imaging.ImageDecodeError``), too-large for a file over the byte cap, else
    ``default``: read for what reading the input raised (FileNotFoundError,
    PermissionError, a store's errors), decode for what decoding raised."""
    kind = getattr(e, "error_type", None)
    if kind in ERROR_TYPES:
        return kind
    if isinstance(e, storage.FileTooLargeError):
        return ERROR_TOO_LARGE
    return default


def member_path(tar: str, member: str) -> str:
    return f"{tar}{TAR_MEMBER_SEP}{member}"


def split_member(path: str) -> tuple[str, str | None]:
    """``member_path``'s inverse: (tar URI, member name), or (path, None) for a plain file.

    Splits at the first ``.tar#`` (or ``.tar.gz#``, ``.tgz#``): member names may hold
    anything, tar URIs are taken not to hold that sequence.
    """
    lower = path.lower()
    cuts = [at + len(ext) for ext in (".tar", ".tar.gz", ".tgz")
            if (at := lower.find(ext + TAR_MEMBER_SEP)) >= 0]
    if not cuts:
        return path, None
    cut = min(cuts)
    return path[:cut], path[cut + len(TAR_MEMBER_SEP):]


def source_file(path: str) -> str:
    """The file that holds ``path``: the tar for a member, else the path itself."""
    return split_member(path)[0]


def iter_tar(uri: str, max_bytes: int = MAX_FILE_BYTES):
    """Yields (member path, bytes or exception) for each file in the tar at ``uri``, reading
    it as a stream: one member in memory at a time, never the whole tar.

    A member over ``max_bytes`` gives an error without being read into memory (a
    gzip bomb named .tar is caught here, or as a broken archive). A tar that cannot be
    opened (the read's own error) or read as a tar (BrokenTarError) gives an error under
    the tar's own path, after the members read before it; a tar with no files gives one
    error row (EmptyTarError), so it never vanishes.
    """
    files = 0
    try:
        with storage.open_uri(uri, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                files += 1
                name = member_path(uri, member.name)
                if member.size > max_bytes:
                    yield name, storage.FileTooLargeError(
                        f"tar member of {member.size} bytes exceeds the {max_bytes}-byte limit")
                    continue
                yield name, tar.extractfile(member).read()
    except tarfile.TarError as e:  # not a tar, truncated, corrupt (compressed data too)
        if not files and str(e) == "empty file":  # tarfile's word for a zero-byte tar
            yield uri, EmptyTarError("empty tar file")
        else:
            yield uri, BrokenTarError(f"broken tar archive: {stable_text(str(e))}")
        return
    except Exception as e:  # noqa: BLE001 - missing, unreadable: the read's own error
        yield uri, e
        return
    if not files:
        yield uri, EmptyTarError("tar archive holds no files")


def read_input(path: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of one input as named in a predictions table: a file, or a tar member
    (found by reading the tar up to it)."""
    tar, member = split_member(path)
    if member is None:
        return storage.read_bytes(path)
    for name, data in iter_tar(tar, max_bytes):
        if name == path:
            if isinstance(data, BaseException):
                raise data
            return data
    raise FileNotFoundError(f"{member} is not in {tar}")


def iter_inputs(paths, max_bytes: int = MAX_FILE_BYTES, fetch: int = 64):
    """Yields (path, bytes or exception) per input file, and per member of each tar.

    Plain files are fetched ``fetch`` at a time, concurrently (``storage.read_many``),
    so that an actor reading from S3 is not bound by one request's latency per file.
    """
    pending: list[str] = []

    def flush():
        yield from zip(pending, storage.read_many(pending, max_bytes))
        pending.clear()

    for path in paths:
        if is_tar(path):
            yield from flush()
            yield from iter_tar(path, max_bytes)
            continue
        pending.append(path)
        if len(pending) == fetch:
            yield from flush()
    yield from flush()


COL_JPEG = "jpeg"  # a JPEG's bytes, left for the model stage to decode on its device (Decoder's defer_jpeg)


class Decoder:
    """Reads and decodes inputs into uint8 images of the eval geometry, in chunks.

    ``chunks(paths)`` yields dicts of at most ``max_images`` rows with columns ``path``,
    ``status``, ``error``, ``error_type`` and ``image`` (n, S, S, 3) uint8 (zeros on error rows). Never
    raises for bad input: every file and tar member gives exactly one row. At most one
    tar member's bytes, ``max_images`` files' bytes and ``max_images`` decoded images
    are held at a time. Images are channels-last (HWC), the layout the model computes in.

    With ``defer_jpeg``, a JPEG that the model's device decodes (``imaging.device_decodable_jpeg``)
    is not decoded here: its row carries the file's bytes in a ``jpeg`` column (empty on
    the other rows) and a zero image, and ``classifier.Classifier`` decodes it.
    """

    def __init__(self, image_size: int, max_pixels: int, max_images: int = 64, max_bytes: int = MAX_FILE_BYTES,
                 defer_jpeg: bool = False):
        from imgcls.imaging import decode_resized, device_decodable_jpeg, resize_size  # torch: decoding workers only

        self.decode_resized, self.short_side = decode_resized, resize_size(image_size)
        self.deferred = device_decodable_jpeg if defer_jpeg else None
        self.image_size = image_size
        self.max_pixels = max_pixels
        self.max_images = max_images
        self.max_bytes = max_bytes

    def _image(self, data: bytes) -> np.ndarray:
        return self.decode_resized(data, self.short_side, self.image_size, self.max_pixels)  # (S, S, 3)

    def _chunk(self, rows: list) -> dict[str, np.ndarray]:
        # Filled row by row into a C-contiguous array: np.stack would keep the crops'
        # strided layout, and Ray Data would then copy the whole batch again to make
        # it contiguous, which cost more than decoding.
        image = np.zeros((len(rows), self.image_size, self.image_size, 3), np.uint8)
        for i, row in enumerate(rows):
            if row[1] is not None:
                image[i] = row[1]
        obj = lambda values: np.array(values, dtype=object)  # noqa: E731
        chunk = {COL_PATH: obj([r[0] for r in rows]),
                 COL_STATUS: obj([STATUS_OK if r[2] is None else STATUS_ERROR for r in rows]),
                 COL_ERROR: obj([r[2] for r in rows]), COL_ERROR_TYPE: obj([r[3] for r in rows]), "image": image}
        if self.deferred is not None:  # bytes in every row (empty: decoded here), so the column has one Arrow type
            chunk[COL_JPEG] = obj([r[4] if len(r) > 4 else b"" for r in rows])
        return chunk

    def chunks(self, paths):
        rows = []
        for name, data in iter_inputs(paths, self.max_bytes, fetch=self.max_images):
            if isinstance(data, BaseException):  # the read's own error, or the tar's
                rows.append((name, None, error_text(data), error_type(data, ERROR_READ)))
            elif self.deferred is not None and self.deferred(data, self.max_pixels):
                rows.append((name, None, None, None, data))
            else:
                try:
                    rows.append((name, self._image(data), None, None))
                except Exception as e:  # noqa: BLE001 - ImageDecodeError (carries its type), or a bug
                    rows.append((name, None, error_text(e), error_type(e, ERROR_DECODE)))
            if len(rows) == self.max_images:
                yield self._chunk(rows)
                rows = []
        if rows:
            yield self._chunk(rows)


class ReadDecodeBatch:
    """CPU stage of ``predict``: a batch of input rows (``path``) -> decoded batches of at
    most ``max_images`` rows (see ``Decoder``); an empty batch for no input rows."""

    def __init__(self, image_size: int, max_pixels: int, max_images: int = 64, max_bytes: int = MAX_FILE_BYTES,
                 defer_jpeg: bool = False):
        self.decoder = Decoder(image_size, max_pixels, max_images, max_bytes, defer_jpeg)

    def __call__(self, batch: dict[str, np.ndarray]):
        yielded = False
        for chunk in self.decoder.chunks(batch[COL_PATH]):
            yield chunk
            yielded = True
        if not yielded:
            yield self.decoder._chunk([])


class DecodeShards:
    """CPU stage of bulk labelling with a separate decode pool: each input row names one
    shard (``shard``, ``list``: the Parquet file of its paths); yields its decoded chunks
    tagged with ``shard``, ``row`` (index in the shard) and ``shard_rows`` (the shard's row
    count, on its last chunk only: a tar's count is known once it has been read)."""

    def __init__(self, image_size: int, max_pixels: int, max_images: int = 64, max_bytes: int = MAX_FILE_BYTES,
                 defer_jpeg: bool = False):
        self.decoder = Decoder(image_size, max_pixels, max_images, max_bytes, defer_jpeg)

    def _tag(self, chunk: dict, shard: int, first: int, total: int) -> dict:
        n = len(chunk[COL_PATH])
        chunk[COL_SHARD] = np.full(n, shard, np.int64)
        chunk[COL_ROW] = np.arange(first, first + n, dtype=np.int64)
        chunk[COL_SHARD_ROWS] = np.full(n, total, np.int64)
        return chunk

    def __call__(self, batch: dict[str, np.ndarray]):
        for shard, list_uri in zip(batch[COL_SHARD], batch["list"]):
            previous, rows = None, 0
            for chunk in self.decoder.chunks(read_shard_list(list_uri)):
                if previous is not None:
                    yield self._tag(previous, shard, rows - len(previous[COL_PATH]), -1)
                previous = chunk
                rows += len(chunk[COL_PATH])
            yield self._tag(previous, shard, rows - len(previous[COL_PATH]), rows)


def read_shard_list(uri: str) -> list[str]:
    """The input paths of one shard, from its list file (see ``imgcls.inputs``)."""
    import pyarrow.parquet as pq

    with storage.open_uri(uri, "rb") as f:
        return pq.read_table(f, columns=[COL_PATH]).column(COL_PATH).to_pylist()
