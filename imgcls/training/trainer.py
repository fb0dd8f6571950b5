"""Data-parallel training with Ray Train's TorchTrainer: what runs on the driver.

``fit`` lists and splits the data, decodes each split once into a uint8 cache
(``training.cache``), prepares the run folder (resume, overwrite, warm start), builds
the ``TorchTrainer`` around ``loop.train_loop_per_worker`` and keeps the best checkpoint.
"""

from __future__ import annotations

import math
import os
import threading
import uuid
from dataclasses import dataclass, field
from typing import Optional

import ray
import ray.train
import ray.train.torch
import torch

from imgcls import storage
from imgcls.checkpoint import SPLITS_DIR, read_split, read_split_files, save_checkpoint, save_config, write_splits
from imgcls.config import JobConfig
from imgcls.devices import autoscaler_capacity, choose_gpu, node_requests
from imgcls.evaluation.metrics import inverse_frequency_weights
from imgcls.labelled import (
    SPLITS,
    DataError,
    LabelledImages,
    class_counts,
    list_labelled_images,
    pin_to_saved_splits,
    split_stratified,
)
from imgcls.models import create_model
from imgcls.preprocess import resize_size
from imgcls.training.augment import stored_geometry
from imgcls.training.cache import CachePlan, ImageCache, cache_dataset, plan_cache
from imgcls.training.loop import say, train_loop_per_worker
from imgcls.training.probe import PROBE_CHECKPOINT, PROBE_HEAD_FILE, run_probe
from imgcls.tracking import RUN_ID_KEY, EpochLog, end_run, start_training

BEST_DIR = "best"  # copy of the best checkpoint inside the run folder
RESIDENT_MEMORY_SHARE = 0.25  # of a worker's share of node memory that its resident data may take
CACHE_DIR = "cache"  # default cache folder inside the run folder


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1.0))


def cpus_per_worker(num_workers: int, requested: Optional[float], use_gpu: bool) -> float:
    """CPUs to reserve per training worker.

    Workers that each hold a whole CPU leave none for Ray Data's tasks on a small
    machine, and a streamed split then hangs; so by default the workers share half the
    CPUs. How many threads a worker computes with is set apart (``worker_threads``).
    """
    if requested is not None:
        return requested
    if use_gpu:
        return 1.0
    return max(0.1, min(1.0, cluster_cpus() * 0.5 / num_workers))


@dataclass
class FitResult:
    checkpoint: str  # folder of the latest checkpoint
    best_checkpoint: str  # folder of the checkpoint with the highest val accuracy
    metrics: dict
    history: list[dict]
    classes: list[str]
    splits: dict[str, LabelledImages]
    caches: dict[str, ImageCache] = field(default_factory=dict)
    resident: bool = False
    mlflow_run_id: Optional[str] = None  # the run's MLflow run, when tracked (``imgcls.tracking``)
    run: str = ""  # the run folder


def prepare_splits(job: JobConfig) -> tuple[dict[str, LabelledImages], list[str]]:
    """Lists, validates and splits the labelled data; returns the splits and the class list.

    With ``--init-from``, every file named in that checkpoint's saved splits keeps its
    split there (found by path, or by key when it moved: ``pin_to_saved_splits``), so the
    new model is validated and tested on no image the old weights were trained on; the
    new files are split as any (``split_stratified``).
    """
    images = list_labelled_images(job.data.root)
    classes = sorted(set(images.labels))
    splits = split_stratified(images, job.data.val_fraction, job.data.test_fraction,
                              seed=job.data.split_seed, max_per_class=job.data.max_per_class,
                              pinned=init_from_pins(job, images))
    for name in ("train", "val"):
        if not len(splits[name]):
            raise DataError(f"the {name} split is empty: add data or raise data.{name}_fraction")
    return splits, classes


def init_from_pins(job: JobConfig, images: LabelledImages) -> dict[str, str]:
    """The split each of ``images`` had in ``--init-from``'s saved splits (none without
    ``--init-from``, or when that checkpoint saved none: an older version's, an export)."""
    if not job.train.init_from:
        return {}
    try:
        saved = {name: read_split(job.train.init_from, name) for name in SPLITS}
    except FileNotFoundError:
        return {}
    return pin_to_saved_splits(images, saved)


def cache_uri(job: JobConfig, storage_path: str) -> str:
    return job.data.cache_path or storage.join(storage_path, job.train.name, CACHE_DIR)


