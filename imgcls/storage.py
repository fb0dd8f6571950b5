"""fsspec URI handling: the one place where paths and filesystems are resolved.

Plain paths are local files; ``s3://``, ``gs://``, ``az://`` and any other fsspec
protocol work wherever a path is accepted.
"""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec
from fsspec.core import split_protocol, url_to_fs

MANIFEST_EXTENSIONS = (".csv", ".parquet")  # a manifest of paths, where a folder could be given


class FileTooLargeError(ValueError):
    """A file (or tar member) over the byte cap of a read."""


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Returns the filesystem for ``uri`` and the path within it."""
    return url_to_fs(uri)


def protocol(uri: str) -> str:
    return split_protocol(uri)[0] or "file"


def strip(uri: str) -> str:
    """The path within its filesystem (no protocol)."""
    return filesystem(uri)[1]


def unstrip(like_uri: str, path: str) -> str:
    """Puts back the protocol of ``like_uri`` on a path returned by its filesystem."""
    proto = split_protocol(like_uri)[0]
    return f"{proto}://{path}" if proto and proto != "file" else path


def absolute(uri: str) -> str:
    """Local paths made absolute (Ray needs that for storage_path); URIs unchanged."""
    return uri if split_protocol(uri)[0] not in (None, "file") else os.path.abspath(strip(uri))


def is_absolute(path: str) -> bool:
    return split_protocol(path)[0] is not None or os.path.isabs(path)


def join(base: str, *parts: str) -> str:
    if split_protocol(base)[0]:
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(base, *parts)


def hidden_below(base: str, path: str) -> bool:
    """Whether any part of ``path`` below the folder ``base`` is hidden (starts with '.'):
    ``.ipynb_checkpoints/x.jpg`` or ``.DS_Store``. Listings of inputs and of training
    data both skip such paths."""
    rel = path[len(base.rstrip("/")) + 1:] if path.startswith(base.rstrip("/") + "/") else path.rsplit("/", 1)[-1]
    return any(part.startswith(".") for part in rel.split("/") if part)


def open_uri(uri: str, mode: str = "rb", **kwargs):
    return fsspec.open(uri, mode, **kwargs)


def read_bytes(uri: str) -> bytes:
    if split_protocol(uri)[0] is None:  # a plain local path: without fsspec's path handling, about 3x faster
        with open(uri, "rb") as f:
            return f.read()
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def write_json(uri: str, obj: Any) -> None:
    with open_uri(uri, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)


def read_json(uri: str) -> Any:
    with open_uri(uri, "r") as f:
        return json.load(f)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_many(uris: list[str], max_bytes: int | None = None) -> list[bytes | BaseException]:
    """The bytes of each URI, fetched concurrently, in order; a failed read gives its exception.

    Objects on one remote store come in one ``fs.cat`` call, which s3fs, gcsfs and adlfs
    run as concurrent requests, so a batch costs about one round trip rather than one
    per file. Local files are read one after the other: the page cache answers faster
    than threads start. A file over ``max_bytes`` gives a FileTooLargeError (a local one
    without being read).
    """
    out: list[bytes | BaseException] = [ValueError("not read")] * len(uris)
    remote: dict[Any, list[int]] = {}
    for i, uri in enumerate(uris):
        if split_protocol(uri)[0] is None:
            try:
                with open(uri, "rb") as f:  # a folder raises here, before its size is taken for a file's
                    size = os.fstat(f.fileno()).st_size
                    if max_bytes is not None and size > max_bytes:
                        raise FileTooLargeError(f"file of {size} bytes exceeds the {max_bytes}-byte limit")
                    out[i] = f.read()
            except Exception as e:  # noqa: BLE001 - the caller turns it into an error row
                out[i] = e
        else:
            fs, _ = filesystem(uri)
            remote.setdefault(fs, []).append(i)
    for fs, idx in remote.items():
        paths = [filesystem(uris[i])[1] for i in idx]
        try:
            got = fs.cat(paths, on_error="return")
        except Exception as e:  # noqa: BLE001 - the whole request failed: every file gets the error
            got = {p: e for p in paths}
        for i, p in zip(idx, paths):
            value = got.get(p, got.get(fs._strip_protocol(p), FileNotFoundError(uris[i])))
            if isinstance(value, bytes) and max_bytes is not None and len(value) > max_bytes:
                value = FileTooLargeError(f"file of {len(value)} bytes exceeds the {max_bytes}-byte limit")
            out[i] = value
    return out
