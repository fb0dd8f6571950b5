import io
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from imgcls.preprocess import ClassificationPresetEval, ClassificationPresetTrain, ImageDecodeError, decode_image
from imgcls.labelled import (DataError, LabelledImages, encode_labels, list_labelled_images,
    split_stratified)


def write_tree(root, counts):
    for label, n in counts.items():
        os.makedirs(root / label, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / label / f"{i}.png")
    return str(root)


def test_image_folder_is_listed_with_labels(tmp_path):
    root = write_tree(tmp_path, {"cat": 3, "dog": 2})
    images = list_labelled_images(root)
    assert sorted(set(images.labels)) == ["cat", "dog"] and len(images) == 5
    assert all(os.path.exists(p) for p in images.paths)


def test_manifest_csv_with_relative_paths(tmp_path):
    write_tree(tmp_path, {"a": 2, "b": 2})
    pd.DataFrame({"path": ["a/0.png", "a/1.png", "b/0.png", "b/1.png"], "label": ["x", "x", "y", "y"]}) \
        .to_csv(tmp_path / "m.csv", index=False)
    images = list_labelled_images(str(tmp_path / "m.csv"))
    assert images.labels == ["x", "x", "y", "y"] and images.paths[0] == str(tmp_path / "a/0.png")


@pytest.mark.parametrize("case,message", [
    ("empty", "no images in class subfolders"),
    ("single", "single class"),
    ("nocol", "has no 'path' column"),
    ("nothing", "neither a folder"),
])
def test_bad_inputs_fail_early_with_clear_errors(tmp_path, case, message):
    if case == "empty":
        (tmp_path / "data").mkdir()
        root = str(tmp_path / "data")
    elif case == "single":
        root = write_tree(tmp_path, {"only": 3})
    elif case == "nocol":
        pd.DataFrame({"file": ["x.png"], "label": ["a"]}).to_parquet(tmp_path / "m.parquet")
        root = str(tmp_path / "m.parquet")
    else:
        root = str(tmp_path / "nope")
    with pytest.raises(DataError, match=message):
        list_labelled_images(root)


def test_a_manifest_is_listed_without_a_request_per_row(tmp_path):
    """Its paths are not checked on the driver (a million HEAD requests on S3): tar
    members (TAR#MEMBER, review.csv's rows) and files alike; the reading tasks name a
    missing one (test_cache)."""
    pd.DataFrame({"path": ["a/0.png", "shards/0.tar#cat/1.jpg", "s3://bucket/gone.png"], "label": ["a", "b", "b"]}) \
        .to_csv(tmp_path / "m.csv", index=False)
    images = list_labelled_images(str(tmp_path / "m.csv"))
    assert images.paths == [str(tmp_path / "a/0.png"), str(tmp_path / "shards/0.tar#cat/1.jpg"), "s3://bucket/gone.png"]


def test_unknown_label_is_named():
    with pytest.raises(DataError, match="zebra"):
        encode_labels(["cat", "zebra"], ["cat", "dog"])


def test_split_is_stratified_deterministic_and_disjoint():
    counts = {"a": 2000, "b": 600, "c": 5, "d": 3, "e": 2}
    paths = [f"/d/{c}/{i}.png" for c, n in counts.items() for i in range(n)]
    images = LabelledImages(paths, [p.split("/")[2] for p in paths])
    s1 = split_stratified(images, 0.2, 0.1, seed=3)
    s2 = split_stratified(LabelledImages(paths[::-1], images.labels[::-1]), 0.2, 0.1, seed=3)
    assert all(s1[k].paths == s2[k].paths for k in s1)  # input order does not matter
    all_paths = s1["train"].paths + s1["val"].paths + s1["test"].paths
    assert sorted(all_paths) == sorted(paths)
    for c in ("a", "b"):  # each class in the fractions' proportions (binomial: within 4 standard deviations)
        for name, fraction in (("val", 0.2), ("test", 0.1)):
            n = s1[name].labels.count(c)
            assert abs(n - fraction * counts[c]) <= 4 * (fraction * (1 - fraction) * counts[c]) ** 0.5, (c, name, n)
    for c in ("c", "d"):  # a class of 3 or more has at least one image in each split
        assert all(s1[name].labels.count(c) >= 1 for name in ("train", "val", "test")), c
    assert s1["train"].labels.count("e") == 2  # fewer than 3: all trained on
    assert split_stratified(images, 0.2, 0.1, seed=4)["val"].paths != s1["val"].paths
    assert s1["val"].keys == s1["val"].paths  # no keys given: the paths are the keys


