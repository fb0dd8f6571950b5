"""fsspec URI handling: the one place where paths and filesystems are resolved.

Plain paths are local files; ``s3://``, ``gs://``, ``az://`` and any other fsspec
protocol work wherever a path is accepted.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import itertools
import json
import os
import tempfile
from contextlib import ExitStack
from typing import Any, Iterable, Iterator, Optional

import fsspec
from fsspec.asyn import sync
from fsspec.core import split_protocol, url_to_fs

MANIFEST_EXTENSIONS = (".csv", ".parquet")  # a manifest of paths, where a folder could be given
LIST_PAGE = 1000  # listing entries taken from a store at a time (S3 returns 1,000 keys a page)
SORT_RUN = 100_000  # a local listing is sorted in memory up to this many entries, beyond in runs on disk


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


def _too_large(size: int, max_bytes: int) -> FileTooLargeError:
    return FileTooLargeError(f"file of {size} bytes exceeds the {max_bytes}-byte limit")


def _infos(fs: fsspec.AbstractFileSystem, paths: list[str]) -> list[Any]:
    """``fs.info`` of each path, or its exception; on an async store (s3fs, gcsfs, adlfs)
    all at once, so that a batch costs one round trip."""
    if getattr(fs, "async_impl", False):
        async def gather():
            return await asyncio.gather(*(fs._info(p) for p in paths), return_exceptions=True)

        return sync(fs.loop, gather)
    out = []
    for path in paths:
        try:
            out.append(fs.info(path))
        except Exception as e:  # noqa: BLE001 - the caller's error row
            out.append(e)
    return out


def _remote_sizes(uris: list[str], known: list) -> None:
    """Fills in ``known`` (a size, an exception or None per URI) for the remote URIs that
    have none: ``fs.info``'s size, its error (a missing object), or IsADirectoryError
    for a prefix that is a folder, as a local folder gives."""
    by_fs: dict[Any, list[tuple[int, str]]] = {}
    for i, uri in enumerate(uris):
        if known[i] is None and split_protocol(uri)[0] is not None:
            fs, path = filesystem(uri)
            by_fs.setdefault(fs, []).append((i, path))
    for fs, items in by_fs.items():
        for (i, _), info in zip(items, _infos(fs, [path for _, path in items])):
            if isinstance(info, BaseException):
                known[i] = info
            elif info.get("type") == "directory":
                known[i] = IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), uris[i])
            else:
                known[i] = int(info.get("size") or 0)


def _read_local(uri: str, max_bytes: Optional[int]) -> bytes | BaseException:
    try:
        with open(uri, "rb") as f:  # a folder raises here, before its size is taken for a file's
            size = os.fstat(f.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                raise _too_large(size, max_bytes)
            return f.read()
    except Exception as e:  # noqa: BLE001 - the caller turns it into an error row
        return e


def _fetch(uris: list[str], max_bytes: Optional[int]) -> list[bytes | BaseException]:
    """The bytes of remote objects, one concurrent request per store. Under a cap, each
    is a ranged read of at most ``max_bytes + 1`` bytes: an object that grew past the
    cap since its size was taken costs no more memory than the cap."""
    out: list[bytes | BaseException] = [ValueError("not read")] * len(uris)
    by_fs: dict[Any, list[int]] = {}
    for i, uri in enumerate(uris):
        by_fs.setdefault(filesystem(uri)[0], []).append(i)
    for fs, idx in by_fs.items():
        paths = [filesystem(uris[i])[1] for i in idx]
        try:
            if max_bytes is None:
                got = fs.cat(paths, on_error="return")
                values = [got.get(p, got.get(fs._strip_protocol(p), FileNotFoundError(uris[i])))
                          for i, p in zip(idx, paths)]
            else:
                values = fs.cat_ranges(paths, [0] * len(paths), [max_bytes + 1] * len(paths), on_error="return")
        except Exception as e:  # noqa: BLE001 - the whole request failed: every file gets the error
            values = [e] * len(paths)
        for i, value in zip(idx, values):
            if isinstance(value, bytes) and max_bytes is not None and len(value) > max_bytes:
                value = FileTooLargeError(f"file of over {max_bytes} bytes exceeds the {max_bytes}-byte limit")
            out[i] = value
    return out


def iter_read(uris: list[str], max_bytes: Optional[int] = None, sizes: Optional[list] = None,
              budget: Optional[int] = None) -> Iterator[bytes | BaseException]:
    """The bytes of each URI, or the exception its read gave, in order, holding at most
    ``budget`` bytes read and not yet taken by the caller.

    Remote objects are fetched concurrently (one request per store for a batch: s3fs,
    gcsfs and adlfs run them at once), in waves of at most ``budget`` bytes by their
    sizes (at least one object a wave); local files are read one after the other when
    their turn comes (the page cache answers faster than threads start). ``sizes``
    (from a listing; None where unknown) spares the size requests: under a cap or a
    budget, a remote object of unknown size gets ``fs.info`` first, all of a batch's at
    once. An object over ``max_bytes`` gives a FileTooLargeError without a byte read,
    local or remote; a missing one its FileNotFoundError from the size request.
    """
    n = len(uris)
    known = list(sizes) if sizes is not None else [None] * n
    if max_bytes is not None or budget is not None:
        _remote_sizes(uris, known)
    fetched: dict[int, bytes | BaseException] = {}
    for i, uri in enumerate(uris):
        size = known[i]
        if split_protocol(uri)[0] is None:
            yield _read_local(uri, max_bytes)
        elif isinstance(size, BaseException):
            yield size
        elif size is not None and max_bytes is not None and size > max_bytes:
            yield _too_large(size, max_bytes)
        elif size == 0:
            yield b""  # nothing to read (a ranged read of an empty object is an error on S3)
        else:
            if i not in fetched:  # a new wave: this object and the next ones that fit the budget
                wave, held = [], 0
                for j in range(i, n):
                    s = known[j]
                    if split_protocol(uris[j])[0] is None or isinstance(s, BaseException) or s == 0 or \
                            (s is not None and max_bytes is not None and s > max_bytes):
                        continue  # not read in a wave
                    if wave and budget is not None and held + (s or 0) > budget:
                        break
                    wave.append(j)
                    held += s or 0
                fetched.update(zip(wave, _fetch([uris[j] for j in wave], max_bytes)))
            yield fetched.pop(i)


def read_many(uris: list[str], max_bytes: int | None = None,
              sizes: Optional[list] = None) -> list[bytes | BaseException]:
    """The bytes of each URI, fetched concurrently, in order; a failed read gives its exception.

    Objects on one remote store come in one request (``iter_read``), so a batch costs
    about one round trip rather than one per file. A file over ``max_bytes`` gives a
    FileTooLargeError without being read: a local one from its stat, a remote one from
    ``sizes`` (a listing's, None where unknown) or else from ``fs.info``. All the
    bytes are returned together: to bound the bytes held, iterate ``iter_read`` with a
    budget instead.
    """
    return list(iter_read(uris, max_bytes, sizes))


def iter_files(uri: str, recursive: bool = False, maxdepth: Optional[int] = None, stem: str = "",
               subdirs: Optional[list] = None) -> Iterator[tuple[str, Optional[int]]]:
    """(URI, size) of every file directly under the folder or prefix ``uri``, sorted by
    URI, without the listing ever held whole: a store's listing is taken a page at a time
    as the caller consumes it, so the caller's memory does not grow with the key count.

    Args:
        recursive: Every file below ``uri``, at any depth (``maxdepth`` levels at most).
        stem: Only names that start with it (in the first level below ``uri``), filtered
            by the store where it can (S3's ``Prefix``).
        subdirs: A list that receives the sub-folders (URIs) of a flat listing.

    S3 (s3fs) lists keys in their sorted order, 1,000 a page; a local folder is read by
    ``os.scandir`` and sorted in runs of ``SORT_RUN`` entries, spilled to temporary files
    and merged, so its memory is bounded too; its sizes are None (a local read takes its
    own). Other stores are listed whole by fsspec (``find``/``ls``) and sorted.
    """
    fs, path = filesystem(uri)
    path = path.rstrip("/")
    depth = None if recursive and maxdepth is None else (maxdepth or 1)
    if _pages(fs):
        entries = _s3_entries(fs, path, depth, stem)
    elif protocol(uri) in ("file", "local"):
        entries = _sorted_runs(_local_entries(path, depth, stem))
    else:
        found = fs.find(path, maxdepth=depth, withdirs=depth == 1, detail=True)
        entries = ((name, info.get("size"), info["type"] == "directory") for name, info in sorted(found.items())
                   if name.rstrip("/") != path and name[len(path) + 1:].startswith(stem))
    for name, size, is_dir in entries:
        if is_dir:
            if subdirs is not None:
                subdirs.append(unstrip(uri, name))
        else:
            yield unstrip(uri, name), size


def _pages(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` lists a page at a time here (s3fs's ``_iterdir``)."""
    return getattr(fs, "async_impl", False) and hasattr(fs, "_iterdir") and hasattr(fs, "split_path")


def is_folder(uri: str) -> bool:
    """Whether ``uri`` is a folder (on S3, a prefix with objects below it), from the first
    entries of its listing: s3fs's ``isdir`` lists the whole prefix and keeps it cached."""
    fs, path = filesystem(uri)
    if not _pages(fs):
        return fs.isdir(path)
    subdirs: list[str] = []
    for _ in iter_files(uri, subdirs=subdirs):
        return True
    return bool(subdirs)


def _s3_entries(fs, path: str, depth: Optional[int], stem: str) -> Iterator[tuple[str, Optional[int], bool]]:
    """(path, size, is folder) under ``path`` from S3's paginated listing (``_iterdir``,
    ``LIST_PAGE`` entries at a time): files in key order, sub-folders (depth 1) as their
    common prefixes. Deeper than ``depth`` levels is skipped (a recursive listing has no
    such limit on S3: its keys come all the same)."""
    bucket, key, _ = fs.split_path(path)
    prefix = (key + "/" if key else "") + stem
    pages = fs._iterdir(bucket, prefix=prefix, delimiter="/" if depth == 1 else "")

    async def page() -> list[dict]:
        out = []
        try:
            while len(out) < LIST_PAGE:
                out.append(await pages.__anext__())
        except StopAsyncIteration:
            pass
        return out

    base = len(path) + 1
    try:
        while True:
            items = sync(fs.loop, page)
            for c in items:
                name = c["name"]
                if name.endswith("/"):  # a folder marker object, not a file
                    continue
                is_dir = c["type"] == "directory"
                if depth is not None and name[base:].count("/") >= depth:
                    continue
                yield name, (None if is_dir else c.get("size")), is_dir
            if len(items) < LIST_PAGE:
                return
    finally:
        sync(fs.loop, pages.aclose)


def _local_entries(path: str, depth: Optional[int], stem: str) -> Iterator[tuple[str, Optional[int], bool]]:
    """(path, None, is folder) under a local folder, unsorted, by ``os.scandir``: a
    folder deeper than the first level is walked (to ``depth``) rather than returned."""
    todo = [(path, 1)]
    while todo:
        folder, level = todo.pop()
        with os.scandir(folder) as it:
            for entry in it:
                if level == 1 and not entry.name.startswith(stem):
                    continue
                name = f"{folder}/{entry.name}"
                if entry.is_dir():
                    if depth == 1:
                        yield name, None, True
                    elif depth is None or level < depth:
                        todo.append((name, level + 1))
                else:
                    yield name, None, False


def _sorted_runs(items: Iterable[tuple], run: int = SORT_RUN) -> Iterator[tuple]:
    """``items`` sorted, holding at most ``run`` of them in memory: more are cut into
    sorted runs written to temporary files, then merged."""
    items = iter(items)
    first = sorted(itertools.islice(items, run))
    if len(first) < run:
        yield from first
        return
    with tempfile.TemporaryDirectory(prefix="imgcls-list-") as tmp, ExitStack() as stack:
        runs, chunk = [], first
        while chunk:
            spill = os.path.join(tmp, f"{len(runs)}.jsonl")
            with open(spill, "w") as f:
                f.writelines(json.dumps(item) + "\n" for item in chunk)
            runs.append(spill)
            chunk = sorted(itertools.islice(items, run))
        readers = [(tuple(json.loads(line)) for line in stack.enter_context(open(r))) for r in runs]
        yield from heapq.merge(*readers)
