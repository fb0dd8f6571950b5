"""Checkpoint folder layout, save and load.

A checkpoint is a folder (local or fsspec URI) holding:
``model.pt`` (state dict of the unwrapped model), ``train_state.pt`` (optimizer,
scheduler, scaler, epoch), ``classes.json``, ``config.yaml`` (the resolved JobConfig),
``history.json`` (per-epoch metrics), ``meta.json`` (arch, input size, normalisation) and
``splits/{train,val,test}.parquet`` (the ``path,label`` manifests of the run's splits, with
each file's split ``key``).
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import yaml
from torch import nn

from imgcls import storage
from imgcls.config import JobConfig
from imgcls.labelled import SPLITS, LabelledImages
from imgcls.manifest import manifest_columns, read_manifest
from imgcls.models import create_model, get_spec
from imgcls.tracking import local_model, registered_id

MODEL_FILE = "model.pt"
TRAIN_STATE_FILE = "train_state.pt"
CLASSES_FILE = "classes.json"
CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.json"
META_FILE = "meta.json"
SPLITS_DIR = "splits"  # the run's train/val/test manifests (labelled.SPLITS), in the run folder and every checkpoint


def save_config(uri: str, job: JobConfig) -> None:
    with storage.open_uri(uri, "w") as f:
        yaml.safe_dump(job.to_dict(), f, sort_keys=False)


def save_checkpoint(folder: str, model: nn.Module, job: JobConfig, classes: list[str],
                    history: list[dict], train_state: Optional[dict] = None,
                    files: Optional[dict[str, bytes]] = None, meta: Optional[dict] = None) -> None:
    """Writes a checkpoint folder; ``model`` must be unwrapped (not DDP). ``files`` maps
    relative paths to bytes written as they are (the run's split manifests); ``meta``
    adds keys to meta.json (the MLflow run, ``tracking.RUN_ID_KEY``)."""
    storage.makedirs(folder)
    for name, data in (files or {}).items():
        storage.makedirs(storage.join(folder, os.path.dirname(name)))
        with storage.open_uri(storage.join(folder, name), "wb") as f:
            f.write(data)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with storage.open_uri(storage.join(folder, MODEL_FILE), "wb") as f:
        torch.save(state, f)
    if train_state is not None:
        with storage.open_uri(storage.join(folder, TRAIN_STATE_FILE), "wb") as f:
            torch.save(train_state, f)
    spec = get_spec(job.model.arch)
    storage.write_json(storage.join(folder, CLASSES_FILE), classes)
    storage.write_json(storage.join(folder, HISTORY_FILE), history)
    storage.write_json(storage.join(folder, META_FILE), {
        "arch": job.model.arch, "num_classes": len(classes), "image_size": job.model.image_size,
        "mean": list(spec.mean), "std": list(spec.std), "epoch": history[-1]["epoch"] if history else None,
        "width": job.model.width, **(meta or {}),
    })
    save_config(storage.join(folder, CONFIG_FILE), job)


def read_split_files(folder: str) -> dict[str, bytes]:
    """The split manifests written by ``write_splits`` into ``folder``, keyed by their path
    inside a checkpoint (``splits/train.parquet``...): ``save_checkpoint``'s ``files``."""
    return {f"{SPLITS_DIR}/{name}.parquet": storage.read_bytes(storage.join(folder, f"{name}.parquet"))
            for name in SPLITS}


def write_splits(folder: str, splits: dict) -> None:
    """Writes each split's ``path,label`` manifest to ``folder/{train,val,test}.parquet``:
    what the run trained, validated and tested on. A split manifest is valid data input."""
    storage.makedirs(folder)
    for name in SPLITS:
        write_manifest(storage.join(folder, f"{name}.parquet"), splits[name])


def write_manifest(uri: str, images: LabelledImages) -> None:
    """Writes ``images`` as a ``path,label`` Parquet manifest, with their split keys as a
    ``key`` column when they have them (what ``--init-from`` matches a moved file by)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"path": pa.array(images.paths, pa.string()), "label": pa.array(images.labels, pa.string())}
    if images.keys is not None:
        columns["key"] = pa.array(images.keys, pa.string())
    with storage.open_uri(uri, "wb") as f:
        pq.write_table(pa.table(columns), f)


def read_split(checkpoint: str, split: str) -> LabelledImages:
    """A checkpoint's saved ``split`` as written: paths, labels, and keys when it saved
    them (checkpoints of older versions did not). No file is listed or checked.

    Raises:
        FileNotFoundError: the checkpoint saved no splits (see ``split_manifest``).
    """
    uri = split_manifest(checkpoint, split)
    has_keys = "key" in manifest_columns(uri)
    table = read_manifest(uri, ["path", "label", "key"] if has_keys else ["path", "label"])
    return LabelledImages(table.column("path").to_pylist(), table.column("label").to_pylist(),
                          table.column("key").to_pylist() if has_keys else None)


def split_manifest(checkpoint: str, split: str) -> str:
    """URI of a checkpoint's ``split`` manifest (train, val or test).

    Raises:
        FileNotFoundError: the checkpoint predates saved splits, or is an export.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    checkpoint = local_model(checkpoint)
    uri = storage.join(checkpoint, SPLITS_DIR, f"{split}.parquet")
    if not storage.exists(uri):
        raise FileNotFoundError(f"{checkpoint} holds no {split} split ({SPLITS_DIR}/{split}.parquet): it was not "
                                "saved by imgcls train, or by an older version; use --data instead")
    return uri


@dataclass
class LoadedModel:
    """A model rebuilt from a checkpoint, in eval mode, with what inference needs."""

    model: nn.Module
    classes: list[str]
    image_size: int
    mean: tuple
    std: tuple
    model_id: str
    job: Optional[JobConfig]
    history: list[dict]


@dataclass
class ModelInfo:
    """What inference needs besides the weights: read from a checkpoint or export folder."""

    classes: list[str]
    image_size: int
    mean: tuple
    std: tuple
    arch: str
    width: Optional[int] = None  # small_cnn's first-block channels, when not the default


def read_model_info(folder: str) -> ModelInfo:
    folder = local_model(folder)
    meta = storage.read_json(storage.join(folder, META_FILE))
    return ModelInfo(classes=storage.read_json(storage.join(folder, CLASSES_FILE)), image_size=meta["image_size"],
                     mean=tuple(meta["mean"]), std=tuple(meta["std"]), arch=meta["arch"], width=meta.get("width"))


def model_with_state(info: ModelInfo, state: dict[str, torch.Tensor]) -> nn.Module:
    """``info``'s architecture holding ``state``'s tensors. It is built on the meta device,
    so no weight is drawn at random only to be overwritten (VGG's 130M took 2 s a load),
    then takes the loaded tensors as they are; an architecture with a tensor that the
    state dict does not hold is built and loaded the ordinary way."""
    build = dict(image_size=info.image_size, width=info.width)
    with torch.device("meta"):
        model = create_model(info.arch, len(info.classes), **build)
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model = create_model(info.arch, len(info.classes), **build)
        model.load_state_dict(state)
    return model


def load_checkpoint(folder: str) -> LoadedModel:
    """Rebuilds the trained model from a checkpoint folder (local or fsspec URI), or the
    registered version a ``models:/`` URI names, whose ``model_id`` is then
    ``models:/NAME/VERSION`` (``tracking.registered_id``) instead of the weights' hash."""
    folder = local_model(folder)
    if not storage.exists(storage.join(folder, MODEL_FILE)):
        raise FileNotFoundError(f"{folder} is not an imgcls checkpoint (no {MODEL_FILE})")
    raw = storage.read_bytes(storage.join(folder, MODEL_FILE))
    info = read_model_info(folder)
    history_uri = storage.join(folder, HISTORY_FILE)
    history = storage.read_json(history_uri) if storage.exists(history_uri) else []
    config_uri = storage.join(folder, CONFIG_FILE)
    job = None
    if storage.exists(config_uri):
        with storage.open_uri(config_uri, "r") as f:
            job = JobConfig.from_dict(yaml.safe_load(f))
    model = model_with_state(info, torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True))
    model.eval()
    return LoadedModel(
        model=model, classes=info.classes, image_size=info.image_size, mean=info.mean, std=info.std,
        model_id=registered_id(folder) or hashlib.sha256(raw).hexdigest()[:16], job=job, history=history,
    )


def load_train_state(folder: str) -> Optional[dict[str, Any]]:
    """Model weights plus optimizer/scheduler state for resuming, or None if absent."""
    path = os.path.join(folder, TRAIN_STATE_FILE)
    if not os.path.exists(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["model"] = torch.load(os.path.join(folder, MODEL_FILE), map_location="cpu", weights_only=True)
    state["history"] = storage.read_json(os.path.join(folder, HISTORY_FILE))
    return state