def split_of(splits) -> dict:
    """Each file's split, by its key (its path below the root)."""
    return {k: name for name, part in splits.items() for k in part.split_keys()}


def link_tree(dest, source_root, names) -> None:
    """Hard links the real images ``names[class]`` of ``source_root`` as an ImageFolder tree at ``dest``."""
    for c, files in names.items():
        os.makedirs(dest / c, exist_ok=True)
        for n in files:
            if not os.path.exists(dest / c / n):
                os.link(os.path.join(source_root, c, n), dest / c / n)


def test_adding_and_relabelling_files_moves_no_file_to_another_split(fmnist_root, tmp_path):
    """A month's new files (1%, then 10%, then 50% more real images) and review
    corrections (a later root relabelling files) leave every earlier file in its split:
    a model trained on the old train split is never tested on it."""
    classes = ["bag", "coat", "sandal", "shirt"]
    names = {c: sorted(os.listdir(os.path.join(fmnist_root, c))) for c in classes}
    data = tmp_path / "data"
    link_tree(data, fmnist_root, {c: names[c][:100] for c in classes})  # 400 images
    before = split_of(split_stratified(list_labelled_images(str(data)), 0.1, 0.1, seed=0))
    assert set(before) == {f"{c}/{n}" for c in classes for n in names[c][:100]}
    for added in (1, 10, 50):  # per class: 1%, 10%, 50% more files
        link_tree(data, fmnist_root, {c: names[c][100:100 + added] for c in classes})
        images = list_labelled_images(str(data))
        assert len(images) == 400 + 4 * added
        after = split_of(split_stratified(images, 0.1, 0.1, seed=0))
        moved = {k: (s, after[k]) for k, s in before.items() if after[k] != s}
        assert not moved, f"{len(moved)} files moved after adding {added} a class: {list(moved.items())[:5]}"
    # Review corrections: 40 files relabelled (each to the next class) by a later manifest root.
    fixed = {f"{c}/{n}": classes[(i + 1) % 4] for i, c in enumerate(classes) for n in names[c][90:100]}
    pd.DataFrame({"path": [str(data / k) for k in fixed], "label": list(fixed.values())}) \
        .to_csv(tmp_path / "fixes.csv", index=False)
    images = list_labelled_images(f"{data},{tmp_path / 'fixes.csv'}")
    labels = dict(zip(images.keys, images.labels))
    assert len(images) == 600 and all(labels[k] == label for k, label in fixed.items())
    after = split_of(split_stratified(images, 0.1, 0.1, seed=0))
    assert {k: after[k] for k in before} == before  # the relabelled 40 included


def test_the_same_files_under_another_root_get_the_same_splits(fmnist_root, tmp_path, s3_server):
    """A file's split follows its path below its root: the tree in a local folder, the
    same tree copied to a bucket with a month's new files, and a manifest of relative
    paths in that bucket split every old file alike."""
    import fsspec

    classes = ["bag", "coat", "sandal"]
    names = {c: sorted(os.listdir(os.path.join(fmnist_root, c))) for c in classes}
    link_tree(tmp_path / "local", fmnist_root, {c: names[c][:30] for c in classes})
    fs = fsspec.filesystem("s3")
    files = [f"{c}/{n}" for c in classes for n in names[c][:33]]  # 3 new files a class
    fs.put([os.path.join(fmnist_root, f) for f in files], [f"imgcls/moved/{f}" for f in files])
    with fs.open("imgcls/moved/manifest.csv", "w") as f:
        pd.DataFrame({"path": files, "label": [f.split("/")[0] for f in files]}).to_csv(f, index=False)
    local = list_labelled_images(str(tmp_path / "local"))
    assert sorted(local.keys) == sorted(files[i] for i in range(len(files)) if int(i % 33) < 30)
    split = split_of(split_stratified(local, 0.2, 0.2, seed=1))
    for root in ("s3://imgcls/moved/", "s3://imgcls/moved/manifest.csv"):
        moved = list_labelled_images(root)
        assert len(moved) == 99 and all(p.startswith("s3://imgcls/moved/") for p in moved.paths)
        there = split_of(split_stratified(moved, 0.2, 0.2, seed=1))
        assert {k: there[k] for k in split} == split, root


