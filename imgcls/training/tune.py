"""Hyperparameter search: Ray Tune trials, each a full TorchTrainer run, with ASHA early stopping.

Each trial is a Tune function that builds and fits a TorchTrainer; Ray Train's
``TuneReportCallback`` forwards every epoch's metrics to Tune, so the ASHA scheduler can
stop weak trials after ``grace_period`` epochs.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import ray
from ray import tune
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from imgcls import storage
from imgcls.checkpoint import save_config
from imgcls.config import JobConfig
from imgcls.devices import node_requests
from imgcls.paths import resolve_paths
from imgcls.ray_internals import placement_group
from imgcls.training.loop import PLACEMENT_GROUP_KEY

METRIC = "val_accuracy"
TRIAL_TAG = "imgcls.trial_id"  # on each trial's MLflow run
BEST_TAG = "imgcls.best_trial"  # 'true' on the best trial's MLflow run
BEST_CONFIG_FILE = "tune_best.yaml"


def search_space(batch_sizes=(32, 64, 128)) -> dict:
    """lr, weight decay, batch size and augmentation strength."""
    return {
        "lr": tune.loguniform(1e-4, 1e-2),
        "weight_decay": tune.loguniform(1e-4, 1e-1),
        "batch_size": tune.choice(list(batch_sizes)),
        "augment_magnitude": tune.randint(3, 16),
    }


def apply_trial(job: JobConfig, params: dict, name: str) -> JobConfig:
    """The job with a trial's parameters and its own run name."""
    train_keys = {f.name for f in dataclasses.fields(job.train)}
    data_keys = {f.name for f in dataclasses.fields(job.data)}
    return dataclasses.replace(
        job,
        train=dataclasses.replace(job.train, name=name, max_failures=0,
                                  # A finished trial's placement group can outlive it briefly; small
                                  # worker shares keep the next trial from waiting on it.
                                  cpus_per_worker=job.train.cpus_per_worker or 0.25,
                                  **{k: v for k, v in params.items() if k in train_keys}),
        data=dataclasses.replace(job.data, **{k: v for k, v in params.items() if k in data_keys}),
    )


def tune_trial(config: dict) -> None:
    """Tune function: one TorchTrainer run with the trial's parameters."""
    from imgcls.training.trainer import build_trainer

    # Ray Train's logs at the level the driver set (``trainer.ray_train_log_level``), not
    # this trial actor's default.
    logging.getLogger("ray.train").setLevel(config.get("log_level", "INFO"))
    trial_id = tune.get_context().get_trial_id()
    job = apply_trial(JobConfig.from_dict(config["job"]), config["params"],
                      name=f"{config['job']['train']['name']}-trial-{trial_id}")
    run_id = None
    if config.get("mlflow_parent"):  # the trial's own run, nested under the sweep's
        from imgcls.tracking import flat_params, start_run

        run_id = start_run(job.train.tracking_uri, job.train.name, "tune", params=flat_params(job.to_dict()),
                           tags={TRIAL_TAG: trial_id}, parent=config["mlflow_parent"])
    with node_requests():  # GPUs this trial asked the autoscaler for, withdrawn however it ends
        trainer, *_ = build_trainer(job, callbacks=[TuneReportCallback()], report_placement_group=True,
                                    mlflow_run_id=run_id)
        trainer.fit()
    if run_id:
        from imgcls.tracking import end_run

        end_run(job.train.tracking_uri, run_id)


class ReleaseWorkerGroups(Callback):
    """Removes an ended trial's worker placement group, which would otherwise stay reserved.

    Tune ends a trial (ASHA's stop, or its last epoch) by killing the trial's actor, in
    which Ray Train's controller runs, so the controller never removes the placement
    group of its workers. Ray Train's own cleaner watches the controller through the
    State API, which needs the dashboard; without it, every ended trial kept its
    workers' CPUs, and on 2 CPUs the eighth trial waited for CPUs for ever. The workers
    report the group's id (``PLACEMENT_GROUP_KEY``); this callback removes it.
    """

    def __init__(self):
        self.released: list[str] = []

    def _release(self, trial) -> None:
        group = (trial.last_result or {}).get(PLACEMENT_GROUP_KEY)
        if not group or group in self.released:
            return
        table = ray.util.placement_group_table().get(group)
        if table is not None and table["state"] != "REMOVED":
            ray.util.remove_placement_group(placement_group(group))
        self.released.append(group)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release(trial)


class TrialsFailedError(RuntimeError):
    """Every trial failed: the message names the first trial's error."""


def root_cause(error: BaseException) -> BaseException:
    """The exception a trial raised, without Ray's wrappers (a task error carries it as ``cause``)."""
    seen = set()
    while getattr(error, "cause", None) is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.cause
    return error


def failed_trials_message(results) -> str:
    """'all N trials failed', with the first failed trial's error (its type and message,
    without Ray's traceback) and where its trial folder is."""
    failed = [r for r in results if r.error is not None]
    first = failed[0] if failed else None
    n = len(results)
    if first is None:
        return f"no trial of {n} reported {METRIC}"
    cause = root_cause(first.error)
    text = " ".join(str(cause).split())
    text = text if len(text) <= 2000 else text[:2000] + " ..."
    what = f"all {n} trials failed; the first trial's error" if n != 1 else "the only trial failed"
    return f"{what}: {type(cause).__name__}: {text} (trial folder: {first.path})"


@dataclass
class TuneSummary:
    best_params: dict
    best_val_accuracy: float
    best_job: dict
    trials: list[dict]
    best_config_file: str
    search: str = "random"


