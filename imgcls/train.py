"""Data-parallel training with Ray Train's TorchTrainer.

``fit`` runs on the driver: it lists and splits the data, decodes each split once into
a uint8 cache (``imgcls.cache``) and builds the trainer. ``train_loop_per_worker`` runs on
every worker: it reads its part of the cache (held in memory, or streamed through Ray
Data when it does not fit), makes float and augments whole batches on its device
(``imgcls.augment``), and keeps step statistics on the device, so that a step never
waits for the host. Devices are handled by ``prepare_model`` and the batch loaders.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import os
import resource
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from imgcls import storage
from imgcls.augment import BatchAugment, BatchEval, mixup_cutmix, soft_cross_entropy, stored_geometry
from imgcls.cache import (CachePlan, ImageCache, cache_dataset, load_indices, plan_cache, shard_batches, wait_for_cache,
                          worker_range)
from imgcls.checkpoint import SPLITS_DIR, load_train_state, read_split_files, save_checkpoint, save_config, write_splits
from imgcls.config import JobConfig
from imgcls.data import DataError, LabelledImages, balanced_resample, class_counts, list_labelled_images, split_stratified
from imgcls.devices import choose_gpu
from imgcls.imaging import resize_size
from imgcls.metrics import classification_report, confusion_matrix, inverse_frequency_weights
from imgcls.models import create_model, get_spec, head_name, set_backbone_trainable
from imgcls.probe import PROBE_CHECKPOINT, PROBE_HEAD_FILE, run_probe, set_head
from imgcls.progress import EpochProgress

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 2048  # rows; local shuffle of a streamed split, on top of the cache's shuffled order
BEST_DIR = "best"  # copy of the best checkpoint inside the run folder
CACHE_DIR = "cache"  # default cache folder inside the run folder
RESIDENT_MEMORY_SHARE = 0.25  # of a worker's share of node memory that its resident data may take
RESIDENT_GPU_SHARE = 0.25  # of a GPU's memory that resident data may take; beyond it, pinned host memory
PLACEMENT_GROUP_KEY = "placement_group"  # reported under Tune: the worker group's placement group id


def _say(message: str) -> None:
    """One line from a training worker to the job's output, once. Ray Train patches
    ``print`` in its workers to log the line and also write it to the redirected stdout,
    so each printed line reached the driver twice; its logger reaches it once."""
    logging.getLogger().info(message)


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


def worker_threads(local_world_size: int) -> int:
    """Torch threads per worker: the node's cores shared among the workers on it.

    Ray sets OMP_NUM_THREADS from the reserved (fractional) CPUs, which leaves a lone
    worker on a 2-core node computing on one core.
    """
    node_id = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == node_id), os.cpu_count() or 1)
    return max(1, int(cpus // max(1, local_world_size)))


# ---------------------------------------------------------------------------------
# Worker side


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str = "cosine"):
    """Linear warmup to 1, then decay to 0 (cosine, or linear for 'onecycle'), as a
    multiplier of the peak lr."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1 - progress if schedule == "onecycle" else 0.5 * (1 + math.cos(math.pi * progress))
    return f


def layer_stages(model: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """The model's parameters in stages from the input to the head: one stage per top-level
    module, or per numbered block of a top-level sequence (``layer1.0``, ``_blocks.3``,
    ``features.2``); the classification head is the last stage."""
    head = head_name(model) + "."
    stages: dict[str, list] = {}
    for name, p in model.named_parameters():
        if name.startswith(head):
            continue
        parts = name.split(".")
        key = parts[0] + ("." + parts[1] if len(parts) > 2 and parts[1].isdigit() else "")
        stages.setdefault(key, []).append((name, p))
    return list(stages.values()) + [[(n, p) for n, p in model.named_parameters() if n.startswith(head)]]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float,
                    layer_decay: float = 1.0):
    """SGD (Nesterov) or AdamW, without weight decay on norms and biases (the usual recipe
    for both). With ``layer_decay`` < 1, stage k of n (``layer_stages``, the head last)
    trains at ``lr * layer_decay ** (n - 1 - k)``: the pretrained early layers, which hold
    the most general features, change least."""
    stages = layer_stages(model) if layer_decay < 1 else [list(model.named_parameters())]
    groups = []
    for k, stage in enumerate(stages):
        scale = layer_decay ** (len(stages) - 1 - k)
        for decayed in (True, False):
            params = [p for _, p in stage if (p.ndim > 1) == decayed]
            if params:
                groups.append({"params": params, "lr": lr * scale, "weight_decay": weight_decay if decayed else 0.0})
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16
    autocast trains the small CNN about 1.6-2x faster than float32; elsewhere it is slower."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(device: torch.device, enabled: bool):
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