def test_file_keys_are_paths_relative_to_the_root():
    from imgcls.labelled import file_key

    assert file_key("/data", "bag/1.png") == "bag/1.png"
    assert file_key("/data", "./bag/../bag/1.png") == "bag/1.png"
    assert file_key("/data/m", "/data/bag/1.png") == "../bag/1.png"  # as if written relative
    assert file_key("s3://b/x", "s3://b/x/shards/a.tar#bag/1.png") == "shards/a.tar#bag/1.png"
    assert file_key("/data", "s3://b/x/bag/1.png") == "s3://b/x/bag/1.png"  # another filesystem: as written


def test_max_per_class_caps_by_a_draw_and_keeps_pinned_files():
    paths = [f"/d/{c}/{i}.png" for c in "ab" for i in range(100)]
    images = LabelledImages(paths, [p.split("/")[2] for p in paths])
    capped = split_stratified(images, 0.2, 0.2, seed=0, max_per_class=40)
    kept = set(capped["train"].paths + capped["val"].paths + capped["test"].paths)
    assert len(kept) == 80
    full = split_of(split_stratified(images, 0.2, 0.2, seed=0))
    assert all(full[p] == name for name, part in capped.items() for p in part.paths)  # the cap moves no file
    pinned = {f"/d/a/{i}.png": "test" for i in range(50)}
    capped = split_stratified(images, 0.2, 0.2, seed=0, max_per_class=40, pinned=pinned)
    test_a = [p for p, label in zip(capped["test"].paths, capped["test"].labels) if label == "a"]
    assert len(test_a) == 40 and set(test_a) < set(pinned)  # 40 of the 50 pinned files: the cap keeps them first


@pytest.mark.parametrize("augment", ["none", "light", "standard", "trivialaugment", "randaugment"])
def test_train_presets_give_normalised_tensors(augment):
    image = torch.randint(0, 256, (3, 40, 57), dtype=torch.uint8)
    out = ClassificationPresetTrain(32, (0.5,) * 3, (0.5,) * 3, augment=augment)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -1.0 - 1e-6 and out.max() <= 1.0 + 1e-6


def test_eval_preset_is_deterministic_and_split_in_two():
    image = torch.randint(0, 256, (3, 300, 200), dtype=torch.uint8)
    preset = ClassificationPresetEval(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    full = preset(image)
    assert full.shape == (3, 224, 224)
    assert torch.equal(full, preset(image))
    assert torch.equal(full, preset.normalize(preset.geometry(image)))


def test_scale_normalize_matches_torchvision_and_keeps_channels_last():
    from torchvision.transforms import v2

    from imgcls.preprocess import ScaleNormalize

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # channels_last view
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])(images.contiguous())
    normalize = ScaleNormalize(mean, std)
    hwc = images.permute(0, 2, 3, 1)  # the (N, H, W, 3) batch the model actors receive
    for ours in (normalize(images), normalize.batch_hwc(hwc)):
        assert ours.dtype == torch.float32 and ours.is_contiguous(memory_format=torch.channels_last)
        assert ours.shape == (4, 3, 32, 32) and torch.allclose(ours, reference, atol=1e-5)
    assert images.dtype == torch.uint8  # the input is not modified
    with pytest.raises(TypeError):
        normalize.batch_hwc(images)  # channels first


