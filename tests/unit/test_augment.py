"""Batched training augmentation against torchvision's per-image functional ops."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib import cbook
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from imgcls.training import augment as A
from imgcls.training.augment import (AUGMENTATIONS, BatchAugment, BatchEval, mixup_cutmix, soft_cross_entropy,
    stored_geometry)
from imgcls.config import AUGMENTATIONS as CONFIG_AUGMENTATIONS
from imgcls.preprocess import ScaleNormalize, resize_center_crop, resize_size, to_chw_tensor

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def photo():
    """A real photo, (3, 400, 327) uint8 (a non-square, textured, natural image)."""
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        image = np.asarray(Image.open(f).convert("RGB").resize((327, 400), Image.BILINEAR))
    return to_chw_tensor(image).contiguous()


def stored(photo, size, preset):
    """The photo as the cache stores it for `preset`: (H, W, 3) uint8."""
    short, crop = stored_geometry(size, preset)
    return resize_center_crop(photo, short, crop).permute(1, 2, 0).contiguous()


def denormalize(x):
    """(B, 3, H, W) normalised -> float 0..255."""
    return x * torch.tensor(STD).view(1, 3, 1, 1) * 255 + torch.tensor(MEAN).view(1, 3, 1, 1) * 255


def close_to_uint8(mine, reference):
    """Float 0..255 against torchvision's uint8 result: within 1 (torchvision truncates)."""
    return (mine - reference.float()).abs().max().item() <= 1 + 1e-3


def test_stored_geometry_per_preset():
    assert AUGMENTATIONS == CONFIG_AUGMENTATIONS
    assert resize_size(28) == 32 and resize_size(224) == 256
    for size in (28, 224):
        r = resize_size(size)
        assert stored_geometry(size, "none") == stored_geometry(size, "light") == (r, size)
        for preset in ("standard", "trivialaugment", "randaugment"):
            assert stored_geometry(size, preset) == (r, r)
    with pytest.raises(ValueError, match="augment must be one of"):
        stored_geometry(28, "heavy")


def test_none_and_eval_are_scale_normalize():
    images = torch.randint(0, 256, (5, 20, 20, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    reference = ScaleNormalize(MEAN, STD)
    out = BatchAugment(20, MEAN, STD, "none")(images)
    assert torch.equal(out, reference.batch_hwc(images))
    assert torch.equal(BatchEval(20, MEAN, STD)(images), out)
    torch.testing.assert_close(out, reference(images.permute(0, 3, 1, 2)), rtol=0, atol=1e-5)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)


def test_eval_centre_crops_larger_images_as_resize_center_crop():
    images = torch.randint(0, 256, (3, 31, 34, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = BatchEval(28, MEAN, STD)(images)
    crops = torch.stack([resize_center_crop(im.permute(2, 0, 1), 31, 28) for im in images])  # (B, 3, 28, 28)
    torch.testing.assert_close(out, ScaleNormalize(MEAN, STD)(crops), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="smaller than the crop"):
        BatchEval(32, MEAN, STD)(images)


def test_light_is_a_window_of_the_reflect_padded_image_or_its_mirror():
    size, batch = 16, 96
    pad = size // 8
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=gen)
    out = BatchAugment(size, MEAN, STD, "light")(images, torch.Generator().manual_seed(1))
    assert out.shape == (batch, 3, size, size) and out.is_contiguous(memory_format=torch.channels_last)
    pixels = denormalize(out).round()
    assert (pixels - denormalize(out)).abs().max() < 0.01  # exact pixels, no interpolation
    padded = F.pad(images.permute(0, 3, 1, 2).float(), [pad] * 4, mode="reflect")  # (B, 3, S+2p, S+2p)
    found = torch.zeros(batch, dtype=torch.bool)
    seen = set()
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            window = padded[:, :, dy:dy + size, dx:dx + size]
            for flip in (False, True):
                candidate = window.flip(-1) if flip else window
                match = (candidate == pixels).flatten(1).all(1)  # noise images: at most one window matches
                found |= match
                if match.any():
                    seen.add((dy, dx, flip))
    assert found.all()
    assert {flip for _, _, flip in seen} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in seen}) >= 10


