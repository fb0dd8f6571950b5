"""The one preprocessing spec: decode, eval geometry and normalisation, for every path.

Training's caches, validation, inference, explain and the export metadata all turn a
file into a model input here, so that the same file gives the same tensor everywhere:
``decode_resized`` (JPEGs decoded at a reduced scale that keeps the resize's shorter
side), ``eval_geometry`` (shorter side to ``resize_size(S)``, centre crop S), and
``Normalize`` (``(x / 255 - mean) / std``). ``EvalPreprocess`` bundles them per model.

This module imports torch, PIL and numpy but not torchvision, whose import alone takes
about 7 s of CPU (it pulls in torch._dynamo). Ray workers that only decode images for
inference import this, so they start in about a third of the time.
"""

from __future__ import annotations

import functools
import io
import re
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from imgcls.errors import ERROR_DECODE, ERROR_EMPTY, ERROR_TOO_LARGE, ERROR_UNSUPPORTED, InputError, stable_text


class ImageDecodeError(InputError):
    """The bytes are not a usable image: not an image, corrupt or truncated; the subclasses
    below for the other reasons. ``error_type`` is the predictions table's error type."""

    error_type = ERROR_DECODE


class EmptyImageError(ImageDecodeError):
    """Zero bytes."""

    error_type = ERROR_EMPTY


class ImageTooLargeError(ImageDecodeError):
    """More pixels than ``max_pixels`` (or PIL's own decompression-bomb limit)."""

    error_type = ERROR_TOO_LARGE


class UnsupportedImageError(ImageDecodeError):
    """An image that PIL cannot decode here: a format it does not read (HEIC, JPEG XL), one
    it identifies but has no decoder for (EPS without Ghostscript, GRIB, HDF5), or a mode it
    cannot convert to RGB."""

    error_type = ERROR_UNSUPPORTED


# PIL's words for an image it identified but cannot decode (rather than a corrupt one).
_UNSUPPORTED = re.compile(r"(?i)unsupported|not supported|not available|cannot find loader|ghostscript|cannot handle"
                          r"|support not installed")


# ISO base media (HEIF) brands of still images; AVIF is read by PIL when built with libavif.
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}


def _unreadable_format(data: bytes) -> Optional[str]:
    """The name of an image format PIL does not identify, from its signature; None if not one."""
    if data[4:8] == b"ftyp":  # ISO base media: a major brand, a version, compatible brands
        size = int.from_bytes(data[:4], "big")
        brands = {data[8:12]} | {data[i:i + 4] for i in range(16, min(size, 256), 4)}
        if brands & {b"avif", b"avis"}:
            return "AVIF"
        if brands & _HEIF_BRANDS:
            return "HEIF/HEIC"
    if data.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "JPEG XL"
    return None


def decode_image(data: bytes, max_pixels: int = 64_000_000, target_size: Optional[int] = None) -> np.ndarray:
    """Decodes image bytes to an RGB uint8 array of shape (H, W, 3).

    Applies the EXIF orientation; converts grayscale, palette, RGBA, CMYK, 16-bit, 32-bit
    integer and float images to 8-bit RGB (see ``_to_rgb8``); refuses images over
    ``max_pixels`` before decoding them. For JPEG, ``target_size`` lets the decoder work
    at a reduced scale (draft mode) while keeping the shorter side at least ``target_size``.

    Raises:
        ImageDecodeError: non-image, truncated or corrupt input; its subclasses
            EmptyImageError, ImageTooLargeError and UnsupportedImageError for empty,
            oversized and undecodable (HEIC, EPS without Ghostscript...) input. The
            messages hold nothing that differs from run to run.
    """
    if not data:
        raise EmptyImageError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageTooLargeError(f"{w}x{h} image exceeds max_pixels={max_pixels} (decompression bomb?)")
            if target_size and im.format == "JPEG":
                im.draft("RGB", (target_size, target_size))
            im.load()  # surfaces truncation now rather than later
            ImageOps.exif_transpose(im, in_place=True)
            return _to_rgb8(im)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{type(e).__name__}: {e}") from None
    except Image.UnidentifiedImageError as e:  # its message names the BytesIO, with its address
        known = _unreadable_format(data)
        if known:
            raise UnsupportedImageError(f"a {known} image, which PIL cannot read") from None
        raise ImageDecodeError(f"{type(e).__name__}: cannot identify image file") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on bad data
        kind = UnsupportedImageError if _UNSUPPORTED.search(str(e)) else ImageDecodeError
        raise kind(stable_text(f"{type(e).__name__}: {e}")) from None