def plan_caches(job: JobConfig, train_images: LabelledImages, val_images: LabelledImages, classes: list[str],
                storage_path: str) -> dict[str, CachePlan]:
    """The train and val splits' caches at the training geometry: found decoded, or planned.

    Training images keep what the augmentation needs (``augment.stored_geometry``);
    validation images are exactly the eval preset's, as inference sees them.
    """
    m = job.model
    root = cache_uri(job, storage_path)
    geometry = {"train": stored_geometry(m.image_size, job.data.augment), "val": (resize_size(m.image_size), m.image_size)}
    return {name: plan_cache(images, classes, storage.join(root, name), *geometry[name], seed=job.train.seed)
            for name, images in (("train", train_images), ("val", val_images))}


def say_cache(name: str, cache: ImageCache) -> None:
    verb = "found" if cache.reused else "decoded"
    print(f"{name} cache: {verb} {cache.num_images} images at {cache.side}x{cache.side} "
          f"({cache.nbytes / 2**20:.0f} MB) in {cache.seconds:.1f} s", flush=True)


def build_caches(job: JobConfig, train_images: LabelledImages, val_images: LabelledImages, classes: list[str],
                 storage_path: str) -> dict[str, ImageCache]:
    """Decodes the train and val splits once (or finds them decoded); see ``plan_caches``."""
    caches = {}
    for name, plan in plan_caches(job, train_images, val_images, classes, storage_path).items():
        caches[name] = plan.cache if plan.cache.reused else plan.build()
        say_cache(name, caches[name])
    return caches


class CacheDecode:
    """The caches still to decode, built in order, here or on a driver thread.

    In the background (``fit``, when the workers will hold their data in memory) the
    decode runs while Ray Train starts its workers, which takes seconds of process
    start-up and imports; each worker then waits for its caches' manifests
    (``cache.wait_for_cache``) before loading them. A failed decode marks the caches it
    did not finish as failed, which stops the waiting workers, and ``wait`` raises its
    error (an unreadable training image, say).
    """

    def __init__(self, plans: dict[str, CachePlan], task_cpus: float = 1.0, background: bool = False):
        self.plans = {name: plan for name, plan in plans.items() if not plan.cache.reused}
        self.task_cpus, self.error = task_cpus, None
        background = background and bool(self.plans)  # nothing to decode: nothing to wait for
        self.thread = threading.Thread(target=self._run, name="imgcls-decode", daemon=True) if background else None
        if self.thread is not None:
            self.thread.start()
        else:
            self._run()

    @property
    def background(self) -> bool:
        return self.thread is not None

    def _run(self) -> None:
        names = list(self.plans)
        for i, name in enumerate(names):
            try:
                self.plans[name].build(self.task_cpus)
            except BaseException as e:  # noqa: BLE001 - re-raised by wait()
                self.error = e
                for rest in names[i:]:  # this cache and the ones after it
                    self.plans[rest].fail(e)
                return
            say_cache(name, self.plans[name].cache)

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error


def fits_in_memory(caches: dict[str, ImageCache], num_workers: int, whole_train: bool = False) -> bool:
    """Whether each worker's part of the cached splits fits its share of memory.

    A worker holds ceil(1/num_workers) of the training images (all of them with
    ``whole_train``: the sampler draws each epoch from the whole split) and about as
    much of the validation images; they must take at most RESIDENT_MEMORY_SHARE of the
    cluster's memory divided among the workers, leaving the rest to the model,
    activations and Ray.
    """
    per_worker = sum(c.nbytes for c in caches.values()) / num_workers
    if whole_train:
        per_worker += caches["train"].nbytes * (1 - 1 / num_workers)
    memory = float(ray.cluster_resources().get("memory", 0))
    return per_worker <= RESIDENT_MEMORY_SHARE * memory / num_workers


class RunFolderError(ValueError):
    """A run folder that holds another run's checkpoints, without --resume or --overwrite."""


# Settings a resumed run may change: how long it runs and how it keeps checkpoints.
RESUME_MAY_CHANGE = {"epochs", "resume", "overwrite", "resume_from", "max_failures", "num_to_keep",
                     "tracking_uri", "register", "register_alias"}  # and where it is logged and registered


def config_differences(old: JobConfig, new: JobConfig) -> dict[str, tuple]:
    """``{field: (old, new)}`` for every setting that differs, sections flattened."""
    out = {}
    for section, values in new.to_dict().items():
        before = old.to_dict().get(section, {})
        for key, value in values.items():
            if before.get(key) != value:
                out[key] = (before.get(key), value)
    return out


