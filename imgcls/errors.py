"""Input errors and their types: what an error row of a predictions table says went wrong.

Shared by every reader and decoder (``imgcls.preprocess``, ``imgcls.inference``), and
free of torch and pyarrow, so that planning tasks import it in a fraction of a second.
"""

from __future__ import annotations

import re

from imgcls import storage

# Values of COL_ERROR_TYPE: why an input gave an error row, a small fixed set to group by
# (the error text says more, and is the same in every run over the same files).
ERROR_READ = "read"  # could not be read: missing, permission denied, a folder, a network or store error
ERROR_EMPTY = "empty"  # a zero-byte file, or a tar that holds no files
ERROR_TOO_LARGE = "too-large"  # over the byte cap (MAX_FILE_BYTES) or the pixel cap (max_pixels: a decompression bomb)
ERROR_DECODE = "decode"  # not an image, or a corrupt or truncated one
ERROR_UNSUPPORTED = "unsupported"  # an image PIL cannot decode here: HEIC, JPEG XL, EPS without Ghostscript, a stub format
ERROR_TAR = "tar"  # a broken tar: not a tar, truncated or corrupt (the row is under the tar's own path)
ERROR_TYPES = (ERROR_READ, ERROR_EMPTY, ERROR_TOO_LARGE, ERROR_DECODE, ERROR_UNSUPPORTED, ERROR_TAR)


class InputError(ValueError):
    """An input that cannot be labelled for a reason found by reading it; ``error_type``
    (one of ERROR_TYPES) says which. ``preprocess.ImageDecodeError`` is one."""

    error_type = ERROR_DECODE


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # in reprs: <_io.BytesIO object at 0x7f56fc53e610>


def stable_text(text: str) -> str:
    """``text`` without what differs from run to run: the memory addresses of reprs."""
    return _ADDRESS.sub("", text)


def error_text(e: BaseException) -> str:
    """The COL_ERROR of an input's error: its type and message, the same in every run."""
    return stable_text(f"{type(e).__name__}: {e}")[:500]


def error_type(e: BaseException, default: str = ERROR_READ) -> str:
    """The COL_ERROR_TYPE of an input's error: the ``error_type`` it carries (InputError
    and ``preprocess.ImageDecodeError``), too-large for a file over the byte cap, else
    ``default``: read for what reading the input raised (FileNotFoundError,
    PermissionError, a store's errors), decode for what decoding raised."""
    kind = getattr(e, "error_type", None)
    if kind in ERROR_TYPES:
        return kind
    if isinstance(e, storage.FileTooLargeError):
        return ERROR_TOO_LARGE
    return default