def _to_rgb8(im: Image.Image) -> np.ndarray:
    """A decoded PIL image -> (H, W, 3) uint8 RGB: the one conversion of every decode path
    (the training cache, inference, explain).

    One-channel images deeper than 8 bits are scaled to 0..255 by their type and range,
    rounded to the nearest value, then repeated to three channels; NaN and +-inf count as 0:
    - ``I;16*`` (16-bit): value / 65535 * 255.
    - ``I`` (32-bit integer): as-is when the largest value is at most 255, as 16-bit
      when at most 65535, else value / largest * 255; negative values give 0.
    - ``F`` (32-bit float): value * 255 when all values lie in [0, 1]; as-is when they
      lie in [0, 255]; else stretched from the image's min..max to 0..255 (an image of
      one value gives 0). A 0..255 image that is darker than 1 everywhere therefore reads
      as a 0..1 one; nothing in the file tells the two apart.
    Transparent images are composited on white; other modes go through PIL's convert.
    """
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        arr = np.nan_to_num(np.array(im, dtype=np.float32), copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        shift, scale = 0.0, 1.0
        if im.mode.startswith("I;16"):
            scale = 255 / 65535
        elif im.mode == "I":
            scale = 1.0 if hi <= 255 else 255 / 65535 if hi <= 65535 else 255 / hi
        elif lo >= 0 and hi <= 1:
            scale = 255.0
        elif lo < 0 or hi > 255:
            shift, scale = lo, (255 / (hi - lo) if hi > lo else 0.0)
        arr = np.clip(np.rint((arr - shift) * scale), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Composite on white, as most viewers show transparent areas.
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)


def resize_size(image_size: int) -> int:
    """Shorter side before the center crop, the usual 224/256 ratio."""
    return int(round(image_size / 0.875))


def eval_geometry(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, S, S) uint8: the eval preset's resize and center crop.

    The shorter side goes to ``resize_size(S)`` (bilinear, antialiased), then the
    central S x S is cut out: the same pixels as torchvision's
    ``v2.Compose([v2.Resize(resize_size(S), antialias=True), v2.CenterCrop(S)])`` on CPU.
    """
    return resize_center_crop(image, resize_size(image_size), image_size)


def resize_center_crop(image: torch.Tensor, short_side: int, crop: int) -> torch.Tensor:
    """(3, H, W) or (N, 3, H, W) uint8 -> (..., 3, crop, crop): shorter side to ``short_side``,
    then the centre.

    Bilinear and antialiased, torchvision's ``Resize(short_side)`` then ``CenterCrop(crop)``
    pixel for pixel on CPU; ``crop`` must not exceed ``short_side``. A batch of images of
    one size is resized in one call, each image exactly as on its own.
    """
    h, w = image.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = short_side, int(short_side * long / short)
    nh, nw = (new_short, new_long) if h <= w else (new_long, new_short)
    if (nh, nw) != (h, w):
        x = image if image.dim() == 4 else image[None]
        if x.is_contiguous(memory_format=torch.channels_last) and x.shape[0] == 1:
            # As torchvision does: a batch stride of numel makes the layout unambiguous,
            # so interpolate returns channels_last too (HWC rows, cheap to copy out).
            x = x.as_strided(x.shape, (x.numel(),) + x.stride()[1:])
        native = x.device.type == "cpu"  # uint8 antialiased bilinear is a CPU kernel
        y = torch.nn.functional.interpolate(x if native else x.float(), size=(nh, nw), mode="bilinear",
                                            align_corners=False, antialias=True)
        y = y if native else y.round_().clamp_(0, 255).to(torch.uint8)
        image = y if image.dim() == 4 else y[0]
    top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
    return image[..., top:top + crop, left:left + crop]


def decode_resized(data: bytes, short_side: int, side: int, max_pixels: int = 64_000_000) -> np.ndarray:
    """Image bytes -> (side, side, 3) uint8: decoded (JPEGs at a reduced scale where that
    keeps ``short_side``), then ``resize_center_crop``. With ``short_side =
    resize_size(S)`` and ``side = S`` these are the eval preset's pixels, which inference
    and the validation cache both use.

    Raises:
        ImageDecodeError: as ``decode_image``.
    """
    image = decode_image(data, max_pixels, target_size=short_side)
    return resize_center_crop(to_chw_tensor(image), short_side, side).permute(1, 2, 0).numpy()


def device_decodable_jpeg(data: bytes, max_pixels: int = 64_000_000) -> bool:
    """Whether ``DeviceJpegDecoder`` takes ``data`` as it is, from its header alone (PIL
    reads no pixels): a JPEG in RGB (YCbCr) or grayscale, of at most ``max_pixels``,
    without an EXIF rotation (the device decoder applies none). Anything else, CMYK
    JPEGs, other formats and what is not an image, goes through ``decode_resized``."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            return (im.format == "JPEG" and im.mode in ("RGB", "L") and 0 < w * h <= max_pixels
                    and im.getexif().get(0x0112, 1) == 1)
    except Exception:  # noqa: BLE001 - not an image, or a broken header: the CPU path says which
        return False