def prepare_run_folder(job: JobConfig) -> tuple[str, bool]:
    """Checks the run folder (storage_path/name) against ``--resume``/``--overwrite`` and
    writes the run's config.yaml; returns the folder and whether the run continues from
    checkpoints of its own that are there (listed once, here).

    A folder that holds checkpoints is continued only with ``--resume``, and only with
    the same settings (but for RESUME_MAY_CHANGE); ``--overwrite`` deletes them first.

    Raises:
        RunFolderError: checkpoints there and neither flag, or --resume with other settings.
    """
    import yaml

    t = job.train
    run = storage.join(storage.absolute(t.storage_path), t.name)
    fs, path = storage.filesystem(run)
    fs.invalidate_cache(path)
    entries = fs.ls(path, detail=False) if fs.exists(path) else []
    names = {e.rstrip("/").rsplit("/", 1)[-1]: e for e in entries}
    holds_checkpoints = any(n.startswith("checkpoint_") for n in names)
    config_uri = storage.join(run, "config.yaml")
    if holds_checkpoints and t.overwrite:
        for name, entry in names.items():
            if name != "cache":  # the decoded cache is keyed by its data: still valid
                fs.rm(entry, recursive=True)
    elif holds_checkpoints and not t.resume:
        raise RunFolderError(f"{run} already holds checkpoints of a run: pass --resume to continue it, "
                             "--overwrite to start it afresh, or another --name for a new run")
    elif holds_checkpoints and "config.yaml" in names:
        with storage.open_uri(config_uri, "r") as f:
            saved = JobConfig.from_dict(yaml.safe_load(f))
        changed = {k: v for k, v in config_differences(saved, job).items() if k not in RESUME_MAY_CHANGE}
        if changed:
            listed = ", ".join(f"--{k.replace('_', '-')} {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
            raise RunFolderError(f"--resume with other settings than the run in {run}: {listed}; resume with the "
                                 "run's settings, or start a new run (--name, or --overwrite)")
    storage.makedirs(run)
    save_config(config_uri, job)
    return run, holds_checkpoints and not t.overwrite


@dataclass
class PreparedData:
    """What the driver prepares before any training: splits, caches, the run folder.

    The caches are found decoded or planned; ``decode`` builds the planned ones, now or
    in the background, and ``wait_decoded`` returns once they are built."""

    splits: dict[str, LabelledImages]
    classes: list[str]
    plans: dict[str, CachePlan]  # every split's cache, found or planned
    storage_path: str
    run: str
    resuming: bool  # training continues from a checkpoint of this run (or --resume-from)
    decoding: Optional[CacheDecode] = None

    @property
    def caches(self) -> dict[str, ImageCache]:
        return {name: plan.cache for name, plan in self.plans.items()}

    def decode(self, background: bool = False, task_cpus: float = 1.0) -> None:
        if self.decoding is None:
            self.decoding = CacheDecode(self.plans, task_cpus, background)

    def wait_decoded(self) -> None:
        self.decode()
        self.decoding.wait()


def prepare_data(job: JobConfig) -> PreparedData:
    """Lists and splits the data, checks the run folder, saves the split manifests there
    and plans the train and val splits' caches (or finds them decoded): ``decode`` or
    ``wait_decoded`` builds them."""
    splits, classes = prepare_splits(job)
    t = job.train
    if t.init_from:
        check_init_from(job, classes)
    storage_path = storage.absolute(t.storage_path)
    run, continues = prepare_run_folder(job)
    resuming = bool(t.resume_from) or continues
    write_splits(storage.join(run, SPLITS_DIR), splits)
    # The plain train split, each image once, whatever the class balance (``training.sampler``).
    plans = plan_caches(job, splits["train"], splits["val"], classes, storage_path)
    for name, plan in plans.items():
        if plan.cache.reused:
            say_cache(name, plan.cache)
    return PreparedData(splits, classes, plans, storage_path, run, resuming)


def check_init_from(job: JobConfig, classes: list[str]) -> list[str]:
    """The classes of ``--init-from``'s checkpoint, checked against this run's: the same
    architecture and image size, and no class of the checkpoint missing from the data.

    Raises:
        DataError: a class the checkpoint knows has no images here, or another model.
    """
    from imgcls.checkpoint import read_model_info

    info = read_model_info(job.train.init_from)
    missing = sorted(set(info.classes) - set(classes))
    if missing:
        raise DataError(f"--init-from {job.train.init_from} knows class(es) {missing} that the data lacks; a warm "
                        f"start keeps every class of the model (the data has {classes})")
    if info.arch != job.model.arch or info.image_size != job.model.image_size:
        raise DataError(f"--init-from {job.train.init_from} is {info.arch} at {info.image_size} px; this run trains "
                        f"{job.model.arch} at {job.model.image_size} px (give --arch and --image-size to match)")
    return info.classes


def wants_probe_head(job: JobConfig, resuming: bool) -> bool:
    """LP-FT's probe before fine-tuning: by default whenever training starts from pretrained weights."""
    if resuming or job.train.linear_probe or job.train.init_from:
        return False
    return bool(job.model.weights) if job.train.probe_head is None else job.train.probe_head


def probe_class_weight(job: JobConfig, splits: dict[str, LabelledImages], classes: list[str]) -> Optional[list[float]]:
    """The linear probe's per-class loss weights: inverse class frequency with either class
    balance. The probe fits the cached train split, each image once, so with the sampler
    too it weights classes rather than fitting copies, which cross-validation folds would
    split across training and held-out parts."""
    if job.train.class_balance == "none":
        return None
    return inverse_frequency_weights(class_counts(splits["train"].labels, classes)).tolist()


def probe(job: JobConfig, data: PreparedData, use_gpu: bool) -> dict:
    """Fits the linear probe (``imgcls.training.probe``) on the cached splits as a Ray task."""
    weights = probe_class_weight(job, data.splits, data.classes)
    data.wait_decoded()
    result = run_probe(job, data.classes, data.caches, weights, use_gpu, with_state=job.train.linear_probe)
    metrics = result["metrics"]
    say(f"linear probe: val_acc {metrics['val_accuracy']:.4f}  train_acc {metrics['train_accuracy']:.4f}  "
         f"l2 {metrics['probe_l2']:g}  {metrics['num_features']} features of {metrics['train_samples']} images "
         f"in {metrics['probe_seconds']:.1f} s")
    return result


def worker_count_note(num_workers: int, batch_size: int, use_gpu: bool) -> Optional[str]:
    """On a cluster that an autoscaler grows, why training keeps ``num_workers`` workers
    rather than growing with the nodes (None elsewhere).

    Ray Train's elastic ``ScalingConfig(num_workers=(min, max))`` restarts a run with
    another worker count as nodes come and go; imgcls plans a run for one count: the
    global batch (workers x batch size), which the learning rate is set for, and each
    worker's share of the cached images. So the count stays as given, and the run says
    how many the node types would hold.
    """
    resource = "GPU" if use_gpu else "CPU"
    capacity = int(autoscaler_capacity(resource))
    if capacity <= 0:
        return None
    return (f"training: {num_workers} workers (--num-workers), a fixed count: the autoscaler adds the nodes they "
            f"need (its node types hold {capacity} {resource}s), but a run keeps one worker count from start to end, "
            f"since its global batch ({num_workers} x {batch_size} images, which the learning rate is set for) and "
            f"each worker's share of the cached images are planned for it; give --num-workers to use more")


def ray_train_log_level() -> str:
    """The level of the driver's "ray.train" logger, by name, for Ray Train's LoggingConfig."""
    import logging

    level = logging.getLogger("ray.train").getEffectiveLevel()
    return next((name for name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
                 if getattr(logging, name) >= level), "CRITICAL")


def build_trainer(job: JobConfig, callbacks: Optional[list] = None, data: Optional[PreparedData] = None,
                  overlap_decode: bool = False, report_placement_group: bool = False,
                  mlflow_run_id: Optional[str] = None) -> tuple[ray.train.torch.TorchTrainer, dict[str, LabelledImages], list[str], str]:
    """Prepares data and the TorchTrainer for ``job``; returns (trainer, splits, classes, storage_path).

    The trainer's ``train_loop_config`` carries the caches (``caches``), whether the
    workers hold them in memory (``resident``) and must wait for them to be decoded
    (``decoding``), the split manifests to save with every checkpoint (``splits``) and,
    for LP-FT, the linear probe's head (``probe_head``), and the MLflow run that rank 0
    logs each epoch to (``mlflow_run_id``, ``tracking.EpochLog``). With ``report_placement_group``
    (Tune's trials), every report also names the workers' placement group.

    With ``overlap_decode``, caches still to decode for resident workers are decoded on a
    driver thread while the workers start (``data.wait_decoded`` after the run); otherwise
    they are decoded here, first.
    """
    data = data or prepare_data(job)
    t = job.train
    caches = data.caches
    sampler = t.class_balance == "sampler"
    resident = fits_in_memory(caches, t.num_workers, whole_train=sampler) if job.data.in_memory is None \
        else job.data.in_memory
    use_gpu = choose_gpu(t.use_gpu, gpus=t.num_workers, what="training")
    note = worker_count_note(t.num_workers, t.batch_size, use_gpu)
    if note:
        print(note, flush=True)
    probe_head = None
    if wants_probe_head(job, data.resuming):
        result = probe(job, data, use_gpu)
        probe_head = storage.join(data.run, PROBE_HEAD_FILE)
        with storage.open_uri(probe_head, "wb") as f:
            torch.save({"weight": torch.from_numpy(result["weight"]), "bias": torch.from_numpy(result["bias"])}, f)
    # CPUs the workers leave free: decode tasks must not wait for CPUs that workers
    # waiting for the decode hold.
    spare = cluster_cpus() - t.num_workers * cpus_per_worker(t.num_workers, t.cpus_per_worker, use_gpu)
    data.decode(background=overlap_decode and resident and spare >= 0.25, task_cpus=min(1.0, max(spare / 2, 0.25)))
    if not data.decoding.background:
        data.wait_decoded()
    # Only the training split goes through Ray Data (split equally, so that every worker
    # takes the same number of steps); streamed workers read their share of the val
    # shards themselves (``shard_batches``): Ray's equal split would drop the remainder,
    # so 19 validation images on 2 workers would count as 18. With the sampler, streamed
    # workers read their part of each epoch's draw from the shards too.
    datasets = {} if resident or sampler else {"train": cache_dataset(caches["train"])}
    log_level = ray_train_log_level()
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": job.to_dict(), "classes": data.classes,
            "class_counts": class_counts(data.splits["train"].labels, data.classes),
            "caches": {name: c.to_dict() for name, c in caches.items()}, "resident": resident,
            "decoding": data.decoding.background,
            "splits": storage.join(data.run, SPLITS_DIR), "probe_head": probe_head,
            "init_from": job.train.init_from if job.train.init_from and not data.resuming else None,
            "report_placement_group": report_placement_group, "log_level": log_level,
            "mlflow_run_id": mlflow_run_id,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker(t.num_workers, t.cpus_per_worker, use_gpu),
                                  **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=t.name, storage_path=data.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            # Kept by validation accuracy, so that the best checkpoint of the whole run
            # survives however many later ones come; Ray always keeps the latest too.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=t.num_to_keep, checkpoint_score_attribute="val_accuracy",
                checkpoint_score_order="max"),
            callbacks=callbacks,
            # The controller's and workers' Ray Train logs at the driver's level for
            # "ray.train" (``loop.quiet_report_logs`` does the rest): `imgcls` without
            # --verbose sets WARNING (``cli.init_ray``), so that a run shows its epoch
            # lines, not Ray's reports of every result and checkpoint.
            logging_config=ray.train.LoggingConfig(log_level=log_level),
        ),
        datasets=datasets,
    )
    return trainer, data.splits, data.classes, data.storage_path


