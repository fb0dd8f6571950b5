"""A labelled set of real-photo JPEGs of realistic size, for training and GPU benchmarks.

Each class is one real colour photo that an installed or downloadable package ships:
seven from scikit-image's ``skimage/data`` (read from the installed package, or else
straight out of its wheel, fetched with ``pip download --no-deps`` so that scikit-image
and its dependencies are never installed) and Grace Hopper's portrait from matplotlib.
Every image is a distinct random crop of its class's photo (random position, size,
aspect, flip and colour jitter), resized so both sides lie in ``[min_side, max_side]``
and saved as a JPEG: decoding costs what a camera-sized training image costs, while
the set stays reproducible offline.

Build one (reruns reuse a complete folder):
    .venv/bin/python bench/photos.py out/photos [--per-class 250] [--min-side 400] [--max-side 640]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import io
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile

from PIL import Image, ImageEnhance, ImageOps

SKIMAGE_WHEEL = "scikit-image==0.26.0"
# class name -> photo under skimage/data (None: matplotlib's sample photo)
SOURCES = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "motorcycle": "motorcycle_left.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "retina": "retina.jpg",
    "grace_hopper": None,
}
MIN_CROP, MAX_CROP = 0.35, 0.9  # crop side as a fraction of the photo's shorter side
MIN_ASPECT, MAX_ASPECT = 3 / 4, 4 / 3


# The source photos are kept here once fetched (git-ignored under out/, a few MB), so a
# machine without network (the GPU machine) builds the set from this folder carried over.
SOURCES_CACHE = os.environ.get("IMGCLS_PHOTO_SOURCES", os.path.join("out", "bench", "photo-sources"))


def _skimage_photos(names: list[str]) -> dict[str, bytes]:
    """The files ``names`` of ``skimage/data``, from SOURCES_CACHE, the installed package
    or its wheel (whatever was fetched is kept in SOURCES_CACHE)."""
    found = {}
    for name in names:
        path = os.path.join(SOURCES_CACHE, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                found[name] = f.read()
    spec = importlib.util.find_spec("skimage")  # locates the package without importing it
    if len(found) < len(names) and spec and spec.submodule_search_locations:
        folder = os.path.join(spec.submodule_search_locations[0], "data")
        for name in names:
            path = os.path.join(folder, name)
            if os.path.exists(path):
                with open(path, "rb") as f:
                    found[name] = f.read()
    missing = [n for n in names if n not in found]
    if missing:
        with tempfile.TemporaryDirectory() as work:
            # --only-binary: an sdist would be built just to read its metadata.
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "--quiet", SKIMAGE_WHEEL, "-d", work], check=True)
            with zipfile.ZipFile(glob.glob(os.path.join(work, "*.whl"))[0]) as wheel:
                for name in missing:
                    found[name] = wheel.read(f"skimage/data/{name}")
    os.makedirs(SOURCES_CACHE, exist_ok=True)
    for name, data in found.items():
        path = os.path.join(SOURCES_CACHE, name)
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(data)
    return found


def load_sources() -> dict[str, Image.Image]:
    """The source photo of every class in ``SOURCES``, as RGB images."""
    from matplotlib import cbook

    data = _skimage_photos([n for n in SOURCES.values() if n])
    photos = {}
    for label, name in SOURCES.items():
        if name is None:
            with cbook.get_sample_data("grace_hopper.jpg") as f:
                photos[label] = Image.open(io.BytesIO(f.read())).convert("RGB")
        else:
            photos[label] = Image.open(io.BytesIO(data[name])).convert("RGB")
    return photos


def random_crop(photo: Image.Image, rng: random.Random, min_side: int, max_side: int) -> Image.Image:
    """One random crop of ``photo``, jittered and resized so both sides lie in [min_side, max_side]."""
    w, h = photo.size
    # The aspect is also bounded by what the output sides allow.
    hi = min(MAX_ASPECT, max_side / min_side)
    aspect = rng.uniform(max(MIN_ASPECT, 1 / hi), hi)  # width / height
    side = rng.uniform(MIN_CROP, MAX_CROP) * min(w, h)
    cw, ch = min(w, round(side * aspect ** 0.5)), min(h, round(side / aspect ** 0.5))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    crop = photo.crop((left, top, left + cw, top + ch))
    short, long = min(cw, ch), max(cw, ch)
    scale = rng.uniform(min_side / short, max_side / long)
    crop = crop.resize((max(min_side, min(max_side, round(cw * scale))),
                        max(min_side, min(max_side, round(ch * scale)))), Image.BICUBIC)
    if rng.random() < 0.5:
        crop = ImageOps.mirror(crop)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        crop = enhance(crop).enhance(rng.uniform(0.8, 1.2))
    return crop


def build_photo_set(dest: str, per_class: int = 250, min_side: int = 400, max_side: int = 640, quality: int = 90,
                    seed: int = 0) -> str:
    """Writes ``dest/<class>/<i>.jpg``: ``per_class`` distinct crops of each class's photo.

    Args:
        dest: Output folder. A folder that a previous call completed (its ``.complete``
            marker records the arguments) is reused as is; any other is rebuilt.
        per_class: Images per class (there are ``len(SOURCES)`` classes).
        min_side: Smallest width or height of an image, in pixels.
        max_side: Largest width or height of an image, in pixels.
        quality: JPEG quality.
        seed: The same seed and arguments give the same files.

    Returns:
        ``dest``.
    """
    if not 0 < min_side <= max_side:
        raise ValueError(f"need 0 < min_side <= max_side, got {min_side}, {max_side}")
    marker = os.path.join(dest, ".complete")
    stamp = f"per_class={per_class} min_side={min_side} max_side={max_side} quality={quality} seed={seed}\n"
    if os.path.exists(marker):
        with open(marker) as f:
            if f.read() == stamp:
                return dest
    shutil.rmtree(dest, ignore_errors=True)
    for label, photo in load_sources().items():
        rng = random.Random(f"{seed}:{label}")  # per class, so classes do not depend on each other
        os.makedirs(os.path.join(dest, label))
        for i in range(per_class):
            random_crop(photo, rng, min_side, max_side).save(os.path.join(dest, label, f"{i:05d}.jpg"),
                                                             quality=quality)
    with open(marker, "w") as f:
        f.write(stamp)
    return dest


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dest")
    p.add_argument("--per-class", type=int, default=250)
    p.add_argument("--min-side", type=int, default=400)
    p.add_argument("--max-side", type=int, default=640)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(build_photo_set(args.dest, args.per_class, args.min_side, args.max_side, args.quality, args.seed))


if __name__ == "__main__":
    main()
