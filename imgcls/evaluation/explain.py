"""Grad-CAM explanations on torch hooks, and heatmap overlays as PNG files.

Grad-CAM (Selvaraju et al., 2017): weight the target layer's activation maps by the
spatial mean of the class score's gradient, sum, ReLU, upsample to the input size.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def default_target_layer(model: nn.Module) -> str:
    """The last Conv2d: the deepest layer that still has spatial resolution."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer for Grad-CAM")
    return convs[-1]


def grad_cam(model: nn.Module, x: torch.Tensor, target_class: Optional[Sequence[int]] = None,
             layer: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM heatmaps for a batch.

    Args:
        model: A classifier in eval mode.
        x: (B, 3, H, W) normalised input.
        target_class: Class per image; None explains the predicted class.
        layer: Module name to explain at; default the last Conv2d.

    Returns:
        (heatmaps (B, H, W) in [0, 1], logits (B, C)).
    """
    module = model.get_submodule(layer or default_target_layer(model))
    store = {}
    h1 = module.register_forward_hook(lambda _m, _i, out: store.__setitem__("act", out))
    h2 = module.register_full_backward_hook(lambda _m, _gi, go: store.__setitem__("grad", go[0]))
    try:
        model.zero_grad(set_to_none=True)
        x = x.detach().requires_grad_(True)  # keeps backward hooks firing even with frozen weights
        logits = model(x)
        cls = logits.argmax(1) if target_class is None else torch.as_tensor(target_class, device=logits.device)
        logits.gather(1, cls.view(-1, 1)).sum().backward()
    finally:
        h1.remove()
        h2.remove()
    act, grad = store["act"].detach(), store["grad"].detach()  # (B, K, h, w)
    weights = grad.mean(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
    cam = F.relu((weights * act).sum(1, keepdim=True))  # (B, 1, h, w)
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]  # (B, H, W)
    peak = cam.flatten(1).max(1).values.clamp(min=1e-12)[:, None, None]
    return cam / peak, logits.detach()


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blends a [0, 1] heatmap (H, W), coloured with 'jet', over an RGB uint8 image (H, W, 3)."""
    from matplotlib import colormaps

    colored = colormaps["jet"](heatmap)[..., :3] * 255  # (H, W, 3)
    return (image * (1 - alpha) + colored * alpha).clip(0, 255).astype(np.uint8)


def safe_name(text: str) -> str:
    """``text`` fit for a file name inside the output folder: no separators, no leading
    dots (a class named '../x' must not write outside it)."""
    import re

    return re.sub(r"[^\w.-]+", "_", text).lstrip(".") or "_"


def explain_images(checkpoint: str, paths: Sequence[str], output: str, layer: Optional[str] = None) -> list[dict]:
    """Writes a Grad-CAM overlay PNG per image into ``output``; returns what each shows."""
    from PIL import Image

    from imgcls.checkpoint import load_checkpoint
    from imgcls.preprocess import ClassificationPresetEval
    from imgcls.inference.read import read_input, split_member

    loaded = load_checkpoint(checkpoint)
    preset = ClassificationPresetEval(loaded.image_size, loaded.mean, loaded.std)
    os.makedirs(output, exist_ok=True)
    results = []
    for i, path in enumerate(paths):
        image, label, score = explain_image(loaded, preset, read_input(path), layer)
        stem = os.path.splitext(os.path.basename(split_member(path)[1] or path))[0]
        name = f"{i:04d}_{safe_name(stem)}_{safe_name(label)}.png"
        Image.fromarray(image).save(os.path.join(output, name))
        results.append({"path": path, "label": label, "score": score, "overlay": os.path.join(output, name)})
    return results


def explain_image(loaded, preset, data: bytes, layer: Optional[str] = None) -> tuple[np.ndarray, str, float]:
    """The Grad-CAM overlay (S, S, 3) uint8 of the predicted class over the pixels
    inference sees, that class and its probability, for one image's bytes. ``loaded`` is
    a ``checkpoint.LoadedModel``, ``preset`` its ``ClassificationPresetEval``; ``imgcls
    explain`` and ``imgcls serve``'s POST /v1/explain both call this."""
    chw = preset.decode(data)  # (3, S, S) uint8
    heat, logits = grad_cam(loaded.model, preset.normalize(chw)[None], layer=layer)
    probs = logits.softmax(1)[0]
    return overlay(chw.permute(1, 2, 0).numpy(), heat[0].numpy()), loaded.classes[int(probs.argmax())], float(probs.max())