def fit_linear_probe(job: JobConfig, data: PreparedData, mlflow_run_id: Optional[str] = None) -> FitResult:
    """``--linear-probe``: the probe's head on the pretrained backbone, saved as the run's
    only checkpoint (``checkpoint_linear_probe``) and as ``best``."""
    use_gpu = choose_gpu(job.train.use_gpu, gpus=1, what="the linear probe")
    result = probe(job, data, use_gpu)
    model = create_model(job.model.arch, len(data.classes), image_size=job.model.image_size, width=job.model.width)
    model.load_state_dict(result["state"])
    history = [{k: v for k, v in result["metrics"].items() if k != "probe_grid"}]
    checkpoint = storage.join(data.run, PROBE_CHECKPOINT)
    save_checkpoint(checkpoint, model, job, data.classes, history,
                    files=read_split_files(storage.join(data.run, SPLITS_DIR)),
                    meta={RUN_ID_KEY: mlflow_run_id} if mlflow_run_id else None)
    if mlflow_run_id:
        EpochLog(job.train.tracking_uri, mlflow_run_id).sync(history)
    storage.write_json(storage.join(checkpoint, "probe.json"), result["metrics"])
    best_link = storage.join(data.run, BEST_DIR)
    promote_best(checkpoint, best_link)
    return FitResult(checkpoint=checkpoint, best_checkpoint=best_link, metrics=history[-1], history=history,
                     classes=data.classes, splits=data.splits, caches=data.caches, resident=False,
                     mlflow_run_id=mlflow_run_id, run=data.run)


