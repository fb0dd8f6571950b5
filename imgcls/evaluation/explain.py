"""Class activation maps (Grad-CAM and kin) on torch hooks, captioned overlays and a page.

Grad-CAM (Selvaraju et al., 2017): weight the target layer's activation maps by the
spatial mean of the class score's gradient, sum, ReLU, upsample to the input size.
Grad-CAM++ (Chattopadhay et al., 2018) weights the positive gradients by second- and
third-order terms; Score-CAM (Wang et al., 2020) weights each map by the class score of
the input masked with it (one forward pass a channel: slow); Eigen-CAM (Muhammad and
Yeasin, 2020) takes the activations' first principal component, with no gradient and no
class.

The target layer matters more than the method. The last Conv2d, which the first version
used, is in ResNets and EfficientNets the convolution *before* a BatchNorm, an activation
(and in a ResNet the residual add): its raw output times the channel weights is
negative almost everywhere, and the final ReLU left 18 of 39 real test photos with an
all-zero map on a fine-tuned EfficientNet-Lite0. The default is therefore the last
activation with spatial extent, the tensor that only pooling and the head follow
(``default_target_layer``), which is where the maintained libraries point (ResNet's
``layer4``, torchvision's ``features``). Even there a map can be all zero (no channel
with positive evidence: on a Lite0 with a fitted head, 6% of the maps at its activated
head, none at the BatchNorm before it; the issue's fine-tune had it the other way round
at the last block), so such an image is explained at the next output back instead.

Kept in imgcls rather than taken from a library (bench/explain.py, same layer, same
held-out images, one thread on a busy machine): captum's LayerGradCam draws the very same
Grad-CAM maps (same deletion drops to four digits), in 0.67 to 0.95x the time on Lite0
at 224 px but 1.4 to 3x on the ResNet-18 and the small CNN, and has none of the other
three methods; pytorch-grad-cam has all four but took 2 to 6x the time (it moves the
maps to NumPy and scales them an image at a time), and it explains a module that runs
twice (the packaged Lite0 applies one ``_swish`` ReLU6 to its stem and to its head) at
its *first* call, the stem: 17 to 26% empty maps there and a deletion drop no larger
than random's. Here a module is explained at its last call.
"""

from __future__ import annotations

import html
import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("gradcam", "gradcam++", "scorecam", "eigencam")
POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
PAGE_FILE = "explain.html"


def _record_outputs(model: nn.Module, x: torch.Tensor, names: Optional[Sequence[str]] = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Runs ``model(x)`` once and returns (logits, {module name: its 4-D output}), the
    names in the order their modules *finished* (a container after its children), each
    module's output from its last call (a module may run more than once)."""
    outputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_module, _inputs, out):
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                outputs.pop(name, None)  # re-insert: the order is that of the last call
                outputs[name] = out
        return hook

    wanted = dict(model.named_modules()) if names is None else {n: model.get_submodule(n) for n in names}
    handles = [m.register_forward_hook(keep(n)) for n, m in wanted.items() if n]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits, outputs


def _spatial_candidates(model: nn.Module, outputs: dict[str, torch.Tensor], n: int = 3) -> list[str]:
    """The names of the last ``n`` distinct outputs with spatial extent (above 1x1) that
    are not a pooling layer's, deepest first: the first is what only pooling and the head
    follow. Of the modules that returned one same tensor (ResNet's ``layer4``,
    ``layer4.1`` and its ReLU), the outermost, which finished last; it runs once where its
    children may run twice."""
    modules = dict(model.named_modules())
    pooled = {id(t) for name, t in outputs.items() if isinstance(modules[name], POOLING)}
    names, seen = [], set()
    for name in reversed(outputs):
        t = outputs[name]
        if t.shape[-1] * t.shape[-2] > 1 and id(t) not in pooled and id(t) not in seen:
            names.append(name)
            seen.add(id(t))
            if len(names) == n:
                break
    if not names:
        raise ValueError(f"{type(model).__name__} yields no 4-D map with spatial extent to explain")
    return names


def default_target_layer(model: nn.Module, image_size: int = 224) -> str:
    """The module whose output is the last activation with spatial extent: resnet ``layer4``,
    torchvision EfficientNet, MobileNet and ConvNeXt ``features``, the packaged
    EfficientNet-Lite0's activated head ``_swish`` (at its last call), small_cnn's last
    ReLU before its max-pool. Found by one forward pass of a zero image."""
    with torch.no_grad():
        _, outputs = _record_outputs(model, torch.zeros(1, 3, image_size, image_size))
    return _spatial_candidates(model, outputs, n=1)[0]