@pytest.fixture(scope="module")
def small_photo(photo):
    """(1, 3, 56, 48) float 0..255 of integer values, and the (3, 56, 48) uint8 it came from."""
    image = TF.resize(photo, [56, 48], antialias=True)
    assert image.shape == (3, 56, 48)
    return image.float()[None], image


@pytest.mark.parametrize("name,reference", [
    ("Brightness", lambda im, m: TF.adjust_brightness(im, 1 + m)),
    ("Color", lambda im, m: TF.adjust_saturation(im, 1 + m)),
    ("Contrast", lambda im, m: TF.adjust_contrast(im, 1 + m)),
    ("Sharpness", lambda im, m: TF.adjust_sharpness(im, 1 + m)),
])
def test_blend_ops_match_torchvision_per_sample(small_photo, name, reference):
    x, image = small_photo
    mags = torch.tensor([0.0, 0.3, -0.5, 0.99, -0.99, 0.77])
    out = A._COLOUR_OPS[name](x.expand(len(mags), -1, -1, -1), mags, None)  # one call, a factor per sample
    for k, m in enumerate(mags.tolist()):
        assert close_to_uint8(out[k], reference(image, m)), (name, m)


def test_posterize_solarize_autocontrast_equalize_match_torchvision(small_photo):
    x, image = small_photo
    bits = torch.arange(1.0, 9.0)
    out = A._posterize(x.expand(8, -1, -1, -1), bits)
    for k, b in enumerate(bits.int().tolist()):
        assert torch.equal(out[k], TF.posterize(image, b).float())
    levels = torch.linspace(1.0, 0.0, 31)[::5]  # the solarize magnitudes, thresholds 255 * m
    out = A._solarize(x.expand(len(levels), -1, -1, -1), levels)
    for k, m in enumerate(levels.tolist()):
        assert torch.equal(out[k], TF.solarize(image, 255 * m).float())
    dull = (image.float() * 0.4 + 60).to(torch.uint8)  # a low-contrast image for autocontrast to stretch
    assert close_to_uint8(A._autocontrast(dull.float()[None])[0], TF.autocontrast(dull))
    assert torch.equal(A._equalize(x)[0], TF.equalize(image).float())
    assert torch.equal(A._equalize(dull.float()[None])[0], TF.equalize(dull).float())
    flat = torch.full((1, 3, 8, 8), 77.0)  # constant: both leave it as it is
    assert torch.equal(A._equalize(flat), flat) and torch.equal(A._autocontrast(flat), flat)


def test_grouped_colour_ops_equal_each_op_alone(small_photo):
    x, _ = small_photo
    names = ["Identity", "Equalize", "Brightness", "Rotate", "Posterize", "Brightness", "Contrast", "Solarize",
             "AutoContrast", "Color", "Sharpness", "Equalize"]
    op = torch.tensor([A._OP[n] for n in names])
    mag = torch.tensor([0.0, 0.0, 0.5, 30.0, 3.0, -0.4, 0.6, 0.5, 0.0, -0.9, 0.8, 0.0])
    batch = torch.cat([x.roll(7 * k, dims=-1) for k in range(len(names))])  # a different image per sample
    out = A._apply_colour_ops_(batch.clone(), op, mag)
    for k, n in enumerate(names):
        expected = batch[k:k + 1] if n in ("Identity", "Rotate") else A._COLOUR_OPS[n](batch[k:k + 1], mag[k:k + 1])
        assert torch.equal(out[k:k + 1], expected), n


@pytest.mark.parametrize("name", ["Contrast", "AutoContrast", "Equalize"])
def test_statistics_can_come_from_another_image(small_photo, name):
    x, _ = small_photo
    dull = x * 0.4 + 60
    op = A._COLOUR_OPS[name]
    mag = torch.tensor([0.5])
    # the op is a per-pixel map fitted to the source: mirroring the input mirrors the output
    torch.testing.assert_close(op(dull.flip(-1), mag, dull), op(dull, mag).flip(-1))
    assert not torch.allclose(op(dull, mag, x), op(dull, mag), atol=2)


