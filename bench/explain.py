"""Are imgcls's explanations right, and should a maintained library draw them?

Three of the registry's architectures, trained here on real images:
- ``efficientnet_lite0``: the packaged ImageNet weights with a new head fitted (L-BFGS,
  on the frozen pooled features) to ``--train-per-class`` dog and cat photos a class at
  ``--size`` px; or, with ``--lite0-checkpoint``, an imgcls checkpoint fine-tuned with
  ``jobs/configs/dogs_cats_finetune.yaml``;
- ``resnet18`` and ``small_cnn``: trained from scratch (no offline weights) for
  ``--epochs`` epochs on real Fashion-MNIST images, 100 a class, at ``--resnet-size`` px
  and 28 px (the 32-pixel dog/cat photos are too hard for either from scratch on a few
  hundred: both stayed near chance).

On ``--test-per-class`` held-out images a class, each way of drawing maps at the default
layer (imgcls: ``evaluation.explain.default_target_layer``) records:
- ``empty_map_rate``: the share of all-zero maps;
- the deletion test (Petsiuk et al. 2018, one step): the mean fall of the explained
  class's probability when the 20% of pixels its map ranks highest are replaced by a
  blurred copy, against an equal share of random 8x8-grid blocks (3 draws), and their
  ratio ``deletion_drop_vs_random`` (target: at least 1.5);
- ``seconds``: the maps of all the images, in batches of ``--batch-size``.
The ways: imgcls's gradcam, gradcam++ and eigencam (scorecam, one forward pass a
channel, only on the small CNN), pytorch-grad-cam's GradCAM and captum's LayerGradCam
given the same module.

Speed before and after batching: the top-50 most confident mistakes (filled up with the
least confident right answers when fewer) of Lite0 at ``--size`` px, explained with the
former code (one image at a time, hooked at the last Conv2d) and with imgcls's now.

The libraries are not imgcls dependencies: ``pip install grad-cam captum`` to compare
(a missing one is recorded as an error). Everything runs on ``--threads`` threads (2: the project's CPU budget). Run alone:
    .venv/bin/python bench/explain.py [--size 224] [--out bench/results/explain.json]
    .venv/bin/python bench/explain.py --quick --out /tmp/explain.json   # a small smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from imgcls.evaluation.explain import deletion_drops, grad_cam  # noqa: E402
from imgcls.models import WithFeatures, create_model, get_spec  # noqa: E402


def image_tensors(root: str, per_class: int, offset: int, classes=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` images of each class folder from the ``offset``-th on: (N, 3, h, w) in [0, 1], labels."""
    from PIL import Image

    classes = classes or sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    xs, ys = [], []
    for y, c in enumerate(classes):
        for name in sorted(os.listdir(os.path.join(root, c)))[offset:offset + per_class]:
            xs.append(np.array(Image.open(os.path.join(root, c, name)).convert("RGB")))
            ys.append(y)
    return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255, torch.tensor(ys)


def model_input(x: torch.Tensor, arch: str, size: int) -> torch.Tensor:
    spec = get_spec(arch)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)


def fit_head(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> nn.Module:
    """Fits Lite0's new head on its frozen pooled features of ``x``."""
    with torch.no_grad():
        feats = torch.cat([WithFeatures(model)(x[i:i + batch])[1] for i in range(0, len(x), batch)])
    opt = torch.optim.LBFGS(model._fc.parameters(), max_iter=100)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model._fc(feats), y) + 1e-3 * model._fc.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval()


def train_scratch(arch: str, x: torch.Tensor, y: torch.Tensor, epochs: int, size: int) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(arch, int(y.max()) + 1, image_size=size)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[idx].flip(3) if idx[0] % 2 else x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def grad_cam_before(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """imgcls's former Grad-CAM: hooks on the last Conv2d, one image a call (the caller's loop)."""
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-1]
    module, store = model.get_submodule(name), {}
    h1 = module.register_forward_hook(lambda _m, _i, out: store.__setitem__("act", out))
    h2 = module.register_full_backward_hook(lambda _m, _gi, go: store.__setitem__("grad", go[0]))
    try:
        model.zero_grad(set_to_none=True)
        x = x.detach().requires_grad_(True)
        logits = model(x)
        logits.gather(1, logits.argmax(1).view(-1, 1)).sum().backward()
    finally:
        h1.remove()
        h2.remove()
    act, grad = store["act"].detach(), store["grad"].detach()
    cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return cam / cam.flatten(1).max(1).values.clamp(min=1e-12)[:, None, None]


