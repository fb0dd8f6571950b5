"""The training loop that runs on every Ray Train worker.

``train_loop_per_worker`` reads its part of the decoded cache (held in memory, or
streamed through Ray Data when it does not fit), makes float and augments whole batches
on its device (``training.augment``), keeps step statistics on the device so that a
step never waits for the host, validates on the whole validation split, and reports
metrics and checkpoints to Ray Train.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import os
import resource
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from imgcls import storage
from imgcls.checkpoint import load_train_state, read_split_files, save_checkpoint
from imgcls.config import JobConfig
from imgcls.evaluation.metrics import classification_report, confusion_matrix, inverse_frequency_weights
from imgcls.models import create_model, get_spec, head_name, set_backbone_trainable
from imgcls.ray_internals import train_report_logger_name
from imgcls.progress import EpochProgress
from imgcls.training.augment import BatchAugment, BatchEval, mixup_cutmix, soft_cross_entropy
from imgcls.training.cache import ImageCache, load_indices, load_labels, shard_batches, wait_for_cache, worker_range
from imgcls.training.probe import set_head
from imgcls.training.sampler import sampled_batches, worker_sample
from imgcls.tracking import RUN_ID_KEY

log = logging.getLogger(__name__)
SHUFFLE_BUFFER = 2048  # rows; local shuffle of a streamed split, on top of the cache's shuffled order
RESIDENT_GPU_SHARE = 0.25  # of a GPU's memory that resident data may take; beyond it, pinned host memory
PLACEMENT_GROUP_KEY = "placement_group"  # reported under Tune: the worker group's placement group id


def say(message: str) -> None:
    """One line from a training worker to the job's output, once. Ray Train patches
    ``print`` in its workers to log the line and also write it to the redirected stdout,
    so each printed line reached the driver twice; its logger reaches it once."""
    logging.getLogger().info(message)


def worker_threads(local_world_size: int) -> int:
    """Torch threads per worker: the node's cores shared among the workers on it.

    Ray sets OMP_NUM_THREADS from the reserved (fractional) CPUs, which leaves a lone
    worker on a 2-core node computing on one core.
    """
    node_id = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == node_id), os.cpu_count() or 1)
    return max(1, int(cpus // max(1, local_world_size)))


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

    Kept over the libraries (``bench/library_swaps.py``, part ``ema``): torch's
    ``AveragedModel`` with ``get_ema_multi_avg_fn`` has no ramp and copies the model at its
    first update (0.29-0.32 largest weight difference after 50 updates at decay 0.999, on
    weights up to 1.4) and averages num_batches_tracked as a float, truncated back to the
    count it copied; given this ramp as its ``multi_avg_fn`` it is exact, but then the update
    is this code again. timm's ``ModelEmaV3(use_warmup=True, warmup_gamma=9,
    warmup_power=1)`` updated with ``step=updates + 2`` is exact too (bitwise, same update
    code) and its update takes 0.90-0.96x this one's time, but ``import timm.utils`` loads
    all of timm, torchvision included: 1.2 s and 186 MiB in a small-CNN training worker,
    which never imports torchvision otherwise. One worker of the README's main job (329
    updates) would spend 24x this EMA's time on it; and timm would become a core
    dependency (about 26 MB with huggingface_hub and hf-xet).
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

    Loaded once from the cache (``load``); every epoch then draws a permutation (or is
    given the epoch's order, ``--class-balance sampler``) and slices batches from it with
    tensor indexing, on the device that holds it.
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

    def batches(self, batch_size: int, generator: Optional[torch.Generator] = None,
                order: Optional[torch.Tensor] = None) -> Batches:
        """Batches of the held images at ``order`` (repeats allowed), else shuffled when
        ``generator`` is given, else in order."""
        if order is None:
            n = len(self)
            order = (torch.randperm(n, generator=generator, device=generator.device) if generator is not None
                     else torch.arange(n))
        order = order.to(self.images.device)
        n = len(order)
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
def validate(model, batches: Batches, device: torch.device, num_classes: int, to_float: BatchEval, *,
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


def quiet_report_logs(level: str) -> None:
    """Gives Ray Train's "Reporting training result ..." log of every report the run's level.

    RunConfig's LoggingConfig filters Ray Train's console logs by logger name ("ray.train"
    and below), but Ray 2.60 logs each ``ray.train.report`` on a logger named by its
    module's file path, which that filter misses: two long lines per epoch at INFO.
    """
    name = train_report_logger_name()
    if name is not None:  # None: another Ray Train, nothing to adjust
        logging.getLogger(name).setLevel(level)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point on each worker."""
    worker_start = time.perf_counter()
    quiet_report_logs(config.get("log_level", "INFO"))
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
            say(f"resuming from epoch {state['epoch'] + 1} checkpoint")
    elif config.get("init_from"):  # a warm start: the old model's weights, its head rows by class
        warm_start(model, config["init_from"], classes)
    elif config.get("probe_head"):  # LP-FT: start from the linear probe's head
        head = torch.load(io.BytesIO(storage.read_bytes(config["probe_head"])), map_location="cpu", weights_only=True)
        set_head(model, head["weight"], head["bias"])
    split_files = read_split_files(config["splits"]) if rank == 0 and config.get("splits") else {}
    epoch_log = tracked_epochs(job, config.get("mlflow_run_id"), history) if rank == 0 else None
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
    setup_seconds = load_start - worker_start  # the model built (and resumed), DDP's set-up: before any data
    # Decoded on the driver while this worker started: wait for it (``CacheDecode``).
    cache_wait = sum(wait_for_cache(c) for c in caches.values()) if config.get("decoding") else 0.0
    # The sampler draws each epoch from the whole training split (``training.sampler``):
    # a resident worker holds all of it, a streamed one reads the shards itself.
    sampler = t.class_balance == "sampler"
    if config["resident"]:
        part = (0, 1) if sampler else (rank, world)
        train_data = ResidentSplit.load(caches["train"], *part, equal=True, device=device)
        val_data = ResidentSplit.load(caches["val"], rank, world, equal=False, device=device)
        per_worker = len(train_data)
    elif not sampler:
        train_shard = ray.train.get_dataset_shard("train")
        per_worker = caches["train"].num_images // world
    if sampler:
        train_labels = train_data.labels.cpu().numpy() if config["resident"] else load_labels(caches["train"])
        per_worker = len(worker_range(len(train_labels), rank, world, equal=True))
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
    # by killing it, so the trainer never removes the group itself (``imgcls.training.tune``).
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
        opts.progress = EpochProgress(epoch, t.epochs, caches["train"].num_images, world, say) if rank == 0 else None
        drawn = None  # the sampler's class counts of this worker's part of the epoch
        if sampler:
            sample = worker_sample(train_labels, len(classes), t.seed, epoch, rank, world)
            drawn = torch.from_numpy(np.bincount(train_labels[sample], minlength=len(classes))).to(device)
            batches = (train_data.batches(t.batch_size, order=torch.from_numpy(sample)) if config["resident"]
                       else sampled_batches(caches["train"], sample, t.batch_size, seed))
        elif config["resident"]:
            batches = train_data.batches(t.batch_size, torch.Generator(device=device).manual_seed(seed))
        else:
            batches = streamed_batches(train_shard, t.batch_size, seed)
        sums = train_one_epoch(forward, optimizer, scheduler, batches, device, opts)
        if on_gpu:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        loss_sum, correct, seen = [v.item() for v in all_reduce_sum([sums["loss_sum"], sums["correct"], sums["seen"]])]
        if drawn is not None:
            drawn = all_reduce_sum([drawn])[0].tolist()
        # The plain module, not the DDP wrapper: DDP's forward broadcasts buffers, a
        # collective that would hang when the workers' val parts differ in batch count.
        eval_model = ema.module if ema is not None else _unwrap(model)
        val_batches = val_data.batches(t.batch_size * 2) if config["resident"] else \
            shard_batches(caches["val"], rank, world, t.batch_size * 2)
        cm, val_loss = validate(eval_model, val_batches, device, len(classes), to_float, amp=amp,
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
        if drawn is not None:
            metrics["sampled_class_counts"] = drawn  # all workers' draws this epoch, by class
        if epoch == start_epoch:
            metrics.update(setup_seconds=setup_seconds, load_seconds=load_seconds,
                           first_step_time=first_step.get("time"),
                           cache_wait_seconds=cache_wait, decode_overlapped=bool(config.get("decoding")))
        history.append(metrics)
        if rank == 0:
            say(f"epoch {epoch + 1}/{t.epochs}  train_loss {metrics['train_loss']:.4f}  "
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
                                train_state=train_state, files=split_files,
                                meta={RUN_ID_KEY: config["mlflow_run_id"]} if config.get("mlflow_run_id") else None)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, **tune_extra}, checkpoint=checkpoint)
        if epoch_log is not None:  # after the checkpoint: a restart from it catches up, never repeats
            epoch_log.sync(history)


def tracked_epochs(job: JobConfig, run_id: Optional[str], history: list[dict]):
    """Rank 0's ``tracking.EpochLog`` of the training's MLflow run, caught up with the
    epochs of ``history`` (a resumed checkpoint's) that the run lacks; None without tracking."""
    if not run_id:
        return None
    from imgcls.tracking import EpochLog

    epoch_log = EpochLog(job.train.tracking_uri, run_id)
    epoch_log.sync(history)
    return epoch_log


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