class DeviceJpegDecoder:
    """JPEG bytes -> eval-geometry uint8 images (3, S, S) on ``device``, decoded there.

    ``torchvision.io.decode_jpeg`` decodes the whole list in one call: with nvjpeg on a
    GPU, so that a node's CPUs only read files; on a CPU device with libjpeg, which is how
    the tests run this path. The eval geometry (``resize_center_crop``) then runs on the
    same device. The image is decoded at full size, where the CPU path lets PIL decode a
    large JPEG at a reduced scale first (draft mode), so the two give close but not equal
    pixels (tests/unit/test_preprocess.py bounds the difference).

    A list that fails (nvjpeg returns nothing when one image fails) is decoded image by
    image; an image that fails on its own comes back as None, and the caller decodes it
    with ``decode_resized``, which gives it the error row any other path would.
    (torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec's, whose
    ``decode_jpeg`` takes the same arguments.)
    """

    def __init__(self, image_size: int, device: torch.device):
        import torchvision.io as tvio

        self.tvio, self.device = tvio, torch.device(device)
        self.short_side, self.side = resize_size(image_size), image_size

    def _decode(self, data):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation notice, once per call
            return self.tvio.decode_jpeg(data, mode=self.tvio.ImageReadMode.RGB, device=self.device)

    def __call__(self, datas: Sequence[bytes]) -> list[Optional[torch.Tensor]]:
        if not datas:
            return []
        encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        try:
            images = self._decode(encoded)
        except RuntimeError:
            images = []
            for one in encoded:
                try:
                    images.append(self._decode(one))
                except RuntimeError:
                    images.append(None)
        return [None if im is None else resize_center_crop(im, self.short_side, self.side) for im in images]


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 array -> (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.array(image, copy=not image.flags.writeable)).permute(2, 0, 1)


