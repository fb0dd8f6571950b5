"""Manifests: CSV or Parquet files that list images by ``path`` (and ``label``).

One reader for every use. ``read_manifest`` loads the named columns into this process,
for labelled manifests (a training or evaluation set: small enough to hold); the
labelling job streams a manifest of any size with ``manifest_dataset``, Ray Data's
readers over the same columns. Both check the columns first with ``manifest_columns``,
read ``path`` and ``label`` as strings (a label ``007`` stays ``007``), and resolve
relative paths against the manifest's folder (``resolve_paths``). pyarrow only; Ray is
imported by ``manifest_dataset`` alone.
"""

from __future__ import annotations

from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from imgcls import storage

MANIFEST_EXTENSIONS = storage.MANIFEST_EXTENSIONS


class ManifestError(ValueError):
    """A manifest that cannot be read as asked: a column missing, or no rows."""


def is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_EXTENSIONS)


def _is_csv(uri: str) -> bool:
    return uri.lower().endswith(".csv")


def manifest_columns(uri: str) -> list[str]:
    """The manifest's column names, from the CSV header or the Parquet schema (no rows read)."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        if _is_csv(uri):
            header = f.readline().decode("utf-8", "replace").strip()
            return [h.strip().strip('"') for h in header.split(",")] if header else []
        return pq.read_schema(f).names


def check_columns(uri: str, columns: Sequence[str]) -> None:
    """Raises ManifestError naming the columns of ``columns`` that the manifest lacks."""
    found = manifest_columns(uri)
    missing = [c for c in columns if c not in found]
    if missing:
        raise ManifestError(f"manifest {uri} has no {', '.join(repr(c) for c in missing)} column "
                            f"(it needs {', '.join(columns)}; columns: {found})")


def read_manifest(uri: str, columns: Sequence[str]) -> pa.Table:
    """The manifest's ``columns``, as strings, in this process."""
    check_columns(uri, columns)
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        if _is_csv(uri):
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(
                include_columns=list(columns), column_types={c: pa.string() for c in columns},
                strings_can_be_null=True))
        else:
            table = pq.read_table(f, columns=list(columns))
    return table.select(list(columns)).cast(pa.schema([(c, pa.string()) for c in columns]))


def manifest_dataset(uri: str, columns: Sequence[str]):
    """The manifest's ``columns``, as strings, as a Ray Data Dataset (streamed, any size)."""
    import ray

    check_columns(uri, columns)
    fs, path = storage.filesystem(uri)
    if _is_csv(uri):
        import pyarrow.csv as pacsv

        return ray.data.read_csv(path, filesystem=fs, convert_options=pacsv.ConvertOptions(
            include_columns=list(columns), column_types={c: pa.string() for c in columns}, strings_can_be_null=True))
    return ray.data.read_parquet(path, filesystem=fs, columns=list(columns))


def manifest_folder(uri: str) -> str:
    """The folder relative paths in the manifest at ``uri`` are relative to."""
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


def resolve_paths(folder: str, paths: Sequence[str]) -> list[str]:
    """``paths`` with each relative one joined to ``folder`` (see ``manifest_folder``)."""
    return [p if storage.is_absolute(p) else storage.join(folder, p) for p in paths]