def warp(images_hwc, top, left, height, width, flip=False, geo=None, size=None, with_fill=False):
    """One sample through A._warp with the fill applied: (3, S, S) float 0..255 (and the (S, S) fill mask)."""
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    out, fill = A._warp(images_hwc[None], one(top), one(left), one(height), one(width), torch.tensor([flip]), geo,
                        size or images_hwc.shape[0])
    out = (out if fill is None else out * fill)[0]
    return (out, None if fill is None else fill[0, 0]) if with_fill else out


def test_identity_crop_resize_and_flip(photo):
    image = stored(photo, 32, "standard")  # (37, 37, 3)
    r = image.shape[0]
    chw = image.permute(2, 0, 1).float()
    torch.testing.assert_close(warp(image, 0, 0, r, r), chw, rtol=0, atol=1e-3)  # nothing moves
    assert torch.equal(warp(image, 0, 0, r, r, flip=True).round(), chw.flip(-1))
    # scale=1 and ratio=1 over the whole image: the plain bilinear resize (not antialiased)
    resized = F.interpolate(chw[None], size=(32, 32), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(warp(image, 0, 0, r, r, size=32), resized, rtol=0, atol=1e-3)
    antialiased = TF.resize(image.permute(2, 0, 1), [32, 32], antialias=True).float()
    assert (warp(image, 0, 0, r, r, size=32) - antialiased).abs().mean() < 2
    # a box as big as the output is an exact crop: rows are top, columns are left
    tall = torch.cat([image, image.flip(0)], 0)  # (74, 37, 3), not square
    crop = warp(tall, 30, 4, 28, 28, size=28)
    assert torch.equal(crop.round(), tall[30:58, 4:32].permute(2, 0, 1).float())
    # enlarging repeats the image's edge as a resize does (no dark border)
    enlarged = F.interpolate(chw[None], size=(48, 48), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(warp(image, 0, 0, r, r, size=48), enlarged, rtol=0, atol=1e-3)
    # a box inside the image: the same, the pixels around the box are not read
    box = tall[30:60, 13:29].permute(2, 0, 1).float()  # (3, 30, 16)
    enlarged = F.interpolate(box[None], size=(40, 40), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(warp(tall, 30, 13, 30, 16, size=40), enlarged, rtol=0, atol=1e-3)


GEOMETRIC_CASES = [
    ("ShearX", 0.3, lambda im, m: TF.affine(im, angle=0.0, translate=[0, 0], scale=1.0, center=[0, 0],
                                            shear=[math.degrees(math.atan(m)), 0.0], **BILINEAR)),
    ("ShearY", -0.5, lambda im, m: TF.affine(im, angle=0.0, translate=[0, 0], scale=1.0, center=[0, 0],
                                             shear=[0.0, math.degrees(math.atan(m))], **BILINEAR)),
    ("TranslateX", 7.6, lambda im, m: TF.affine(im, angle=0.0, translate=[int(m), 0], scale=1.0, shear=[0.0, 0.0],
                                                **BILINEAR)),
    ("TranslateY", -5.2, lambda im, m: TF.affine(im, angle=0.0, translate=[0, int(m)], scale=1.0, shear=[0.0, 0.0],
                                                 **BILINEAR)),
    ("Rotate", 30.0, lambda im, m: TF.rotate(im, m, **BILINEAR)),
    ("Rotate", -100.0, lambda im, m: TF.rotate(im, m, **BILINEAR)),
]
BILINEAR = dict(interpolation=InterpolationMode.BILINEAR)  # fill None: zero padding


def assert_like_torchvision_affine(mine, fill, expected):
    """Same pixels inside the transformed image, black fill outside, a half-pixel seam between."""
    inside, outside = fill == 1, fill == 0
    assert inside.float().mean() > 0.3 and close_to_uint8(mine[:, inside], expected[:, inside])
    assert (mine[:, outside] == 0).all() and (expected[:, outside] == 0).all()
    assert (mine - expected.float()).abs().mean() < 1


@pytest.mark.parametrize("name,mag,reference", GEOMETRIC_CASES)
def test_geometric_ops_match_torchvision(photo, name, mag, reference):
    image = stored(photo, 40, "none")  # (40, 40, 3)
    geo = A._op_matrix(torch.tensor([A._OP[name]]), torch.tensor([mag]), 40)
    mine, fill = warp(image, 0, 0, 40, 40, geo=geo, with_fill=True)
    assert_like_torchvision_affine(mine, fill, reference(image.permute(2, 0, 1), mag))


def test_random_affine_matrix_matches_torchvision(photo):
    image = stored(photo, 40, "none")
    angle, tx, ty, scale, shear = 12.0, 3.0, -4.0, 1.08, -7.0
    v = lambda *a: [torch.tensor([float(x)]) for x in a]  # noqa: E731
    geo = A._affine_matrix(*v(angle, tx, ty, scale, shear, 0, 0, 0), size=40)
    expected = TF.affine(image.permute(2, 0, 1), angle=angle, translate=[tx, ty], scale=scale, shear=[shear, 0.0],
                         **BILINEAR)
    assert_like_torchvision_affine(*warp(image, 0, 0, 40, 40, geo=geo, with_fill=True), expected)


def test_one_resample_composes_crop_then_flip_then_affine(photo):
    image = stored(photo, 64, "standard")  # (73, 73, 3)
    angle, tx, ty, scale, shear = 12.0, 3.0, -4.0, 1.08, -7.0
    v = lambda *a: [torch.tensor([float(x)]) for x in a]  # noqa: E731
    geo = A._affine_matrix(*v(angle, tx, ty, scale, shear, 0, 0, 0), size=64)
    mine = warp(image, 5, 9, 60, 52, flip=True, geo=geo, size=64)
    steps = TF.resized_crop(image.permute(2, 0, 1).float(), 5, 9, 60, 52, [64, 64], antialias=False,
                            interpolation=InterpolationMode.BILINEAR)
    steps = TF.affine(TF.horizontal_flip(steps), angle=angle, translate=[tx, ty], scale=scale, shear=[shear, 0.0],
                      **BILINEAR)
    # Three interpolations blur more than one; the wrong order (affine before flip) gives ~48.
    assert (mine - steps).abs().mean() < 4
    black_mine, black_steps = (mine < 0.5).all(0), (steps < 0.5).all(0)
    assert black_steps.sum() > 100 and (black_mine ^ black_steps).sum() <= 0.1 * black_steps.sum()


def test_random_resized_crop_boxes_fit_and_follow_the_ranges():
    gen = torch.Generator().manual_seed(0)
    top, left, h, w = A._random_resized_crop(4000, 37, 37, torch.device("cpu"), gen)
    assert ((top >= 0) & (left >= 0) & (top + h <= 37) & (left + w <= 37) & (h >= 1) & (w >= 1)).all()
    assert torch.equal(top, top.round()) and torch.equal(h, h.round())
    area = h * w / 37 ** 2
    assert 0.3 < area.min() < 0.4 and area.max() == 1.0  # scale (0.35, 1), with rounding and the fallback
    assert (w / h).min() >= 0.7 and (w / h).max() <= 1.4
    assert len(set(zip(top.tolist(), left.tolist()))) > 200


@pytest.mark.parametrize("magnitude", [9, 18])
def test_standard_draws_random_affine_with_p_half_in_the_ranges(magnitude):
    size, n, s = 40, 4000, magnitude / 9
    geo = BatchAugment(size, MEAN, STD, "standard", magnitude)._random_affine(
        n, torch.device("cpu"), torch.Generator().manual_seed(0)).double()  # (N, 3, 3)
    identity = torch.isclose(geo, torch.eye(3, dtype=torch.double), atol=1e-6).flatten(1).all(1)
    assert 0.45 < identity.double().mean() < 0.55
    linear = geo[~identity, :2, :2]
    scale = linear.det().rsqrt()  # the linear part is the inverse rotation-shear (det 1) over the scale
    assert scale.min() >= 1 - 0.1 * s - 1e-6 and scale.max() <= 1 + 0.1 * s + 1e-6
    assert scale.min() < 1 - 0.09 * s and scale.max() > 1 + 0.09 * s
    # inverse about the centre: t = -A^-1 m, in pixels
    shift = -(torch.linalg.inv(linear) @ geo[~identity, :2, 2:])[..., 0] * size / 2  # (M, 2)
    assert torch.allclose(shift, shift.round(), atol=1e-4)  # whole pixels
    assert shift.abs().max().round() == round(0.1 * s * size) and shift.abs().mean() > 0.2 * s * size * 0.1
    cos_angle = linear[:, 0, 0] * scale  # rotation, slightly sheared
    assert cos_angle.min() < math.cos(math.radians(12 * s))


@pytest.mark.parametrize("preset", AUGMENTATIONS)
def test_every_preset_shape_layout_determinism_and_per_image_randomness(photo, preset):
    size, batch = 28, 48
    one = stored(photo, size, preset)
    images = one[None].expand(batch, -1, -1, -1).contiguous()  # the same image, 48 times
    augment = BatchAugment(size, MEAN, STD, preset)
    out = augment(images, torch.Generator().manual_seed(3))
    assert out.shape == (batch, 3, size, size) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(out).all()
    assert torch.equal(out, augment(images, torch.Generator().manual_seed(3)))
    assert augment(images[:0]).shape == (0, 3, size, size)
    distinct = len({o.numpy().tobytes() for o in out})
    if preset == "none":
        assert distinct == 1 and torch.equal(out, BatchEval(size, MEAN, STD)(images))
        return
    assert not torch.equal(out, augment(images, torch.Generator().manual_seed(4)))
    assert distinct >= (10 if preset == "light" else batch - 2)
    torch.manual_seed(5)  # no generator: the global RNG
    first = augment(images)
    torch.manual_seed(5)
    assert torch.equal(first, augment(images))


@pytest.mark.parametrize("preset", ["standard", "trivialaugment", "randaugment"])
def test_heavy_presets_keep_the_picture(photo, preset):
    # Mostly the same image: the mean over many samples stays near the eval image's mean colour.
    size = 32
    images = stored(photo, size, preset)[None].expand(64, -1, -1, -1).contiguous()
    out = denormalize(BatchAugment(size, MEAN, STD, preset)(images, torch.Generator().manual_seed(0)))
    assert out.min() >= -1e-3 and out.max() <= 255 + 1e-3
    eval_mean = stored(photo, size, "none").float().mean((0, 1))
    assert (out.mean((0, 2, 3)) - eval_mean).abs().max() < 40


def test_randaugment_keeps_the_order_of_colour_and_geometric_ops(monkeypatch):
    size = 32
    images = torch.full((4, 37, 37, 3), 255, dtype=torch.uint8)
    images[2:] = 100  # flat gray: AutoContrast and Contrast leave it as it is, unless they count the fill
    solarize, rotate = A._OP["Solarize"], A._OP["Rotate"]
    ops = torch.tensor([[solarize, rotate], [rotate, solarize], [A._OP["AutoContrast"], rotate],
                        [A._OP["Contrast"], rotate]])
    mags = torch.tensor([[0.0, 45.0], [45.0, 0.0], [0.0, 45.0], [0.5, 45.0]])  # solarize threshold 0 inverts all
    augment = BatchAugment(size, MEAN, STD, "randaugment")
    monkeypatch.setattr(augment, "_draw_ops", lambda b, device, generator: (ops, mags))
    out = denormalize(augment(images, torch.Generator().manual_seed(0)))
    corner, centre = out[:, :, 0, 0], out[:, :, size // 2, size // 2]  # (4, 3) each
    # solarize then rotate: a black image on a black fill; rotate then solarize: white corners
    assert out[0].max() < 0.5
    assert (corner[1] > 254).all() and (centre[1] < 0.5).all()
    # a colour op before the rotation neither sees nor changes the fill
    assert (corner[2:] < 0.5).all() and (centre[2:] - 100).abs().max() <= 1


@pytest.mark.parametrize("name,mag", [("Contrast", 0.5), ("AutoContrast", 0.0), ("Equalize", 0.0),
                                      ("Solarize", 0.6), ("Brightness", -0.4)])
def test_a_colour_op_before_a_rotation_is_the_sequential_result(monkeypatch, photo, name, mag):
    size = 32
    image = stored(photo, size, "randaugment")  # (37, 37, 3)
    augment = BatchAugment(size, MEAN, STD, "randaugment")
    box = [torch.tensor([v]) for v in (6.0, 3.0, 30.0, 30.0)]
    monkeypatch.setattr(A, "_random_resized_crop", lambda *args, **kwargs: box)
    monkeypatch.setattr(augment, "_draw_ops", lambda b, device, generator: (
        torch.tensor([[A._OP[name], A._OP["Rotate"]]]), torch.tensor([[mag, 30.0]])))
    out = denormalize(augment(image[None], torch.Generator().manual_seed(0)))[0]
    crop = TF.resized_crop(image.permute(2, 0, 1), 6, 3, 30, 30, [size, size], antialias=True,
                           interpolation=InterpolationMode.BILINEAR)
    if torch.rand(1, generator=torch.Generator().manual_seed(0)).item() < 0.5:  # the flip, the only draw left
        crop = TF.horizontal_flip(crop)
    reference = {"Contrast": lambda im: TF.adjust_contrast(im, 1.5), "AutoContrast": TF.autocontrast,
                 "Equalize": TF.equalize, "Solarize": lambda im: TF.solarize(im, 0.6 * 255),
                 "Brightness": lambda im: TF.adjust_brightness(im, 0.6)}[name](crop)
    reference = TF.rotate(reference, 30.0, interpolation=InterpolationMode.BILINEAR).float()
    # Two interpolations against one, and the nonlinear ops on moved pixels: close, not equal
    # (statistics over the rotated image, fill included, would be tens of levels off).
    assert (out - reference).abs().mean() < 6


def test_statistics_of_a_colour_op_before_a_rotation_come_from_the_crop(monkeypatch):
    size = 32
    images = torch.full((1, 37, 37, 3), 250, dtype=torch.uint8)
    images[:, 11:26, 11:26] = 100  # the crop (10..26) is gray in a bright frame, which the rotation partly cuts
    augment = BatchAugment(size, MEAN, STD, "randaugment")
    box = [torch.tensor([v]) for v in (10.0, 10.0, 17.0, 17.0)]
    monkeypatch.setattr(A, "_random_resized_crop", lambda *args, **kwargs: box)
    monkeypatch.setattr(augment, "_draw_ops", lambda b, device, generator: (
        torch.tensor([[A._OP["Contrast"], A._OP["Rotate"]]]), torch.tensor([[0.5, 45.0]])))
    out = denormalize(augment(images, torch.Generator().manual_seed(0)))[0]
    crop = TF.resized_crop(images[0].permute(2, 0, 1), 10, 10, 17, 17, [size, size], antialias=True,
                           interpolation=InterpolationMode.BILINEAR)
    expected = TF.adjust_contrast(crop, 1.5)[:, size // 2, size // 2]  # the mean of the whole crop
    # (the mean of the rotated image, with its fill or with the frame repeated into it, is 4-80 levels off)
    assert (out[:, size // 2, size // 2] - expected).abs().max() <= 1 and out[:, 0, 0].max() < 0.5


def test_standard_fills_what_the_affine_brings_in_with_black(monkeypatch):
    size = 32
    white = torch.full((64, 37, 37, 3), 255, dtype=torch.uint8)
    augment = BatchAugment(size, MEAN, STD, "standard")
    v = lambda x: torch.full((64,), float(x))  # noqa: E731
    monkeypatch.setattr(augment, "_random_affine", lambda b, device, generator: A._affine_matrix(
        v(45), v(0), v(0), v(1), v(0), v(0), v(0), v(0), size))
    out = denormalize(augment(white, torch.Generator().manual_seed(0)))
    corners = out[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # beyond the crop, rotated in: black
    assert corners.max() < 0.5 and (out[:, :, size // 2, size // 2] > 254).all()


def test_trivialaugment_draws_every_op_with_torchvision_magnitudes():
    augment = BatchAugment(32, MEAN, STD, "trivialaugment")
    op, mag = augment._draw_ops(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert op.shape == (20000, 1)
    counts = torch.bincount(op.flatten(), minlength=14)
    assert (counts > 20000 / 14 * 0.85).all()
    rotate = mag[op == A._OP["Rotate"]]
    assert rotate.min() < -125 and rotate.max() > 125 and (rotate.abs() <= 135).all()
    assert set(mag[op == A._OP["Posterize"]].tolist()) == {2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0}
    assert (mag[op == A._OP["Solarize"]] >= 0).all()
    ra = BatchAugment(32, MEAN, STD, "randaugment", magnitude=9)
    op, mag = ra._draw_ops(5000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert op.shape == (5000, 2)
    assert set(mag[op == A._OP["Rotate"]].abs().tolist()) == {9.0}  # linspace(0, 30, 31)[9]
    assert torch.allclose(mag[op == A._OP["TranslateX"]].abs(), torch.tensor(150 / 331 * 32 * 9 / 30))


def test_mixup_cutmix_targets_and_areas():
    gen = torch.Generator().manual_seed(0)
    images = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 16, 20).contiguous()  # image b is all b
    labels = torch.arange(8)
    same, targets = mixup_cutmix(images, labels, 10, label_smoothing=0.1, generator=gen)
    assert same is images and torch.allclose(targets.sum(1), torch.ones(8))
    assert torch.allclose(targets[0, 0], torch.tensor(0.91)) and torch.allclose(targets[0, 5], torch.tensor(0.01))
    for _ in range(5):
        mixed, targets = mixup_cutmix(images, labels, 10, mixup_alpha=0.4, generator=gen)
        lam = targets[0, 0].item()
        assert torch.allclose(targets.sum(1), torch.ones(8)) and torch.allclose(targets[0, 7], torch.tensor(1 - lam))
        torch.testing.assert_close(mixed[0], torch.full((3, 16, 20), 7 * (1 - lam)))
        mixed, targets = mixup_cutmix(images, labels, 10, cutmix_alpha=1.0, generator=gen)
        lam = targets[0, 0].item()
        pasted = (mixed[0] == 7).float().mean().item()  # image 0 gets image 7's box
        assert abs(pasted - (1 - lam)) < 1e-6 and torch.allclose(targets.sum(1), torch.ones(8))
        assert torch.equal(images, torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 16, 20))  # input untouched
    kinds = set()
    for _ in range(20):
        mixed, _ = mixup_cutmix(images, labels, 10, mixup_alpha=1.0, cutmix_alpha=1.0, generator=gen)
        kinds.add("cutmix" if set(mixed[0].unique().tolist()) <= {0.0, 7.0} else "mixup")
    assert kinds == {"mixup", "cutmix"}
    for alphas in ((0.4, 0.0), (0.0, 0.4)):  # the layout the augmentation gives stays
        mixed, _ = mixup_cutmix(images.contiguous(memory_format=torch.channels_last), labels, 10, *alphas)
        assert mixed.is_contiguous(memory_format=torch.channels_last)
    a = mixup_cutmix(images, labels, 10, mixup_alpha=0.4, generator=torch.Generator().manual_seed(9))
    b = mixup_cutmix(images, labels, 10, mixup_alpha=0.4, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_soft_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 5, generator=gen), torch.tensor([0, 4, 2, 2, 1, 3])
    onehot = F.one_hot(labels, 5).float()
    torch.testing.assert_close(soft_cross_entropy(logits, onehot), F.cross_entropy(logits, labels))
    soft = torch.softmax(torch.randn(6, 5, generator=gen), 1)
    torch.testing.assert_close(soft_cross_entropy(logits, soft), F.cross_entropy(logits, soft))
    _, smoothed = mixup_cutmix(torch.zeros(6, 3, 4, 4), labels, 5, label_smoothing=0.2)
    expected = F.cross_entropy(logits, labels, label_smoothing=0.2)
    torch.testing.assert_close(soft_cross_entropy(logits, smoothed), expected)
