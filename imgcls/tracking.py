"""Experiment tracking on MLflow: runs of train, tune, evaluate and monitor.

Tracking is on when a tracking URI is given (``--tracking-uri``, the YAML's
``train.tracking_uri``, or ``MLFLOW_TRACKING_URI``), and only then is ``mlflow``
imported: every function that talks to MLflow imports it itself, and this module's own
imports are the standard library's and ``imgcls.storage``. A ``pip install imgcls``
without the ``mlflow`` extra runs every command that is given no tracking URI and no
``models:/`` URI.

One ``imgcls train`` is one MLflow run. The driver creates it (or, on ``--resume``,
finds it in the run's checkpoints: ``RUN_ID_KEY`` in ``meta.json``) and logs the
flattened config as params; rank 0 logs each epoch's metrics with ``step=epoch`` after
the epoch's checkpoint is reported (``EpochLog``), so a worker killed and restarted from
that checkpoint neither repeats a step nor leaves one out; the driver then logs the test
metrics, the splits, ``history.json``, the test report and the checkpoint's URI.
``imgcls tune`` makes one parent run per sweep and a child run per trial; ``imgcls
evaluate`` and ``imgcls monitor`` log runs tagged with the model's run (``MODEL_RUN_TAG``)
and nested under it. The registry (``imgcls register``, ``models:/`` URIs) is
``imgcls.registry``.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any, Iterable, Optional

from imgcls import storage
from imgcls.paths import is_registry_uri

TRACKING_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"  # MLflow's own variable; default experiment DEFAULT_EXPERIMENT
DEFAULT_EXPERIMENT = "imgcls"
RUN_ID_KEY = "mlflow_run_id"  # in a checkpoint's meta.json: the training run that made it
QUIET = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # "View run ... at" on stdout at every run's end
         "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
MODEL_RUN_TAG = "imgcls.model_run_id"  # on evaluate's and monitor's runs: the model's training run
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a run under its parent
COMMAND_TAG = "imgcls.command"
CHECKPOINT_TAG = "imgcls.checkpoint"
STEP_METRIC = "val_accuracy"  # in every epoch's metrics: its steps are the epochs logged so far
REGISTERED_FILE = "registered_model.json"  # in a checkpoint folder downloaded from the registry


def local_model(uri: str) -> str:
    """The checkpoint folder of ``uri``: itself, or for a ``models:/`` URI the folder the
    registry's version was downloaded to (``registry.checkpoint_folder``; found in the
    cache without asking MLflow when a version is named and was fetched before)."""
    if not is_registry_uri(uri):
        return uri
    from imgcls.registry import checkpoint_folder

    return checkpoint_folder(uri)


def registered_id(folder: str) -> Optional[str]:
    """The model id of a checkpoint downloaded from the registry, ``models:/NAME/VERSION``
    (written there by ``registry.checkpoint_folder``); None for any other folder."""
    uri = storage.join(folder, REGISTERED_FILE)
    if storage.protocol(folder) != "file" or not storage.exists(uri):
        return None
    return storage.read_json(uri)["model_id"]


def model_run_id(folder: str) -> Optional[str]:
    """The MLflow run that trained the checkpoint in ``folder`` (a checkpoint folder, or a
    ``models:/`` URI), from its meta.json, else for a registered version the run it was
    registered in; None when it was trained without tracking, or is no checkpoint."""
    try:
        folder = local_model(folder)
        meta = storage.read_json(storage.join(folder, "meta.json"))
    except (FileNotFoundError, OSError, ValueError):
        return None
    registered = storage.join(folder, REGISTERED_FILE)  # a version registered from an untracked checkpoint
    if RUN_ID_KEY not in meta and storage.protocol(folder) == "file" and storage.exists(registered):
        return storage.read_json(registered).get("run_id")
    return meta.get(RUN_ID_KEY)


def client(tracking_uri: Optional[str] = None):
    """An ``MlflowClient`` of ``tracking_uri`` (None: MLflow's default, ``MLFLOW_TRACKING_URI``),
    whose registry is the same server. MLflow's own output is kept off stdout, which
    carries the commands' JSON summaries, and its download bars off the log (``QUIET``)."""
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def experiment_id(mlflow_client, tracking_uri: Optional[str], name: Optional[str] = None) -> str:
    """The id of experiment ``name`` (default: ``MLFLOW_EXPERIMENT_NAME``, else 'imgcls')
    at ``tracking_uri`` (None: ``MLFLOW_TRACKING_URI``),
    created if new; in a SQLite store its artifacts go to ``mlartifacts/`` beside the
    database file, not to MLflow's default ``./mlruns`` of whichever folder a command ran in."""
    name = name or os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    uri, location = tracking_uri or os.environ.get(TRACKING_ENV, ""), None
    if uri.startswith("sqlite:///"):
        location = os.path.join(os.path.dirname(uri[len("sqlite:///"):]) or ".", "mlartifacts")
        location = os.path.abspath(location)
    return mlflow_client.create_experiment(name, artifact_location=location)


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config dict as MLflow params: ``{'train.lr': '0.001', ...}``; None as ''."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = "" if value is None else str(value)[:6000]  # MLflow's limit on a value
    return out


def numeric_metrics(values: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of ``values`` (not booleans, strings, lists or None), as floats."""
    return {f"{prefix}{k}": float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _log(mlflow_client, run_id: str, metrics: Optional[dict] = None, params: Optional[dict] = None,
         tags: Optional[dict] = None, step: int = 0) -> None:
    """Metrics (at ``step``), params and tags in batches of MLflow's limits."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.time import get_current_time_millis

    now = get_current_time_millis()
    batch_metrics = [Metric(k, v, now, step) for k, v in (metrics or {}).items()]
    batch_params = [Param(k, v) for k, v in (params or {}).items()]
    batch_tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    for lo in range(0, max(len(batch_metrics), len(batch_params), len(batch_tags), 1), 100):
        mlflow_client.log_batch(run_id, metrics=batch_metrics[lo:lo + 100], params=batch_params[lo:lo + 100],
                                tags=batch_tags[lo:lo + 100])


def start_run(tracking_uri: Optional[str], run_name: str, command: str, params: Optional[dict] = None,
              tags: Optional[dict] = None, parent: Optional[str] = None) -> str:
    """Creates an MLflow run of ``command`` in the experiment, with ``params``; returns its id.
    ``parent`` nests it under that run in the UI."""
    c = client(tracking_uri)
    all_tags = {COMMAND_TAG: command, "mlflow.runName": run_name, **(tags or {})}
    if parent:
        all_tags[PARENT_TAG] = parent
    # A child run is in its parent's experiment (a Tune trial's actor lacks the driver's environment).
    experiment = c.get_run(parent).info.experiment_id if parent else experiment_id(c, tracking_uri)
    run = c.create_run(experiment, run_name=run_name)
    _log(c, run.info.run_id, params=params, tags=all_tags)
    return run.info.run_id


def end_run(tracking_uri: Optional[str], run_id: str, status: str = "FINISHED") -> None:
    client(tracking_uri).set_terminated(run_id, status)


def checkpoint_meta_run_id(checkpoint: str) -> Optional[str]:
    """``RUN_ID_KEY`` of a checkpoint folder's meta.json, else None."""
    uri = storage.join(checkpoint, "meta.json")
    return storage.read_json(uri).get(RUN_ID_KEY) if storage.exists(uri) else None


def resumed_run_id(run_folder: str, resume_from: Optional[str] = None) -> Optional[str]:
    """The MLflow run of the training that ``--resume`` (or ``--resume-from``) continues:
    the one recorded in its checkpoints' meta.json, the latest checkpoint first."""
    if resume_from:
        return checkpoint_meta_run_id(resume_from)
    fs, path = storage.filesystem(run_folder)
    if not fs.exists(path):
        return None
    fs.invalidate_cache(path)
    names = sorted((e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)), reverse=True)
    for name in names:
        if name.startswith("checkpoint_"):
            found = checkpoint_meta_run_id(storage.join(run_folder, name))
            if found:
                return found
    return None


def start_training(job, run_folder: str, resuming: bool, parent: Optional[str] = None) -> Optional[str]:
    """The MLflow run of ``imgcls train`` (``job``'s), when ``job.train.tracking_uri`` is
    set: the run continued by ``--resume`` when its checkpoints name one that the server
    holds, else a new run with the flattened config as params (a resumed run's new run
    then gets the epochs before the resume from the checkpoint's history). None without
    tracking."""
    uri = job.train.tracking_uri
    if not uri:
        return None
    if resuming:
        found = resumed_run_id(run_folder, job.train.resume_from)
        if found:
            from mlflow.exceptions import MlflowException

            try:
                client(uri).update_run(found, status="RUNNING")
                return found
            except MlflowException:  # another tracking server than the run's: a new run there
                pass
    return start_run(uri, job.train.name, "train", params=flat_params(job.to_dict()),
                     tags={"imgcls.run_folder": run_folder}, parent=parent)


class EpochLog:
    """Rank 0's per-epoch metrics in the training's MLflow run, ``step=epoch``.

    ``sync(history)`` logs every epoch of ``history`` not logged yet, and is called
    after each epoch's checkpoint is reported: a worker group restarted from a
    checkpoint (a killed worker, ``--resume``) asks MLflow which epochs the run holds and
    catches up from the checkpoint's history, so no step is logged twice and none is left
    out. The values are ``history.json``'s numbers (``numeric_metrics``).
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.client, self.run_id = client(tracking_uri), run_id
        logged = self.client.get_metric_history(run_id, STEP_METRIC)
        self.last = max((m.step for m in logged), default=-1)

    def sync(self, history: Iterable[dict]) -> None:
        for metrics in history:
            epoch = int(metrics["epoch"])
            if epoch > self.last:
                values = numeric_metrics({k: v for k, v in metrics.items() if k != "epoch"})
                _log(self.client, self.run_id, metrics=values, step=epoch)
                self.last = epoch


def log_files(tracking_uri: Optional[str], run_id: str, files: dict[str, str]) -> None:
    """Logs each ``{artifact path: file or folder URI}`` (local or any fsspec URI) to the run."""
    c = client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        for dest, src in files.items():
            if not storage.exists(src):
                continue
            fs, path = storage.filesystem(src)
            here = os.path.join(tmp, dest)
            os.makedirs(os.path.dirname(here), exist_ok=True)
            if fs.isdir(path):
                fs.get(path.rstrip("/") + "/", here, recursive=True)
                c.log_artifacts(run_id, here, dest)
            else:
                fs.get(path, here)
                c.log_artifact(run_id, here, os.path.dirname(dest) or None)


def finish_training(tracking_uri: str, run_id: str, summary: dict, run_folder: str, best: str,
                    report: Optional[str]) -> None:
    """The end of a tracked ``imgcls train``: its test metrics (``test_*``), the splits,
    ``history.json`` and the test report as artifacts, the checkpoint's URI as a tag."""
    c = client(tracking_uri)
    metrics = numeric_metrics(summary.get("test", {}), "test_")
    metrics.update(numeric_metrics(summary.get("init_from_test", {}), "init_from_test_"))
    _log(c, run_id, metrics=metrics, tags={CHECKPOINT_TAG: best,
                                           "imgcls.latest_checkpoint": summary.get("latest_checkpoint", "")})
    files = {"splits": storage.join(run_folder, "splits"), "history.json": storage.join(best, "history.json")}
    if report:
        files[f"test/{os.path.basename(report)}"] = report
    log_files(tracking_uri, run_id, files)
    c.set_terminated(run_id, "FINISHED")


def log_result_run(tracking_uri: Optional[str], command: str, model: Optional[str], metrics: dict,
                   files: dict[str, str], params: Optional[dict] = None, model_run: Optional[str] = None) -> str:
    """A run of ``imgcls evaluate`` or ``imgcls monitor``: ``metrics`` (flattened, numbers
    and verdicts only), ``files`` as artifacts, tagged with the model's training run
    (``MODEL_RUN_TAG``: ``model_run``, else the one ``model``'s checkpoint names) and
    nested under it in the UI. Returns the run's id."""
    run = model_run or (model_run_id(model) if model else None)
    tags = {MODEL_RUN_TAG: run} if run else {}
    if model:
        tags["imgcls.model"] = model
        registered = registered_id(model)
        if registered:
            tags["imgcls.registered_model"] = registered
    run_id = start_run(tracking_uri, command, command, params=params, tags=tags, parent=run)
    values = {k: float(v) if isinstance(v, bool) else v for k, v in flatten(metrics).items()}
    _log(client(tracking_uri), run_id, metrics=numeric_metrics(values))
    log_files(tracking_uri, run_id, files)
    end_run(tracking_uri, run_id)
    return run_id


def log_monitor_run(tracking_uri: str, reference: str, current: str, result: dict) -> str:
    """``imgcls monitor``'s run: drift.json's statistics and verdicts (``drift`` 1 or 0)
    and the report, under the run of the model that labelled ``current`` (its ``_job.json``
    ``model_run_id``), else of the reference checkpoint's model. Logged in the same
    experiment every month, the p-values and PSI over the runs are a chart in the UI."""
    job = storage.join(current, "_job.json")
    labelled_by = storage.read_json(job).get("model_run_id") if storage.exists(job) else None
    is_checkpoint = storage.exists(storage.join(reference, "meta.json"))
    metrics = {k: v for k, v in result.items() if k not in ("drift_json", "report")}
    return log_result_run(tracking_uri, "monitor", reference if is_checkpoint else None, metrics,
                          {"drift.json": result["drift_json"], "drift.html": result["report"]},
                          params={"reference": reference, "current": current, "alpha": result.get("alpha")},
                          model_run=labelled_by)


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (``{'a': {'b': 1}}`` -> ``{'a.b': 1}``); lists are left out."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        elif not isinstance(value, (list, tuple)):
            out[f"{prefix}{key}"] = value
    return out
