"""Data-parallel training with Ray Train's TorchTrainer.

``fit`` runs on the driver: it lists and splits the data, builds Ray Datasets and the
trainer. ``train_loop_per_worker`` runs on every worker; devices are handled only by
``prepare_model`` and ``iter_torch_batches``.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from imgcls import storage
from imgcls.checkpoint import load_train_state, save_checkpoint, save_config
from imgcls.config import JobConfig
from imgcls.data import (
    ClassificationPresetEval,
    ClassificationPresetTrain,
    LabelledImages,
    LoadLabelledBatch,
    balanced_resample,
    class_counts,
    encode_labels,
    list_labelled_images,
    split_stratified,
)
from imgcls.metrics import classification_report, confusion_matrix, inverse_frequency_weights
from imgcls.models import create_model, get_spec, set_backbone_trainable

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 1024  # rows; local shuffle on top of the driver's shuffled order
BEST_DIR = "best"  # copy of the best checkpoint inside the run folder


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1.0))


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def cpus_per_worker(num_workers: int, requested: Optional[float], use_gpu: bool) -> float:
    """CPUs to reserve per training worker.

    Workers that each hold a whole CPU leave none for Ray Data's decode tasks on a
    small machine, and the job hangs; so by default the workers share half the CPUs.
    """
    if requested is not None:
        return requested
    if use_gpu:
        return 1.0
    return max(0.1, min(1.0, cluster_cpus() * 0.5 / num_workers))


def to_dataset(images: LabelledImages, classes: list[str], transform, seed: int = 0) -> ray.data.Dataset:
    """A Ray Dataset of decoded, transformed ``image``/``label`` rows."""
    labels = encode_labels(images.labels, classes)
    order = np.random.default_rng(seed).permutation(len(images))
    items = [{"path": images.paths[i], "label": int(labels[i])} for i in order]
    # Small blocks so that decoding spreads over tasks and streams into training.
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 256, 200)))
    return ds.map_batches(LoadLabelledBatch(transform), batch_size=64, num_cpus=0.5)


# ---------------------------------------------------------------------------------
# Worker side


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warmup to 1, then cosine decay to 0, as a multiplier of the peak lr."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float):
    # No weight decay on norms and biases, the usual recipe for both optimizers.
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


def autocast(device: torch.device, enabled: bool):
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def train_one_epoch(model, criterion, optimizer, scheduler, batches, device, *, amp: bool = False,
                    channels_last: bool = False, scaler: Optional[torch.amp.GradScaler] = None) -> dict:
    """One pass over ``batches`` (dicts of ``image``/``label`` tensors); returns local sums."""
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for batch in batches:
        x, y = batch["image"].to(device), batch["label"].to(device)  # (B, 3, S, S), (B,)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(x)
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    return {"loss_sum": loss_sum, "correct": correct, "seen": seen}


@torch.inference_mode()
def evaluate(model, criterion, batches, device, num_classes: int, *, amp: bool = False,
             channels_last: bool = False) -> tuple[torch.Tensor, float]:
    """Local confusion matrix (C, C) and summed loss over ``batches``."""
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = 0.0
    for batch in batches:
        x, y = batch["image"].to(device), batch["label"].to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(x)
        loss_sum += criterion(logits.float(), y).item() * len(y)
        cm += confusion_matrix(y, logits.argmax(1), num_classes)
    return cm, loss_sum


def all_reduce_sum(values: list, device: torch.device) -> list:
    """Sums numbers or tensors over all workers (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    out = []
    for v in values:
        t = v.clone() if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out.append(t if isinstance(v, torch.Tensor) else t.item())
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point on each worker."""
    job = JobConfig.from_dict(config["job"])
    classes: list[str] = config["classes"]
    t, m = job.train, job.model
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(t.seed)
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    amp = on_gpu if t.amp is None else t.amp
    channels_last = on_gpu if t.channels_last is None else t.channels_last

    # [1] Model, optionally resumed from the latest checkpoint.
    model = create_model(m.arch, len(classes), weights=m.weights, image_size=m.image_size)
    state, start_epoch, history = None, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = load_train_state(folder)
        model.load_state_dict(state["model"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        if rank == 0:
            print(f"resuming from epoch {state['epoch'] + 1} checkpoint", flush=True)
    frozen = m.freeze_backbone and (m.unfreeze_after is None or start_epoch < m.unfreeze_after)
    set_backbone_trainable(model, not frozen)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)

    # [2] Optimiser, schedule, loss.
    steps_per_epoch = max(1, math.ceil(config["num_train"] / (t.batch_size * world)))
    optimizer = build_optimizer(_unwrap(model), t.optimizer, t.lr, t.weight_decay, t.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(int(t.warmup_epochs * steps_per_epoch), t.epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=amp and on_gpu)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
    weight = inverse_frequency_weights(config["class_counts"]).to(device) if t.class_balance == "loss" else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=t.label_smoothing)
    eval_criterion = nn.CrossEntropyLoss()

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    # [3] Epochs: train, validate over ALL workers' shards, checkpoint from rank 0.
    for epoch in range(start_epoch, t.epochs):
        if frozen and m.unfreeze_after is not None and epoch >= m.unfreeze_after:
            # DDP only syncs parameters that required grad when it was built, so re-wrap.
            frozen = False
            set_backbone_trainable(_unwrap(model), True)
            model = ray.train.torch.prepare_model(_unwrap(model))
        start = time.perf_counter()
        batches = train_shard.iter_torch_batches(
            batch_size=t.batch_size, local_shuffle_buffer_size=SHUFFLE_BUFFER, local_shuffle_seed=t.seed + epoch)
        stats = train_one_epoch(model, criterion, optimizer, scheduler, batches, device,
                                amp=amp, channels_last=channels_last, scaler=scaler)
        elapsed = time.perf_counter() - start
        loss_sum, correct, seen = all_reduce_sum([stats["loss_sum"], stats["correct"], stats["seen"]], device)
        cm, val_loss = evaluate(model, eval_criterion, val_shard.iter_torch_batches(batch_size=t.batch_size * 2),
                                device, len(classes), amp=amp, channels_last=channels_last)
        cm, val_loss = all_reduce_sum([cm, val_loss], device)
        report = classification_report(cm, classes)
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(1, seen),
            "train_accuracy": correct / max(1, seen),
            "val_loss": val_loss / max(1, report["num_samples"]),
            "val_accuracy": report["accuracy"],
            "val_macro_f1": report["macro_f1"],
            "val_samples": report["num_samples"],
            "images_per_s": seen / elapsed,  # all workers together
            "lr": scheduler.get_last_lr()[0],
        }
        history.append(metrics)
        if rank == 0:
            print(f"epoch {epoch + 1}/{t.epochs}  train_loss {metrics['train_loss']:.4f}  "
                  f"train_acc {metrics['train_accuracy']:.4f}  val_loss {metrics['val_loss']:.4f}  "
                  f"val_acc {metrics['val_accuracy']:.4f}  val_f1 {metrics['val_macro_f1']:.4f}  "
                  f"images/s {metrics['images_per_s']:.1f}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                save_checkpoint(tmp, _unwrap(model), job, classes, history, train_state={
                    "epoch": epoch, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                })
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


# ---------------------------------------------------------------------------------
# Driver side


@dataclass
class FitResult:
    checkpoint: str  # folder of the latest checkpoint
    best_checkpoint: str  # folder of the checkpoint with the highest val accuracy
    metrics: dict
    history: list[dict]
    classes: list[str]
    splits: dict[str, LabelledImages]


def prepare_splits(job: JobConfig) -> tuple[dict[str, LabelledImages], list[str]]:
    """Lists, validates and splits the labelled data; returns the splits and the class list."""
    images = list_labelled_images(job.data.root)
    classes = sorted(set(images.labels))
    splits = split_stratified(images, job.data.val_fraction, job.data.test_fraction,
                              seed=job.data.split_seed, max_per_class=job.data.max_per_class)
    for name in ("train", "val"):
        if not len(splits[name]):
            raise ValueError(f"the {name} split is empty: add data or raise data.{name}_fraction")
    return splits, classes


def build_trainer(job: JobConfig, callbacks: Optional[list] = None
                  ) -> tuple[ray.train.torch.TorchTrainer, dict[str, LabelledImages], list[str], str]:
    """Prepares data and the TorchTrainer for ``job``; returns (trainer, splits, classes, storage_path)."""
    splits, classes = prepare_splits(job)
    t, m = job.train, job.model
    spec = get_spec(m.arch)
    train_images = splits["train"]
    if t.class_balance == "sampler":
        train_images = balanced_resample(train_images, seed=t.seed)
    train_tf = ClassificationPresetTrain(m.image_size, spec.mean, spec.std, job.data.augment, job.data.augment_magnitude)
    eval_tf = ClassificationPresetEval(m.image_size, spec.mean, spec.std)
    datasets = {
        "train": to_dataset(train_images, classes, train_tf, seed=t.seed),
        "val": to_dataset(splits["val"], classes, eval_tf),
    }
    use_gpu = cluster_gpus() > 0 if t.use_gpu is None else t.use_gpu
    storage_path = storage.absolute(t.storage_path)
    storage.makedirs(storage.join(storage_path, t.name))
    save_config(storage.join(storage_path, t.name, "config.yaml"), job)

    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": job.to_dict(), "classes": classes, "num_train": len(train_images),
            "class_counts": class_counts(splits["train"].labels, classes),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker(t.num_workers, t.cpus_per_worker, use_gpu),
                                  **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=t.name, storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.num_to_keep),
            callbacks=callbacks,
        ),
        datasets=datasets,
        resume_from_checkpoint=ray.train.Checkpoint(t.resume_from) if t.resume_from else None,
    )
    return trainer, splits, classes, storage_path


def fit(job: JobConfig) -> FitResult:
    """Trains ``job`` on the running Ray cluster and returns its checkpoints and metrics."""
    trainer, splits, classes, storage_path = build_trainer(job)
    t = job.train
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint: {result.error}")
    latest = storage.unstrip(storage_path, result.checkpoint.path)
    best = max(result.best_checkpoints, key=lambda cm: cm[1].get("val_accuracy", -1))[0].path \
        if result.best_checkpoints else result.checkpoint.path
    # A stable name for the best checkpoint, for predict/export commands and manifests.
    best_link = storage.join(storage_path, t.name, BEST_DIR)
    fs, best_path = storage.filesystem(best_link)
    if fs.exists(best_path):
        fs.rm(best_path, recursive=True)
    fs.copy(best.rstrip("/") + "/", best_path, recursive=True)
    history = storage.read_json(storage.join(latest, "history.json"))
    return FitResult(checkpoint=latest, best_checkpoint=best_link, metrics=result.metrics, history=history,
                     classes=classes, splits=splits)
