"""Batch inference as a Ray Data pipeline; builds the predictions Dataset, writes nothing.

Stages: input rows (``path``, ``shard``, ``shard_size``) -> ``ReadDecodeBatch`` in CPU
tasks (read bytes, decode, eval-preset geometry; failures become error rows) ->
``Classifier`` in an actor pool (normalise, forward, top-k) -> rows of OUTPUT_SCHEMA.
"""

from __future__ import annotations

import hashlib
import math
from typing import Collection, Optional, Sequence

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data import ActorPoolStrategy

from imgcls import storage
from imgcls.data import ClassificationPresetEval
from imgcls.models import inference_model
from imgcls.reader import (COL_EMBEDDING, COL_ERROR, COL_LABEL, COL_MODEL_ID, COL_PATH, COL_SCORE, COL_SHARD,
                           COL_SHARD_SIZE, COL_STATUS, COL_TOPK_LABELS, COL_TOPK_SCORES, STATUS_OK, ReadDecodeBatch,
                           output_schema)


class Classifier:
    """Actor stage: loads the model once, then labels batches under inference_mode.

    ``model`` is a checkpoint folder (runtime 'torch') or an export folder holding
    ``model.onnx`` (runtime 'onnxruntime').
    """

    def __init__(self, model: str, top_k: int = 5, embeddings: bool = False, runtime: str = "torch",
                 threads: Optional[int] = None, use_gpu: bool = False):
        from imgcls.checkpoint import load_checkpoint, read_model_info

        if threads:
            torch.set_num_threads(threads)
        self.runtime = runtime
        self.embeddings = embeddings
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if runtime == "onnxruntime":
            import onnxruntime as ort

            info = read_model_info(model)
            raw = storage.read_bytes(storage.join(model, "model.onnx"))
            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
            self.session = ort.InferenceSession(raw, opts, providers=["CPUExecutionProvider"])
            self.model_id = hashlib.sha256(raw).hexdigest()[:16]
        else:
            info = load_checkpoint(model)
            self.model = inference_model(info.model, info.image_size, self.device)
            self.model_id = info.model_id
        self.classes = np.array(info.classes, dtype=object)
        self.normalize = ClassificationPresetEval(info.image_size, info.mean, info.std).normalize
        self.top_k = min(top_k, len(info.classes))
        self.schema = output_schema(embeddings)

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

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch[COL_PATH])
        ok = np.asarray(batch[COL_STATUS] == STATUS_OK)
        labels, scores = np.full(n, None, dtype=object), np.full(n, np.nan, dtype=np.float32)
        topk_labels, topk_scores, embedding = [[]] * n, [[]] * n, [None] * n
        if ok.any():
            images = batch["image"]  # (B, S, S, 3) uint8
            images = np.stack(images) if images.dtype == object else images
            images = images if ok.all() else images[ok]
            # A (b, 3, S, S) view in channels_last layout; one normalisation call keeps that
            # layout, so the model's input needs no further copy.
            x = self.normalize(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2))
            probs, feats = self._forward(x)
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
            COL_ERROR: [e if isinstance(e, str) else None for e in batch[COL_ERROR]], COL_LABEL: labels.tolist(),
            COL_SCORE: [None if math.isnan(s) else float(s) for s in scores],
            COL_TOPK_LABELS: topk_labels, COL_TOPK_SCORES: topk_scores, COL_MODEL_ID: [self.model_id] * n,
        }
        if self.embeddings:
            columns[COL_EMBEDDING] = embedding
        table = pa.Table.from_pydict(columns, schema=self.schema)
        return table.append_column(COL_SHARD, pa.array(batch[COL_SHARD], pa.int64())) \
                    .append_column(COL_SHARD_SIZE, pa.array(batch[COL_SHARD_SIZE], pa.int64()))


def input_rows(shards: Sequence[Sequence[str]], skip: Collection[int] = ()) -> ray.data.Dataset:
    """The rows ``predict`` takes: one per input file (or tar), tagged with its shard.

    ``shards`` is a list of path lists; shards whose index is in ``skip`` are left out
    (already written by an earlier run). About 64 files per block keeps every decode
    task busy without flooding the scheduler.
    """
    items = [{COL_PATH: path, COL_SHARD: i, COL_SHARD_SIZE: len(paths)}
             for i, paths in enumerate(shards) if i not in skip for path in paths]
    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 64, 1000)))