def library_maps(kind: str, model: nn.Module, layer: str, x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """(B, H, W) maps from pytorch-grad-cam's GradCAM or captum's LayerGradCam at ``layer``."""
    module = model.get_submodule(layer)
    if kind == "pytorch_grad_cam":
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        with GradCAM(model=model, target_layers=[module]) as cam:
            return torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in cls]))
    from captum.attr import LayerAttribution, LayerGradCam

    attr = LayerGradCam(model, module).attribute(x, target=cls, relu_attributions=True)
    return LayerAttribution.interpolate(attr.detach(), tuple(x.shape[-2:]), "bilinear")[:, 0]


def score_maps(model: nn.Module, x: torch.Tensor, make, batch: int, draws: int = 3) -> dict:
    """Runs ``make(xb) -> (maps, predicted class)`` over ``x`` in batches and scores the maps."""
    began = time.perf_counter()
    heats, classes = [], []
    for i in range(0, len(x), batch):
        heat, cls = make(x[i:i + batch])
        heats.append(heat.float())
        classes.append(cls)
    seconds = time.perf_counter() - began
    heat, cls = torch.cat(heats), torch.cat(classes)
    empty = heat.flatten(1).max(1).values <= 0
    g = torch.Generator().manual_seed(0)
    top, rnd = [], []
    for _ in range(draws):
        for i in range(0, len(x), batch):
            a, b = deletion_drops(model, x[i:i + batch], heat[i:i + batch], cls[i:i + batch], generator=g)
            top.append(a)
            rnd.append(b)
    top_drop, random_drop = float(torch.cat(top).mean()), float(torch.cat(rnd).mean())
    return {"empty_map_rate": float(empty.float().mean()), "deletion_drop_top20": top_drop,
            "deletion_drop_random20": random_drop,
            "deletion_drop_vs_random": top_drop / random_drop if random_drop > 0 else None,
            "seconds": seconds, "images": len(x)}


def measure(arch: str, model: nn.Module, x: torch.Tensor, batch: int) -> dict:
    from imgcls.evaluation.explain import default_target_layer

    layer = default_target_layer(model, image_size=x.shape[-1])
    out = {"layer": layer}
    methods = ["gradcam", "gradcam++", "eigencam"] + (["scorecam"] if arch == "small_cnn" else [])
    for method in methods:
        out[f"imgcls_{method}"] = score_maps(
            model, x, lambda xb, m=method: (lambda h, lg: (h, lg.argmax(1)))(*grad_cam(model, xb, method=m)), batch)
    for kind in ("pytorch_grad_cam", "captum"):
        def make(xb, kind=kind):
            with torch.no_grad():
                cls = model(xb).argmax(1)
            return library_maps(kind, model, layer, xb, cls), cls
        try:
            out[f"{kind}_gradcam"] = score_maps(model, x, make, batch)
        except Exception as e:  # not installed, or it fails on this model
            out[f"{kind}_gradcam"] = {"error": f"{type(e).__name__}: {e}"}
    print(arch, json.dumps({k: (v if isinstance(v, str) else {m: (round(n, 4) if isinstance(n, float) else n)
                                                                for m, n in v.items()}) for k, v in out.items()}),
          flush=True)
    return out


