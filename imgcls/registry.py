"""The model registry, on MLflow: register a checkpoint, and load one by ``models:/`` URI.

A registered version is the checkpoint folder itself, logged as the artifact of an MLflow
pyfunc model (``CheckpointModel``), not MLflow's PyTorch flavour. The PyTorch flavour
saves a pickled module (or its state dict) and nothing else, so the classes, the input
size and normalisation (meta.json), the resolved config, the history and the split
manifests would not come back; the checkpoint folder round-trips byte for byte, every
imgcls command reads it as it reads any checkpoint, and its ``model.pt`` hashes to the
same weights id. The pyfunc wrapper (``imgcls/inference/pyfunc.py``) makes the version
loadable by ``mlflow.pyfunc`` too (``predict`` takes a frame with a ``path`` column and
labels those images).

``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` resolve through MLflow's client to
a version, downloaded once to ``MODEL_CACHE_ENV`` (default ``~/.cache/imgcls/models``)
under the registry's folder and ``NAME/VERSION`` (``cache_folder``): a registered version never changes, so the cached folder is used
without asking MLflow again. Promoting or rolling back is moving an alias
(``set_alias``); registry stages are deprecated and not used.

This module imports ``mlflow``: import it only where a registry is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import warnings
from importlib import metadata
from typing import Optional

import mlflow
import mlflow.pyfunc

from imgcls import storage
from imgcls.paths import MODELS_SCHEME
from imgcls.tracking import REGISTERED_FILE, RUN_ID_KEY, client, start_run

MODEL_CACHE_ENV = "IMGCLS_MODEL_CACHE"
CHECKPOINT_ARTIFACT = "checkpoint"  # the pyfunc model's artifact: the checkpoint folder (inference/pyfunc.py)
# The pyfunc model's code, logged as MLflow's "models from code" (a file, not a pickled
# object): a path, not an import, as the registry is shared below the feature packages.
PYFUNC_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "inference", "pyfunc.py")
MODEL_ARTIFACT = "model"  # the run's artifact path of the logged model
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


class RegistryError(ValueError):
    """A ``models:/`` URI that names no registered version, or cannot be parsed."""


@contextlib.contextmanager
def quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def parse(uri: str) -> tuple[str, Optional[str], Optional[str]]:
    """(name, alias, version) of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    match = _URI.match(uri)
    if match is None:
        raise RegistryError(f"{uri} is not a registered model's URI: use models:/NAME@ALIAS or models:/NAME/VERSION")
    return match["name"], match["alias"], match["version"]


def cache_folder(name: str, version: str, tracking_uri: Optional[str] = None) -> str:
    """Where version ``version`` of ``name`` is kept once downloaded: under the cache root,
    a folder per registry (a hash of its tracking URI: two registries may each hold a
    version 2 of the same name), then ``NAME/VERSION``."""
    root = os.environ.get(MODEL_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "imgcls", "models")
    registry = hashlib.sha256((tracking_uri or mlflow.get_tracking_uri()).encode()).hexdigest()[:12]
    return os.path.join(root, registry, name, version)


