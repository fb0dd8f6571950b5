"""The model stage of batch inference: a Ray Data actor that labels decoded batches.

Like reader.py this module imports no torchvision, whose import alone takes about 7 s of
CPU: the driver prepares the model once (``predict.prepare_model``: BatchNorm folded,
channels_last, traced to TorchScript) and every actor loads that program with torch
alone, so a pool starts in about half the time and each actor holds less memory.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import torch

from imgcls.imaging import ScaleNormalize
from imgcls.reader import (COL_EMBEDDING, COL_ERROR, COL_ERROR_TYPE, COL_LABEL, COL_MODEL_ID, COL_PATH, COL_ROW,
                           COL_SCORE, COL_SHARD, COL_SHARD_ROWS, COL_STATUS, COL_TOPK_LABELS, COL_TOPK_SCORES,
                           STATUS_OK, ReadDecodeBatch, output_schema)

PASS_THROUGH = (COL_SHARD, COL_ROW, COL_SHARD_ROWS)  # internal int64 columns a batch may carry


@dataclass(frozen=True)
class ModelPayload:
    """Everything a Classifier actor needs, prepared once by the driver."""

    runtime: str  # 'torch' (program: TorchScript) or 'onnxruntime' (program: ONNX)
    program: bytes
    classes: tuple[str, ...]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    model_id: str  # hash of the checkpoint's weights, or of the ONNX file
    program_uri: str = ""  # where ``program`` was stored instead (``stored``)

    def stored(self, uri: str) -> "ModelPayload":
        """A copy that names ``uri``, where the program is written, instead of holding it.

        Actor constructor arguments over 100 KB go to Ray's object store, and an actor
        restarted after its node is lost cannot get them back (ray-project/ray#53727);
        a payload of a few hundred bytes travels inline, and restarts work.
        """
        import dataclasses

        from imgcls import storage

        with storage.open_uri(uri, "wb") as f:
            f.write(self.program)
        return dataclasses.replace(self, program=b"", program_uri=uri)

    def load_program(self) -> bytes:
        if self.program or not self.program_uri:
            return self.program
        from imgcls import storage

        return storage.read_bytes(self.program_uri)


def onnx_providers(use_gpu: bool, available: list[str]) -> list[str]:
    """ONNX Runtime execution providers: CUDA first when this actor has a GPU and the
    installed onnxruntime has the CUDA provider (``onnxruntime-gpu``), else the CPU."""
    if use_gpu and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if use_gpu:
        import logging

        logging.getLogger(__name__).warning(
            "the actor has a GPU but onnxruntime has no CUDA provider (install onnxruntime-gpu); running on CPU")
    return ["CPUExecutionProvider"]


class Classifier:
    """Actor stage: loads the prepared model once, then labels batches under inference_mode."""

    def __init__(self, payload: ModelPayload, top_k: int = 5, embeddings: bool = False,
                 threads: Optional[int] = None, use_gpu: bool = False, cpu_chunk: int = 16):
        if threads:
            torch.set_num_threads(threads)
        self.runtime = payload.runtime
        self.embeddings = embeddings
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if payload.runtime == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
            self.providers = onnx_providers(use_gpu, ort.get_available_providers())
            self.session = ort.InferenceSession(payload.load_program(), opts, providers=self.providers)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
                self.model = torch.jit.load(io.BytesIO(payload.load_program()), map_location=self.device).eval()
        self.model_id = payload.model_id
        self.classes = np.array(payload.classes, dtype=object)
        self.normalize = ScaleNormalize(payload.mean, payload.std)
        self.top_k = min(top_k, len(payload.classes))
        self.schema = output_schema(embeddings)
        # On CPU the forward runs this many images at a time, whatever the batch size: a
        # small batch's activations stay in cache. MobileNetV3-Small at 224 px takes 1.8 ms
        # per image on one thread in chunks of 16, and 3.0 ms in batches of 64.
        self.cpu_chunk = cpu_chunk
        # Batches arrive as read-only views of Ray's object store; they are only read.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

    def _forward(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, S, S) float -> probabilities (B, C), features (B, F)."""
        if self.runtime == "onnxruntime":
            logits, feats = self.session.run(["logits", "features"], {"image": x.contiguous().numpy()})
            logits, feats = torch.from_numpy(logits), torch.from_numpy(feats)
        else:
            with torch.inference_mode():
                x = x.to(self.device).contiguous(memory_format=torch.channels_last)
                logits, feats = self.model(x)
        return logits.float().softmax(1).cpu().numpy(), feats.float().cpu().numpy()

    def _forward_chunks(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(b, S, S, 3) uint8 -> probabilities, features; on CPU ``cpu_chunk`` images at a time."""
        step = len(images) if self.device.type == "cuda" else self.cpu_chunk
        outs = []
        for i in range(0, len(images), step):
            # (n, 3, S, S) in channels_last layout, which the model takes without a copy.
            outs.append(self._forward(self.normalize.batch_hwc(torch.from_numpy(images[i:i + step]))))
        return np.concatenate([p for p, _ in outs]), np.concatenate([f for _, f in outs])

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Decoded rows -> OUTPUT_SCHEMA rows, plus the internal columns the batch carries."""
        table = self.label(batch)
        for col in PASS_THROUGH:
            if col in batch:
                table = table.append_column(col, pa.array(batch[col], pa.int64()))
        return table

    def label(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Decoded rows (``reader.Decoder``'s columns) -> rows of OUTPUT_SCHEMA."""
        n = len(batch[COL_PATH])
        ok = np.asarray(batch[COL_STATUS] == STATUS_OK)
        labels, scores = np.full(n, None, dtype=object), np.full(n, np.nan, dtype=np.float32)
        topk_labels, topk_scores, embedding = [[]] * n, [[]] * n, [None] * n
        if ok.any():
            images = batch["image"]  # (B, S, S, 3) uint8
            images = np.stack(images) if images.dtype == object else images
            images = images if ok.all() else images[ok]
            probs, feats = self._forward_chunks(np.ascontiguousarray(images))
            top = np.argsort(-probs, axis=1)[:, : self.top_k]  # (b, k)
            top_p = np.take_along_axis(probs, top, axis=1)
            idx = np.flatnonzero(ok)
            labels[idx], scores[idx] = self.classes[top[:, 0]], top_p[:, 0]
            for j, i in enumerate(idx):
                topk_labels[i], topk_scores[i] = self.classes[top[j]].tolist(), top_p[j].tolist()
                embedding[i] = feats[j].tolist() if self.embeddings else None
        columns = {
            COL_PATH: batch[COL_PATH].tolist(), COL_STATUS: batch[COL_STATUS].tolist(),
            # Missing errors may arrive as None or NaN, depending on the block format.
            COL_ERROR: [e if isinstance(e, str) else None for e in batch[COL_ERROR]],
            COL_ERROR_TYPE: [e if isinstance(e, str) else None for e in batch[COL_ERROR_TYPE]],
            COL_LABEL: labels.tolist(),
            COL_SCORE: [None if math.isnan(s) else float(s) for s in scores],
            COL_TOPK_LABELS: topk_labels, COL_TOPK_SCORES: topk_scores, COL_MODEL_ID: [self.model_id] * n,
        }
        if self.embeddings:
            columns[COL_EMBEDDING] = embedding
        return pa.Table.from_pydict(columns, schema=self.schema)


class ReadAndClassify:
    """Both stages in one actor, for CPU-only pools: read and decode a batch of paths,
    then label it (``reader.ReadDecodeBatch`` followed by ``Classifier``).

    On CPUs the two stages compete for the same cores anyway, so running them in one
    process loses no overlap; it saves passing every decoded image (150 KB at 224 px)
    through the object store, a second actor pool's start-up and its processes' memory.
    """

    def __init__(self, payload: ModelPayload, max_pixels: int, max_images: int = 64, **classifier_kwargs):
        self.read = ReadDecodeBatch(payload.image_size, max_pixels, max_images)
        self.classify = Classifier(payload, **classifier_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Labels ``max_images`` images at a time, so that a batch of tar shards holds
        few decoded images; the rows of text they give are returned together."""
        tables = [self.classify(decoded) for decoded in self.read(batch)]
        # One table per call: a generator yielding each one cost about 15% of throughput.
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables)