def top_mistakes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` most confident mistakes, filled up with the least confident right answers."""
    with torch.no_grad():
        probs = torch.cat([model(x[i:i + 32]).softmax(1) for i in range(0, len(x), 32)])
    score, pred = probs.max(1)
    wrong = pred != y
    order = torch.argsort(torch.where(wrong, 2 + score, 1 - score), descending=True)
    return x[order[:n]]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="out/bench/explain")
    p.add_argument("--size", type=int, default=224, help="Lite0's input side")
    p.add_argument("--resnet-size", type=int, default=112, help="ResNet-18's input side (Fashion-MNIST upscaled)")
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--test-per-class", type=int, default=50)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--mistakes", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lite0-checkpoint", default=None, help="a fine-tuned imgcls checkpoint to use for Lite0")
    p.add_argument("--quick", action="store_true", help="small settings for a smoke run")
    p.add_argument("--out", default="bench/results/explain.json")
    args = p.parse_args()
    if args.quick:
        args.size, args.resnet_size, args.train_per_class, args.test_per_class = 128, 64, 100, 10
        args.epochs, args.mistakes = 3, 10
    torch.set_num_threads(args.threads)
    from imgcls.datasets import fetch_dogs_cats, fetch_fashion_mnist

    began = time.perf_counter()
    dogs_cats = fetch_dogs_cats(os.path.join(args.workdir, "dogs-cats"))
    fmnist = fetch_fashion_mnist(os.path.join(args.workdir, "fmnist"), per_class=200)
    n, m = args.train_per_class, args.test_per_class
    train_x, train_y = image_tensors(dogs_cats, n, 0)
    test_x, test_y = image_tensors(dogs_cats, m, 1000 - m)
    results, accuracy = {}, {}

    models = {}
    if args.lite0_checkpoint:
        from imgcls.checkpoint import load_checkpoint

        loaded = load_checkpoint(args.lite0_checkpoint)
        models["efficientnet_lite0"] = (loaded.model.eval(), loaded.image_size)
    else:
        lite0 = create_model("efficientnet_lite0", 2, weights="packaged", image_size=args.size).eval()
        models["efficientnet_lite0"] = (fit_head(lite0, model_input(train_x, "efficientnet_lite0", args.size),
                                                 train_y, args.batch_size), args.size)
    fx, fy = image_tensors(fmnist, 100, 0)
    models["resnet18"] = (train_scratch("resnet18", model_input(fx, "resnet18", args.resnet_size), fy,
                                        args.epochs, args.resnet_size), args.resnet_size)
    models["small_cnn"] = (train_scratch("small_cnn", model_input(fx, "small_cnn", 28), fy, args.epochs, 28), 28)
    for arch, (model, size) in models.items():
        if arch != "efficientnet_lite0":
            x, y = image_tensors(fmnist, max(1, 2 * m // 10), 150)
            x = model_input(x, arch, size)
        else:
            x, y = model_input(test_x, arch, size), test_y
        with torch.no_grad():
            accuracy[arch] = float((model(x).argmax(1) == y).float().mean())
        results[arch] = measure(arch, model, x, args.batch_size)

    lite0, size = models["efficientnet_lite0"]
    worst = top_mistakes(lite0, model_input(test_x, "efficientnet_lite0", size), test_y, args.mistakes)
    t0 = time.perf_counter()
    before = torch.cat([grad_cam_before(lite0, worst[i:i + 1]) for i in range(len(worst))])
    t1 = time.perf_counter()
    after = torch.cat([grad_cam(lite0, worst[i:i + args.batch_size])[0] for i in range(0, len(worst),
                                                                                       args.batch_size)])
    t2 = time.perf_counter()
    speed = {"images": len(worst), "size": size, "before_seconds": t1 - t0, "after_seconds": t2 - t1,
             "before_empty_maps": int((before.flatten(1).max(1).values <= 0).sum()),
             "after_empty_maps": int((after.flatten(1).max(1).values <= 0).sum())}
    print("top mistakes", json.dumps(speed), flush=True)

    def ratio(arch, way, key):
        return results[arch][way].get(key)

    result = {
        "machine": {"cpus": os.cpu_count(), "threads": args.threads}, "date": time.strftime("%Y-%m-%d"),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "accuracy": accuracy, "results": results, "top_mistakes": speed,
        "targets": {"deletion_drop_vs_random_min": 1.5, "empty_map_rate_max": 0},
        "ratios": {
            "deletion_drop_vs_random": {a: ratio(a, "imgcls_gradcam", "deletion_drop_vs_random") for a in results},
            "empty_map_rate": {a: ratio(a, "imgcls_gradcam", "empty_map_rate") for a in results},
            "pytorch_grad_cam_vs_imgcls_seconds": {
                a: (results[a]["pytorch_grad_cam_gradcam"].get("seconds") or float("nan"))
                / results[a]["imgcls_gradcam"]["seconds"] for a in results},
            "captum_vs_imgcls_seconds": {
                a: (results[a]["captum_gradcam"].get("seconds") or float("nan"))
                / results[a]["imgcls_gradcam"]["seconds"] for a in results},
            "top_mistakes_before_vs_after_seconds": speed["before_seconds"] / speed["after_seconds"],
        },
        "seconds": time.perf_counter() - began,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["ratios"]), flush=True)


if __name__ == "__main__":
    main()