@pytest.mark.parametrize("image_size", [224, 32, 28])
@pytest.mark.parametrize("shape", [(32, 32), (224, 224), (300, 500), (1000, 700), (37, 91), (257, 256)])
def test_eval_geometry_matches_torchvision_resize_and_center_crop(image_size, shape):
    """preprocess.eval_geometry avoids importing torchvision; its pixels must be torchvision's."""
    from torchvision.transforms import v2

    from imgcls.preprocess import eval_geometry, resize_size, to_chw_tensor

    rng = np.random.default_rng(sum(shape))
    coarse = Image.fromarray(rng.integers(0, 256, (shape[0] // 8 + 1, shape[1] // 8 + 1, 3), dtype=np.uint8))
    photo_like = np.asarray(coarse.resize(shape[::-1], Image.BICUBIC))  # smooth areas and edges
    image = to_chw_tensor(photo_like)
    reference = v2.Compose([v2.Resize(resize_size(image_size), antialias=True), v2.CenterCrop(image_size)])(image)
    ours = eval_geometry(image, image_size)
    assert ours.dtype == torch.uint8 and ours.shape == (3, image_size, image_size)
    assert torch.equal(ours, reference)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def test_decode_handles_modes_and_orientation():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    assert decode_image(encode(rgb.convert("CMYK"), "JPEG")).shape == (20, 30, 3)
    assert decode_image(encode(rgb.convert("L"), "PNG")).shape == (20, 30, 3)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(0)
    assert (decode_image(encode(rgba, "PNG")) == 255).all()  # transparent -> white
    deep = Image.fromarray((np.arange(600, dtype=np.uint16).reshape(20, 30) * 100).astype(np.uint16))
    out = decode_image(encode(deep, "PNG"))
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3) and out.max() > 200
    exif = rgb.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    assert decode_image(encode(rgb, "JPEG", exif=exif)).shape == (30, 20, 3)


@pytest.mark.parametrize("data,message", [
    (b"", "empty"),
    (b"hello, not an image", "cannot identify"),
    (None, "(?i)truncated"),
])
def test_decode_errors_are_typed(data, message):
    if data is None:
        full = encode(Image.new("RGB", (64, 64), "red"), "JPEG")
        data = full[: len(full) // 2]
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)


def test_decompression_bomb_is_refused_before_decoding():
    big = encode(Image.new("L", (4000, 4000)), "PNG")
    with pytest.raises(ImageDecodeError, match="max_pixels"):
        decode_image(big, max_pixels=1_000_000)


def test_jpeg_draft_mode_decodes_at_reduced_scale():
    data = encode(Image.new("RGB", (2000, 1000), "blue"), "JPEG")
    out = decode_image(data, target_size=256)
    assert out.shape[0] >= 256 and out.shape[0] < 1000


def test_fetch_errors_say_what_failed(tmp_path, monkeypatch):
    """A failing package tool shows its command and output, not a bare CalledProcessError."""
    import imgcls.datasets as ds

    monkeypatch.setattr(ds, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "not-installed"))
    monkeypatch.setattr(ds, "FASHION_MNIST_DEB", "no-such-package-imgcls")
    monkeypatch.setattr(ds.os, "geteuid", lambda: 1000)  # no apt-get update
    with pytest.raises(ds.FetchError, match=r"apt-get (download no-such-package-imgcls' failed|is not installed)"):
        ds.fetch_fashion_mnist(str(tmp_path / "fm"), per_class=2)


def test_fetch_marker_tells_subsets_apart(tmp_path):
    from imgcls.datasets import fetch_fashion_mnist

    dest = str(tmp_path / "fm")
    fetch_fashion_mnist(dest, per_class=3)
    assert sum(len(files) for _, _, files in os.walk(dest)) == 30 + 1
    fetch_fashion_mnist(dest, per_class=5)  # more per class: fetched again, not the 3-per-class subset
    counts = {d: len(os.listdir(os.path.join(dest, d))) for d in os.listdir(dest) if not d.startswith(".")}
    assert set(counts.values()) == {5} and len(counts) == 10


def test_one_preprocessing_definition_gives_the_same_pixels_everywhere(tmp_path):
    """A real JPEG photo (matplotlib's Grace Hopper, 512x600) read by inference (the
    reader), by the validation/test cache (its shard tasks' batched resize) and by explain
    (the eval preset) gives the same uint8 tensor, pixel for pixel; normalising it gives
    what the model sees in each."""
    from matplotlib import cbook

    from imgcls.training.cache import resize_many
    from imgcls.preprocess import decode_image, resize_size
    from imgcls.inference.decode import Decoder

    photo = str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    data = open(photo, "rb").read()
    for size in (64, 96, 224):
        short = resize_size(size)
        [chunk] = list(Decoder(size, 64_000_000).chunks([photo]))
        inference = torch.from_numpy(chunk["image"][0]).permute(2, 0, 1)
        cached = torch.from_numpy(resize_many([decode_image(data, target_size=short)], short, size)[0]).permute(2, 0, 1)
        explained = ClassificationPresetEval(size, (0.5,) * 3, (0.25,) * 3).decode(data)
        assert inference.shape == (3, size, size)
        assert torch.equal(inference, cached) and torch.equal(inference, explained)


def test_fetch_dogs_cats_keeps_per_class_photos(tmp_path):
    from imgcls.datasets import fetch_dogs_cats

    dest = str(tmp_path / "dc")
    fetch_dogs_cats(dest, per_class=4)
    counts = {d: len(os.listdir(os.path.join(dest, d))) for d in os.listdir(dest) if not d.startswith(".")}
    assert counts == {"cat": 4, "dog": 4}
    assert Image.open(os.path.join(dest, "dog", sorted(os.listdir(os.path.join(dest, "dog")))[0])).size == (32, 32)


def test_several_roots_are_listed_together_and_a_later_label_wins(tmp_path):
    import pandas as pd
    from PIL import Image

    from imgcls.labelled import list_labelled_images

    for c in ("bag", "coat"):
        (tmp_path / "old" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8)).save(tmp_path / "old" / c / f"{i}.png")
    (tmp_path / "new" / "sandal").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "new" / "sandal" / "0.png")
    corrected = str(tmp_path / "old" / "bag" / "1.png")
    pd.DataFrame({"path": [corrected], "label": ["coat"]}).to_csv(tmp_path / "fixes.csv", index=False)
    images = list_labelled_images(f"{tmp_path / 'old'},{tmp_path / 'new'},{tmp_path / 'fixes.csv'}")
    assert len(images) == 5 and len(set(images.paths)) == 5
    labels = dict(zip(images.paths, images.labels))
    assert labels[corrected] == "coat" and labels[str(tmp_path / "new" / "sandal" / "0.png")] == "sandal"
    assert sorted(set(images.labels)) == ["bag", "coat", "sandal"]