class ModelEMA:
    """Exponential moving average of a model's weights and buffers.

    The decay ramps up as ``(1 + n) / (10 + n)`` over the first updates (as TensorFlow's
    and timm's EMA do), so that a short run's average is not dominated by its random
    initial weights. All tensors are updated in one fused ``_foreach_lerp_``.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        mine, theirs = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in mine.items() if v.dtype.is_floating_point]
        torch._foreach_lerp_([mine[k] for k in floats], [theirs[k].detach() for k in floats], 1 - d)
        for k, v in mine.items():
            if not v.dtype.is_floating_point:
                v.copy_(theirs[k])


Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]  # (B, H, W, 3) uint8, (B,) int64


class ResidentSplit:
    """A worker's part of a cached split, held in memory for the whole run.

    Loaded once from the cache (``load``); every epoch then draws a permutation and
    slices batches from it with tensor indexing, on the device that holds it.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels  # (N, H, W, 3) uint8, (N,) int64

    @classmethod
    def load(cls, cache: ImageCache, rank: int, world: int, equal: bool, device: torch.device) -> "ResidentSplit":
        images, labels = load_indices(cache, worker_range(cache.num_images, rank, world, equal))
        images, labels = torch.from_numpy(images), torch.from_numpy(labels)
        if device.type == "cuda":
            free = torch.cuda.get_device_properties(device).total_memory * RESIDENT_GPU_SHARE
            if images.numel() <= free:
                return cls(images.to(device), labels.to(device))
            return cls(images.pin_memory(), labels.pin_memory())
        return cls(images, labels)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, generator: Optional[torch.Generator] = None) -> Batches:
        """Shuffled batches when ``generator`` is given, in order otherwise."""
        n = len(self)
        order = (torch.randperm(n, generator=generator, device=generator.device) if generator is not None
                 else torch.arange(n)).to(self.images.device)
        for lo in range(0, n, batch_size):
            idx = order[lo:lo + batch_size]
            yield self.images[idx], self.labels[idx]


def streamed_batches(shard, batch_size: int, seed: Optional[int] = None) -> Batches:
    """Batches of a Ray Train dataset shard of the cache, locally shuffled when ``seed`` is given."""
    kwargs = {"local_shuffle_buffer_size": SHUFFLE_BUFFER, "local_shuffle_seed": seed} if seed is not None else {}
    for batch in shard.iter_torch_batches(batch_size=batch_size, dtypes={"image": torch.uint8, "label": torch.int64},
                                          **kwargs):
        yield batch["image"], batch["label"]


