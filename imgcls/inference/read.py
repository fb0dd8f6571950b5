"""Reading inputs: files fetched concurrently from any fsspec store, tars streamed member by member.

Tar members are named ``<tar path>#<member name>`` (``TAR_MEMBER_SEP``), a form that
round-trips on s3:// (fsspec's ``::`` would chain filesystems); ``evaluate`` and
``explain`` read such paths back with ``read_input``, and every reader of a labelled
manifest (``review.csv``'s rows) reads them with ``iter_inputs``. Importing this
brings no torch.
"""

from __future__ import annotations

import itertools
import tarfile
from collections import Counter

from imgcls import storage
from imgcls.errors import ERROR_EMPTY, ERROR_READ, ERROR_TAR, InputError, stable_text
from imgcls.inference.schema import COL_PATH

# A tar member's path: the tar's URI, this separator, the member's name inside the tar,
# e.g. ``s3://bucket/shards/000001.tar#images/cat.jpg``. Not ``::``, which fsspec
# reads as URL chaining; '#' is kept as-is by s3://, gs://, az:// and local paths.
TAR_MEMBER_SEP = "#"
MAX_FILE_BYTES = 256 * 2**20  # per input file or tar member; larger ones give error rows (PredictConfig.max_file_mb)
# Per reading actor: the bytes of files fetched and not yet decoded. A batch of files is
# fetched in waves of at most this many bytes (at least one file a wave), so a shard of
# large files never has 64 of them in memory at once (16 GB at the cap).
MAX_BYTES_IN_FLIGHT = 256 * 2**20
LIST_SIZE = "size"  # a shard list's column beside its paths: each file's size where a listing gave it


def is_tar(path: str) -> bool:
    """A WebDataset-style tar shard, whose members are the images (plain or gzipped)."""
    return path.lower().endswith((".tar", ".tar.gz", ".tgz"))


class EmptyTarError(InputError):
    """A tar that holds no files."""

    error_type = ERROR_EMPTY


class BrokenTarError(InputError):
    """A tar that cannot be read as one: not a tar, truncated or corrupt."""

    error_type = ERROR_TAR