def _weights(method: str, act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """(B, K, 1, 1) channel weights of Grad-CAM or Grad-CAM++ from activations and gradients."""
    if method == "gradcam":
        return grad.mean(dim=(2, 3), keepdim=True)
    # Grad-CAM++ with exp(score) as the score, as its authors and pytorch-grad-cam do:
    # alpha = g^2 / (2 g^2 + sum(A) g^3), weights = sum(alpha * relu(g)).
    g2, g3 = grad.pow(2), grad.pow(3)
    alpha = g2 / (2 * g2 + act.sum(dim=(2, 3), keepdim=True) * g3 + 1e-7)
    alpha = torch.where(grad != 0, alpha, torch.zeros_like(alpha))
    return (alpha * F.relu(grad)).sum(dim=(2, 3), keepdim=True)


def _eigen(act: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) -> (B, 1, h, w): each image's activations projected on their first
    principal component, signed so that it agrees with the mean activation."""
    b, k, h, w = act.shape
    flat = act.flatten(2).transpose(1, 2).float()  # (B, hw, K)
    _, _, vh = torch.linalg.svd(flat - flat.mean(1, keepdim=True), full_matrices=False)
    proj = flat @ vh[:, 0, :, None]  # (B, hw, 1)
    sign = torch.sign((proj[..., 0] * flat.mean(2)).sum(1)).clamp(min=0) * 2 - 1  # (B,) +1 or -1
    return (proj[..., 0] * sign[:, None]).view(b, 1, h, w)


def _score_weights(model: nn.Module, x: torch.Tensor, act: torch.Tensor, cls: torch.Tensor,
                   chunk: int = 64) -> torch.Tensor:
    """Score-CAM's (B, K, 1, 1) weights: the softmax over channels of the class score of
    the input times each min-max scaled, upsampled map; ``chunk`` masked inputs a pass."""
    b, k = act.shape[:2]
    maps = F.interpolate(act, size=x.shape[-2:], mode="bilinear", align_corners=False)
    low, high = maps.flatten(2).min(2).values[..., None, None], maps.flatten(2).max(2).values[..., None, None]
    maps = (maps - low) / (high - low).clamp(min=1e-12)  # (B, K, H, W) in [0, 1]
    scores = torch.empty(b, k, device=x.device)
    with torch.no_grad():
        for i in range(b):
            for j in range(0, k, chunk):
                masked = x[i:i + 1] * maps[i, j:j + chunk, None]  # (c, 3, H, W)
                scores[i, j:j + chunk] = model(masked)[:, cls[i]].float()
    return scores.softmax(1)[..., None, None]


def grad_cam(model: nn.Module, x: torch.Tensor, target_class: Optional[Sequence[int]] = None,
             layer: Optional[str] = None, method: str = "gradcam", return_raw: bool = False):
    """Class activation maps for a batch, all images in one forward and one backward pass.

    Args:
        model: A classifier in eval mode.
        x: (B, 3, H, W) normalised input.
        target_class: Class per image; None explains the predicted class.
        layer: Module name to explain at (at its last call if it runs more than once).
            None: ``default_target_layer``'s choice, found in this same forward pass;
            where an image's map there is all zero (no positive evidence: the weighted
            activations are negative everywhere), the next output back, up to two
            more (on a Lite0 with a fitted head, 6% of the maps at its activated head were
            empty and none at the BatchNorm before it; another fine-tune had the reverse).
        method: One of ``METHODS``.
        return_raw: Also return the maps' peaks before scaling (0 for an empty map) and
            the layer explained for each image.

    Returns:
        (heatmaps (B, H, W) in [0, 1], logits (B, C)); with ``return_raw`` also (peaks
        (B,), layer names (B,)).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    x = x.detach().requires_grad_(True)  # keeps the graph even with frozen weights
    with torch.enable_grad():
        logits, outputs = _record_outputs(model, x, None if layer is None else [layer])
        if layer is not None and layer not in outputs:
            raise ValueError(f"layer {layer!r} returned no 4-D map to explain")
        layers = [layer] if layer is not None else _spatial_candidates(model, outputs)
        acts = [outputs[name] for name in layers]
        cls = logits.argmax(1) if target_class is None else torch.as_tensor(target_class, device=logits.device)
        grads = [None] * len(acts)
        if method in ("gradcam", "gradcam++"):
            grads = torch.autograd.grad(logits.gather(1, cls.view(-1, 1)).sum(), acts)
    x = x.detach()
    heat = torch.zeros(x.shape[0], *x.shape[-2:], device=x.device)
    peak = torch.zeros(x.shape[0], device=x.device)
    used = [layers[0]] * x.shape[0]
    todo = torch.arange(x.shape[0], device=x.device)  # images whose maps are still all zero
    for name, act, grad in zip(layers, acts, grads):
        act = act.detach()[todo]
        if method == "eigencam":
            cam = _eigen(act)
        elif method == "scorecam":
            cam = (_score_weights(model, x[todo], act, cls[todo]) * act).sum(1, keepdim=True)
        else:
            cam = (_weights(method, act, grad[todo]) * act).sum(1, keepdim=True)  # (b, 1, h, w)
        cam = F.interpolate(F.relu(cam.float()), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        top = cam.flatten(1).max(1).values  # (b,)
        heat[todo], peak[todo] = cam / top.clamp(min=1e-12)[:, None, None], top
        for i in todo[top > 0].tolist():
            used[i] = name
        todo = todo[top <= 0]
        if len(todo) == 0:
            break
    if return_raw:
        return heat, logits.detach(), peak, used
    return heat, logits.detach()


def top_fraction_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """(B, H, W) -> bool mask of each image's ``fraction`` of pixels with the highest score."""
    flat = scores.flatten(1)
    k = max(1, round(fraction * flat.shape[1]))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, flat.topk(k, dim=1).indices, True)
    return mask.view_as(scores)


