"""Decoding real image files of every pixel type, and the typed, stable errors of the ones that cannot be decoded."""

import io
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from imgcls.preprocess import (EmptyImageError, ImageDecodeError, ImageTooLargeError, UnsupportedImageError,
    decode_image, decode_resized)
from imgcls.errors import (ERROR_DECODE, ERROR_EMPTY, ERROR_READ, ERROR_TOO_LARGE, ERROR_UNSUPPORTED, error_text,
    error_type)


def written(tmp_path, name: str, array: np.ndarray, mode: str = None) -> np.ndarray:
    """Writes ``array`` as the image file ``name`` (TIFF or PNG, by its extension) with PIL,
    checks that PIL reads it back in the mode meant, and decodes the file's bytes."""
    path = tmp_path / name
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    expected = mode or {np.float32: "F", np.int32: "I", np.uint16: "I;16"}[array.dtype.type]
    with Image.open(path) as im:
        assert im.mode == expected, (name, im.mode)
    with open(path, "rb") as f:
        out = decode_image(f.read())
    assert out.dtype == np.uint8 and out.shape == (*array.shape, 3)
    assert (out == out[..., :1]).all()  # gray: the same value in R, G and B
    return out[..., 0]


def test_float_image_in_0_1_scales_by_255(tmp_path):
    """A float32 TIFF of 0..1 values (what scientific tools write) is not black."""
    values = np.array([[0.0, 0.25, 0.5], [0.75, 1.0, 0.1]], np.float32)
    out = written(tmp_path, "unit.tif", values)
    assert out[0, 2] in (127, 128)
    assert out[0, :2].tolist() == [0, 64] and out[1].tolist() == [191, 255, 26]


def test_float_image_in_0_255_is_taken_as_is(tmp_path):
    values = np.array([[0.0, 1.5, 100.4], [200.6, 255.0, 17.0]], np.float32)
    assert written(tmp_path, "bytes.tif", values).tolist() == [[0, 2, 100], [201, 255, 17]]


def test_float_image_outside_0_255_is_stretched_from_its_own_range(tmp_path):
    values = np.array([[-1.0, 0.0, 3.0]], np.float32)  # e.g. normalised data
    assert written(tmp_path, "signed.tif", values).tolist() == [[0, 64, 255]]
    values = np.array([[1000.0, 2000.0, 5000.0]], np.float32)
    assert written(tmp_path, "wide.tif", values).tolist() == [[0, 64, 255]]
    flat = np.full((2, 2), -7.0, np.float32)  # one value: no range to stretch
    assert (written(tmp_path, "flat.tif", flat) == 0).all()


def test_nan_and_infinity_count_as_zero(tmp_path):
    values = np.array([[np.nan, np.inf, -np.inf, 0.5, 1.0]], np.float32)
    out = written(tmp_path, "holes.tif", values)
    assert out.tolist() == [[0, 0, 0, 128, 255]]  # and the range is that of the finite values


@pytest.mark.parametrize("name", ["deep.png", "deep.tif"])
def test_16_bit_image_scales_by_65535(tmp_path, name):
    values = np.array([[0, 257, 257 * 100], [32768, 65534, 65535]], np.uint16)
    assert written(tmp_path, name, values).tolist() == [[0, 1, 100], [128, 255, 255]]


def test_32_bit_integer_image_scales_by_its_range(tmp_path):
    small = np.array([[0, 7, 100], [200, 254, 255]], np.int32)  # within 0..255: as-is
    assert written(tmp_path, "small.tif", small).tolist() == small.tolist()
    sixteen = np.array([[0, 257, 257 * 100], [300, 65535, 32768]], np.int32)  # within 0..65535: as 16-bit
    assert written(tmp_path, "sixteen.tif", sixteen).tolist() == [[0, 1, 100], [1, 255, 128]]
    wide = np.array([[0, 400_000, 1_000_000]], np.int32)  # beyond: by the largest value
    assert written(tmp_path, "wide.tif", wide).tolist() == [[0, 102, 255]]
    negative = np.array([[-5, 0, 200]], np.int32)  # negative values give 0
    assert written(tmp_path, "negative.tif", negative).tolist() == [[0, 0, 200]]


def test_inference_and_cache_geometry_decode_float_images_the_same_way(tmp_path):
    """``decode_resized`` (inference and the validation cache) goes through the same conversion."""
    Image.fromarray(np.full((40, 60), 0.5, np.float32)).save(tmp_path / "half.tif")
    out = decode_resized((tmp_path / "half.tif").read_bytes(), 36, 32)
    assert out.shape == (32, 32, 3) and (out == 128).all()


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


# The first bytes of an iPhone photo: an ISO base media ftyp box of brand heic.
HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00\x00\x00\x22meta" + bytes(200)
JPEG = encode(Image.new("RGB", (64, 64), "red"), "JPEG")


