"""The model stage of batch inference, without Ray: prepared payloads and the Classifier."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from imgcls.checkpoint import load_checkpoint, save_checkpoint
from imgcls.inference.model_stage import Classifier
from imgcls.config import JobConfig, ModelConfig
from imgcls.preprocess import ClassificationPresetEval
from imgcls.models import create_model, list_models
from imgcls.inference.pipeline import MIN_BLOCKS, input_blocks
from imgcls.inference.program import build_program
from imgcls.inference.schema import COL_PATH, COL_STATUS, STATUS_ERROR, STATUS_OK
from imgcls.inference.decode import ReadDecodeBatch

SIZE = 64


def photo_batch(files: list[str]) -> dict:
    """A decoded batch as the reader stage emits it, with one unreadable file at the end."""
    paths = np.array(files + ["/no/such/file.jpg"], dtype=object)
    batches = list(ReadDecodeBatch(SIZE, 64_000_000)({COL_PATH: paths}))
    assert len(batches) == 1
    return batches[0]


@pytest.fixture(scope="module")
def photos(dogs_cats_root):
    import glob

    return sorted(glob.glob(f"{dogs_cats_root}/*/*.png") + glob.glob(f"{dogs_cats_root}/*/*.jpg"))[:5]


# vgg11_bn stands for its family, and runs with the slow tests with the other large models
# (building vgg11_bn's 130M weights takes 20 s); vgg11 and vgg16 would add 25 s more.
SLOW_ARCHS = {"vgg11_bn", "convnext_tiny", "efficientnet_b1"}


@pytest.fixture
def model_folder(tmp_path):
    """A folder for a checkpoint and its program: in memory (/dev/shm) where it has room,
    since vgg11_bn's pair is over 1 GB and writing it to this machine's disk took 5 s
    of the test's 15; else the test's own temporary folder."""
    import shutil
    import tempfile

    shm = "/dev/shm"
    if not (os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 4 << 30):
        yield tmp_path
        return
    folder = tempfile.mkdtemp(prefix="imgcls-test-", dir=shm)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("arch", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW_ARCHS else m
                                  for m in list_models() if m not in ("vgg11", "vgg16")])
def test_prepared_model_labels_like_the_checkpoint(arch, photos, model_folder):
    """Folded, channels_last and traced, every registry model gives the checkpoint's own
    probabilities, for batch sizes other than the one it was traced with, also when the
    batch is run in chunks (here 2 + 2 + 1 images)."""
    torch.manual_seed(0)
    model = create_model(arch, 3, image_size=SIZE)
    model.train()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        model(torch.randn(4, 3, SIZE, SIZE) * 2)
    save_checkpoint(str(model_folder), model, JobConfig(model=ModelConfig(arch=arch, image_size=SIZE)),
                    ["a", "b", "c"], history=[])
    payload = build_program(str(model_folder))
    classifier = Classifier(payload, top_k=2, embeddings=True, cpu_chunk=2)
    batch = photo_batch(photos)
    table = classifier(batch)

    loaded = load_checkpoint(str(model_folder))
    preset = ClassificationPresetEval(SIZE, loaded.mean, loaded.std)
    x = preset.normalize(torch.from_numpy(batch["image"][:-1]).permute(0, 3, 1, 2))
    with torch.no_grad():
        expected = loaded.model(x).softmax(1)
    rows = table.to_pylist()
    assert [r[COL_STATUS] for r in rows] == [STATUS_OK] * len(photos) + [STATUS_ERROR]
    assert [r["error_type"] for r in rows] == [None] * len(photos) + ["read"]  # the missing file
    assert payload.model_id == loaded.model_id and all(r["model_id"] == loaded.model_id for r in rows)
    for r, p in zip(rows, expected):
        assert r["label"] == ["a", "b", "c"][int(p.argmax())]
        assert r["score"] == pytest.approx(float(p.max()), abs=1e-4)
        assert len(r["topk_labels"]) == 2 and len(r["embedding"]) > 0
    assert rows[-1]["label"] is None and rows[-1]["embedding"] is None


def test_reader_bounds_the_images_it_holds_however_large_a_tar(photos, tmp_path):
    """A batch of input rows may name tars of thousands of members; the reader yields at
    most ``max_images`` decoded images at a time, one row per member, named tar#member."""
    import tarfile

    from conftest import add_tar_member

    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(9):  # each photo a file of its own (tests/unit/test_inputs.py reads hard links)
            with open(photos[i % len(photos)], "rb") as f:
                add_tar_member(tar, f"{i}.jpg", f.read())
        add_tar_member(tar, "note.txt", b"not an image")
    rows = {COL_PATH: np.array([str(shard), photos[0]], dtype=object)}
    batches = list(ReadDecodeBatch(SIZE, 64_000_000, max_images=4)(rows))
    assert [len(b[COL_PATH]) for b in batches] == [4, 4, 3]
    assert all(b["image"].shape == (len(b[COL_PATH]), SIZE, SIZE, 3) and b["image"].flags.c_contiguous
               for b in batches)
    merged = {k: np.concatenate([b[k] for b in batches]) for k in (COL_PATH, COL_STATUS)}
    assert list(merged[COL_PATH][:9]) == [f"{shard}#{i}.jpg" for i in range(9)]
    assert list(merged[COL_STATUS]).count(STATUS_ERROR) == 1 and merged[COL_PATH][9] == f"{shard}#note.txt"
    assert merged[COL_PATH][10] == photos[0] and merged[COL_STATUS][10] == STATUS_OK
    [nothing] = list(ReadDecodeBatch(SIZE, 64_000_000, max_images=4)({COL_PATH: np.array([], dtype=object)}))
    assert nothing["image"].shape == (0, SIZE, SIZE, 3) and len(nothing[COL_PATH]) == 0