class TarMemberError(InputError):
    """A tar member that is not a file's bytes: a symbolic link, a device, a FIFO, or a
    hard link to a member that is not in the archive as a file."""

    error_type = ERROR_READ


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

    Kept instead of fsspec's tar filesystem, which indexes every member before reading
    any: it took 2.3x the time on 2,000 JPEGs (0.10 against 0.04 s; gzipped, 0.22 against
    0.09 s, as it decompresses twice), and on a truncated tar it raises at opening, where
    this yields the 1,005 members before the break and then one error (bench/library_swaps.py).
    Ray Data's WebDataset reader does not fit either: it makes one row per sample (the
    members whose names share the part before the first dot), not one per member.

    A member over ``max_bytes`` gives an error without being read into memory (a
    gzip bomb named .tar is caught here, or as a broken archive). A tar that cannot be
    opened (the read's own error) or read as a tar (BrokenTarError) gives an error under
    the tar's own path, after the members read before it; a tar with no files gives one
    error row (EmptyTarError), so it never vanishes.

    Every member but a folder is a row. A hard link (``tar`` stores a file's second name
    so, as it does a file added twice) has its target's bytes, read in a second pass over
    the tar after the first; a symbolic link or any other special member is an error row
    (TarMemberError).
    """
    files = 0
    links: dict[str, list[str]] = {}  # a hard link's target member -> the links' paths
    try:
        with storage.open_uri(uri, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if member.isdir():
                    continue
                files += 1
                name = member_path(uri, member.name)
                if member.islnk():
                    links.setdefault(member.linkname, []).append(name)
                elif not member.isfile():
                    kind = "symbolic link" if member.issym() else "special file (device or FIFO)"
                    yield name, TarMemberError(f"tar member is a {kind}, not a file")
                elif member.size > max_bytes:
                    yield name, _too_large(member.size, max_bytes)
                else:
                    yield name, tar.extractfile(member).read()
    except tarfile.TarError as e:  # not a tar, truncated, corrupt (compressed data too)
        if not files and str(e) == "empty file":  # tarfile's word for a zero-byte tar
            yield uri, EmptyTarError("empty tar file")
        else:
            yield uri, _broken(e)
    except Exception as e:  # noqa: BLE001 - missing, unreadable: the read's own error
        yield uri, e
    else:
        if not files:
            yield uri, EmptyTarError("tar archive holds no files")
    if links:  # read before a break too: their targets come before them
        yield from _hard_links(uri, links, max_bytes)


def _broken(e: tarfile.TarError) -> BrokenTarError:
    return BrokenTarError(f"broken tar archive: {stable_text(str(e))}")


def _too_large(size: int, max_bytes: int) -> storage.FileTooLargeError:
    return storage.FileTooLargeError(f"tar member of {size} bytes exceeds the {max_bytes}-byte limit")


def _hard_links(uri: str, links: dict[str, list[str]], max_bytes: int):
    """(link path, its target's bytes or an error) for every hard link of ``links``
    ({target member: link paths}, emptied as their targets are found), from one more
    pass over the tar at ``uri``."""
    try:
        with storage.open_uri(uri, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                names = links.pop(member.name, None) if member.isfile() else None
                if names is None:
                    continue
                data = (_too_large(member.size, max_bytes) if member.size > max_bytes
                        else tar.extractfile(member).read())
                for name in names:
                    yield name, data
                if not links:
                    return
    except Exception as e:  # noqa: BLE001 - a target not reached (the tar changed or went since): each link says why
        error = _broken(e) if isinstance(e, tarfile.TarError) else e
        for names in links.values():
            for name in names:
                yield name, error
        return
    for target, names in links.items():
        for name in names:
            yield name, TarMemberError(f"tar member is a hard link to {target!r}, which is not a file in the archive")


def read_input(path: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of one input as named in a predictions table or a labelled manifest: a
    file, or a tar member (found by reading the tar up to it). Raises the read's error."""
    [(_, data)] = iter_inputs([path], max_bytes)
    if isinstance(data, BaseException):
        raise data
    return data


def iter_inputs(paths, max_bytes: int = MAX_FILE_BYTES, fetch: int = 64, sizes=None,
                budget: int = MAX_BYTES_IN_FLIGHT):
    """Yields (path, bytes or exception) per input file, per tar member named, and per
    member of each tar named whole.

    Plain files are fetched ``fetch`` at a time, concurrently (``storage.iter_read``),
    so that an actor reading from S3 is not bound by one request's latency per file, and
    at most ``budget`` bytes at a time (see MAX_BYTES_IN_FLIGHT): what this holds is
    that, plus the file the caller is working on. ``sizes`` (the listing's, aligned with
    ``paths``; None where unknown) lets a file over ``max_bytes`` be refused without a
    request; without one, a remote file's size is asked first, a batch's at once.
    Tar members named one by one (``TAR#MEMBER``, as a labelling run's rows and
    ``review.csv`` name them) come after the plain files, each tar streamed once for
    all of its members named here (``iter_members``). A path named twice gives two rows.
    """
    pending: list[str] = []
    pending_sizes: list = []
    named: dict[str, list[str]] = {}  # tar URI -> the member paths named, in order

    def flush():
        yield from zip(pending, storage.iter_read(pending, max_bytes, pending_sizes, budget))
        pending.clear()
        pending_sizes.clear()

    for path, size in zip(paths, sizes if sizes is not None else itertools.repeat(None)):
        if is_tar(path):
            yield from flush()
            yield from iter_tar(path, max_bytes)
            continue
        tar, member = split_member(path)
        if member is not None:
            named.setdefault(tar, []).append(path)
            continue
        pending.append(path)
        pending_sizes.append(size)
        if len(pending) == fetch:
            yield from flush()
    yield from flush()
    for tar, members in named.items():
        yield from iter_members(tar, members, max_bytes)


def iter_members(tar: str, paths: list[str], max_bytes: int = MAX_FILE_BYTES):
    """Yields (path, bytes or exception) for each of ``paths`` (member paths of the tar
    at ``tar``; a repeat gives a repeated row) from one pass over the tar, which stops
    once every one is found. A member the tar lacks is a FileNotFoundError naming it; a
    tar that is missing or cannot be read gives its error to every member not read before.
    """
    wanted = Counter(paths)
    tar_error = None
    stream = iter_tar(tar, max_bytes)
    try:
        for name, data in stream:
            if name == tar:  # the tar's own error row: missing, broken, empty
                tar_error = data
                continue
            for _ in range(wanted.pop(name, 0)):
                yield name, data
            if not wanted:
                return
    finally:
        stream.close()  # closes the tar when every member was found before its end
    for path, count in wanted.items():
        error = tar_error or FileNotFoundError(f"{split_member(path)[1]} is not in {tar}")
        for _ in range(count):
            yield path, error


def read_shard(uri: str) -> tuple[list[str], list]:
    """The input paths of one shard and their sizes (None where unknown, as in a manifest's
    lists or a plan written before sizes were), from its list file (see
    ``imgcls.inference.inputs``)."""
    import pyarrow.parquet as pq

    with storage.open_uri(uri, "rb") as f:
        table = pq.read_table(f)
    paths = table.column(COL_PATH).to_pylist()
    sizes = table.column(LIST_SIZE).to_pylist() if LIST_SIZE in table.column_names else [None] * len(paths)
    return paths, sizes


def read_shard_list(uri: str) -> list[str]:
    """The input paths of one shard, from its list file (see ``imgcls.inference.inputs``)."""
    return read_shard(uri)[0]