class ScaleNormalize:
    """uint8 -> float32 ``(x / 255 - mean) / std``: the one normalisation of every path.

    The same numbers as ``v2.ToDtype(torch.float32, scale=True)`` then ``v2.Normalize``
    (to float rounding), in a third less time. It takes batches on any device: the
    constants are kept per device (and per image width, for ``batch_hwc``).
    - ``self(images)``: (..., 3, H, W) uint8, keeping the memory layout (a channels_last
      input gives a channels_last output, which the inference model takes without a copy);
    - ``batch_hwc(images)``: (N, H, W, 3) uint8, the layout decoders and caches hold;
    - ``chw(x)``: (N, 3, H, W) float in 0..255, what augmentation's warps produce.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.shift = torch.tensor(self.mean, dtype=torch.float32) * 255
        self.scale = 1 / (torch.tensor(self.std, dtype=torch.float32) * 255)
        self._constants: dict = {}

    def _rows(self, device: torch.device, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(bias, scale) as row vectors of 3 * ``width`` values on ``device``."""
        key = (device, width)
        if key not in self._constants:
            scale = self.scale.repeat(width)
            self._constants[key] = ((-self.shift.repeat(width) * scale).to(device), scale.to(device))
        return self._constants[key]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 image, got {image.dtype}")
        key = (image.device, "channels")
        if key not in self._constants:
            self._constants[key] = (self.shift.view(3, 1, 1).to(image.device), self.scale.view(3, 1, 1).to(image.device))
        shift, scale = self._constants[key]
        return image.to(torch.float32).sub_(shift).mul_(scale)  # a new tensor: uint8 -> float

    def to(self, device: torch.device) -> "ScaleNormalize":
        """This normalisation, its constants made on ``device`` now rather than at the first batch."""
        device = torch.device(device)
        self(torch.zeros(1, 3, 1, 1, dtype=torch.uint8, device=device))
        self._rows(device, 1)
        return self

    def batch_hwc(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3), contiguous -> float32 (N, 3, H, W) in channels_last layout.

        The same numbers as ``self(images.permute(0, 3, 1, 2))``, eight times faster: each
        image row of W pixels is one run of 3W values, and scaling it by a per-position
        row vector vectorises, where broadcasting per-channel values over the
        channels_last view does not (0.03 instead of 0.25 ms per 224 px image, one thread).
        """
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise TypeError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} {tuple(images.shape)}")
        n, h, w, c = images.shape
        bias, scale = self._rows(images.device, w)
        # (x - shift) * scale as x * scale - shift * scale, in one pass that reads uint8 and
        # writes float32 (a fifth faster than converting first and scaling in place).
        x = torch.addcmul(bias, images.contiguous().view(n * h, w * c), scale)
        return x.view(n, h, w, c).permute(0, 3, 1, 2)

    def chw(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float in 0..255 -> (N, 3, H, W) float32 channels_last."""
        bias, scale = self._rows(x.device, 1)
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=torch.channels_last)
        return torch.addcmul(bias.view(1, 3, 1, 1), x, scale.view(1, 3, 1, 1), out=out)


class ClassificationPresetEval:
    """Resize, center crop, scale to [0, 1], normalise: used by evaluation AND inference.

    Inference applies the two halves in different places: ``geometry`` (uint8 in, uint8
    out; ``preprocess.eval_geometry``, which needs no torchvision) in the CPU decode tasks,
    so that 4x fewer bytes travel to the model actors, and ``normalize`` next to the model.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.image_size = image_size
        self.geometry = functools.partial(eval_geometry, image_size=image_size)
        self.normalize = ScaleNormalize(mean, std)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:  # (3, H, W) uint8 -> (3, S, S) float
        return self.normalize(self.geometry(image))

    def decode(self, data: bytes, max_pixels: int = 64_000_000) -> torch.Tensor:
        """Image file bytes -> (3, S, S) uint8 exactly as inference, the validation and test
        caches and explain see them (``preprocess.decode_resized``: JPEGs decoded at a reduced
        scale that keeps the resize's shorter side, then the eval resize and crop)."""
        return torch.from_numpy(decode_resized(data, resize_size(self.image_size), self.image_size,
                                               max_pixels)).permute(2, 0, 1)


class ClassificationPresetTrain:
    """Random crop and flip plus the chosen augmentation, then the eval normalisation.

    The per-image definition of each ``--augment`` preset. Training itself runs the same
    presets on whole uint8 batches on the worker's device (``imgcls.training.augment.BatchAugment``);
    this one serves per-image pipelines such as the plain-PyTorch benchmark baseline.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 augment: str = "standard", magnitude: int = 9):
        from torchvision.transforms import v2  # here: importing torchvision costs seconds per process

        if augment in ("none", "light"):
            steps = [v2.Resize(resize_size(image_size), antialias=True), v2.CenterCrop(image_size)]
            if augment == "light":  # the classic small-image recipe: padded random crop and flip
                steps += [v2.RandomCrop(image_size, padding=max(1, image_size // 8), padding_mode="reflect"),
                          v2.RandomHorizontalFlip()]
        else:
            steps = [v2.RandomResizedCrop(image_size, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        if augment == "standard":
            s = magnitude / 9  # 1.0 at the default magnitude
            steps.append(v2.RandomApply([v2.RandomAffine(
                degrees=15 * s, translate=(0.1 * s, 0.1 * s), scale=(1 - 0.1 * s, 1 + 0.1 * s), shear=10 * s,
            )], p=0.5))
        elif augment == "trivialaugment":
            steps.append(v2.TrivialAugmentWide())
        elif augment == "randaugment":
            steps.append(v2.RandAugment(num_ops=2, magnitude=magnitude))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
        self.transform = v2.Compose(steps)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.transform(image)
