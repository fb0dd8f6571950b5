"""Reading a predictions table in batches: the columns asked for, one batch in memory at a time.

``review`` and ``evaluate --predictions`` read runs of tens of millions of rows (a 10
million row run with 576-float embeddings is 23 GB in pandas), so they go over the
Parquet parts in row order, batch by batch, and keep only what they accumulate. Each
batch comes with the number of its part, so that a second pass can read another column
of a few rows by going back to their parts only (``review --dedup``'s embeddings).
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from imgcls import storage
from imgcls.inference.schema import COL_STATUS, STATUS_OK

BATCH_ROWS = 65_536  # rows a batch holds (576-float embeddings: 150 MB)
READAHEAD = 2  # batches decoded ahead of the one in use: a few, so memory stays a few batches'

OK_ROWS = pc.field(COL_STATUS) == STATUS_OK


def open_predictions(uri: str) -> pads.Dataset:
    """The predictions folder or file at ``uri`` (local or fsspec URI) as a pyarrow dataset,
    its files in path order (files that are not Parquet, or start with '_' or '.', left out)."""
    fs, path = storage.filesystem(uri)
    return pads.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=True)


def scan(dataset: pads.Dataset, columns: Sequence[str], where: Optional[pc.Expression] = None,
         parts: Optional[set[int]] = None, batch_rows: int = BATCH_ROWS) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Yields (part number, batch) over ``dataset``'s rows in order, with ``columns`` only.

    Args:
        dataset: ``open_predictions``'s dataset.
        columns: The columns to read (a part without one gives nulls).
        where: Rows to keep (``OK_ROWS``); the same filter gives the same rows in the
            same order on every pass, so row positions within a part carry over.
        parts: Only these parts (numbers as yielded), for a second pass over a few rows.
        batch_rows: Rows a batch holds at most.
    """
    for number, fragment in enumerate(dataset.get_fragments()):
        if parts is not None and number not in parts:
            continue
        for batch in fragment.to_batches(schema=dataset.schema, columns=list(columns), filter=where,
                                         batch_size=batch_rows, batch_readahead=READAHEAD):
            if batch.num_rows:
                yield number, batch