def pool_plan(use_gpu: Optional[bool], num_actors: Optional[int]) -> dict:
    """Sizes and per-actor resources of the two actor pools, from the running cluster.

    - Model actors: one per GPU. On CPUs, enough single-threaded actors (two-threaded
      from 8 CPUs) to keep about three quarters of the cores busy with the model: on 2
      cores two 1-thread actors label 345 images/s where one 2-thread actor, whose
      threads wait on each other whenever a decoder takes a core, labels 310. Together
      they claim half the CPUs, fractionally, so that a 2-core machine cannot deadlock
      (whole-CPU actors there starve the readers).
    - Decode actors: from 1 up to about a quarter of the CPUs (all but one per GPU on
      GPU nodes), scaled by Ray Data with the backlog. They are actors rather than
      tasks so that their processes, which import torch once, stay up: with tasks Ray
      kept retiring and restarting idle worker processes, and each restart cost seconds
      of CPU and hundreds of MB of memory.
    """
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 1)), int(res.get("GPU", 0))
    if use_gpu is None:
        use_gpu = gpus > 0
    if use_gpu:
        n = num_actors or max(1, gpus)
        model = {"size": n, "num_gpus": 1, "num_cpus": 1, "threads": None, "use_gpu": True}
        decode = {"max_size": max(1, int(cpus) - n - 1), "num_cpus": 1}
        return {**model, "decode": decode}
    threads = 1 if cpus < 8 else 2
    n = num_actors or max(1, round(cpus * 0.75 / threads))
    if num_actors:  # a given pool size shares the same cores
        threads = max(1, round(cpus * 0.75 / n))
    model = {"size": n, "num_gpus": 0, "num_cpus": cpus * 0.5 / n, "threads": threads, "use_gpu": False}
    k = max(1, int(cpus // 4))
    # Distinct from the model actors' request, so that Ray Data never fuses the stages.
    decode_cpus = cpus * 0.25 / k if cpus * 0.25 / k != model["num_cpus"] else cpus * 0.2 / k
    return {**model, "decode": {"max_size": k, "num_cpus": decode_cpus}}


def predict(rows: ray.data.Dataset, model: str, image_size: int, *, batch_size: int = 64, top_k: int = 5,
            embeddings: bool = False, runtime: str = "torch", use_gpu: Optional[bool] = None,
            num_actors: Optional[int] = None, max_pixels: int = 64_000_000) -> ray.data.Dataset:
    """Labels ``rows`` (columns path, shard, shard_size) and returns prediction rows.

    Args:
        rows: One row per input file or tar shard.
        model: Checkpoint folder, or export folder for runtime 'onnxruntime'.
        image_size: The model's input side (from the checkpoint's meta).

    Returns:
        A lazy Dataset with the OUTPUT_SCHEMA columns plus ``shard``/``shard_size``;
        exactly one row per input file (per tar member for tar shards).
    """
    plan = pool_plan(use_gpu, num_actors)
    decode = plan["decode"]
    decoded = rows.map_batches(
        ReadDecodeBatch, fn_constructor_kwargs={"image_size": image_size, "max_pixels": max_pixels},
        batch_size=32, compute=ActorPoolStrategy(min_size=1, max_size=decode["max_size"]), num_cpus=decode["num_cpus"])
    return decoded.map_batches(
        Classifier,
        fn_constructor_kwargs={"model": model, "top_k": top_k, "embeddings": embeddings, "runtime": runtime,
                               "threads": plan["threads"], "use_gpu": plan["use_gpu"]},
        batch_size=batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(size=plan["size"]), num_cpus=plan["num_cpus"], num_gpus=plan["num_gpus"],
    )


def list_inputs(uri: str) -> list[str]:
    """Every input of a labelling job, sorted: files under a folder (hidden ones aside),
    glob matches, the ``path`` column of a .csv/.parquet manifest, or a single file.

    Non-image files are kept on purpose: each gets an error row rather than vanishing.
    """
    import pandas as pd

    fs, path = storage.filesystem(uri)
    if uri.lower().endswith((".csv", ".parquet")) and fs.isfile(path):
        with storage.open_uri(uri, "rb") as f:
            df = pd.read_csv(f) if uri.lower().endswith(".csv") else pd.read_parquet(f)
        if "path" not in df.columns:
            raise ValueError(f"manifest {uri} has no 'path' column")
        folder = uri.rsplit("/", 1)[0] if "/" in uri else "."
        return sorted(p if storage.is_absolute(p) else storage.join(folder, p) for p in df["path"].astype(str))
    if any(ch in path for ch in "*?["):
        found = fs.glob(path)
    elif fs.isdir(path):
        found = fs.find(path)
    elif fs.isfile(path):
        found = [path]
    else:
        raise FileNotFoundError(f"no input at {uri}")
    files = [f for f in found if not any(part.startswith(".") for part in f.split("/")[-1:])]
    return sorted(storage.unstrip(uri, f) for f in files)