@pytest.mark.parametrize("data,kind,cls,message", [
    (b"", ERROR_EMPTY, EmptyImageError, "EmptyImageError: empty file"),
    (b"hello, not an image", ERROR_DECODE, ImageDecodeError,
     "ImageDecodeError: UnidentifiedImageError: cannot identify image file"),
    (JPEG[: len(JPEG) // 2], ERROR_DECODE, ImageDecodeError, None),  # truncated
    (b"\x89PNG\r\n\x1a\n garbage", ERROR_DECODE, ImageDecodeError, None),
    (encode(Image.new("L", (2000, 1000)), "PNG"), ERROR_TOO_LARGE, ImageTooLargeError,
     "ImageTooLargeError: 2000x1000 image exceeds max_pixels=1000000 (decompression bomb?)"),
    (HEIC, ERROR_UNSUPPORTED, UnsupportedImageError, "UnsupportedImageError: a HEIF/HEIC image, which PIL cannot read"),
    # A GRIB file, which PIL identifies but has no decoder for.
    (b"GRIB\x00\x00\x20\x01" + bytes(24), ERROR_UNSUPPORTED, UnsupportedImageError,
     "UnsupportedImageError: OSError: cannot find loader for this GRIB file"),
], ids=["empty", "not-an-image", "truncated", "fake-png", "bomb", "heic", "grib"])
def test_decode_errors_carry_their_type_and_a_stable_message(data, kind, cls, message):
    """The error row's type comes from the exception; its text has no memory address (PIL's
    own 'cannot identify image file <_io.BytesIO object at 0x7f...>' has one), so two
    runs over the same bytes give the same text."""
    texts = set()
    for _ in range(2):
        with pytest.raises(ImageDecodeError) as info:
            decode_image(data, max_pixels=1_000_000)
        assert type(info.value) is cls and error_type(info.value, ERROR_DECODE) == kind
        texts.add(error_text(info.value))
    [text] = texts
    assert not re.search(r"0x[0-9a-fA-F]{6,}| at 0x", text)
    if message:
        assert text == message


@pytest.mark.skipif(shutil.which("gs") is not None, reason="Ghostscript is installed: PIL decodes EPS")
def test_an_image_pil_identifies_but_cannot_decode_here_is_unsupported(tmp_path):
    """An EPS file, as PIL itself writes it, needs Ghostscript to be decoded."""
    Image.new("RGB", (16, 16), "blue").save(tmp_path / "drawing.eps")
    with pytest.raises(UnsupportedImageError, match="Ghostscript"):
        decode_image((tmp_path / "drawing.eps").read_bytes())


def test_error_type_of_other_exceptions_is_the_stage_default():
    """What reading raised is a read error, what decoding raised (outside decode_image's own
    errors) a decode error; an error's own type wins over the default."""
    assert error_type(FileNotFoundError(2, "No such file or directory")) == ERROR_READ
    assert error_type(PermissionError(13, "Permission denied")) == ERROR_READ
    assert error_type(RuntimeError("boom"), ERROR_DECODE) == ERROR_DECODE
    assert error_type(EmptyImageError("empty file"), ERROR_READ) == ERROR_EMPTY
    assert error_text(ValueError("bad <object object at 0x7f56fc53e610> here")) == "ValueError: bad <object object> here"


# A real photo of realistic size (512 x 600 px) that matplotlib ships.
def hopper_bytes() -> bytes:
    import matplotlib.cbook

    with open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), "rb") as f:
        return f.read()


def test_only_plain_jpegs_are_left_to_the_device_decoder():
    from imgcls.preprocess import device_decodable_jpeg

    photo = Image.open(io.BytesIO(hopper_bytes()))
    rotated = photo.getexif()
    rotated[0x0112] = 6
    buf = io.BytesIO()
    photo.save(buf, "JPEG", exif=rotated)
    assert device_decodable_jpeg(hopper_bytes())
    assert device_decodable_jpeg(encode(photo.convert("L"), "JPEG"))  # grayscale
    assert not device_decodable_jpeg(hopper_bytes(), max_pixels=512 * 600 - 1)  # the CPU path refuses it, typed
    assert not device_decodable_jpeg(buf.getvalue())  # an EXIF rotation: the device decoder applies none
    assert not device_decodable_jpeg(encode(photo.convert("CMYK"), "JPEG"))
    assert not device_decodable_jpeg(encode(photo, "PNG"))
    assert not device_decodable_jpeg(b"hello, not an image") and not device_decodable_jpeg(b"")


@pytest.mark.slow  # imports torchvision.io: in CI, not in the quick loop
def test_device_jpeg_decoder_gives_the_cpu_paths_pixels_within_a_bound_and_hands_back_what_it_cannot_decode():
    """On a CPU device (the tests' stand-in for nvjpeg): the same eval geometry as
    ``decode_resized``, which decodes this photo at half scale first (PIL's draft mode)
    where the device decodes it whole, so pixels differ a little; a list holding a
    truncated JPEG is decoded file by file, and only that file comes back as None."""
    import torch

    from imgcls.preprocess import DeviceJpegDecoder, resize_size

    good = hopper_bytes()
    small = encode(Image.open(io.BytesIO(good)).resize((96, 64)), "JPEG")
    decode = DeviceJpegDecoder(224, torch.device("cpu"))
    out = decode([good, good[: len(good) // 2], small])
    assert out[1] is None and out[0].shape == (3, 224, 224) and out[2].shape == (3, 224, 224)
    assert out[0].dtype == torch.uint8
    cpu = torch.from_numpy(decode_resized(good, resize_size(224), 224)).permute(2, 0, 1)
    diff = (out[0].int() - cpu.int()).abs().float()
    # measured: 2.5 levels on average, 20 at the 99th percentile (of 255)
    assert diff.mean() < 4 and diff.quantile(0.99) <= 30, (diff.mean(), diff.quantile(0.99))
    # no reduced-scale decode for the small one: the same decoder's pixels, up to libjpeg builds
    small_cpu = torch.from_numpy(decode_resized(small, resize_size(224), 224)).permute(2, 0, 1)
    assert (out[2].int() - small_cpu.int()).abs().float().mean() < 1
    assert decode([]) == []