def promote_best(checkpoint: str, dest: str) -> None:
    """Makes ``dest`` a copy of the folder ``checkpoint``, replacing any earlier copy so
    that a reader never sees a half-copied folder.

    The copy is written beside ``dest`` under a hidden name, then renamed into place.
    On local disk the old and new folders are swapped in one atomic step (Linux's
    ``renameat2(RENAME_EXCHANGE)``), so ``dest`` never even goes missing; elsewhere the
    old folder is moved aside first. The old copy is deleted only at the next call, so
    that a reader who opened it just before the swap can still finish reading it.
    Object stores have no atomic folder rename: there a reader may briefly find
    ``dest`` absent, but never mixed.
    """
    fs, path = storage.filesystem(dest)
    parent, name = path.rstrip("/").rsplit("/", 1)
    for stale in fs.glob(f"{parent}/.{name}-*"):  # the copy replaced last time, or a killed call's
        fs.rm(stale, recursive=True)
    tmp = f"{parent}/.{name}-{uuid.uuid4().hex[:8]}"
    fs.copy(checkpoint.rstrip("/") + "/", tmp, recursive=True)
    if storage.protocol(dest) == "file" and os.path.isdir(path) and _exchange(tmp, path):
        return  # ``tmp`` now names the old copy
    if fs.exists(path):
        fs.mv(path, f"{parent}/.{name}-{uuid.uuid4().hex[:8]}", recursive=True)
    fs.mv(tmp, path, recursive=True)


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps two local paths (Linux renameat2); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def best_of(best_checkpoints: list) -> Optional[str]:
    """Path of the checkpoint with the highest val_accuracy among Ray's (checkpoint, metrics)
    pairs; on a tie (common on a small val split), the one with the lower val_loss, then
    the earliest."""
    if not best_checkpoints:
        return None
    scored = [(cm[1].get("val_accuracy", -1.0), -cm[1].get("val_loss", math.inf), -cm[1].get("epoch", 0), cm[0].path)
              for cm in best_checkpoints]
    return max(scored)[-1]