@dataclass
class StepOptions:
    """How each training step runs, beyond the model and optimiser."""

    augment: BatchAugment
    num_classes: int
    amp: bool = False
    channels_last: bool = False
    scaler: Optional[torch.amp.GradScaler] = None
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    label_smoothing: float = 0.0
    class_weight: Optional[torch.Tensor] = None
    ema: Optional[ModelEMA] = None
    freeze_batchnorm: bool = False
    generator: Optional[torch.Generator] = None
    on_first_step: Optional[Callable[[], None]] = field(default=None, repr=False)
    progress: Optional[EpochProgress] = field(default=None, repr=False)  # rank 0's lines within the epoch


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def soft_target_loss(logits: torch.Tensor, targets: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Cross-entropy against (B, C) soft targets, optionally weighted per class."""
    return soft_cross_entropy(logits.float(), targets if weight is None else targets * weight)


def train_one_epoch(model, optimizer, scheduler, batches: Batches, device: torch.device, opts: StepOptions) -> dict:
    """One pass over ``batches`` of uint8 images; returns local sums as device tensors.

    Nothing in the loop reads a value back to the host: the loss and accuracy sums
    accumulate on the device and are read once, after the epoch.
    """
    model.train()
    if opts.freeze_batchnorm:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    mixing = opts.mixup_alpha > 0 or opts.cutmix_alpha > 0
    criterion = nn.CrossEntropyLoss(weight=opts.class_weight, label_smoothing=opts.label_smoothing)
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        x = _layout(opts.augment(images, opts.generator), opts.channels_last)  # (B, 3, S, S) float
        with autocast(device, opts.amp):
            if mixing:
                x, targets = mixup_cutmix(x, labels, opts.num_classes, opts.mixup_alpha, opts.cutmix_alpha,
                                          opts.label_smoothing, generator=opts.generator)
                logits = model(x)
                loss = soft_target_loss(logits, targets, opts.class_weight)
            else:
                logits = model(x)
                loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        if opts.scaler is not None and opts.scaler.is_enabled():
            opts.scaler.scale(loss).backward()
            opts.scaler.step(optimizer)
            opts.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        if opts.ema is not None:
            opts.ema.update(_unwrap(model))
        if opts.on_first_step is not None:
            opts.on_first_step()
            opts.on_first_step = None
        loss_sum += loss.detach() * len(labels)
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += len(labels)
        if opts.progress is not None:
            opts.progress.step(len(labels))
    return {"loss_sum": loss_sum, "correct": correct, "seen": torch.tensor(seen, dtype=torch.int64, device=device)}


@torch.inference_mode()
def evaluate(model, batches: Batches, device: torch.device, num_classes: int, to_float: BatchEval, *,
             amp: bool = False, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Local confusion matrix (C, C) and summed loss over ``batches``, as device tensors."""
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for images, labels in batches:
        x = _layout(to_float(images.to(device, non_blocking=True)), channels_last)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        cm += confusion_matrix(labels, logits.argmax(1), num_classes)
    return cm, loss_sum


def all_reduce_sum(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sums tensors over all workers (unchanged when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    out = []
    for v in values:
        t = v.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out.append(t)
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _rss_mb() -> float:
    """This process's resident memory now, in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point on each worker."""
    worker_start = time.perf_counter()
    job = JobConfig.from_dict(config["job"])
    classes: list[str] = config["classes"]
    t, m, d = job.train, job.model, job.data
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(worker_threads(ctx.get_local_world_size()))
    torch.manual_seed(t.seed)
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    amp = (on_gpu or native_bf16()) if t.amp is None else t.amp
    channels_last = True if t.channels_last is None else t.channels_last
    spec = get_spec(m.arch)

    # [1] Model, optionally resumed from the latest checkpoint.
    model = create_model(m.arch, len(classes), weights=m.weights, image_size=m.image_size, width=m.width)
    state, start_epoch, history = None, 0, []
    # The run's own latest checkpoint (a restart after a failure), else --resume-from's
    # (Train V2 dropped the trainer's resume_from_checkpoint: the loop loads it itself).
    checkpoint = ray.train.get_checkpoint() or (ray.train.Checkpoint(t.resume_from) if t.resume_from else None)
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = load_train_state(folder)
            if state is None:
                raise RuntimeError(f"checkpoint {folder} has no train_state.pt, so training cannot resume from it "
                                   "(a model-only checkpoint such as best/ or an export?); resume from a "
                                   "checkpoint_* folder of the run")
        model.load_state_dict(state.get("raw_model", state["model"]))
        start_epoch, history = state["epoch"] + 1, state["history"]
        if rank == 0:
            _say(f"resuming from epoch {state['epoch'] + 1} checkpoint")
    elif config.get("init_from"):  # a warm start: the old model's weights, its head rows by class
        warm_start(model, config["init_from"], classes)
    elif config.get("probe_head"):  # LP-FT: start from the linear probe's head
        head = torch.load(io.BytesIO(storage.read_bytes(config["probe_head"])), map_location="cpu", weights_only=True)
        set_head(model, head["weight"], head["bias"])
    split_files = read_split_files(config["splits"]) if rank == 0 and config.get("splits") else {}
    frozen = m.freeze_backbone and (m.unfreeze_after is None or start_epoch < m.unfreeze_after)
    set_backbone_trainable(model, not frozen)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    ema = ModelEMA(_unwrap(model), t.ema_decay) if t.ema_decay else None
    if ema is not None and state is not None:
        ema.module.load_state_dict(state["model"])  # the saved model is the average
        ema.updates = state.get("ema_updates", 0)
    forward = torch.compile(model) if t.compile else model

    # [2] Data: this worker's part of the cached splits, resident or streamed.
    caches = {name: ImageCache.from_dict(c) for name, c in config["caches"].items()}
    load_start = time.perf_counter()
    # Decoded on the driver while this worker started: wait for it (``CacheDecode``).
    cache_wait = sum(wait_for_cache(c) for c in caches.values()) if config.get("decoding") else 0.0
    if config["resident"]:
        train_data = ResidentSplit.load(caches["train"], rank, world, equal=True, device=device)
        val_data = ResidentSplit.load(caches["val"], rank, world, equal=False, device=device)
        per_worker = len(train_data)
    else:
        train_shard = ray.train.get_dataset_shard("train")
        per_worker = caches["train"].num_images // world
    load_seconds = time.perf_counter() - load_start

    # [3] Optimiser, schedule, loss, augmentation.
    steps_per_epoch = max(1, math.ceil(per_worker / t.batch_size))
    optimizer = build_optimizer(_unwrap(model), t.optimizer, t.lr, t.weight_decay, t.momentum, t.layer_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(int(t.warmup_epochs * steps_per_epoch), t.epochs * steps_per_epoch, t.schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=amp and on_gpu)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
    first_step = {}
    opts = StepOptions(
        augment=BatchAugment(m.image_size, spec.mean, spec.std, d.augment, d.augment_magnitude),
        num_classes=len(classes), amp=amp, channels_last=channels_last, scaler=scaler,
        mixup_alpha=t.mixup_alpha, cutmix_alpha=t.cutmix_alpha, label_smoothing=t.label_smoothing,
        class_weight=inverse_frequency_weights(config["class_counts"]).to(device) if t.class_balance == "loss" else None,
        ema=ema, on_first_step=lambda: first_step.setdefault("time", time.time()),
        freeze_batchnorm=t.freeze_batchnorm,
    )
    to_float = BatchEval(m.image_size, spec.mean, spec.std)

    # Under Tune, each report names this worker group's placement group: Tune ends a trial
    # by killing it, so the trainer never removes the group itself (``imgcls.tune``).
    tune_extra = {}
    if config.get("report_placement_group") and ray.util.get_current_placement_group() is not None:
        tune_extra[PLACEMENT_GROUP_KEY] = ray.util.get_current_placement_group().id.hex()

    # [4] Epochs: train, validate over ALL workers' parts, checkpoint from rank 0.
    for epoch in range(start_epoch, t.epochs):
        if frozen and m.unfreeze_after is not None and epoch >= m.unfreeze_after:
            # DDP only syncs parameters that required grad when it was built, so re-wrap.
            frozen = False
            set_backbone_trainable(_unwrap(model), True)
            model = ray.train.torch.prepare_model(_unwrap(model))
            forward = torch.compile(model) if t.compile else model
        # The first epoch of a worker's life counts its start-up and data loading too.
        start = worker_start if epoch == start_epoch else time.perf_counter()
        seed = t.seed * 100_003 + epoch * 1_009 + rank
        opts.generator = torch.Generator(device=device).manual_seed(seed)
        opts.progress = EpochProgress(epoch, t.epochs, caches["train"].num_images, world, _say) if rank == 0 else None
        batches = (train_data.batches(t.batch_size, torch.Generator(device=device).manual_seed(seed))
                   if config["resident"] else streamed_batches(train_shard, t.batch_size, seed))
        sums = train_one_epoch(forward, optimizer, scheduler, batches, device, opts)
        if on_gpu:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        loss_sum, correct, seen = [v.item() for v in all_reduce_sum([sums["loss_sum"], sums["correct"], sums["seen"]])]
        # The plain module, not the DDP wrapper: DDP's forward broadcasts buffers, a
        # collective that would hang when the workers' val parts differ in batch count.
        eval_model = ema.module if ema is not None else _unwrap(model)
        val_batches = val_data.batches(t.batch_size * 2) if config["resident"] else \
            shard_batches(caches["val"], rank, world, t.batch_size * 2)
        cm, val_loss = evaluate(eval_model, val_batches, device, len(classes), to_float, amp=amp,
                                channels_last=channels_last)
        cm, val_loss = all_reduce_sum([cm, val_loss])
        report = classification_report(cm.cpu(), classes)
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(1, seen),
            "train_accuracy": correct / max(1, seen),
            "val_loss": val_loss.item() / max(1, report["num_samples"]),
            "val_accuracy": report["accuracy"],
            "val_macro_f1": report["macro_f1"],
            "val_samples": report["num_samples"],
            "images_per_s": seen / elapsed,  # all workers together
            "epoch_seconds": elapsed,
            "lr": max(scheduler.get_last_lr()),  # the head's, with layer_decay
            "started_at_epoch": start_epoch,  # > 0 when this worker group resumed from a checkpoint
            "worker_rss_mb": _rss_mb(),  # rank 0's memory now: flat over epochs
            "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "resident": bool(config["resident"]),
            "node_id": ray.get_runtime_context().get_node_id(),  # rank 0's node
            "device": str(device), "amp": bool(amp), "channels_last": bool(channels_last),  # as chosen for rank 0
        }
        if epoch == start_epoch:
            metrics.update(load_seconds=load_seconds, first_step_time=first_step.get("time"),
                           cache_wait_seconds=cache_wait, decode_overlapped=bool(config.get("decoding")))
        history.append(metrics)
        if rank == 0:
            _say(f"epoch {epoch + 1}/{t.epochs}  train_loss {metrics['train_loss']:.4f}  "
                 f"train_acc {metrics['train_accuracy']:.4f}  val_loss {metrics['val_loss']:.4f}  "
                 f"val_acc {metrics['val_accuracy']:.4f}  val_f1 {metrics['val_macro_f1']:.4f}  "
                 f"images/s {metrics['images_per_s']:.1f}")
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                train_state = {"epoch": epoch, "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}
                if ema is not None:  # the average is the model; the raw weights resume training
                    train_state.update(raw_model={k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()},
                                       ema_updates=ema.updates)
                save_checkpoint(tmp, ema.module if ema is not None else _unwrap(model), job, classes, history,
                                train_state=train_state, files=split_files)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, **tune_extra}, checkpoint=checkpoint)


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
    caches: dict[str, ImageCache] = field(default_factory=dict)
    resident: bool = False


def prepare_splits(job: JobConfig) -> tuple[dict[str, LabelledImages], list[str]]:
    """Lists, validates and splits the labelled data; returns the splits and the class list."""
    images = list_labelled_images(job.data.root)
    classes = sorted(set(images.labels))
    splits = split_stratified(images, job.data.val_fraction, job.data.test_fraction,
                              seed=job.data.split_seed, max_per_class=job.data.max_per_class)
    for name in ("train", "val"):
        if not len(splits[name]):
            raise DataError(f"the {name} split is empty: add data or raise data.{name}_fraction")
    return splits, classes


def training_images(job: JobConfig, splits: dict[str, LabelledImages]) -> LabelledImages:
    """The train split as the workers see it: resampled to equal class counts with
    ``class_balance='sampler'``."""
    if job.train.class_balance == "sampler":
        return balanced_resample(splits["train"], seed=job.train.seed)
    return splits["train"]


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


def fits_in_memory(caches: dict[str, ImageCache], num_workers: int) -> bool:
    """Whether each worker's part of the cached splits fits its share of memory.

    A worker holds ceil(1/num_workers) of the training images and about as much of the
    validation images; they must take at most RESIDENT_MEMORY_SHARE of the cluster's
    memory divided among the workers, leaving the rest to the model, activations and Ray.
    """
    per_worker = sum(c.nbytes for c in caches.values()) / num_workers
    memory = float(ray.cluster_resources().get("memory", 0))
    return per_worker <= RESIDENT_MEMORY_SHARE * memory / num_workers


class RunFolderError(ValueError):
    """A run folder that holds another run's checkpoints, without --resume or --overwrite."""


# Settings a resumed run may change: how long it runs and how it keeps checkpoints.
RESUME_MAY_CHANGE = {"epochs", "resume", "overwrite", "resume_from", "max_failures", "num_to_keep"}


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
    plans = plan_caches(job, training_images(job, splits), splits["val"], classes, storage_path)
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


def warm_start(model: nn.Module, checkpoint: str, classes: list[str]) -> list[str]:
    """Loads ``checkpoint``'s weights into ``model``; the head's rows follow the class
    names (a class new to this run keeps its fresh row). Returns the new classes."""
    from imgcls.checkpoint import load_checkpoint

    old = load_checkpoint(checkpoint)
    head = head_name(model)
    state = {k: v for k, v in old.model.state_dict().items() if not k.startswith(head + ".")}
    model.load_state_dict(state, strict=False)
    old_head, new_head = old.model.get_submodule(head), model.get_submodule(head)
    index = {c: i for i, c in enumerate(old.classes)}
    with torch.no_grad():
        for i, c in enumerate(classes):
            if c in index:
                new_head.weight[i] = old_head.weight[index[c]]
                new_head.bias[i] = old_head.bias[index[c]]
    return [c for c in classes if c not in index]


def wants_probe_head(job: JobConfig, resuming: bool) -> bool:
    """LP-FT's probe before fine-tuning: by default whenever training starts from pretrained weights."""
    if resuming or job.train.linear_probe or job.train.init_from:
        return False
    return bool(job.model.weights) if job.train.probe_head is None else job.train.probe_head


def probe(job: JobConfig, data: PreparedData, use_gpu: bool) -> dict:
    """Fits the linear probe (``imgcls.probe``) on the cached splits as a Ray task."""
    weights = None
    if job.train.class_balance == "loss":
        weights = inverse_frequency_weights(class_counts(data.splits["train"].labels, data.classes)).tolist()
    data.wait_decoded()
    result = run_probe(job, data.classes, data.caches, weights, use_gpu, with_state=job.train.linear_probe)
    metrics = result["metrics"]
    _say(f"linear probe: val_acc {metrics['val_accuracy']:.4f}  train_acc {metrics['train_accuracy']:.4f}  "
         f"l2 {metrics['probe_l2']:g}  {metrics['num_features']} features of {metrics['train_samples']} images "
         f"in {metrics['probe_seconds']:.1f} s")
    return result


def build_trainer(job: JobConfig, callbacks: Optional[list] = None, data: Optional[PreparedData] = None,
                  overlap_decode: bool = False, report_placement_group: bool = False) -> tuple[ray.train.torch.TorchTrainer, dict[str, LabelledImages], list[str], str]:
    """Prepares data and the TorchTrainer for ``job``; returns (trainer, splits, classes, storage_path).

    The trainer's ``train_loop_config`` carries the caches (``caches``), whether the
    workers hold them in memory (``resident``) and must wait for them to be decoded
    (``decoding``), the split manifests to save with every checkpoint (``splits``) and,
    for LP-FT, the linear probe's head (``probe_head``). With ``report_placement_group``
    (Tune's trials), every report also names the workers' placement group.

    With ``overlap_decode``, caches still to decode for resident workers are decoded on a
    driver thread while the workers start (``data.wait_decoded`` after the run); otherwise
    they are decoded here, first.
    """
    data = data or prepare_data(job)
    t = job.train
    caches = data.caches
    resident = fits_in_memory(caches, t.num_workers) if job.data.in_memory is None else job.data.in_memory
    use_gpu = choose_gpu(t.use_gpu, gpus=t.num_workers, what="training")
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
    # so 19 validation images on 2 workers would count as 18.
    datasets = {} if resident else {"train": cache_dataset(caches["train"])}

    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": job.to_dict(), "classes": data.classes,
            "class_counts": class_counts(data.splits["train"].labels, data.classes),
            "caches": {name: c.to_dict() for name, c in caches.items()}, "resident": resident,
            "decoding": data.decoding.background,
            "splits": storage.join(data.run, SPLITS_DIR), "probe_head": probe_head,
            "init_from": job.train.init_from if job.train.init_from and not data.resuming else None,
            "report_placement_group": report_placement_group,
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
        ),
        datasets=datasets,
    )
    return trainer, data.splits, data.classes, data.storage_path