def test_one_manifest_reader_keeps_labels_as_written_and_names_missing_columns(tmp_path):
    """Training's labelled manifests and labelling's path manifests go through one reader:
    labels are strings as written (``007`` is not the number 7), and a missing column is
    named with the ones the manifest has."""
    from imgcls.manifest import ManifestError, read_manifest

    (tmp_path / "m.csv").write_text("path,label,note\na/0.png,007,x\nb/1.png,7,y\n")
    table = read_manifest(str(tmp_path / "m.csv"), ["path", "label"])
    assert table.column_names == ["path", "label"]
    assert table.column("label").to_pylist() == ["007", "7"]
    pd.DataFrame({"path": ["p.png"], "label": [3]}).to_parquet(tmp_path / "m.parquet")
    assert read_manifest(str(tmp_path / "m.parquet"), ["path", "label"]).column("label").to_pylist() == ["3"]
    with pytest.raises(ManifestError, match=r"has no 'label' column .*columns: \['path', 'note'\]"):
        (tmp_path / "p.csv").write_text("path,note\na.png,x\n")
        read_manifest(str(tmp_path / "p.csv"), ["path", "label"])
    images = list_labelled_images(str(tmp_path / "m.csv"))
    assert images.labels == ["007", "7"] and images.paths == [str(tmp_path / "a/0.png"), str(tmp_path / "b/1.png")]
