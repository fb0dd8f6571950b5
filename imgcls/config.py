"""Typed configuration: the single source of truth for every job's settings.

Overrides apply in order: dataclass defaults, then a YAML file (sections ``data``,
``model``, ``train``, ``predict``), then command-line flags (see ``imgcls.cli``).
Nothing here reads the environment or argv.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Optional

AUGMENTATIONS = ("none", "light", "standard", "trivialaugment", "randaugment")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle")
CLASS_BALANCE = ("none", "loss", "sampler")
RUNTIMES = ("torch", "onnxruntime")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PROGRAMS = ("auto", "torchscript", "export", "compile")  # how the model reaches the actors (program.build_program)
TTAS = ("none", "flip")  # test-time augmentation of inference  # of inference (model_stage.inference_dtype)
# The architectures of imgcls.models' registry, named here so that the CLI can list them
# without importing torchvision (a unit test checks them against the registry).
TORCHVISION_MODELS = ("convnext_tiny", "efficientnet_b0", "efficientnet_b1", "mobilenet_v3_large",
                      "mobilenet_v3_small", "resnet18", "resnet34", "resnet50", "vgg11", "vgg11_bn", "vgg16")
PACKAGED_WEIGHTS_MODELS = ("efficientnet_lite0",)  # those with weights='packaged'
MODEL_NAMES = tuple(sorted(("small_cnn", *PACKAGED_WEIGHTS_MODELS, *TORCHVISION_MODELS)))


def choices(values: tuple[str, ...]) -> dict:
    """Field metadata of a setting with a fixed set of values: ``build`` refuses others and
    the CLI lists them (``click.Choice``)."""
    return {"choices": values}


@dataclass(frozen=True)
class DataConfig:
    root: str = field(default="", metadata={"multiple": True})
    """Labelled data: an ImageFolder tree (one subfolder per class) or a CSV/Parquet
    manifest with ``path,label`` columns, on local disk or any fsspec URI; several
    (--root given more than once, or comma-separated) are listed together, e.g. a
    model's old training data and newly labelled rows."""
    val_fraction: float = 0.1
    """Share of each class held out for validation (stratified)."""
    test_fraction: float = 0.1
    """Share of each class held out for the final test (stratified)."""
    split_seed: int = 0
    """Seed of the deterministic train/val/test split."""
    max_per_class: Optional[int] = None
    """Cap on images per class, for quick runs on a subset."""
    augment: str = field(default="standard", metadata=choices(AUGMENTATIONS))
    """Training augmentation preset."""
    augment_magnitude: int = 9
    """Magnitude of RandAugment (0-30); also scales rotation/shear in 'standard'."""
    cache_path: Optional[str] = None
    """Where the splits are cached once decoded and resized (uint8 shards, reused by
    reruns and resumes with the same data); None: a 'cache' folder in the run folder."""
    in_memory: Optional[bool] = None
    """Each worker holds its part of the cached splits in memory (on its GPU when it
    fits) instead of streaming them from the cache every epoch; None decides from the
    data's size against the workers' memory."""

    def __post_init__(self):
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise ValueError("val_fraction and test_fraction must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave data to train on")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        if self.max_per_class is not None and self.max_per_class < 1:
            raise ValueError("max_per_class must be positive")
        if not 0 <= self.augment_magnitude <= 30:
            raise ValueError("augment_magnitude must be in [0, 30]")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = field(default="small_cnn", metadata=choices(MODEL_NAMES))
    """Network architecture."""
    weights: Optional[str] = None
    """Initial weights: None (random), a torchvision enum name such as 'DEFAULT' or
    'IMAGENET1K_V1' (downloaded), 'packaged' (weights shipped in a Python package),
    or a local/fsspec path to a state dict (.pt/.pth/.safetensors)."""
    image_size: int = 224
    """Side of the square network input, in pixels."""
    freeze_backbone: bool = False
    """Train only the classification head at first."""
    unfreeze_after: Optional[int] = None
    """With freeze_backbone, unfreeze the whole network after this many epochs."""
    width: Optional[int] = None
    """Channels of small_cnn's first block (doubled in each of the next two); None is 32."""

    def __post_init__(self):
        if self.image_size < 16:
            raise ValueError("image_size must be at least 16")
        if self.width is not None and (self.width < 1 or self.arch != "small_cnn"):
            raise ValueError("width is a positive channel count, for small_cnn only")
        if self.unfreeze_after is not None and (self.unfreeze_after < 0 or not self.freeze_backbone):
            raise ValueError("unfreeze_after needs freeze_backbone and must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    """Passes over the training split."""
    batch_size: int = 64
    """Images per step on each worker."""
    optimizer: str = field(default="adamw", metadata=choices(OPTIMIZERS))
    """Optimizer (SGD with Nesterov momentum, or AdamW)."""
    lr: float = 1e-3
    """Peak learning rate, reached after warmup."""
    weight_decay: float = 0.05
    """Decoupled (AdamW) or L2 (SGD) weight decay."""
    momentum: float = 0.9
    """SGD momentum (Nesterov)."""
    warmup_epochs: float = 1.0
    """Linear warmup length; the decay to zero follows."""
    schedule: str = field(default="cosine", metadata=choices(SCHEDULES))
    """Decay after the warmup: 'cosine', or 'onecycle' (linear, a triangle with the warmup)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    linear_probe: bool = False
    """Train only a logistic-regression head on the frozen pretrained backbone's features,
    computed once (seconds, no gradient steps); saved as a normal checkpoint."""
    probe_head: Optional[bool] = None
    """LP-FT: fit the new head as a linear probe on frozen features before fine-tuning, so
    that fine-tuning starts from a good head instead of a random one. None: on when
    starting from pretrained weights."""
    freeze_batchnorm: bool = False
    """Keep BatchNorm layers in inference mode while fine-tuning: their pretrained running
    statistics are used and kept (their scale and shift still train), so the features
    match those the head was probed on, and small batches of a small dataset do not
    disturb them. Only with a small lr (AdamW 1e-4): with nothing renormalising the
    activations, EfficientNet-Lite0 fine-tuned at AdamW 1e-3 fell to chance."""
    layer_decay: float = 1.0
    """Layer-wise lr decay: the head trains at the lr, and each backbone stage below it at
    this factor of the lr of the stage above (e.g. 0.8); 1 is off."""
    mixup_alpha: float = 0.0
    """MixUp: images and labels mixed with the batch reversed, weight ~ Beta(a, a); 0 is off."""
    cutmix_alpha: float = 0.0
    """CutMix: a box pasted from the reversed batch, area ~ Beta(a, a); 0 is off. With
    both alphas set, each batch uses one of the two at random."""
    ema_decay: Optional[float] = None
    """Exponential moving average of the weights (e.g. 0.999), which is then validated
    and saved as the model; None is off."""
    compile: bool = False
    """torch.compile the model (slower to start; on 2 CPU cores it did not pay off)."""
    class_balance: str = field(default="none", metadata=choices(CLASS_BALANCE))
    """Imbalance handling: 'loss' weights the loss by inverse class frequency; 'sampler'
    draws each epoch afresh from the cached training images (each decoded and stored
    once) as many images as the split holds, every class equally often (a rare class's
    images repeated, the largest class's a different subset each epoch). Both weight
    the linear probe's classes."""
    num_workers: int = 2
    """Ray Train workers (data-parallel replicas)."""
    use_gpu: Optional[bool] = None
    """Train on GPUs; None picks GPUs when the cluster has them."""
    cpus_per_worker: Optional[float] = None
    """CPUs reserved per worker; None leaves room for Ray Data's tasks."""
    amp: Optional[bool] = None
    """Mixed precision (fp16 on GPU, bf16 on CPU); None means on for GPUs and for CPUs
    that compute bf16 natively (AVX512-BF16/AMX), off elsewhere."""
    channels_last: Optional[bool] = None
    """NHWC memory format; None means on (faster on GPUs and, measured, on CPUs too)."""
    storage_path: str = "runs"
    """Where checkpoints go: a local folder or fsspec URI shared by all nodes."""
    name: str = "imgcls"
    """Run name: the run's folder under storage_path."""
    resume: bool = False
    """Continue the run whose folder (storage_path/name) already holds checkpoints, from
    its latest; without it (or --overwrite) such a folder is refused."""
    overwrite: bool = False
    """Start afresh in a run folder that holds checkpoints: they are deleted (the
    decoded cache is kept)."""
    resume_from: Optional[str] = None
    """Explicit checkpoint folder to resume from."""
    init_from: Optional[str] = None
    """Warm-start a new run from this checkpoint's weights (a retrain with new data): every
    class it knows must be in the data and keeps its head row; new classes get new rows.
    The run then reports the old and the new model on the same test split."""
    max_failures: int = 2
    """Worker failures tolerated; training restarts from the latest checkpoint."""
    num_to_keep: Optional[int] = 3
    """Checkpoints to keep (None keeps all)."""
    seed: int = 0
    """Seed of weights init and data order."""
    tracking_uri: Optional[str] = None
    """MLflow tracking URI (e.g. sqlite:///out/mlflow.db, http://host:5000): the run, its
    per-epoch metrics, test metrics and artifacts are logged there (``imgcls.tracking``);
    None: MLFLOW_TRACKING_URI if set, else no tracking."""
    register: Optional[str] = None
    """After training, register the best checkpoint as a new version of this model name in
    MLflow's registry (needs a tracking URI)."""
    register_alias: Optional[str] = None
    """With --register: point this alias (e.g. champion) at the new version."""

    def __post_init__(self):
        if self.register_alias and not self.register:
            raise ValueError("register_alias needs register: the registered model to give the alias to")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.class_balance not in CLASS_BALANCE:
            raise ValueError(f"class_balance must be one of {CLASS_BALANCE}, got {self.class_balance!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.num_workers < 1:
            raise ValueError("epochs, batch_size and num_workers must be positive")
        if self.lr <= 0:
            raise ValueError("lr must be positive")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError("label_smoothing must be in [0, 1)")
        if self.warmup_epochs < 0 or self.max_failures < -1:
            raise ValueError("warmup_epochs must be >= 0 and max_failures >= -1")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ValueError("cpus_per_worker must be positive")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError("mixup_alpha and cutmix_alpha must be >= 0")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError("ema_decay must be in (0, 1)")
        if not 0 < self.layer_decay <= 1:
            raise ValueError("layer_decay must be in (0, 1]")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other")


@dataclass(frozen=True)
class PredictConfig:
    model: str = ""
    """Checkpoint folder (or export folder, for --runtime onnxruntime) to label with;
    several checkpoints, comma-separated, label as one ensemble (same classes and image
    size; their probabilities averaged, their features concatenated)."""
    input: str = ""
    """Images to label: a folder, a glob, a manifest (.csv/.parquet), or .tar shards;
    local or any fsspec URI."""
    output: str = ""
    """Folder (local or fsspec URI) that receives the Parquet shards."""
    batch_size: Optional[int] = None
    """Images per model batch; None: 256 on a GPU (copied to it in chunks that overlap the
    model's work), 64 on CPUs, where an actor holds that many decoded images and runs
    them 16 at a time to keep activations in cache."""
    precision: str = field(default="auto", metadata=choices(PRECISIONS))
    """Inference dtype: 'auto' is bf16 on GPUs (fp16 where they lack it) and float32 on
    CPUs; 'fp32', 'bf16', 'fp16' force one. Scores differ from float32's by about 1e-2
    in bf16."""
    program: str = field(default="auto", metadata=choices(PROGRAMS))
    """How the driver hands the model to the actors (runtime 'torch'): 'torchscript' (a
    trace: starts fastest), 'export' (a ``torch.export`` program, TorchScript's
    successor), 'compile' (that program run through ``torch.compile`` in each actor:
    slower to start). 'auto' is torchscript until bench/gpu.py has measured the others on
    a GPU."""
    top_k: int = 5
    """Labels and scores kept per image."""
    embeddings: bool = False
    """Also write the penultimate-layer features."""
    tta: str = field(default="none", metadata=choices(TTAS))
    """Test-time augmentation: 'flip' averages each image's probabilities with its
    horizontal mirror's."""
    runtime: str = field(default="torch", metadata=choices(RUNTIMES))
    """Inference runtime: 'torch' for a checkpoint folder, 'onnxruntime' for an export folder
    holding model.onnx."""
    num_actors: Optional[int] = None
    """Inference actors; None sizes the pool from the cluster."""
    use_gpu: Optional[bool] = None
    """Run the model on GPUs; None picks GPUs when the cluster has them."""
    separate_decode: Optional[bool] = None
    """Read and decode in a CPU actor pool of its own; None does so only when the model
    runs on GPUs (on CPUs each model actor decodes its own batches)."""
    gpu_decode: bool = False
    """Decode JPEGs on the model actors' device (nvjpeg on a GPU, in one call per batch)
    instead of in the decode pool, which then only reads files and decodes the rest; for
    the separate-decode layout (the GPUs' default). Off until measured faster on a GPU."""
    files_per_shard: int = 2000
    """Input files per output shard, the unit of resumption."""
    max_pixels: int = 64_000_000
    """Images with more pixels are refused as decompression bombs."""
    max_file_mb: int = 256
    """Files (and tar members) larger than this many MiB are error rows (too-large),
    refused by their size before a byte is read."""
    buffer_mb: int = 512
    """Object-store memory the pipeline may fill with blocks in flight (decoded images
    waiting for the model, predictions waiting to be written); it keeps peak memory
    flat however many files there are."""

    def __post_init__(self):
        if (self.batch_size is not None and self.batch_size < 1) or self.top_k < 1 or self.files_per_shard < 1 \
                or self.buffer_mb < 1 or self.max_file_mb < 1:
            raise ValueError("batch_size, top_k, files_per_shard, buffer_mb and max_file_mb must be positive")
        if self.tta not in TTAS:
            raise ValueError(f"tta must be one of {TTAS}, got {self.tta!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if self.program not in PROGRAMS:
            raise ValueError(f"program must be one of {PROGRAMS}, got {self.program!r}")
        if self.num_actors is not None and self.num_actors < 1:
            raise ValueError("num_actors must be positive")


@dataclass(frozen=True)
class ServeConfig:
    """``imgcls serve``: one model behind HTTP on Ray Serve (``imgcls.serving``)."""

    model: str = ""
    """Checkpoint folder (or export folder, for --runtime onnxruntime) to serve; several
    checkpoints, comma-separated, serve as one ensemble, as in ``imgcls predict``."""
    runtime: str = field(default="torch", metadata=choices(RUNTIMES))
    """Inference runtime: 'torch' for a checkpoint folder, 'onnxruntime' for an export folder."""
    tta: str = field(default="none", metadata=choices(TTAS))
    """Test-time augmentation: 'flip' averages each image's probabilities with its mirror's."""
    precision: str = field(default="auto", metadata=choices(PRECISIONS))
    """Inference dtype, as ``imgcls predict --precision``."""
    top_k: int = 5
    """Labels and scores returned per image."""
    name: str = "imgcls"
    """The Serve application's name, and the model's name in the /v2 protocol's paths."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds. Another than loopback needs IMGCLS_SERVE_TOKEN (a
    bearer token every request must carry) or --insecure."""
    port: int = 8000
    """HTTP port."""
    insecure: bool = False
    """Allow a non-loopback --host without a token: anyone who reaches the port may classify."""
    max_batch_size: int = 16
    """Images one model call takes at most (``serve.batch``): requests that arrive within
    --batch-wait-ms of each other share a forward pass."""
    batch_wait_ms: float = 5.0
    """How long the first request of a batch waits for others."""
    num_replicas: str = "auto"
    """Replicas: a count, or 'auto' to scale between --min-replicas and --max-replicas by
    ongoing requests (--target-ongoing-requests per replica)."""
    min_replicas: int = 1
    """Fewest replicas with 'auto'."""
    max_replicas: int = 4
    """Most replicas with 'auto'."""
    target_ongoing_requests: int = 16
    """Requests in flight per replica that 'auto' scales to keep."""
    max_ongoing_requests: int = 48
    """Requests a replica takes at once; more wait in Serve's queue."""
    max_queued_requests: int = 256
    """Requests that may wait for a replica; beyond this the answer is 503 with Retry-After."""
    replica_cpus: float = 1.0
    """CPUs reserved per replica (fractional values share a core)."""
    threads: Optional[int] = None
    """torch threads per replica; None: torch's default."""
    use_gpu: bool = False
    """One GPU per replica."""
    max_body_mb: float = 20.0
    """Largest request body; a larger one is refused with 413 before it is read whole."""
    max_pixels: int = 64_000_000
    """Images with more pixels are refused (413), as in bulk labelling."""
    log_dir: str = ""
    """Folder (local or fsspec URI) where every answer is appended as a predictions row
    (with ``timestamp`` and ``request_id``), in Parquet parts each replica writes;
    ``imgcls monitor --current`` and ``imgcls review --predictions`` read it."""
    log_images: bool = False
    """Also keep each request's image under LOG_DIR/_images/; the row's path names it."""
    log_flush_rows: int = 1000
    """A replica writes its buffered log rows as a part once it holds this many..."""
    log_flush_s: float = 30.0
    """...or once the oldest is this old (and when the model changes or the replica stops)."""

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if self.tta not in TTAS:
            raise ValueError(f"tta must be one of {TTAS}, got {self.tta!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.num_replicas != "auto" and not (self.num_replicas.isdigit() and int(self.num_replicas) > 0):
            raise ValueError(f"num_replicas must be 'auto' or a positive count, got {self.num_replicas!r}")
        if min(self.top_k, self.max_batch_size, self.min_replicas, self.max_replicas, self.max_ongoing_requests,
               self.max_queued_requests, self.target_ongoing_requests, self.log_flush_rows) < 1:
            raise ValueError("top_k, max_batch_size, replica counts, request limits and log_flush_rows must be positive")
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if self.max_body_mb <= 0 or self.batch_wait_ms < 0 or self.replica_cpus < 0 or self.log_flush_s <= 0:
            raise ValueError("max_body_mb and log_flush_s must be positive, batch_wait_ms and replica_cpus not negative")


@dataclass(frozen=True)
class DriftThresholds:
    """The least effect size at which each of ``imgcls monitor``'s tests reports drift
    (when its p-value is also below alpha; see imgcls.evaluation.monitor)."""

    class_threshold: float = 0.03
    """Predicted classes: Jensen-Shannon distance of the class shares (natural log, 0 to
    0.83), Evidently's distance for categories. Its default there, 0.1 (about PSI 0.1,
    the "moderate" level), lets a 10% prior shift through (0.057 in bench/monitor.py's
    predictions at a million rows a side), while a 1% shift is 0.009 there and two runs of
    one mix 0.007. Over 0.833, its largest value, the class mix is left out of the
    verdict."""
    confidence_threshold: float = 0.1
    """Top-1 scores: Wasserstein distance over the reference's standard deviation;
    Evidently's default for this distance (in bench/monitor.py: blurred images 0.44, a
    30% prior shift 0.07)."""
    error_threshold: float = 0.03
    """Error rows: Jensen-Shannon distance of the error and ok shares, as for the classes
    (an error rate from 0 to 0.26%, or from 1% to 1.9%)."""
    embedding_threshold: float = 0.005
    """Embeddings: unbiased MMD^2 (Gaussian kernel at the median distance). No tool sets
    one (alibi-detect decides by the p-value alone); 0.005 is about three standard
    deviations of it between 500 embeddings a side of one distribution in
    bench/monitor.py (a 30% prior shift: 0.011, blurred images: 0.049)."""

    def __post_init__(self):
        if min(self.class_threshold, self.confidence_threshold, self.error_threshold, self.embedding_threshold) < 0:
            raise ValueError("drift thresholds must be 0 or more")

    def by_test(self) -> dict[str, float]:
        """The thresholds by the name of the test they apply to."""
        return {"classes": self.class_threshold, "confidence": self.confidence_threshold,
                "errors": self.error_threshold, "embeddings": self.embedding_threshold}


@dataclass(frozen=True)
class JobConfig:
    """Everything a training job needs; written beside each checkpoint."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.train.linear_probe and not self.model.weights:
            raise ConfigError("linear_probe", "a linear probe needs pretrained weights (--weights)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JobConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown config sections {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        return cls(**{f.name: build(f.default_factory, d.get(f.name) or {}) for f in fields(cls)})


class ConfigError(ValueError):
    """A config value that is wrong; ``key`` names the field (the CLI shows it as its flag)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def _field_types(cls) -> dict[str, tuple[type, bool]]:
    """Field name -> (base type, optional) from each field's annotation."""
    import typing

    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out[f.name] = (args[0] if args else hint, type(None) in typing.get_args(hint))
    return out


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def coerce(key: str, value: Any, kind: type, optional: bool) -> Any:
    """``value`` as ``kind``: what YAML or a caller gave, checked. YAML 1.1 reads ``1e-3``
    as a string, so numbers in strings are parsed; anything else of the wrong type is an
    error that names ``key``."""
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
        if optional:
            return None
        raise ConfigError(key, "a value is required")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(key, f"expected a number, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(key, f"expected a number, got {value!r}") from None
        if not isinstance(number, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        if kind is int:
            if float(number) != int(number):
                raise ConfigError(key, f"expected a whole number, got {value!r}")
            return int(number)
        return float(number)
    if kind is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(key, f"expected text, got {value!r}")
        return str(value)
    return value


def build(cls, values: dict[str, Any]):
    """Builds dataclass ``cls`` from a dict: unknown keys are refused by name, every value
    is coerced and checked by its field's declared type (``coerce``) and, for a field with
    ``choices`` metadata, against its choices."""
    names = {f.name for f in fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(sorted(unknown)[0], f"unknown {cls.__name__} key(s) {sorted(unknown)}; "
                                              f"known: {sorted(names)}")
    types = _field_types(cls)
    typed = {k: coerce(k, v, *types[k]) for k, v in values.items()}
    for f in fields(cls):
        allowed = f.metadata.get("choices")
        if allowed and f.name in typed and typed[f.name] is not None and typed[f.name] not in allowed:
            raise ConfigError(f.name, f"must be one of {', '.join(allowed)}; got {typed[f.name]!r}")
    return cls(**typed)


def merge(base, **overrides):
    """Returns a copy of dataclass ``base`` with the non-None overrides applied."""
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