def fit_linear_probe(job: JobConfig, data: PreparedData) -> FitResult:
    """``--linear-probe``: the probe's head on the pretrained backbone, saved as the run's
    only checkpoint (``checkpoint_linear_probe``) and as ``best``."""
    use_gpu = choose_gpu(job.train.use_gpu, gpus=1, what="the linear probe")
    result = probe(job, data, use_gpu)
    model = create_model(job.model.arch, len(data.classes), image_size=job.model.image_size, width=job.model.width)
    model.load_state_dict(result["state"])
    history = [{k: v for k, v in result["metrics"].items() if k != "probe_grid"}]
    checkpoint = storage.join(data.run, PROBE_CHECKPOINT)
    save_checkpoint(checkpoint, model, job, data.classes, history,
                    files=read_split_files(storage.join(data.run, SPLITS_DIR)))
    storage.write_json(storage.join(checkpoint, "probe.json"), result["metrics"])
    best_link = storage.join(data.run, BEST_DIR)
    promote_best(checkpoint, best_link)
    return FitResult(checkpoint=checkpoint, best_checkpoint=best_link, metrics=history[-1], history=history,
                     classes=data.classes, splits=data.splits, caches=data.caches, resident=False)


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
    """Trains ``job`` on the running Ray cluster and returns its checkpoints and metrics."""
    data = prepare_data(job)
    if job.train.linear_probe:
        return fit_linear_probe(job, data)
    trainer, splits, classes, storage_path = build_trainer(job, data=data, overlap_decode=True)
    t = job.train
    try:
        result = trainer.fit()
    except Exception:
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
                     classes=classes, splits=splits, caches=data.caches, resident=config["resident"])