def pin(uri: str, tracking_uri: Optional[str] = None) -> str:
    """``uri`` with an alias replaced by the version it points to now (``models:/NAME/3``),
    so that a job started with it keeps that version when the alias moves."""
    name, alias, version = parse(uri)
    if alias is None:
        return f"{MODELS_SCHEME}{name}/{version}"
    from mlflow.exceptions import MlflowException

    try:
        found = client(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException as e:
        raise RegistryError(f"{uri}: no version of {name} has the alias {alias} ({e.message})") from None
    return f"{MODELS_SCHEME}{name}/{found.version}"


def checkpoint_folder(uri: str, tracking_uri: Optional[str] = None) -> str:
    """The local checkpoint folder of the registered version ``uri`` names, downloaded on
    first use to the cache (``NAME/VERSION``), with ``REGISTERED_FILE`` beside its files:
    the id (``models:/NAME/VERSION``) that predictions carry, and the training run."""
    from mlflow.exceptions import MlflowException

    name, _, version = parse(pin(uri, tracking_uri))
    folder = cache_folder(name, version, tracking_uri)
    if os.path.exists(os.path.join(folder, REGISTERED_FILE)):
        return folder
    c = client(tracking_uri)
    try:
        found = c.get_model_version(name, version)
        download = c.get_model_version_download_uri(name, version)
    except MlflowException as e:
        raise RegistryError(f"{uri}: no such registered version ({e.message})") from None
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{version}-", dir=os.path.dirname(folder))
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=download, dst_path=tmp, tracking_uri=tracking_uri)
        got = os.path.join(tmp, "artifacts", CHECKPOINT_ARTIFACT)
        if not os.path.isdir(got):  # the download URI may name the model folder itself or its parent
            got = next((os.path.join(top, CHECKPOINT_ARTIFACT) for top, dirs, _ in os.walk(tmp)
                        if CHECKPOINT_ARTIFACT in dirs and os.path.basename(top) == "artifacts"), None)
        if got is None:
            raise RegistryError(f"{uri} holds no imgcls checkpoint (no artifacts/{CHECKPOINT_ARTIFACT}): it was not "
                                "registered by imgcls register")
        storage.write_json(os.path.join(got, REGISTERED_FILE), {
            "model_id": f"{MODELS_SCHEME}{name}/{version}", "name": name, "version": int(version),
            "run_id": found.run_id, "source": found.source})
        try:
            os.rename(got, folder)  # whole or not at all: a second process may have won the race
        except OSError:
            if not os.path.exists(os.path.join(folder, REGISTERED_FILE)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def register(checkpoint: str, name: str, alias: Optional[str] = None, tracking_uri: Optional[str] = None) -> dict:
    """Logs the checkpoint folder ``checkpoint`` as an MLflow model in the run that trained
    it (meta.json's run id; a new run 'register' for a checkpoint trained without
    tracking), registers it as a new version of ``name`` and, with ``alias``, points the
    alias at it. Returns the version's name, number, URI and run id."""
    if not storage.exists(storage.join(checkpoint, "model.pt")):
        raise FileNotFoundError(f"{checkpoint} is not an imgcls checkpoint (no model.pt)")
    meta = storage.read_json(storage.join(checkpoint, "meta.json"))
    c = client(tracking_uri)
    run_id = meta.get(RUN_ID_KEY)
    if run_id is None:
        run_id = start_run(tracking_uri, f"register {name}", "register", tags={"imgcls.checkpoint": checkpoint})
        c.set_terminated(run_id, "FINISHED")
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, CHECKPOINT_ARTIFACT)
        fs, path = storage.filesystem(checkpoint)
        fs.get(path.rstrip("/") + "/", local, recursive=True)
        saved = os.path.join(tmp, MODEL_ARTIFACT)
        # Requirements given, not inferred: inferring them loads the model in a subprocess.
        # MLflow warns that no signature is inferred (the model's input is image paths).
        with warnings.catch_warnings(), quiet_logger("mlflow.pyfunc"):
            warnings.simplefilter("ignore", UserWarning)
            mlflow.pyfunc.save_model(saved, python_model=PYFUNC_CODE, artifacts={CHECKPOINT_ARTIFACT: local},
                                     pip_requirements=[f"imgcls=={metadata.version('imgcls')}"])
        c.log_artifacts(run_id, saved, MODEL_ARTIFACT)
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name)
    source = f"{c.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
    version = c.create_model_version(name, source, run_id=run_id, tags={"imgcls.checkpoint": checkpoint})
    if alias:
        c.set_registered_model_alias(name, alias, version.version)
    return {"name": name, "version": int(version.version), "uri": f"{MODELS_SCHEME}{name}/{version.version}",
            "alias": alias, "run_id": run_id, "checkpoint": checkpoint}


def set_alias(name: str, alias: str, version: int, tracking_uri: Optional[str] = None) -> None:
    """Points ``models:/NAME@ALIAS`` at ``version``: promoting, or rolling back."""
    client(tracking_uri).set_registered_model_alias(name, alias, str(version))