def fit(job: JobConfig) -> FitResult:
    """Trains ``job`` on the running Ray cluster and returns its checkpoints and metrics.

    The GPUs requested for it (``choose_gpu``) are withdrawn from the autoscaler when it
    ends, however it ends, so that their nodes idle out."""
    with node_requests():
        return _fit(job)


def _fit(job: JobConfig) -> FitResult:
    data = prepare_data(job)
    # A tracked run: a new MLflow run, or with --resume the one its checkpoints name.
    mlflow_run_id = start_training(job, data.run, data.resuming)
    if job.train.linear_probe:
        return fit_linear_probe(job, data, mlflow_run_id)
    trainer, splits, classes, storage_path = build_trainer(job, data=data, overlap_decode=True,
                                                           mlflow_run_id=mlflow_run_id)
    t = job.train
    try:
        result = trainer.fit()
    except Exception:
        if mlflow_run_id:
            end_run(t.tracking_uri, mlflow_run_id, "FAILED")  # --resume continues it
        data.wait_decoded()  # the decode's own error, when that is why training failed
        raise
    data.wait_decoded()
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint: {result.error}")
    latest = storage.unstrip(storage_path, result.checkpoint.path)
    best = storage.unstrip(storage_path, best_of(result.best_checkpoints) or result.checkpoint.path)
    # A stable name for the best checkpoint, for predict/export commands and manifests.
    best_link = storage.join(storage_path, t.name, BEST_DIR)
    promote_best(best, best_link)
    history = storage.read_json(storage.join(latest, "history.json"))
    config = trainer.train_loop_config
    return FitResult(checkpoint=latest, best_checkpoint=best_link, metrics=result.metrics, history=history,
                     classes=classes, splits=splits, caches=data.caches, resident=config["resident"],
                     mlflow_run_id=mlflow_run_id, run=data.run)
