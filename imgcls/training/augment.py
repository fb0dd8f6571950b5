"""Training augmentation on whole uint8 batches, as tensor ops on the worker's device.

The training images are decoded and resized once into a uint8 cache (see
``stored_geometry``); uint8 travels, and float is made on the device that trains. The
presets mean what the per-image torchvision ``v2.Compose`` presets in ``preprocess.py`` mean,
but run on a whole batch at once:

* Batched, because per-image transforms cost tens of small kernel calls per image: on
  28-64 px images the Python and dispatch overhead dwarfs the arithmetic, and on a GPU
  each call is a launch. Here every step is a handful of calls for the whole batch, with
  per-sample parameters held in tensors (no loop over images; the only loops are over the
  few colour-op kinds, each applied to the samples that drew it).
* One resample, because the random resized crop, the flip and every geometric op
  (RandomAffine, or TrivialAugment's / RandAugment's shear, translate and rotate) are
  affine maps: their product is one 2x3 matrix per sample, so one affine grid and one
  bilinear ``grid_sample`` replace up to four interpolations, which would blur the image
  and cost a pass each. The samples are clamped to the crop box, so, as in the sequential
  pipeline, no pixel beyond the crop is ever read; the affine ops' zero fill is a mask
  that is 0 where they sample outside the resized crop, 1 inside it and bilinear across
  its edge (what sampling the crop with zero padding gives).

Where the meaning differs from the torchvision presets, it is on purpose:

* TrivialAugment / RandAugment resample bilinearly (torchvision: nearest), once.
* The random resized crop is not antialiased. The stored training image is only
  ``resize_size(S)`` = S / 0.875 on a side, so the crop is shrunk by at most about 1.15x
  and aliasing is negligible.
* RandAugment's two ops keep their order's meaning although geometric ops act first
  (folded into the resample): a colour op drawn before a geometric op leaves the zero
  fill black (the fill is applied after it) and takes its statistics (Contrast's mean,
  AutoContrast's extremes, Equalize's histogram) from the crop as it was before that op,
  resampled a second time for those samples only. It then acts on pixels the geometric
  op has already moved: Brightness, Color and Contrast are affine in the pixel values and
  commute with a bilinear resample; Posterize, Solarize, Equalize and Sharpness act on
  the resampled pixels instead of having their result resampled, a difference at the
  scale of one interpolation step.
* Colour ops work on float 0..255 and do not truncate to uint8 between ops; each matches
  ``torchvision.transforms.v2.functional`` on uint8 images to within 1.

Kept against the libraries (``bench/library_swaps.py --parts augment``, figures in
bench/results/library_swaps.json): milliseconds a batch from uint8 to normalised float,
2 threads (best of 5) and 1 thread (best of 7), the methods taking turns, on a quiet
2-core machine. imgcls / Kornia / a v2 loop over the images:

=================  =======================  =======================  ===============  ===============
mode               28 px, batch 128         224 px, batch 32         28 px, 1 thread  224 px, 1 thread
=================  =======================  =======================  ===============  ===============
none               0.1 / 0.7 / 3.8          0.9 / 8.0 / 6.5          0.1 / 0.6        1.9 / 7.7
light              0.4 / 2.6 / 8.8          3.9 / 13.2 / 11.8        0.4 / 2.4        7.3 / 23.5
standard           1.5 / 5.5 / 20.5         16.8 / 39.1 / 24.4       1.8 / 5.6        33.2 / 52.5
trivialaugment     3.0 / 5.1 / 22.9         21.5 / 43.6 / 24.8       3.1 / 4.7        35.9 / 29.8
randaugment        4.4 / 5.8 / 31.6         32.4 / 54.0 / 32.7       4.7 / 6.3        48.3 / 43.3
=================  =======================  =======================  ===============  ===============

* ``kornia.augmentation`` is 1.3-9x slower on 2 threads in every mode and size, and on
  one thread except TrivialAugment and RandAugment at 224 px (0.83x, 0.90x imgcls's
  time). Those two are not the same augmentation: it draws crop, flip and affine
  parameters per sample, but its ``auto.TrivialAugment`` and ``auto.RandAugment`` pick
  their op kinds once per call, so every image of a batch gets the same op (or the same
  two), only magnitudes and signs vary.
* torchvision's v2 transforms called on a batch draw one set of parameters for the whole
  batch; per-sample parameters need a loop over the images: 7-36x imgcls's time at 28 px,
  1.0-7.4x at 224 px (three runs of the timings: 1.15-1.2x in ``trivialaugment``,
  1.0-1.3x in ``randaugment``, where the loop had taken 0.69x before Sharpness's blur ran
  channels-last). On a GPU the loop runs image by image where these batch ops keep it busy.
* Accuracy, fine-tuning on bench/finetune.py's sets (test accuracy, mean of seeds 0-2,
  each library's ops swapped into every training worker): ``light`` (the recipe's) on
  ``dogs_cats_25``, imgcls 0.783 (0.712-0.827) and Kornia 0.786 (0.750-0.813);
  ``trivialaugment`` on ``dogs_cats_25``, imgcls 0.771 (0.715-0.813) and the v2 loop
  0.791 (0.750-0.813): the same within the seed spread. On ``photos_25`` every method
  scores 1.0 (saturated). The Fashion-MNIST recipe trains with ``none``, nothing to swap.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from imgcls.config import AUGMENTATIONS
from imgcls.preprocess import ScaleNormalize, resize_size


_CROP_SCALE = (0.35, 1.0)
_CROP_RATIO = (3 / 4, 4 / 3)
_NUM_BINS = 31  # torchvision's num_magnitude_bins for both TrivialAugmentWide and RandAugment

# TrivialAugmentWide's and RandAugment's op space, in torchvision's order.
_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
        "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
_OP = {name: k for k, name in enumerate(_OPS)}
_FIRST_COLOUR = _OP["Brightness"]  # ops 1.._FIRST_COLOUR-1 are geometric, the rest colour
_SIGNED = torch.tensor([name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                                 "Contrast", "Sharpness") for name in _OPS])


def stored_geometry(image_size: int, augment: str) -> tuple[int, int]:
    """Geometry of a cached training image: (shorter side after the resize, side of the centre crop).

    Args:
        image_size: S, the side of the model's input.
        augment: One of AUGMENTATIONS.

    Returns:
        ``(resize_size(S), S)`` for none/light, the eval preset's geometry, so that the
        stored image is exactly the eval image; ``(resize_size(S), resize_size(S))`` for
        the presets with a random resized crop, a square for the crop to cut from.
    """
    _check_augment(augment)
    r = resize_size(image_size)
    return (r, image_size) if augment in ("none", "light") else (r, r)


def _check_augment(augment: str) -> None:
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")


def _centre_crop_offsets(h: int, w: int, size: int) -> tuple[int, int]:
    if h < size or w < size:
        raise ValueError(f"images of {h}x{w} are smaller than the crop {size}x{size}")
    # The rounding of preprocess.resize_center_crop, so the pixels are the eval image's.
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise TypeError(f"expected uint8 (B, H, W, 3) images, got {images.dtype} {tuple(images.shape)}")


class BatchEval:
    """Evaluation preprocessing of a uint8 batch: centre crop if needed, scale, normalise.

    Args:
        image_size: S, the side of the model's input.
        mean: Per-channel mean of the 0..1 images.
        std: Per-channel standard deviation of the 0..1 images.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.image_size = image_size
        self.normalize = ScaleNormalize(mean, std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 normalised, channels_last, same device.

        Larger images are centre-cropped to S first, with ``preprocess.resize_center_crop``'s rounding.
        """
        _check_images(images)
        s = self.image_size
        top, left = _centre_crop_offsets(images.shape[1], images.shape[2], s)
        return self.normalize.batch_hwc(images[:, top:top + s, left:left + s])


class BatchAugment:
    """Training augmentation of a uint8 batch, one of AUGMENTATIONS (see the module docstring).

    Args:
        image_size: S, the side of the model's input.
        mean: Per-channel mean of the 0..1 images.
        std: Per-channel standard deviation of the 0..1 images.
        augment: ``none`` (scale and normalise), ``light`` (reflect-padded random crop and
            flip), ``standard`` (random resized crop, flip, RandomAffine with p=0.5),
            ``trivialaugment`` or ``randaugment`` (random resized crop, flip, then
            torchvision's TrivialAugmentWide or RandAugment(num_ops=2)).
        magnitude: RandAugment's magnitude bin (0-30); in ``standard`` it scales the affine
            ranges by ``magnitude / 9``.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], augment: str = "standard",
                 magnitude: int = 9):
        _check_augment(augment)
        if augment == "randaugment" and not 0 <= magnitude < _NUM_BINS:
            raise ValueError(f"randaugment magnitude must be in [0, {_NUM_BINS - 1}], got {magnitude}")
        self.image_size = image_size
        self.augment = augment
        self.magnitude = magnitude
        self.normalize = ScaleNormalize(mean, std)
        self._magnitudes = {"trivialaugment": _trivialaugment_magnitudes(),
                            "randaugment": _randaugment_magnitudes(image_size)}.get(augment)
        self._on_device: dict = {}

    def __call__(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Augments a batch.

        Args:
            images: (B, H, W, 3) uint8 on any device, stored as ``stored_geometry`` says
                (none/light also take larger images, which they centre-crop to S first).
            generator: Source of all the randomness, on the images' device; None uses
                torch's global RNG.

        Returns:
            (B, 3, S, S) float32, ``(x / 255 - mean) / std``, channels_last, on the images' device.
        """
        _check_images(images)
        if len(images) == 0:
            return torch.empty((0, 3, self.image_size, self.image_size), device=images.device,
                               memory_format=torch.channels_last)
        if self.augment == "none":
            s = self.image_size
            top, left = _centre_crop_offsets(images.shape[1], images.shape[2], s)
            return self.normalize.batch_hwc(images[:, top:top + s, left:left + s])
        if self.augment == "light":
            return self.normalize.batch_hwc(self._light(images, generator))
        b, h, w, _ = images.shape
        dev = images.device
        top, left, height, width = _random_resized_crop(b, h, w, dev, generator)
        flip = _rand((b,), dev, generator) < 0.5
        if self.augment == "standard":
            x, fill = _warp(images, top, left, height, width, flip, self._random_affine(b, dev, generator),
                            self.image_size)  # (B, 3, S, S), (B, 1, S, S)
            return self.normalize.chw(x * fill)
        op, mag = self._draw_ops(b, dev, generator)  # (B, K) each
        num_ops = op.shape[1]
        # before[k]: the product of the geometric ops drawn before op k; before[K]: all of them.
        before = [None, _op_matrix(op[:, 0], mag[:, 0], self.image_size)]
        for k in range(1, num_ops):
            before.append(before[-1] @ _op_matrix(op[:, k], mag[:, k], self.image_size))
        x, fill = _warp(images, top, left, height, width, flip, before[-1], self.image_size)
        # The geometric ops have acted (in one resample); the colour ops now run in their
        # order. A sample's zero fill is applied after its last geometric op, so that the
        # colour ops drawn before it leave the fill black, and those ops take their
        # statistics (mean, extremes, histogram) from the image they would have seen: the
        # crop with only the geometric ops drawn before them.
        stage = torch.arange(num_ops, device=dev)
        last_geo = torch.where(_is_geometric(op), stage, -1).amax(1)  # (B,), -1: no geometric op
        for k in range(num_ops + 1):
            now = last_geo == k - 1
            if k > 0 and bool(now.any()):
                x = x * torch.where(now.view(-1, 1, 1, 1), fill, 1.0)
            if k == num_ops:
                break
            early = torch.nonzero((last_geo > k) & _has_statistics(op[:, k]))[:, 0]  # (N,)
            source = None
            if len(early):
                seen, seen_fill = _warp(images.index_select(0, early), top[early], left[early], height[early],
                                        width[early], flip[early], None if k == 0 else before[k][early],
                                        self.image_size)
                source = x.index_copy(0, early, seen if seen_fill is None else seen * seen_fill)
            x = _apply_colour_ops_(x, op[:, k], mag[:, k], source)
        return self.normalize.chw(x)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The (14, 31) magnitudes per op and bin, and the (14,) signed ops, on `device`."""
        if device not in self._on_device:
            self._on_device[device] = (self._magnitudes.to(device), _SIGNED.to(device))
        return self._on_device[device]

    def _draw_ops(self, b: int, device: torch.device,
                  generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """The auto-augment ops of B samples, in order: op indices into _OPS and signed magnitudes, (B, K) each.

        TrivialAugmentWide: one op, its magnitude bin drawn uniformly; RandAugment: two ops
        at the fixed magnitude bin. Signed ops are negated with probability 0.5.
        """
        table, signed = self._tables(device)
        if self.augment == "trivialaugment":
            op = torch.randint(len(_OPS), (b, 1), device=device, generator=generator)
            mag = table[op, torch.randint(_NUM_BINS, (b, 1), device=device, generator=generator)]
        else:
            op = torch.randint(len(_OPS), (b, 2), device=device, generator=generator)
            mag = table[:, self.magnitude][op]
        negate = signed[op] & (_rand(op.shape, device, generator) < 0.5)
        return op, torch.where(negate, -mag, mag)

    def _light(self, images: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, S, S, 3) uint8: reflect-padded random crop, then flip (p=0.5)."""
        b, h, w, c = images.shape
        s, dev = self.image_size, images.device
        top, left = _centre_crop_offsets(h, w, s)
        pad = max(1, s // 8)
        offsets = torch.randint(2 * pad + 1, (2, b, 1), device=dev, generator=generator)
        flip = _rand((b, 1), dev, generator) < 0.5
        r = torch.arange(s, device=dev) - pad
        # Index gathers instead of a padded copy: a window of the padded image is, per axis,
        # the range offset - pad + [0, S), reflected back into [0, S) (no edge repeat).
        rows, cols = _reflect(offsets[0] + r, s), _reflect(offsets[1] + r, s)  # (B, S) each
        cols = torch.where(flip, cols.flip(1), cols)
        base = torch.arange(b, device=dev).view(b, 1, 1) * (h * w)
        index = base + (rows + top).unsqueeze(2) * w + (cols + left).unsqueeze(1)  # (B, S, S)
        # index_select copies whole 3-byte pixels, 3x faster than advanced indexing.
        return images.reshape(b * h * w, c).index_select(0, index.view(-1)).view(b, s, s, c)

    def _random_affine(self, b: int, device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
        """RandomApply(RandomAffine(...), p=0.5) parameters as (B, 3, 3) sampling matrices."""
        s = self.magnitude / 9
        u = _rand((6, b), device, generator) * 2 - 1  # uniform in [-1, 1)
        apply = u[0] < 0
        max_t = 0.1 * s * self.image_size
        angle = torch.where(apply, 15 * s * u[1], 0.0)
        tx = torch.where(apply, (max_t * u[2]).round(), 0.0)  # RandomAffine translates by whole pixels
        ty = torch.where(apply, (max_t * u[3]).round(), 0.0)
        scale = torch.where(apply, 1 + 0.1 * s * u[4], 1.0)
        shear_x = torch.where(apply, 10 * s * u[5], 0.0)
        zero = torch.zeros_like(angle)
        return _affine_matrix(angle, tx, ty, scale, shear_x, zero, zero, zero, self.image_size)


def _rand(shape, device, generator) -> torch.Tensor:
    return torch.rand(shape, device=device, generator=generator)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def _random_resized_crop(b: int, h: int, w: int, device: torch.device, generator: Optional[torch.Generator],
                         scale: tuple[float, float] = _CROP_SCALE, ratio: tuple[float, float] = _CROP_RATIO):
    """RandomResizedCrop's boxes for B images of h x w: (top, left, height, width), (B,) float each.

    torchvision's rule, batched: ten tries per sample, the first box that fits wins,
    else the central crop clamped to the ratio range.
    """
    u = _rand((4, b, 10), device, generator)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])
    cw = torch.sqrt(area * aspect).round()  # (B, 10)
    ch = torch.sqrt(area / aspect).round()
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits
    cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
    top = (u[2].gather(1, first)[:, 0] * (h - ch + 1)).floor()
    left = (u[3].gather(1, first)[:, 0] * (w - cw + 1)).floor()
    in_ratio = w / h
    if in_ratio < min(ratio):
        fw, fh = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(h * max(ratio))), h
    else:
        fw, fh = w, h
    found = fits.any(1)
    return (torch.where(found, top, float((h - fh) // 2)), torch.where(found, left, float((w - fw) // 2)),
            torch.where(found, ch, float(fh)), torch.where(found, cw, float(fw)))


def _affine_matrix(angle, tx, ty, scale, shear_x, shear_y, cx, cy, size: int) -> torch.Tensor:
    """Sampling matrices of torchvision's ``F.affine`` on a size x size image, (B, 3, 3).

    Each argument is (B,) float: angle and shears in degrees, translation in pixels, the
    centre in pixels from the image centre. The matrix maps output coordinates to input
    coordinates, both normalised to [-1, 1] (``affine_grid``, align_corners=False); it is
    torchvision's ``_get_inverse_affine_matrix`` with the translation divided by size / 2.
    """
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    tan_sx = torch.tan(sx)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * tan_sx + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * tan_sx
    m00, m01, m10, m11 = d / scale, -b / scale, -c / scale, a / scale
    px, py = cx + tx, cy + ty
    m02 = cx - m00 * px - m01 * py
    m12 = cy - m10 * px - m11 * py
    half = size / 2
    zero, one = torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack([torch.stack([m00, m01, m02 / half], 1), torch.stack([m10, m11, m12 / half], 1),
                        torch.stack([zero, zero, one], 1)], 1)


def _is_geometric(op: torch.Tensor) -> torch.Tensor:
    return (op > 0) & (op < _FIRST_COLOUR)


def _op_matrix(op: torch.Tensor, mag: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, 3) sampling matrices of the auto-augment geometric ops (identity for the others).

    As torchvision's ``_apply_image_or_video_transform``: shears by atan(magnitude) about
    the top-left corner, translations by whole pixels, rotation about the centre.
    """
    zero = torch.zeros_like(mag)
    shear = torch.rad2deg(torch.atan(mag))
    corner = torch.where((op == _OP["ShearX"]) | (op == _OP["ShearY"]), -size / 2, 0.0)
    return _affine_matrix(
        angle=torch.where(op == _OP["Rotate"], -mag, zero),  # F.rotate's angle is F.affine's, negated
        tx=torch.where(op == _OP["TranslateX"], mag.trunc(), zero),
        ty=torch.where(op == _OP["TranslateY"], mag.trunc(), zero),
        scale=torch.ones_like(mag),
        shear_x=torch.where(op == _OP["ShearX"], shear, zero),
        shear_y=torch.where(op == _OP["ShearY"], shear, zero),
        cx=corner, cy=corner, size=size)


def _trivialaugment_magnitudes() -> torch.Tensor:
    """(14, 31) magnitudes of TrivialAugmentWide's ops per bin, as torchvision computes them."""
    lin = torch.linspace(0.0, 0.99, _NUM_BINS)
    posterize = (8 - (torch.arange(_NUM_BINS) / ((_NUM_BINS - 1) / 6))).round().float()
    return _magnitude_table(shear=lin, translate=torch.linspace(0.0, 32.0, _NUM_BINS),
                            rotate=torch.linspace(0.0, 135.0, _NUM_BINS), colour=lin, posterize=posterize)


def _randaugment_magnitudes(size: int) -> torch.Tensor:
    """(14, 31) magnitudes of RandAugment's ops per bin for a size x size image."""
    posterize = (8 - (torch.arange(_NUM_BINS) / ((_NUM_BINS - 1) / 4))).round().float()
    return _magnitude_table(shear=torch.linspace(0.0, 0.3, _NUM_BINS),
                            translate=torch.linspace(0.0, 150.0 / 331.0 * size, _NUM_BINS),
                            rotate=torch.linspace(0.0, 30.0, _NUM_BINS), colour=torch.linspace(0.0, 0.9, _NUM_BINS),
                            posterize=posterize)


def _magnitude_table(shear, translate, rotate, colour, posterize) -> torch.Tensor:
    zero = torch.zeros(_NUM_BINS)
    rows = {"Identity": zero, "ShearX": shear, "ShearY": shear, "TranslateX": translate, "TranslateY": translate,
            "Rotate": rotate, "Brightness": colour, "Color": colour, "Contrast": colour, "Sharpness": colour,
            "Posterize": posterize, "Solarize": torch.linspace(1.0, 0.0, _NUM_BINS), "AutoContrast": zero,
            "Equalize": zero}
    return torch.stack([rows[name] for name in _OPS])


def _warp(images: torch.Tensor, top, left, height, width, flip: torch.Tensor, geo: Optional[torch.Tensor],
          size: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Crop, resize, flip and affine ops in one bilinear resample.

    Args:
        images: (B, H, W, 3) uint8.
        top, left, height, width: (B,) float, the crop boxes in pixels.
        flip: (B,) bool, mirror the crop.
        geo: (B, 3, 3) sampling matrices of the ops after the flip (``_affine_matrix``), or None.
        size: S.

    Returns:
        (B, 3, S, S) float 0..255, and the (B, 1, S, S) fill mask of the affine ops (1 inside
        the transformed crop, 0 where they fill, bilinear in between) or None without them.
    """
    b, h, w, _ = images.shape
    x = images.permute(0, 3, 1, 2).float()  # (B, 3, H, W) channels_last, which grid_sample reads fastest
    theta = torch.diag_embed(torch.stack([1 - 2 * flip.float(), torch.ones_like(top), torch.ones_like(top)], 1))
    if geo is not None:
        theta = theta @ geo  # (B, 3, 3)
    # The crop box as a map from the resized crop's [-1, 1] to the image's normalised
    # coordinates, and the centres of its first and last pixels, to which the samples are
    # clamped: resizing the crop repeats its edge pixels, it never reads beyond them.
    span = torch.stack([width / w, height / h], 1)  # (B, 2)
    centre = torch.stack([(2 * left + width) / w - 1, (2 * top + height) / h - 1], 1)  # (B, 2)
    first = torch.stack([(2 * left + 1) / w - 1, (2 * top + 1) / h - 1], 1)  # (B, 2)
    last = torch.stack([(2 * (left + width) - 1) / w - 1, (2 * (top + height) - 1) / h - 1], 1)  # (B, 2)
    # Pixel centres of the output, normalised as affine_grid(align_corners=False) does; the
    # grid is built per axis by broadcasting, 2.5x faster than affine_grid on the CPU.
    base = (torch.arange(size, device=x.device, dtype=torch.float32) * 2 + 1) / size - 1
    cols, rows = base.view(1, 1, size), base.view(1, size, 1)
    grid = torch.empty(b, size, size, 2, device=x.device)  # (B, S, S, 2) sampling points in the image
    fill = None
    for k in range(2):
        t0, t1, t2 = (theta[:, k, i].view(b, 1, 1) for i in range(3))
        g = torch.addcmul(torch.addcmul(t2, t1, rows), t0, cols)  # (B, S, S) in the resized crop
        torch.clamp(torch.addcmul(centre[:, k].view(b, 1, 1), g, span[:, k].view(b, 1, 1)),
                    first[:, k].view(b, 1, 1), last[:, k].view(b, 1, 1), out=grid[..., k])
        if geo is not None:
            # The bilinear weight of a ones crop with zero padding (what sampling the resized
            # crop with zero padding would keep): per axis clamp(min(p + 1, S - p), 0, 1) at
            # the pixel coordinate p = (g + 1) S / 2 - 1/2.
            m = torch.add((size + 1) / 2, g.abs_(), alpha=-size / 2).clamp_(0, 1)
            fill = m if fill is None else fill.mul_(m)
    # Every sample lies inside the image (clamped above); the affine ops' fill is the mask's.
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return x, (None if fill is None else fill.unsqueeze(1))


# ---------------------------------------------------------------------------------
# Colour ops: (N, 3, H, W) float 0..255 and (N,) magnitudes -> (N, 3, H, W) float 0..255.
# ``source``, where given, is the image the statistics come from (default: x itself).


def _has_statistics(op: torch.Tensor) -> torch.Tensor:
    return (op == _OP["Contrast"]) | (op == _OP["AutoContrast"]) | (op == _OP["Equalize"])


def _apply_colour_ops_(x: torch.Tensor, op: torch.Tensor, mag: torch.Tensor,
                       source: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Applies each sample's colour op in place, grouped by op kind (geometric ops and Identity pass).

    Args:
        x: (B, 3, H, W) float 0..255.
        op: (B,) indices into _OPS.
        mag: (B,) signed magnitudes.
        source: (B, 3, H, W) images that Contrast, AutoContrast and Equalize take their
            statistics from, or None for x itself.
    """
    order = torch.argsort(op, stable=True)
    counts = torch.bincount(op, minlength=len(_OPS)).tolist()  # the one host sync per stage
    start = 0
    for k, n in enumerate(counts):
        idx = order[start:start + n]
        start += n
        if n == 0 or k < _FIRST_COLOUR:
            continue
        src = None if source is None else source.index_select(0, idx)
        x.index_copy_(0, idx, _COLOUR_OPS[_OPS[k]](x.index_select(0, idx), mag.index_select(0, idx), src))
    return x


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W), floored as torchvision does for uint8 images."""
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (x * f).add_(other * (1 - f)).clamp_(0, 255)


def _brightness(x, mag, source=None):
    return (x * (1 + mag).view(-1, 1, 1, 1)).clamp_(0, 255)


def _saturation(x, mag, source=None):
    return _blend(x, _grayscale(x), 1 + mag)


def _contrast(x, mag, source=None):
    mean = _grayscale(x if source is None else source).mean((1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
    return _blend(x, mean, 1 + mag)


def _sharpness(x, mag, source=None):
    if x.shape[-1] <= 2 or x.shape[-2] <= 2:
        return x
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device) / 13
    # Channels-last: oneDNN's depthwise 3x3 on a contiguous NCHW batch (what the resample
    # gives) took 10x as long on the CPU, a tenth of a 224 px TrivialAugment batch's time.
    blurred = F.conv2d(x.contiguous(memory_format=torch.channels_last), kernel.expand(3, 1, 3, 3),
                       groups=3).round_()  # (N, 3, H-2, W-2)
    out = x.clone()
    inner = out[..., 1:-1, 1:-1]  # torchvision leaves the one-pixel border as it is
    inner.add_((blurred - inner).mul_((-mag).view(-1, 1, 1, 1)))  # x + (1 - factor) * (blurred - x)
    return out.clamp_(0, 255)


def _posterize(x, mag, source=None):
    step = torch.pow(2.0, 8 - mag.trunc()).view(-1, 1, 1, 1)  # keep the top `bits` bits
    return torch.div(x.round(), step, rounding_mode="floor").mul_(step)


def _solarize(x, mag, source=None):
    threshold = (255 * mag).view(-1, 1, 1, 1)
    return torch.where(x.round() >= threshold, 255 - x, x)


def _autocontrast(x, mag=None, source=None):
    source = x if source is None else source
    # Rounded as uint8 extremes would be, so that interpolation noise on a flat channel
    # is not stretched to full range; a constant channel stays as it is.
    lo, hi = source.amin((2, 3), keepdim=True).round_(), source.amax((2, 3), keepdim=True).round_()  # (N, 3, 1, 1)
    flat = hi <= lo
    lo = torch.where(flat, 0.0, lo)
    gain = torch.where(flat, 1.0, 255 / (hi - lo))
    return ((x - lo) * gain).clamp_(0, 255)


def _equalize(x, mag=None, source=None):
    n, c = x.shape[:2]
    offset = torch.arange(n * c, device=x.device).view(n, c, 1, 1) * 256  # a histogram per image and channel
    index = x.round().clamp_(0, 255).long() + offset  # (N, 3, H, W)
    counted = index if source is None else source.round().clamp_(0, 255).long() + offset
    hist = torch.bincount(counted.flatten(), minlength=n * c * 256).view(n * c, 256)
    # PIL's (and torchvision's) lookup table: lut[k] = (cum[k-1] + step // 2) // step, where
    # step counts the pixels off the top non-empty bin, over 255.
    cum = hist.cumsum(1)
    top = hist.gather(1, cum.argmax(1, keepdim=True))  # the last non-empty bin
    step = torch.div(cum[:, -1:] - top, 255, rounding_mode="floor")
    lut = torch.div(cum[:, :-1] + step // 2, step.clamp(min=1), rounding_mode="floor").clamp_(0, 255)
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut], 1).to(x.dtype)  # (N*3, 256)
    equalized = lut.flatten()[index]
    return torch.where((step > 0).view(n, c, 1, 1), equalized, x)


_COLOUR_OPS = {"Brightness": _brightness, "Color": _saturation, "Contrast": _contrast, "Sharpness": _sharpness,
               "Posterize": _posterize, "Solarize": _solarize, "AutoContrast": _autocontrast, "Equalize": _equalize}


# ---------------------------------------------------------------------------------
# Batch-level MixUp / CutMix


def mixup_cutmix(images: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup_alpha: float = 0.0,
                 cutmix_alpha: float = 0.0, label_smoothing: float = 0.0,
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-level MixUp or CutMix, as timm's ``Mixup`` in mode 'batch'.

    The batch is mixed with itself reversed, with weight lam ~ Beta(alpha, alpha). With
    both alphas > 0 each call picks MixUp or CutMix with probability 0.5. CutMix pastes a
    box of about (1 - lam) of the area from the reversed batch and sets lam to the pasted
    area's complement.

    Args:
        images: (B, C, H, W) float.
        labels: (B,) int64 class indices.
        num_classes: K.
        mixup_alpha: MixUp's Beta parameter; 0 is off.
        cutmix_alpha: CutMix's Beta parameter; 0 is off.
        label_smoothing: Smoothing of the one-hot targets (timm's: off value s / K).
        generator: Source of the randomness, on the images' device; None uses torch's global RNG.

    Returns:
        The mixed images (a new tensor; the input when nothing is mixed) and (B, K) float32
        soft targets whose rows sum to 1.

    Kept over the libraries (``bench/library_swaps.py``, part ``mixup``): given this lam and
    box, torchvision's ``v2.MixUp`` / ``CutMix`` and timm's ``Mixup`` give the same images and
    targets (within 1.2e-7), but neither draws from a generator it is given; timm's refuses
    odd batches (an epoch's last batch can be one) and its box is one pixel longer where
    sqrt(1 - lam) * side is odd (this box is torchvision's); torchvision pairs each image
    with the one before it, has no smoothing, and took about twice this function's CPU time
    on 64 x 3 x 224 x 224 (timm: the same to within the noise).
    """
    off = label_smoothing / num_classes
    onehot = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    onehot.scatter_(1, labels.view(-1, 1), 1 - label_smoothing + off)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, onehot
    dev = images.device
    u = torch.rand(3, device=dev, generator=generator).tolist()
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or u[0] < 0.5)
    # torch has no Beta sampler that takes a generator: a seed drawn from it drives numpy's.
    seed = int(torch.randint(2 ** 62, (1,), device=dev, generator=generator).item())
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    # One new batch-sized tensor each way (a fresh large allocation costs page faults): only
    # the box is reversed for CutMix, and MixUp blends into the reversed copy in place.
    if use_cutmix:
        h, w = images.shape[-2:]
        ratio = math.sqrt(1 - lam)
        cut_h, cut_w = int(h * ratio), int(w * ratio)
        cy, cx = min(int(u[1] * h), h - 1), min(int(u[2] * w), w - 1)
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        mixed = images.clone()
        mixed[..., y0:y1, x0:x1] = images[..., y0:y1, x0:x1].flip(0)
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        mixed = images.flip(0).lerp_(images, lam)  # lam * images + (1 - lam) * reversed
    return mixed, onehot * lam + onehot.flip(0) * (1 - lam)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets.

    Args:
        logits: (B, K).
        targets: (B, K), rows summing to 1.

    Returns:
        The mean over the batch of ``-(targets * log_softmax(logits)).sum(1)``, a scalar.
    """
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


if __name__ == "__main__":
    # Per-image cost of each preset on this machine (its GPU when it has one): the median
    # of 20 batches, with the stored geometry each preset reads.
    import time

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device).manual_seed(0)
    print(f"device {device}, {torch.get_num_threads()} threads")
    for size, batch in ((28, 256), (64, 128)):
        for preset in AUGMENTATIONS:
            side = stored_geometry(size, preset)[1]
            data = torch.randint(0, 256, (batch, side, side, 3), dtype=torch.uint8, device=device, generator=gen)
            augment = BatchAugment(size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), preset)
            times = []
            for _ in range(23):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                augment(data, gen)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            ms = sorted(times[3:])[10] / batch * 1e3
            print(f"{size:3d} px  B={batch:3d}  {preset:15s} {ms:.4f} ms/image")