def test_input_blocks_cover_every_input_once_and_keep_tars_alone():
    paths = [f"a/{i:05d}.jpg" for i in range(5000)] + ["b/x.TAR"] + [f"c/{i}.png" for i in range(300)] + ["d/y.tar"]
    blocks = input_blocks(paths, rows_per_block=256)
    assert sorted(p for b in blocks for p in b[COL_PATH].to_pylist()) == sorted(paths)
    tars = [b for b in blocks if b[COL_PATH][0].as_py().lower().endswith(".tar")]
    assert [b.num_rows for b in tars] == [1, 1]
    assert max(b.num_rows for b in blocks) == 256
    # Few files still make enough blocks to spread over the actors.
    assert len(input_blocks([f"{i}.jpg" for i in range(160)])) == MIN_BLOCKS
    # Nothing to label: one empty block, not an empty dataset without columns.
    assert [b.num_rows for b in input_blocks([])] == [0]


def test_model_stage_and_training_import_torchvision_only_for_its_models():
    """Ray workers import these modules; torchvision alone (it pulls in torch._dynamo and
    sympy) would add 7-9 s to each: the labelling stages, the training loop's module and a
    small-CNN worker never import it, and a torchvision architecture does when built."""
    code = ("import sys\n"
            "tv = lambda: any(m.startswith('torchvision') for m in sys.modules)\n"
            "import imgcls.inference.bulk, imgcls.inference.inputs, imgcls.inference.decode, imgcls.training.loop\n"
            "import imgcls.training.trainer, imgcls.training.cache, imgcls.checkpoint, imgcls.training.probe\n"
            "from imgcls.models import create_model\n"
            "create_model('small_cnn', 3, image_size=28)\n"
            "before = tv()\n"
            "create_model('resnet18', 3)\n"
            "print(before, tv())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False True"


def test_onnxruntime_uses_the_cuda_provider_only_with_a_gpu():
    from imgcls.inference.model_stage import onnx_providers

    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers(True, both) == both
    assert onnx_providers(False, both) == ["CPUExecutionProvider"]
    assert onnx_providers(True, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]  # CPU-only onnxruntime


def test_device_feed_normalises_chunks_in_order_in_the_models_layout_and_dtype():
    """The feed's CPU branch (the GPU one stages the same chunks through pinned memory):
    chunks in order, covering the batch, normalised as ScaleNormalize does, channels_last,
    cast to the inference dtype without losing the layout."""
    from imgcls.inference.model_stage import DeviceFeed
    from imgcls.preprocess import ScaleNormalize

    images = np.random.default_rng(0).integers(0, 256, (7, 5, 5, 3), dtype=np.uint8)
    normalize = ScaleNormalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    expected = normalize(torch.from_numpy(images).permute(0, 3, 1, 2))
    chunks = list(DeviceFeed(torch.device("cpu"), normalize, chunk=3)(images))
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert all(c.is_contiguous(memory_format=torch.channels_last) for c in chunks)
    assert torch.allclose(torch.cat(chunks), expected, atol=1e-5)
    halves = list(DeviceFeed(torch.device("cpu"), normalize, chunk=4, dtype=torch.bfloat16)(images))
    assert [c.dtype for c in halves] == [torch.bfloat16] * 2
    assert halves[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(torch.cat(halves).float(), expected, atol=0.02)


def test_inference_dtype_is_float32_on_cpus_unless_asked_and_checked():
    from imgcls.inference.model_stage import inference_dtype
    from imgcls.config import PredictConfig
    from imgcls.inference.pipeline import model_batch_size

    cpu = torch.device("cpu")
    assert inference_dtype("auto", cpu) is None and inference_dtype("fp32", cpu) is None
    assert inference_dtype("bf16", cpu) is torch.bfloat16 and inference_dtype("fp16", cpu) is torch.float16
    with pytest.raises(ValueError, match="precision must be one of"):
        inference_dtype("int8", cpu)
    with pytest.raises(ValueError, match="precision must be one of"):
        PredictConfig(precision="half")
    assert PredictConfig().batch_size is None
    assert model_batch_size(None, use_gpu=True) == 256 and model_batch_size(None, use_gpu=False) == 64
    assert model_batch_size(32, use_gpu=True) == 32


def test_bf16_inference_labels_like_float32_and_builds_rows_from_arrays(photos, tmp_path):
    """The GPU's default precision, run on the CPU: the model's weights and inputs in bf16,
    probabilities in float32 within bf16's error of float32's; error rows keep empty top-k
    lists and a null embedding."""
    torch.manual_seed(0)
    model = create_model("resnet18", 3, image_size=SIZE).eval()
    save_checkpoint(str(tmp_path), model, JobConfig(model=ModelConfig(arch="resnet18", image_size=SIZE)),
                    ["a", "b", "c"], history=[])
    payload = build_program(str(tmp_path))
    batch = photo_batch(photos)
    full = Classifier(payload, top_k=3, embeddings=True).label(batch).to_pylist()
    half_classifier = Classifier(payload, top_k=3, embeddings=True, precision="bf16")
    assert next(half_classifier.model.parameters()).dtype == torch.bfloat16
    half = half_classifier.label(batch).to_pylist()
    for f, h in zip(full[:-1], half[:-1]):
        assert h["score"] == pytest.approx(f["score"], abs=0.03)
        assert sorted(h["topk_labels"]) == ["a", "b", "c"] and sum(h["topk_scores"]) == pytest.approx(1, abs=1e-3)
        assert np.allclose(h["embedding"], f["embedding"], rtol=0.05, atol=0.05)
    assert [f["label"] for f in full] == [h["label"] for h in half]
    assert half[-1]["topk_labels"] == [] and half[-1]["topk_scores"] == [] and half[-1]["embedding"] is None
    assert half[-1]["score"] is None and half[-1]["label"] is None


def test_an_ensemble_averages_its_members_probabilities_and_flip_adds_the_mirror(photos, tmp_path):
    from imgcls.inference.finished import model_id
    from imgcls.inference.program import EnsembleError

    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folder = str(tmp_path / f"m{seed}")
        save_checkpoint(folder, create_model("small_cnn", 3, image_size=SIZE).eval(),
                        JobConfig(model=ModelConfig(arch="small_cnn", image_size=SIZE)), ["a", "b", "c"], history=[])
        folders.append(folder)
    batch = photo_batch(photos)
    loaded = [load_checkpoint(f) for f in folders]
    preset = ClassificationPresetEval(SIZE, loaded[0].mean, loaded[0].std)
    x = preset.normalize(torch.from_numpy(batch["image"][:-1]).permute(0, 3, 1, 2))
    with torch.no_grad():
        expected = torch.stack([m.model(x).softmax(1) for m in loaded]).mean(0)
        mirrored = torch.stack([m.model(v).softmax(1) for m in loaded for v in (x, x.flip(3))]).mean(0)

    ensemble = build_program(",".join(folders))
    assert ensemble.model_id.startswith("ens-") and ensemble.model_id == model_id(",".join(folders), "torch")
    rows = Classifier(ensemble, top_k=3, embeddings=True).label(batch).to_pylist()
    for r, p in zip(rows, expected):
        assert r["label"] == ["a", "b", "c"][int(p.argmax())] and r["score"] == pytest.approx(float(p.max()), abs=1e-4)
        assert len(r["embedding"]) == 2 * 128  # the members' features side by side
    flipped = build_program(",".join(folders), tta="flip")
    assert flipped.model_id not in (ensemble.model_id, loaded[0].model_id)
    for r, p in zip(Classifier(flipped).label(batch).to_pylist(), mirrored):
        assert r["score"] == pytest.approx(float(p.max()), abs=1e-4)

    other = str(tmp_path / "other")
    save_checkpoint(other, create_model("small_cnn", 2, image_size=SIZE), JobConfig(model=ModelConfig(
        arch="small_cnn", image_size=SIZE)), ["a", "b"], history=[])
    with pytest.raises(EnsembleError, match="cannot join"):
        build_program(f"{folders[0]},{other}")


@pytest.mark.slow  # imports torchvision.io and decodes a photo three ways: in CI, not in the quick loop
def test_jpegs_left_to_the_model_stage_label_like_the_cpu_decoded_ones(tmp_path):
    """``--gpu-decode``'s logic on the CPU: the reader leaves plain JPEGs undecoded (their
    bytes in the ``jpeg`` column), the Classifier decodes them on its device in one call;
    every file keeps its one row, a truncated JPEG the reader passed on still becomes the
    CPU path's error row, and scores match the CPU-decoded batch's."""
    import matplotlib.cbook
    from PIL import Image

    from imgcls.inference.schema import COL_ERROR, COL_JPEG
    from imgcls.inference.decode import Decoder

    hopper = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    files = {"photo.jpg": None, "gray.jpg": hopper.convert("L"), "small.jpg": hopper.resize((90, 70)),
             "cmyk.jpg": hopper.convert("CMYK"), "photo.png": hopper, "truncated.jpg": None}
    with open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), "rb") as f:
        (tmp_path / "photo.jpg").write_bytes(f.read())
    for name, image in files.items():
        if image is not None:
            image.save(tmp_path / name)
    whole = (tmp_path / "small.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "notes.txt").write_text("not an image")
    paths = sorted(str(p) for p in tmp_path.iterdir())
    torch.manual_seed(0)
    save_checkpoint(str(tmp_path / "ckpt"), create_model("small_cnn", 3).eval(),
                    JobConfig(model=ModelConfig(arch="small_cnn", image_size=SIZE)), ["a", "b", "c"], history=[])
    payload = build_program(str(tmp_path / "ckpt"))
    classifier = Classifier(payload, top_k=3, embeddings=True)
    deferred = next(Decoder(SIZE, 64_000_000, max_images=16, defer_jpeg=True).chunks(paths))
    left = {p.rsplit("/", 1)[-1] for p, data in zip(deferred[COL_PATH], deferred[COL_JPEG]) if len(data)}
    assert left == {"photo.jpg", "gray.jpg", "small.jpg", "truncated.jpg"}  # header only: truncation not seen yet
    assert not deferred["image"][[p.endswith(tuple(left)) for p in deferred[COL_PATH]]].any()
    cpu = classifier.label(next(Decoder(SIZE, 64_000_000, max_images=16).chunks(paths))).to_pylist()
    dev = classifier.label(deferred).to_pylist()
    assert classifier.jpeg_decoder is not None
    assert [r["path"] for r in dev] == [r["path"] for r in cpu] == paths
    for c, d in zip(cpu, dev):
        assert (d["status"], d["error"], d["error_type"]) == (c["status"], c["error"], c["error_type"]), d["path"]
        if c["status"] == STATUS_OK:
            assert d["score"] == pytest.approx(c["score"], abs=0.02) and d["label"] == c["label"], d["path"]
            assert np.allclose(d["embedding"], c["embedding"], atol=0.05)
    bad = {r["path"].rsplit("/", 1)[-1]: r["error_type"] for r in dev if r["status"] == STATUS_ERROR}
    assert bad == {"truncated.jpg": "decode", "notes.txt": "decode"}
    assert "truncated" in next(r[COL_ERROR] for r in dev if r["path"].endswith("truncated.jpg"))


@pytest.mark.slow  # torch.export imports torch._dynamo (seconds of CPU): in CI, not in the quick loop
@pytest.mark.parametrize("arch", ["small_cnn", "mobilenet_v3_small"])
def test_an_exported_program_labels_like_the_traced_one(arch, photos, tmp_path):
    """``--program export``: the driver exports the network with ``torch.export`` (a
    dynamic batch size) instead of tracing it to TorchScript; the actor's rows match the
    trace's, in float32 and within bf16's error in bf16, for a batch of another size than
    the export's example and for an error row."""
    torch.manual_seed(0)
    save_checkpoint(str(tmp_path), create_model(arch, 3, image_size=SIZE).eval(),
                    JobConfig(model=ModelConfig(arch=arch, image_size=SIZE)), ["a", "b", "c"], history=[])
    traced, exported = build_program(str(tmp_path)), build_program(str(tmp_path), program="export")
    assert (traced.form, exported.form) == ("torchscript", "export") and traced.model_id == exported.model_id
    batch = photo_batch(photos)
    reference = Classifier(traced, top_k=3, embeddings=True).label(batch).to_pylist()
    for precision, tol in (("fp32", 1e-5), ("bf16", 0.03)):
        classifier = Classifier(exported, top_k=3, embeddings=True, precision=precision)
        assert not isinstance(classifier.model, torch.jit.ScriptModule)
        rows = classifier.label(batch).to_pylist()
        assert [r["status"] for r in rows] == [r["status"] for r in reference] == ["ok"] * len(photos) + ["error"]
        for r, ref in zip(rows[:-1], reference[:-1]):
            assert r["score"] == pytest.approx(ref["score"], abs=tol) and r["label"] == ref["label"], precision
            assert np.allclose(r["embedding"], ref["embedding"], atol=max(tol, 1e-4) * 5), precision


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("form", ["export", "compile"])
def test_exported_and_compiled_programs_label_like_the_trace_on_a_gpu(form, photos, tmp_path):
    """On a GPU, in bf16: the exported program, and the same compiled by ``torch.compile``
    in the actor, give the TorchScript trace's scores within bf16's error."""
    torch.manual_seed(0)
    save_checkpoint(str(tmp_path), create_model("resnet18", 3, image_size=SIZE).eval(),
                    JobConfig(model=ModelConfig(arch="resnet18", image_size=SIZE)), ["a", "b", "c"], history=[])
    batch = photo_batch(photos)
    reference = Classifier(build_program(str(tmp_path)), top_k=3, use_gpu=True).label(batch).to_pylist()
    rows = Classifier(build_program(str(tmp_path), program=form), top_k=3, use_gpu=True).label(batch).to_pylist()
    assert [r["status"] for r in rows] == [r["status"] for r in reference]
    for r, ref in zip(rows[:-1], reference[:-1]):
        assert r["score"] == pytest.approx(ref["score"], abs=0.03)
