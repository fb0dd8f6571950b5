"""The CPU stage of batch inference: read each input, decode it, apply the eval geometry.

Every file and tar member becomes exactly one row, a decoded image or an error. Ray
workers that run ``ReadDecodeBatch`` import only this, ``imgcls.preprocess`` and
``imgcls.storage`` (torch, PIL, pyarrow, fsspec; no torchvision), so they start in about
3 s of CPU instead of about 10 s.
"""

from __future__ import annotations

import numpy as np

from imgcls.errors import ERROR_DECODE, ERROR_READ, error_text, error_type
from imgcls.inference.read import MAX_FILE_BYTES, iter_inputs, read_shard
from imgcls.inference.schema import (
    COL_ERROR,
    COL_ERROR_TYPE,
    COL_JPEG,
    COL_PATH,
    COL_ROW,
    COL_SHARD,
    COL_SHARD_ROWS,
    COL_STATUS,
    STATUS_ERROR,
    STATUS_OK,
)


class Decoder:
    """Reads and decodes inputs into uint8 images of the eval geometry, in chunks.

    ``chunks(paths)`` yields dicts of at most ``max_images`` rows with columns ``path``,
    ``status``, ``error``, ``error_type`` and ``image`` (n, S, S, 3) uint8 (zeros on error rows). Never
    raises for bad input: every file and tar member gives exactly one row. At most one
    tar member's bytes, ``max_images`` files' bytes (and no more than ``read.MAX_BYTES_IN_FLIGHT``
    of them, plus one file) and ``max_images`` decoded images are held at a time. A file
    over ``max_bytes`` is an error row, refused by its size before it is read. Images are channels-last (HWC), the layout the model computes in.

    With ``defer_jpeg``, a JPEG that the model's device decodes (``preprocess.device_decodable_jpeg``)
    is not decoded here: its row carries the file's bytes in a ``jpeg`` column (empty on
    the other rows) and a zero image, and ``model_stage.Classifier`` decodes it.
    """

    def __init__(self, image_size: int, max_pixels: int, max_images: int = 64, max_bytes: int = MAX_FILE_BYTES,
                 defer_jpeg: bool = False):
        from imgcls.preprocess import decode_resized, device_decodable_jpeg, resize_size  # torch: decoding workers only

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

    def _row(self, name: str, data) -> tuple:
        """One input's row: (name, image or None, error text, error type[, deferred bytes])."""
        if isinstance(data, BaseException):  # the read's own error, or the tar's
            return name, None, error_text(data), error_type(data, ERROR_READ)
        if self.deferred is not None and self.deferred(data, self.max_pixels):
            return name, None, None, None, data
        try:
            return name, self._image(data), None, None
        except Exception as e:  # noqa: BLE001 - ImageDecodeError (carries its type), or a bug
            return name, None, error_text(e), error_type(e, ERROR_DECODE)

    def decode(self, named: list[tuple[str, bytes]]) -> dict[str, np.ndarray]:
        """Bytes already in hand (``imgcls serve``'s requests) -> one chunk, each row decoded
        or refused exactly as a file with those bytes would be in bulk labelling."""
        return self._chunk([self._row(name, data) for name, data in named])

    def chunks(self, paths, sizes=None):
        """``sizes``: each path's size where known (a shard list's), None where not."""
        rows = []
        for name, data in iter_inputs(paths, self.max_bytes, fetch=self.max_images, sizes=sizes):
            rows.append(self._row(name, data))
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
            for chunk in self.decoder.chunks(*read_shard(list_uri)):
                if previous is not None:
                    yield self._tag(previous, shard, rows - len(previous[COL_PATH]), -1)
                previous = chunk
                rows += len(chunk[COL_PATH])
            yield self._tag(previous, shard, rows - len(previous[COL_PATH]), rows)
