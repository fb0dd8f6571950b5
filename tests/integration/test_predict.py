"""Bulk labelling on a real Ray cluster: nothing lost, resumable, tar shards, S3."""

import dataclasses
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import EXPECTED_ERRORS, add_tar_member, photo, requires_gpu

import imgcls.devices
import imgcls.inference.lease
from imgcls.inference.bulk import label_images, labels_here
from imgcls.checkpoint import load_checkpoint, save_checkpoint
from imgcls.config import JobConfig, ModelConfig, PredictConfig
from imgcls.preprocess import ClassificationPresetEval, decode_image, to_chw_tensor
from imgcls.inference.inputs import OutputFolderError, plan_inputs
from imgcls.models import create_model
from imgcls.inference.pipeline import pool_plan

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real (untrained) small CNN checkpoint for two classes."""
    folder = str(tmp_path_factory.mktemp("ckpt"))
    torch.manual_seed(0)
    job = JobConfig(model=ModelConfig(arch="small_cnn", image_size=32))
    save_checkpoint(folder, create_model("small_cnn", 2), job, ["cat", "dog"], history=[])
    return folder


ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}| at 0x")  # a memory address, as in <_io.BytesIO object at 0x7f56fc53e610>


def read_output(folder):
    return pq.read_table(str(folder)).to_pandas()


def test_every_file_gets_exactly_one_row(ray_cluster, checkpoint, bad_corpus, tmp_path, capsys, monkeypatch):
    cfg = PredictConfig(model=checkpoint, input=str(bad_corpus), output=str(tmp_path / "out"), files_per_shard=4,
                        top_k=2, embeddings=True)
    summary = label_images(cfg)
    # Progress a person can read: files done of the total, shards, rate; the last line at 100%.
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("labelled ")]
    n = summary.files
    assert progress and progress[-1].startswith(f"labelled {n} / {n} files (100%), 4 / 4 shards, ")
    assert progress[-1].endswith("done")
    df = read_output(tmp_path / "out")
    inputs = sorted(str(p) for p in bad_corpus.rglob("*") if p.is_file())
    assert sorted(df["path"]) == inputs  # rows == inputs, no duplicates
    assert summary.rows == summary.files == len(inputs)
    errors = df[df.status == "error"]
    assert dict(zip(errors["path"].map(os.path.basename), errors["error_type"])) == EXPECTED_ERRORS
    assert errors["error"].str.len().gt(0).all() and not errors["error"].str.contains(ADDRESS).any()
    assert df.loc[df.status == "ok", ["error", "error_type"]].isna().all().all()
    ok = df[df.status == "ok"]
    assert ok["label"].isin(["cat", "dog"]).all() and ok["score"].between(0, 1).all()
    assert ok["topk_labels"].map(len).eq(2).all() and ok["embedding"].map(len).eq(128).all()
    assert df["model_id"].nunique() == 1 and df.loc[df.status == "error", "label"].isna().all()
    # Shards are named by index and nothing half-written is left behind.
    names = sorted(os.listdir(tmp_path / "out"))
    assert [n for n in names if n.startswith("part-")] == [f"part-{i:06d}.parquet" for i in range(4)]
    assert not [n for n in names if n.startswith(".tmp")]

    # So few files were labelled in this process (bulk.labels_here); the actor pool
    # writes the same parts with the same rows.
    plan = plan_inputs(cfg.input, cfg.output, cfg.files_per_shard)
    todo = plan.shard_table()
    assert labels_here(plan, todo, cfg, pool_plan(False, None))
    monkeypatch.setattr(imgcls.devices, "IN_PROCESS_MAX_IMAGES", 0)
    assert not labels_here(plan, todo, cfg, pool_plan(False, None))
    label_images(dataclasses.replace(cfg, output=str(tmp_path / "pool")))
    assert sorted(n for n in os.listdir(tmp_path / "pool") if n.startswith("part-")) == \
        [n for n in names if n.startswith("part-")]
    pool = read_output(tmp_path / "pool")
    exact = ["path", "status", "error_type", "error", "label", "model_id"]
    pd.testing.assert_frame_equal(df[exact], pool[exact])
    assert np.allclose(df["score"].fillna(-1), pool["score"].fillna(-1), atol=1e-6)
    assert np.allclose(np.stack(ok["embedding"]), np.stack(pool.loc[pool.status == "ok", "embedding"]), atol=1e-5)


@pytest.mark.slow  # several pipelines or processes: in CI, not in the quick loop
def test_separate_decode_pool_gives_the_same_rows(ray_cluster, checkpoint, bad_corpus, tmp_path):
    """The GPU layout (decoding in its own CPU actor pool), run here on CPUs, labels
    exactly as the CPU layout, where each model actor decodes its own batches. There,
    shards of 4 files in chunks of 3 images are staged chunk by chunk and merged. With
    ``gpu_decode`` the decode pool passes plain JPEGs on undecoded, through the object
    store, and the model actors decode them (on their CPU here): the same rows."""
    frames = {}
    for layout in ("fused", "split", "split-gpu-decode"):
        separate = layout != "fused"
        out = tmp_path / f"out-{layout}"
        summary = label_images(PredictConfig(model=checkpoint, input=str(bad_corpus), output=str(out),
                                             files_per_shard=4, separate_decode=separate,
                                             gpu_decode=layout.endswith("gpu-decode"),
                                             batch_size=3 if separate else 64))
        assert summary.rows == summary.files
        assert sorted(os.listdir(out)) == ["_inputs", "_job.json", "_model", "_summary.json"] + \
            [f"part-{i:06d}.parquet" for i in range(summary.shards)]  # no staging left
        frames[layout] = read_output(out).sort_values("path").reset_index(drop=True)
    fused = frames["fused"]
    assert len(fused) == len(list(p for p in bad_corpus.rglob("*") if p.is_file()))
    cols = ["path", "status", "error", "error_type", "label", "topk_labels", "model_id"]
    for layout in ("split", "split-gpu-decode"):
        a, b = fused[cols].astype(str), frames[layout][cols].astype(str)
        assert a.equals(b), (layout, [(list(a.iloc[i]), list(b.iloc[i])) for i in range(len(a))
                                      if list(a.iloc[i]) != list(b.iloc[i])])
        assert np.allclose(fused["score"].fillna(-1), frames[layout]["score"].fillna(-1), atol=1e-6), layout


@pytest.mark.slow  # several pipelines or processes: in CI, not in the quick loop
def test_manifest_rows_and_a_rerun_that_neither_lists_again_nor_mixes_models(ray_cluster, checkpoint, bad_corpus,
                                                                               tmp_path):
    """A CSV or Parquet manifest, read by Ray Data: relative paths resolve against its
    folder, missing files become error rows. A rerun reads the plan instead of the inputs;
    a rerun with another model is refused."""
    import shutil

    import pandas as pd

    folder = tmp_path / "m"
    (folder / "imgs").mkdir(parents=True)
    for name in ("plain.jpg", "cmyk.jpg", "rgba.png"):
        shutil.copy(bad_corpus / name, folder / "imgs" / name)
    listed = ["imgs/plain.jpg", "imgs/cmyk.jpg", "imgs/rgba.png", str(bad_corpus / "plain.png"), "imgs/nope.jpg"]
    expected = sorted([str(folder / p) for p in listed if not os.path.isabs(p)] + [str(bad_corpus / "plain.png")])
    pd.DataFrame({"path": listed, "note": range(5)}).to_csv(folder / "manifest.csv", index=False)
    pd.DataFrame({"path": listed}).to_parquet(folder / "manifest.parquet")
    for manifest in ("manifest.csv", "manifest.parquet"):
        out = tmp_path / f"out-{manifest}"
        summary = label_images(PredictConfig(model=checkpoint, input=str(folder / manifest), output=str(out),
                                             files_per_shard=2))
        df = read_output(out)
        assert sorted(df["path"]) == expected and summary.shards == 3
        assert tuple(df.set_index("path").loc[str(folder / "imgs" / "nope.jpg"), ["status", "error_type"]]) == (
            "error", "read")
        assert (summary.rows, summary.ok, summary.errors) == (5, 4, 1)
    plan = out / "_inputs" / "_plan.json"
    planned = plan.stat().st_mtime_ns
    again = label_images(PredictConfig(model=checkpoint, input=str(folder / "manifest.parquet"), output=str(out),
                                       files_per_shard=2))
    assert (again.shards_skipped, again.plan_seconds, again.rows, again.ok) == (3, 0.0, 5, 4)
    assert plan.stat().st_mtime_ns == planned
    other = tmp_path / "other-ckpt"
    torch.manual_seed(1)
    save_checkpoint(str(other), create_model("small_cnn", 2), JobConfig(model=ModelConfig(arch="small_cnn",
                                                                                           image_size=32)),
                    ["cat", "dog"], history=[])
    with pytest.raises(ValueError, match="model_id"):
        label_images(PredictConfig(model=str(other), input=str(folder / "manifest.parquet"), output=str(out),
                                   files_per_shard=2))


@pytest.mark.slow  # several pipelines or processes: in CI, not in the quick loop
def test_onnxruntime_after_export_labels_like_torch(ray_cluster, checkpoint, bad_corpus, tmp_path):
    """``export`` then ``predict --runtime onnxruntime`` (the CPU provider here), end to end
    over the real-photo corpus: the same rows as the torch runtime, scores within 1e-4."""
    from imgcls.inference.export import export_checkpoint

    export_checkpoint(checkpoint, str(tmp_path / "export"), formats=("onnx",))
    frames = {}
    for runtime, model in (("torch", checkpoint), ("onnxruntime", str(tmp_path / "export"))):
        summary = label_images(PredictConfig(model=model, input=str(bad_corpus), output=str(tmp_path / runtime),
                                             runtime=runtime))
        assert summary.rows == summary.files
        frames[runtime] = read_output(tmp_path / runtime).sort_values("path").reset_index(drop=True)
    torch_df, ort_df = frames["torch"], frames["onnxruntime"]
    assert list(torch_df["path"]) == list(ort_df["path"]) and list(torch_df["status"]) == list(ort_df["status"])
    ok = torch_df["status"] == "ok"
    assert ok.sum() >= 8 and (torch_df.loc[ok, "label"] == ort_df.loc[ok, "label"]).all()
    assert np.allclose(torch_df.loc[ok, "score"], ort_df.loc[ok, "score"], atol=1e-4)


@pytest.mark.slow  # the model stage's scores are checked per model in tests/unit/test_model_stage.py
def test_pipeline_scores_match_direct_model_call(ray_cluster, checkpoint, bad_corpus, tmp_path):
    label_images(PredictConfig(model=checkpoint, input=str(bad_corpus / "plain.png"), output=str(tmp_path / "o")))
    row = read_output(tmp_path / "o").iloc[0]
    loaded = load_checkpoint(checkpoint)
    preset = ClassificationPresetEval(loaded.image_size, loaded.mean, loaded.std)
    x = preset(to_chw_tensor(decode_image((bad_corpus / "plain.png").read_bytes())))[None]
    with torch.no_grad():
        probs = loaded.model(x).softmax(1)[0]
    assert row["label"] == loaded.classes[int(probs.argmax())]
    assert row["score"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_tar_shards_yield_one_row_per_member(ray_cluster, checkpoint, dogs_cats_root, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        with tarfile.open(shards / f"shard-{s}.tar", "w") as tar:
            for i in range(5):
                buf = io.BytesIO()
                photo(dogs_cats_root, s * 5 + i).save(buf, "JPEG")
                add_tar_member(tar, f"{s}_{i}.jpg", buf.getvalue())
            add_tar_member(tar, f"{s}_meta.json", b"{}")
    # Batches of 4 images: each model call yields several tables per batch of tars.
    summary = label_images(PredictConfig(model=checkpoint, input=str(shards), output=str(tmp_path / "out"),
                                         batch_size=4))
    df = read_output(tmp_path / "out")
    assert summary.shards == 2 and len(df) == 12 and df["path"].is_unique
    assert (df.status == "ok").sum() == 10
    assert set(df.loc[df.status == "error", "path"].str.rsplit("#", n=1).str[1]) == {"0_meta.json", "1_meta.json"}
    assert set(df.loc[df.status == "error", "error_type"]) == {"decode"}


@pytest.mark.slow  # several pipelines or processes: in CI, not in the quick loop
def test_two_runs_over_the_same_damaged_files_give_the_same_error_rows(ray_cluster, checkpoint, bad_corpus, tmp_path):
    """Error texts hold nothing that differs from run to run (PIL's 'cannot identify image
    file <_io.BytesIO object at 0x7f...>' did), so two jobs over the same files give the
    same (path, status, error, error_type) table, and errors can be grouped by type."""
    import pandas as pd

    broken = tmp_path / "broken.tar"
    with tarfile.open(tmp_path / "whole.tar", "w") as tar:
        tar.add(bad_corpus / "plain.png", arcname="a.png")
        tar.add(bad_corpus / "plain.jpg", arcname="b.jpg")
    broken.write_bytes((tmp_path / "whole.tar").read_bytes()[:700])  # cut inside a.png
    tarfile.open(tmp_path / "empty.tar", "w").close()
    listed = sorted(str(p) for p in bad_corpus.rglob("*") if p.is_file()) + [
        str(tmp_path / n) for n in ("missing.jpg", "broken.tar", "empty.tar", "missing.tar")]
    pd.DataFrame({"path": listed}).to_csv(tmp_path / "manifest.csv", index=False)
    tables = []
    for run in range(2):
        summary = label_images(PredictConfig(model=checkpoint, input=str(tmp_path / "manifest.csv"),
                                             output=str(tmp_path / f"out-{run}"), files_per_shard=4))
        assert summary.rows == summary.files == len(listed)
        tables.append(read_output(tmp_path / f"out-{run}")[["path", "status", "error", "error_type"]]
                      .sort_values("path").reset_index(drop=True))
    first, second = tables
    assert first.equals(second)
    errors = first[first.status == "error"]
    assert dict(zip(errors["path"].map(os.path.basename), errors["error_type"])) == {
        **EXPECTED_ERRORS, "missing.jpg": "read", "broken.tar": "tar", "empty.tar": "empty", "missing.tar": "read"}
    assert not errors["error"].str.contains(ADDRESS).any()
    assert errors.groupby("error_type").size().to_dict() == {"decode": 3, "empty": 2, "read": 2, "tar": 1,
                                                             "too-large": 1, "unsupported": 1}


def test_reruns_resume_only_with_the_settings_of_the_rows_written(ray_cluster, checkpoint, bad_corpus, tmp_path,
                                                                   capsys, monkeypatch):
    """A dead job's stale lease is taken over with a warning. A rerun with another
    --precision or --max-pixels is refused, naming the setting, and deletes nothing; so
    is a resume with --precision auto on the other kind of device (GPUs here, as a GPU job
    records it). The same settings resume: only the missing part is labelled, one row per input."""
    monkeypatch.setattr(imgcls.inference.lease, "CONFIRM_S", 0.2)  # the wait of a takeover, 2 s
    out = tmp_path / "out"
    out.mkdir()
    dead = {"job_id": "job-dead", "host": "pod-1", "pid": 1, "started": 0.0, "heartbeat": time.time() - 120}
    (out / "_lease.json").write_text(json.dumps(dead))
    cfg = PredictConfig(model=checkpoint, input=str(bad_corpus), output=str(out), files_per_shard=4, use_gpu=False)
    first = label_images(cfg)
    assert f"warning: taking over the lease of {out} from labelling job job-dead (pid 1 on host pod-1), which looks " \
           "dead: its last heartbeat was 120 s ago" in capsys.readouterr().err
    assert first.rows == first.files and not (out / "_lease.json").exists()
    job = json.loads((out / "_job.json").read_text())
    assert (job["precision"], job["auto_precision_on"], job["program"], job["max_pixels"]) == (
        "auto", "CPUs", "torchscript", 64_000_000)
    (out / "part-000001.parquet").unlink()
    (out / ".tmp-killed-part-000001.parquet").write_bytes(b"")  # what a killed run leaves
    for change, said in ((dict(precision="fp32"), "--precision was auto for the rows already written, now fp32"),
                         (dict(max_pixels=10**6), "--max-pixels was 64000000 for the rows already written, now 1000000")):
        with pytest.raises(OutputFolderError, match=re.escape(f"{out} holds the output of another job: {said}. Use "
                                                              "another --output, or the same settings")):
            label_images(dataclasses.replace(cfg, **change))
        assert (out / ".tmp-killed-part-000001.parquet").exists() and not (out / "_lease.json").exists()
    (out / "_job.json").write_text(json.dumps({**job, "auto_precision_on": "GPUs"}))
    with pytest.raises(OutputFolderError, match=re.escape(
            f"--precision auto made the rows already written in {out} on GPUs (bf16, or fp16 on GPUs without it); "
            "here it would run on CPUs (fp32): resume on GPUs (--use-gpu), or use another --output")):
        label_images(cfg)
    assert not (out / "part-000001.parquet").exists()
    (out / "_job.json").write_text(json.dumps(job))
    again = label_images(cfg)
    assert (again.shards_skipped, again.rows) == (first.shards - 1, first.rows)
    df = read_output(out)
    assert sorted(df["path"]) == sorted(str(p) for p in bad_corpus.rglob("*") if p.is_file())
    assert not [p for p in os.listdir(out) if p.startswith(".tmp") or p == "_lease.json"]


def link_photos(dogs_cats_root, folder, per_class: int):
    """``per_class`` real photos of each class under ``folder``, as hard links."""
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
        for name in sorted(os.listdir(os.path.join(dogs_cats_root, label)))[:per_class]:
            os.link(os.path.join(dogs_cats_root, label, name), folder / label / name)


def start_labelling(args: list, env: dict, out, log) -> subprocess.Popen:
    """A real ``imgcls predict`` process, once it holds the lease of ``out``."""
    proc = subprocess.Popen([sys.executable, "-m", "imgcls.cli", "predict", *args], stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "_lease.json").exists():
        assert proc.poll() is None, open(log).read()[-3000:]
        time.sleep(0.1)
    return proc


@pytest.mark.slow  # two imgcls predict processes
def test_a_second_job_into_the_same_output_fails_at_once_and_the_first_finishes(ray_address, checkpoint,
                                                                                dogs_cats_root, tmp_path):
    """Two real ``imgcls predict`` jobs into one output folder, as when KubeRay resubmits
    a job whose driver still runs: the second fails at once, naming the first's job id,
    pid and host, while the first still labels, and deletes none of its files; the first
    finishes with one row per input and removes its lease."""
    photos, out = tmp_path / "photos", tmp_path / "out"
    link_photos(dogs_cats_root, photos, 300)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ray_address}
    # An actor pool (--num-actors), not this process's thread: the first job holds its
    # lease for the seconds its actor takes to start, at least.
    args = ["--model", checkpoint, "--input", str(photos), "--output", str(out), "--files-per-shard", "50",
            "--batch-size", "16", "--num-actors", "1"]
    first = start_labelling(args, env, out, tmp_path / "first.log")
    try:
        lease = json.loads((out / "_lease.json").read_text())
        began = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "imgcls.cli", "predict", *args], capture_output=True,
                                text=True, env=env, timeout=120)
        assert second.returncode == 2 and time.monotonic() - began < 60, second.stderr
        assert first.poll() is None, "the first job should still be labelling"
        assert second.stderr.startswith(f"imgcls predict: error: {out} is being written by labelling job "
                                        f"{lease['job_id']} (pid {first.pid} on host {socket.gethostname()}, ")
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    df = read_output(out)
    assert len(df) == 600 and df["path"].is_unique and (df.status == "ok").all()
    assert not [p for p in os.listdir(out) if p.startswith(".tmp") or p == "_lease.json"]


@pytest.mark.slow  # an imgcls predict process
def test_a_job_stopped_by_sigterm_leaves_no_lease_and_a_rerun_resumes_at_once(ray_address, checkpoint,
                                                                               dogs_cats_root, tmp_path, capsys):
    """SIGTERM (a pod's stop, ``kill``) to a labelling driver: it ends through Ray's
    handler and its ``finally``, removing its lease, so that a rerun right after resumes
    without waiting for the lease to go stale."""
    photos, out = tmp_path / "photos", tmp_path / "out"
    link_photos(dogs_cats_root, photos, 200)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ray_address}
    args = ["--model", checkpoint, "--input", str(photos), "--output", str(out), "--files-per-shard", "50",
            "--batch-size", "16", "--num-actors", "1"]
    job = start_labelling(args, env, out, tmp_path / "job.log")
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=120) != 0
    assert not (out / "_lease.json").exists(), (tmp_path / "job.log").read_text()[-3000:]
    capsys.readouterr()
    summary = label_images(PredictConfig(model=checkpoint, input=str(photos), output=str(out), files_per_shard=50))
    assert "taking over" not in capsys.readouterr().err
    df = read_output(out)
    assert summary.rows == len(df) == 400 and df["path"].is_unique


@pytest.mark.slow  # several pipelines or processes: in CI, not in the quick loop
def test_killed_job_resumes_without_redoing_or_duplicating(ray_cluster, checkpoint, dogs_cats_root, tmp_path,
                                                           capsys):
    """800 real photos in 16 shards of 50: the job is killed once 3 parts are written;
    the rerun takes over the killed job's lease at once, writes the rest and leaves the
    parts already written as they were."""
    photos = tmp_path / "photos"
    link_photos(dogs_cats_root, photos, 400)
    out = tmp_path / "out"
    args = ["--model", checkpoint, "--input", str(photos), "--output", str(out), "--files-per-shard", "50",
            "--num-cpus", "1", "--batch-size", "16"]
    log = open(tmp_path / "job.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "imgcls.cli", "predict", *args], stdout=log, stderr=log,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out.exists() and len(list(out.glob("part-*.parquet"))) >= 3):
        assert proc.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, 9)  # the driver and its private Ray cluster, mid-run
    proc.wait()
    # Workers write their own parts: one mid-write when the driver died may still finish
    # its part (whole, through its rename) before it notices. Wait for the folder to settle.
    listing, stable_since = None, time.time()
    while time.time() - stable_since < 5:
        now = sorted(p.name for p in out.glob("part-*.parquet"))
        if now != listing:
            listing, stable_since = now, time.time()
        time.sleep(0.2)
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert 3 <= len(done_before) < 16, "the job should have been killed midway"
    for p in done_before:  # whatever is visible is a complete shard
        assert len(pq.read_table(out / p)) == 50

    capsys.readouterr()
    summary = label_images(PredictConfig(model=checkpoint, input=str(photos), output=str(out), files_per_shard=50))
    assert "is gone from this host" in capsys.readouterr().err  # its lease, taken over without waiting
    assert summary.shards_skipped == len(done_before)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name in done_before} == done_before
    df = read_output(out)
    assert len(df) == 800 and df["path"].is_unique and (df.status == "ok").all()


@pytest.mark.slow  # several pipelines or processes: in CI, not in the quick loop
def test_reads_from_and_writes_to_s3(ray_cluster, s3_server, checkpoint, bad_corpus, tmp_path):
    """A prefix with sub-prefixes (listed in parallel), a tar and a manifest on the S3
    server; tar member paths read back from S3 (as evaluate and explain do)."""
    import s3fs

    from imgcls import storage
    from imgcls.inference.read import read_input

    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    for name in ("plain.jpg", "cmyk.jpg", "zero.jpg", "nested/gray.png"):
        fs.put(str(bad_corpus / name), f"imgcls/inbox/{name}")
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        tar.add(bad_corpus / "plain.png", arcname="in/tar.png")
        tar.add(bad_corpus / "notes.txt", arcname="notes.txt")
    fs.put(str(tmp_path / "shard.tar"), "imgcls/inbox/tars/shard.tar")
    summary = label_images(PredictConfig(model=checkpoint, input="s3://imgcls/inbox", output="s3://imgcls/preds",
                                         files_per_shard=2))
    assert summary.rows == 6 and summary.errors == 2
    table = pq.read_table("imgcls/preds", filesystem=fs).to_pandas()
    assert sorted(table["error_type"].dropna()) == ["decode", "empty"]  # notes.txt in the tar, zero.jpg
    member = "s3://imgcls/inbox/tars/shard.tar#in/tar.png"
    assert sorted(table["path"]) == sorted([f"s3://imgcls/inbox/{n}" for n in (
        "cmyk.jpg", "nested/gray.png", "plain.jpg", "zero.jpg")] + [member, "s3://imgcls/inbox/tars/shard.tar#notes.txt"])
    assert read_input(member) == (bad_corpus / "plain.png").read_bytes()
    assert not [p for p in fs.ls("imgcls/preds") if "/.tmp" in p]
    # A manifest on the store, with paths relative to it, read by Ray Data.
    fs.pipe("imgcls/inbox/list.csv", b"path\nplain.jpg\nnested/gray.png\nmissing.jpg\n")
    summary = label_images(PredictConfig(model=checkpoint, input="s3://imgcls/inbox/list.csv",
                                         output="s3://imgcls/preds-manifest"))
    assert (summary.rows, summary.ok) == (3, 2)
    got = storage.read_many(["s3://imgcls/inbox/plain.jpg", "s3://imgcls/inbox/missing.jpg",
                             "s3://imgcls/inbox/cmyk.jpg"])
    assert got[0] == (bad_corpus / "plain.jpg").read_bytes() and isinstance(got[1], FileNotFoundError)
    assert got[2] == (bad_corpus / "cmyk.jpg").read_bytes()


def test_an_object_over_the_cap_on_s3_is_an_error_row_without_being_read(ray_cluster, s3_server, checkpoint,
                                                                         bad_corpus, tmp_path):
    """A prefix of real photos and one 3 MB object, labelled with a 1 MB cap
    (--max-file-mb): the object's row is too-large, its size taken from the listing,
    and every other object is labelled."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    for name in ("plain.jpg", "cmyk.jpg", "nested/gray.png"):
        fs.put(str(bad_corpus / name), f"imgcls/capped/{name}")
    fs.pipe("imgcls/capped/huge.jpg", bytes(3 * 2**20))
    summary = label_images(PredictConfig(model=checkpoint, input="s3://imgcls/capped", output=str(tmp_path / "out"),
                                         max_file_mb=1))
    df = read_output(tmp_path / "out")
    assert (summary.rows, summary.ok, summary.errors) == (4, 3, 1) and df["path"].is_unique
    [huge] = df[df.status == "error"].to_dict("records")
    assert (huge["path"], huge["error_type"]) == ("s3://imgcls/capped/huge.jpg", "too-large")
    assert huge["error"] == f"FileTooLargeError: file of {3 * 2**20} bytes exceeds the {2**20}-byte limit"


@pytest.mark.gpu
@requires_gpu
def test_gpu_labelling_gives_every_file_one_row_and_the_cpu_scores(ray_cluster, checkpoint, bad_corpus, tmp_path):
    """On a GPU (CPU decode pool, model actor on the device, bf16, uint8 staged through
    pinned memory), and with the JPEGs decoded by nvjpeg (``gpu_decode``): one row per
    input, the same error rows, and the CPU path's scores within bf16's error."""
    common = dict(model=checkpoint, input=str(bad_corpus), files_per_shard=4, top_k=2, embeddings=True)
    label_images(PredictConfig(**common, output=str(tmp_path / "cpu"), use_gpu=False))
    cpu = read_output(tmp_path / "cpu").sort_values("path").reset_index(drop=True)
    inputs = sorted(str(p) for p in bad_corpus.rglob("*") if p.is_file())
    for gpu_decode in (False, True):
        out = tmp_path / f"gpu-{gpu_decode}"
        on_gpu = label_images(PredictConfig(**common, output=str(out), use_gpu=True, gpu_decode=gpu_decode))
        gpu = read_output(out)
        assert sorted(gpu["path"]) == inputs and on_gpu.rows == on_gpu.files == len(inputs)
        errors = gpu[gpu.status == "error"]
        assert dict(zip(errors["path"].map(os.path.basename), errors["error_type"])) == EXPECTED_ERRORS
        gpu = gpu.sort_values("path").reset_index(drop=True)
        assert (gpu["status"] == cpu["status"]).all()
        ok = gpu.status == "ok"
        assert np.allclose(gpu.loc[ok, "score"], cpu.loc[ok, "score"], atol=0.03)
        assert np.allclose(np.stack(gpu.loc[ok, "embedding"]), np.stack(cpu.loc[ok, "embedding"]),
                           rtol=0.05, atol=0.05)
