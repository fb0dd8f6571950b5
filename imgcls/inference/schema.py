"""The predictions table: its columns, status values and Arrow schema.

The one definition every stage of labelling (``decode``, ``model_stage``, ``sink``) and
every reader of its output (evaluation, review, monitoring) uses. pyarrow only.
"""

from __future__ import annotations

import pyarrow as pa

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


# Internal columns of the bulk-labelling pipeline, dropped before writing.
COL_SHARD = "shard"
COL_ROW = "row"  # index of the row within its shard
COL_SHARD_ROWS = "shard_rows"  # rows of the whole shard, on the rows of its last chunk; -1 elsewhere


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


COL_JPEG = "jpeg"  # a JPEG's bytes, left for the model stage to decode on its device (Decoder's defer_jpeg)