def deletion_drops(model: nn.Module, x: torch.Tensor, heat: torch.Tensor, target: torch.Tensor,
                   fraction: float = 0.2, cells: int = 8, generator: Optional[torch.Generator] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The deletion test (Petsiuk et al., 2018) at one step: how far the target class's
    probability falls when the ``fraction`` of pixels a map ranks highest is replaced by
    a blurred copy of the image, and when an equal number of random pixels is, taken
    as whole blocks of a ``cells`` x ``cells`` grid (a map's top pixels form blobs; as
    many scattered single pixels would barely change a CNN's output).

    Returns (drop with the map's pixels removed, drop with random ones), each (B,).
    """
    from torchvision.transforms.functional import gaussian_blur

    side = x.shape[-1]
    sigma = side / 16
    blurred = gaussian_blur(x, kernel_size=2 * int(2 * sigma) + 1, sigma=sigma)
    random_blocks = torch.rand(x.shape[0], 1, cells, cells, generator=generator)
    random_scores = F.interpolate(random_blocks, size=x.shape[-2:], mode="nearest")[:, 0]
    random_scores = random_scores + 1e-6 * torch.rand(random_scores.shape, generator=generator)  # ties
    with torch.no_grad():
        probs = []
        for scores in (None, heat, random_scores):
            inp = x if scores is None else torch.where(top_fraction_mask(scores, fraction)[:, None], blurred, x)
            probs.append(model(inp).float().softmax(1).gather(1, target.view(-1, 1))[:, 0])
    return probs[0] - probs[1], probs[0] - probs[2]


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blends a [0, 1] heatmap (H, W), coloured with 'jet', over an RGB uint8 image (H, W, 3)."""
    from matplotlib import colormaps

    colored = colormaps["jet"](heatmap)[..., :3] * 255  # (H, W, 3)
    return (image * (1 - alpha) + colored * alpha).clip(0, 255).astype(np.uint8)


def captioned(image: np.ndarray, lines: Sequence[str], min_side: int = 224) -> np.ndarray:
    """``image`` (H, W, 3) uint8 enlarged (nearest) to at least ``min_side`` wide, with
    ``lines`` of text on a white strip below it, so the caption stays readable on a
    28-pixel input."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(image)
    if img.width < min_side:
        scale = -(-min_side // img.width)
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    font = ImageFont.load_default(size=13)
    line_h = 16
    out = Image.new("RGB", (img.width, img.height + line_h * len(lines) + 6), "white")
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(lines):
        draw.text((4, img.height + 3 + i * line_h), text, fill="black", font=font)
    return np.asarray(out)


def safe_name(text: str) -> str:
    """``text`` fit for a file name inside the output folder: no separators, no leading
    dots (a class named '../x' must not write outside it)."""
    import re

    return re.sub(r"[^\w.-]+", "_", text).lstrip(".") or "_"


def explain_images(checkpoint: str, paths: Sequence[str], output: str, layer: Optional[str] = None,
                   method: str = "gradcam", true_labels: Optional[Sequence[Optional[str]]] = None,
                   batch_size: int = 16) -> list[dict]:
    """Writes a captioned overlay PNG per image (predicted class and score, true class where
    ``true_labels`` gives one, layer and method), the input as the model saw it, and
    ``explain.html`` with the two side by side, into ``output``; returns what each shows.
    Images go through the model ``batch_size`` at a time."""
    from PIL import Image

    from imgcls.checkpoint import load_checkpoint
    from imgcls.preprocess import ClassificationPresetEval
    from imgcls.inference.read import read_input, split_member

    loaded = load_checkpoint(checkpoint)
    preset = ClassificationPresetEval(loaded.image_size, loaded.mean, loaded.std)
    true_labels = list(true_labels) if true_labels is not None else [None] * len(paths)
    os.makedirs(output, exist_ok=True)
    results = []
    for start in range(0, len(paths), batch_size):
        batch = paths[start:start + batch_size]
        chw = torch.stack([preset.decode(read_input(p)) for p in batch])  # (B, 3, S, S) uint8, as inference sees
        heat, logits, peak, used = grad_cam(loaded.model, preset.normalize(chw), layer=layer, method=method,
                                            return_raw=True)
        probs = logits.float().softmax(1)
        for j, path in enumerate(batch):
            i = start + j
            label, score, truth = loaded.classes[int(probs[j].argmax())], float(probs[j].max()), true_labels[i]
            stem = os.path.splitext(os.path.basename(split_member(path)[1] or path))[0]
            name = f"{i:04d}_{safe_name(stem)}_{safe_name(label)}"
            pixels = chw[j].permute(1, 2, 0).numpy()
            caption = [f"pred {label} {score:.2f}" + ("" if truth is None else f"  true {truth}"),
                       f"{method} at {used[j]}"]
            Image.fromarray(captioned(overlay(pixels, heat[j].numpy()), caption)).save(
                os.path.join(output, name + ".png"))
            Image.fromarray(pixels).save(os.path.join(output, name + "_input.png"))
            results.append({"path": path, "label": label, "score": score, "true_label": truth, "layer": used[j],
                            "method": method, "empty": bool(peak[j] <= 0),
                            "overlay": os.path.join(output, name + ".png"),
                            "input": os.path.join(output, name + "_input.png")})
    write_page(output, results)
    return results


def write_page(output: str, results: Sequence[dict]) -> str:
    """``explain.html`` in ``output``: each input beside its overlay, with the caption's facts."""
    rows = "".join(
        f"<figure><img src='{html.escape(os.path.basename(r['input']))}' alt='input'>"
        f"<img src='{html.escape(os.path.basename(r['overlay']))}' alt='overlay'>"
        f"<figcaption>{html.escape(r['path'])}<br>pred <b>{html.escape(r['label'])}</b> {r['score']:.2f}"
        + ("" if r["true_label"] is None else
           f" &middot; true <b>{html.escape(str(r['true_label']))}</b>"
           + (" &#10007;" if r["true_label"] != r["label"] else " &#10003;"))
        + f"<br>{html.escape(r['method'])} at {html.escape(r['layer'])}"
        + (" &middot; <b>empty map</b>" if r["empty"] else "") + "</figcaption></figure>"
        for r in results)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>imgcls explanations</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}}
figure{{display:inline-block;margin:0 1.5em 1.5em 0;vertical-align:top}}
img{{width:224px;image-rendering:pixelated;border:1px solid #eee;margin-right:4px;vertical-align:top}}
figcaption{{font-size:13px;max-width:460px;word-break:break-all}}</style></head>
<body><h1>imgcls explanations</h1>
<p>Each input as the model saw it, beside its class activation map (red: the regions that raise the
explained class's score most).</p>
{rows}
</body></html>
"""
    path = os.path.join(output, PAGE_FILE)
    with open(path, "w") as f:
        f.write(page)
    return path


def explain_image(loaded, preset, data: bytes, layer: Optional[str] = None) -> tuple[np.ndarray, str, float]:
    """The Grad-CAM overlay (S, S, 3) uint8 of the predicted class over the pixels
    inference sees, that class and its probability, for one image's bytes. ``loaded`` is
    a ``checkpoint.LoadedModel``, ``preset`` its ``ClassificationPresetEval``; ``imgcls
    explain`` and ``imgcls serve``'s POST /v1/explain both call this."""
    chw = preset.decode(data)  # (3, S, S) uint8
    heat, logits = grad_cam(loaded.model, preset.normalize(chw)[None], layer=layer)
    probs = logits.softmax(1)[0]
    return overlay(chw.permute(1, 2, 0).numpy(), heat[0].numpy()), loaded.classes[int(probs.argmax())], float(probs.max())