SEARCHES = ("random", "optuna")


def searcher(search: str, num_samples: int, seed: int):
    """Ray Tune's search algorithm for ``search``: None for random search (Tune's own
    sampling), or ``OptunaSearch`` with Optuna's TPE sampler. TPE samples at random for
    its first ``n_startup_trials`` (Optuna's default, 10, would be the whole of a small
    budget); here a third of the trials, 2 to 10, then models the results so far."""
    if search == "random":
        return None
    if search != "optuna":
        raise ValueError(f"unknown search {search!r}: one of {', '.join(SEARCHES)}")
    try:
        import optuna
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as e:
        raise ImportError("--search optuna needs Optuna: pip install 'imgcls[tune]'") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    startup = min(10, max(2, num_samples // 3))
    return OptunaSearch(sampler=optuna.samplers.TPESampler(n_startup_trials=startup, seed=seed))


def finish_sweep(tracking_uri: str, parent: str, best_trial: str, best_value: float) -> None:
    """Tags the best trial's run (``BEST_TAG``), names it on the sweep's run with the best
    value, and ends the trials' runs that ASHA stopped (their actors were killed)."""
    from imgcls.tracking import client

    c = client(tracking_uri)
    children = c.search_runs([c.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    for run in children:
        if run.data.tags.get(TRIAL_TAG) == best_trial:
            c.set_tag(run.info.run_id, BEST_TAG, "true")
            c.set_tag(parent, "imgcls.best_run_id", run.info.run_id)
        if run.info.status == "RUNNING":
            c.set_terminated(run.info.run_id, "KILLED")  # stopped early by ASHA
    c.log_metric(parent, f"best_{METRIC}", best_value)
    c.set_tag(parent, "imgcls.best_trial_id", best_trial)
    c.set_terminated(parent, "FINISHED")


def run_tune(job: JobConfig, num_samples: int = 4, grace_period: int = 1, max_concurrent: int = 1,
             space: dict | None = None, search: str = "random") -> TuneSummary:
    """Searches ``space`` around ``job`` and returns the best configuration found.

    Args:
        job: The base job; its ``train.epochs`` is the longest a trial runs.
        num_samples: Trials to run.
        grace_period: Epochs every trial gets before ASHA may stop it.
        max_concurrent: Trials at once; each holds ``train.num_workers`` workers.
        search: 'random' (each trial's parameters drawn independently) or 'optuna'
            (Bayesian: TPE proposes each trial from the results before it); ASHA stops
            weak trials early in both.
    """
    search_alg = searcher(search, num_samples, job.train.seed)
    # Tune runs every trial in a folder of its own: relative paths must be resolved here.
    job = resolve_paths(job)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=job.train.epochs,
                              grace_period=grace_period, reduction_factor=2)
    root = storage.absolute(job.train.storage_path)
    run_dir = storage.join(root, f"{job.train.name}-tune")
    if job.data.cache_path is None:
        # One decoded cache for all trials, built here before they start: the search
        # changes no geometry, and concurrent trials must not each build their own.
        job = dataclasses.replace(job, data=dataclasses.replace(job.data, cache_path=storage.join(run_dir, "cache")))
    from imgcls.training.trainer import build_caches, prepare_splits, ray_train_log_level

    # The data is listed and checked once, before any trial: a bad root fails here, once.
    splits, classes = prepare_splits(job)
    build_caches(job, splits["train"], splits["val"], classes, root)
    parent = None
    if job.train.tracking_uri:  # one MLflow run for the sweep; each trial's run nests under it
        from imgcls.tracking import flat_params, start_run

        parent = start_run(job.train.tracking_uri, f"{job.train.name}-tune", "tune",
                           params={**flat_params(job.to_dict()), "tune.num_samples": str(num_samples),
                                   "tune.search": search, "tune.grace_period": str(grace_period)})
    tuner = tune.Tuner(
        # The trial only drives its trainer, whose workers hold the real resources.
        tune.with_resources(tune_trial, {"CPU": 0.01}),
        param_space={"job": job.to_dict(), "params": space or search_space(), "log_level": ray_train_log_level(),
                     "mlflow_parent": parent},
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler, num_samples=num_samples,
                                    max_concurrent_trials=max_concurrent, search_alg=search_alg),
        run_config=tune.RunConfig(name=f"{job.train.name}-tune", storage_path=root, callbacks=[ReleaseWorkerGroups()]),
    )
    results = tuner.fit()
    if not any((r.metrics or {}).get(METRIC) is not None for r in results):
        if parent:
            from imgcls.tracking import end_run

            end_run(job.train.tracking_uri, parent, "FAILED")
        raise TrialsFailedError(failed_trials_message(results))
    best = results.get_best_result(metric=METRIC, mode="max")
    if parent:
        finish_sweep(job.train.tracking_uri, parent, best.metrics["trial_id"], best.metrics[METRIC])
    best_job = apply_trial(job, best.config["params"], name=job.train.name)
    best_file = storage.join(run_dir, BEST_CONFIG_FILE)
    save_config(best_file, best_job)
    trials = [{"params": r.config["params"], METRIC: (r.metrics or {}).get(METRIC),
               "epochs": (r.metrics or {}).get("training_iteration"),
               **({"error": f"{type(root_cause(r.error)).__name__}: {root_cause(r.error)}"} if r.error else {})}
              for r in results]
    return TuneSummary(best_params=best.config["params"], best_val_accuracy=best.metrics[METRIC],
                       best_job=best_job.to_dict(), trials=trials, best_config_file=best_file, search=search)
