"""The README's evaluate / predict / explain commands as written, through the CLI, on real
Fashion-MNIST files: evaluate --data, predict with a glob, evaluate --predictions,
explain --mistakes-from."""

import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from imgcls.checkpoint import save_checkpoint
from imgcls.cli import cli
from imgcls.config import JobConfig, ModelConfig
from imgcls.models import create_model

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def run(*args):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output[-3000:]
    return result.output


@pytest.mark.slow  # several commands: in CI, not in the quick loop
def test_evaluate_predict_and_explain_as_the_readme_writes_them(ray_cluster, fmnist_root, tmp_path):
    classes = sorted(d for d in os.listdir(fmnist_root) if os.path.isdir(os.path.join(fmnist_root, d)))
    data = tmp_path / "fm"
    for c in classes:  # 5 real images per class
        (data / c).mkdir(parents=True)
        for name in sorted(os.listdir(os.path.join(fmnist_root, c)))[:5]:
            shutil.copy(os.path.join(fmnist_root, c, name), data / c / name)
    model = str(tmp_path / "ckpt")
    torch.manual_seed(0)  # untrained: plenty of confident mistakes to explain
    save_checkpoint(model, create_model("small_cnn", 10), JobConfig(model=ModelConfig(arch="small_cnn", image_size=28)),
                    classes, history=[])

    out = run("evaluate", "--model", model, "--data", str(data), "--output", str(tmp_path / "eval"))
    metrics = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert metrics["num_samples"] == 50 and 0 <= metrics["accuracy"] <= 1 and "top5_accuracy" in metrics
    assert sum(map(sum, metrics["confusion_matrix"])) == 50 and "accuracy" in out
    for name in ("report.html", "confusion_matrix.png", "predictions.parquet", "embedding_map.png"):
        assert os.path.getsize(tmp_path / "eval" / name) > 0
    assert "embedding_map.png" in open(tmp_path / "eval" / "report.html").read()
    # a user reads evaluate's predictions with pandas, list columns included
    scored = pd.read_parquet(tmp_path / "eval" / "predictions.parquet")
    assert len(scored) == 50 and all(len(k) == 5 for k in scored["topk_labels"])

    run("predict", "--model", model, "--input", f"{data}/*/*.png", "--output", str(tmp_path / "labels"))
    labels = pq.read_table(str(tmp_path / "labels")).to_pandas()
    assert len(labels) == 50 and labels["path"].is_unique and (labels["status"] == "ok").all()

    run("evaluate", "--model", model, "--predictions", str(tmp_path / "labels"), "--output", str(tmp_path / "eval2"))
    again = json.load(open(tmp_path / "eval2" / "metrics.json"))
    # True labels from each file's parent folder: the same metrics as evaluate --data.
    assert again["num_samples"] == 50 and again["confusion_matrix"] == metrics["confusion_matrix"]
    assert not os.path.exists(tmp_path / "eval2" / "embedding_map.png")  # labelled without --embeddings

    out = run("explain", "--model", model, "--mistakes-from", str(tmp_path / "eval"), "--top", "3",
              "--output", str(tmp_path / "gradcam"))
    explained = json.loads(out[out.index("["):])
    assert len(explained) == 3 and len(os.listdir(tmp_path / "gradcam")) == 2 * 3 + 1  # overlays, inputs, page
    assert all(os.path.dirname(e["overlay"]) == str(tmp_path / "gradcam") for e in explained)
    assert all(e["true_label"] in classes and e["true_label"] != e["label"] for e in explained)
    report = open(tmp_path / "eval" / "report.html").read()  # the mistakes now link to their overlays
    assert all(f"href='{os.path.relpath(e['overlay'], tmp_path / 'eval')}'" in report for e in explained)


@pytest.mark.slow  # several commands: in CI, not in the quick loop
def test_predict_output_is_imgcls_lines_only_unless_verbose(checkpoint_28, fmnist_root, ray_address, tmp_path):
    """A user's terminal or job log shows the devices chosen, labelling progress and the
    summary once; Ray's own INFO logs and Ray Data's progress reports only with --verbose.
    The quiet run starts a private cluster (whose start-up logs are Ray's too); the
    verbose one joins the session's, as under ``ray job submit``."""
    import subprocess
    import sys

    outputs = {}
    for verbose in (False, True):
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", **({"RAY_ADDRESS": ray_address} if verbose else {})}
        cmd = [sys.executable, "-m", "imgcls.cli", *(["--verbose"] if verbose else []), "predict", "--model",
               checkpoint_28, "--input", os.path.join(fmnist_root, "bag"), "--output", str(tmp_path / f"o{verbose}"),
               *([] if verbose else ["--num-cpus", "2"])]
        outputs[verbose] = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert outputs[verbose].returncode == 0, outputs[verbose].stderr[-3000:]
    quiet = outputs[False]
    assert quiet.stdout.startswith("devices: labelling runs on CPUs") and quiet.stdout.count('"files"') == 1
    assert not re.search(r"\sINFO\s", quiet.stderr) and "labelled 200 / 200 files (100%)" in quiet.stderr
    assert re.search(r"\sINFO\s", outputs[True].stderr)  # Ray's own logs are there when asked for
    assert "labelled 200 / 200 files (100%)" in outputs[True].stderr  # on the session's cluster


@pytest.mark.slow  # a command with its own Ray cluster: in CI, not in the quick loop
def test_train_output_is_imgcls_lines_only(fmnist_root, tmp_path):
    """`imgcls train` on a cluster of its own (--num-cpus) shows the devices chosen, the
    caches, one line per epoch (from the rank-0 worker, under Ray's prefix naming it), the
    test metrics and the summary: not Ray Train's INFO reports of every result, checkpoint
    and worker group, nor its placement-group cleaner's warnings when it cannot watch the
    run's controller (through the dashboard's State API)."""
    import subprocess
    import sys

    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "imgcls.cli", "train", "--config", "jobs/configs/fashion_mnist.yaml",
           "--root", fmnist_root, "--max-per-class", "20", "--epochs", "2", "--num-cpus", "2",
           "--storage-path", str(tmp_path), "--name", "quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["val"]["epoch"] == 1
    text = proc.stdout[:proc.stdout.index("{")] + proc.stderr
    lines = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if line.strip()]
    own = (r"devices: training runs on ", r"(train|val) cache: decoded \d+ images", r"test accuracy ",
           r"\(RayTrainWorker pid=\d+\) epoch [12]/2  train_loss ")
    assert [line for line in lines if not any(re.match(p, line) for p in own)] == [], text[-3000:]
    assert sum(" epoch " in line for line in lines) == 2 and sum(line.startswith("test accuracy") for line in lines) == 1


@pytest.fixture(scope="module")
def checkpoint_28(tmp_path_factory, fmnist_root):
    folder = str(tmp_path_factory.mktemp("ckpt28"))
    classes = sorted(d for d in os.listdir(fmnist_root) if os.path.isdir(os.path.join(fmnist_root, d)))
    torch.manual_seed(0)
    save_checkpoint(folder, create_model("small_cnn", 10), JobConfig(model=ModelConfig(arch="small_cnn", image_size=28)),
                    classes, history=[])
    return folder


def error_line(result) -> str:
    """The one line a user's mistake gives (status 2, no traceback). In this process the
    shared Ray cluster's own log lines may come in the captured stderr too."""
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.output[-3000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def labelled(ray_cluster, checkpoint_28, fmnist_root, tmp_path_factory):
    """A small real folder labelled to completion by `imgcls predict`: (input, output, summary).
    A test that changes the output leaves it complete again."""
    tmp_path = tmp_path_factory.mktemp("labelled")
    folder = tmp_path / "images"
    folder.mkdir()
    for name in sorted(os.listdir(os.path.join(fmnist_root, "bag")))[:20]:
        shutil.copy(os.path.join(fmnist_root, "bag", name), folder / name)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    output = str(tmp_path / "labels")
    out = run("predict", "--model", checkpoint_28, "--input", str(folder), "--output", output)
    summary = json.loads(out[out.index("{"):])
    assert summary["shards"] >= 2 and summary["rows"] == 21 and summary["errors"] == 1
    return str(folder), output, summary


def test_rerun_of_a_finished_predict_job_finishes_at_once(labelled, checkpoint_28):
    """No Ray, no torch: the summary of the complete output (every shard skipped) within
    seconds, where starting Ray alone takes 13-26 s on 2 cores."""
    import subprocess
    import sys
    import time

    folder, output, first = labelled
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "imgcls.cli", "predict", "--model", checkpoint_28, "--input", folder,
           "--output", output]
    began = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    seconds = time.monotonic() - began
    assert done.returncode == 0, done.stderr[-3000:]
    assert "devices:" not in done.stdout and f"{output} is complete" in done.stderr  # Ray was not started
    summary = json.loads(done.stdout)
    assert list(summary) == list(first)  # the shape of a normal run's summary
    assert {k: summary[k] for k in ("files", "rows", "ok", "errors", "shards", "output")} == \
        {k: first[k] for k in ("files", "rows", "ok", "errors", "shards", "output")}
    assert summary["shards_skipped"] == summary["shards"] and summary["images_per_s"] == 0
    assert seconds < 10, seconds  # about 1-2 s on an idle machine


def test_finished_output_with_another_model_or_a_missing_part_is_not_skipped(labelled, checkpoint_28, tmp_path):
    from imgcls.config import PredictConfig
    from imgcls.inference.finished import finished_summary

    folder, output, first = labelled
    cfg = PredictConfig(model=checkpoint_28, input=folder, output=output)
    assert finished_summary(cfg)["rows"] == first["rows"]
    other = str(tmp_path / "other")
    torch.manual_seed(1)
    save_checkpoint(other, create_model("small_cnn", 10), JobConfig(model=ModelConfig(arch="small_cnn", image_size=28)),
                    sorted(os.listdir(folder)[:10]), history=[])
    assert finished_summary(PredictConfig(model=other, input=folder, output=output)) is None
    assert finished_summary(PredictConfig(model=checkpoint_28, input=folder, output=output, top_k=2)) is None
    # Another checkpoint is refused as before, in one line.
    result = CliRunner().invoke(cli, ["predict", "--model", other, "--input", folder, "--output", output])
    line = error_line(result)
    assert line.startswith("imgcls predict: error: ") and "holds the output of another job" in line
    # A part lost: the job runs and labels that shard again.
    os.remove(os.path.join(output, "part-000001.parquet"))
    assert finished_summary(cfg) is None
    again = json.loads((out := run("predict", "--model", checkpoint_28, "--input", folder, "--output", output))[
        out.index("{"):])
    assert again["shards_skipped"] == first["shards"] - 1 and again["rows"] == first["rows"]
    assert finished_summary(cfg)["rows"] == first["rows"]


def test_evaluate_predictions_of_an_unlabelled_folder_fails_in_one_line(labelled, checkpoint_28, tmp_path):
    """The demo's case: predictions of a folder whose name is no class (`images`, like
    `inbox`): nothing to score, one line, status 2."""
    folder, output, _ = labelled
    result = CliRunner().invoke(cli, ["evaluate", "--model", checkpoint_28, "--predictions", output,
                                      "--output", str(tmp_path / "eval")])
    line = error_line(result)
    assert line.startswith("imgcls evaluate: error: no row to score")
    assert "'images': 20" in line and "1 are error rows" in line


def test_review_picks_uncertain_predictions_as_a_manifest_to_train_on(ray_cluster, checkpoint_28, fmnist_root,
                                                                       tmp_path):
    """`imgcls review` on a real labelling run (with embeddings): margin picks have lower
    margins than random ones, --per-class spreads them, --dedup keeps one of two identical
    files, the contact sheet shows every pick, and the manifest, once its label column is
    filled in, is training input."""
    import numpy as np
    import pandas as pd

    from imgcls.labelled import list_labelled_images

    folder = tmp_path / "images"
    for label in ("bag", "coat", "sneaker"):
        (folder / label).mkdir(parents=True)
        for name in sorted(os.listdir(os.path.join(fmnist_root, label)))[:30]:
            shutil.copy(os.path.join(fmnist_root, label, name), folder / label / name)
    first = sorted(os.listdir(folder / "bag"))[0]
    shutil.copy(folder / "bag" / first, folder / "bag" / "copy-of-first.png")
    labels = str(tmp_path / "labels")
    run("predict", "--model", checkpoint_28, "--input", str(folder), "--output", labels, "--embeddings")
    rows = pq.read_table(labels).to_pandas()
    margin_of = dict(zip(rows["path"], rows["topk_scores"].map(lambda s: s[0] - s[1])))

    def review(name, *flags):
        out = run("review", "--predictions", labels, "--output", str(tmp_path / name), *flags)
        summary = json.loads(out[out.index("{"):])
        return summary, pd.read_csv(summary["manifest"], keep_default_na=False)

    summary, by_margin = review("margin", "--n", "20")
    _, at_random = review("random", "--strategy", "random", "--n", "20")
    assert len(by_margin) == len(at_random) == 20 and summary["rows"] == 91
    assert by_margin.columns.tolist() == ["path", "predicted_label", "score", "uncertainty", "label"]
    assert (by_margin["label"] == "").all()
    assert np.mean([margin_of[p] for p in by_margin["path"]]) < np.mean([margin_of[p] for p in at_random["path"]])
    assert max(margin_of[p] for p in by_margin["path"]) <= sorted(margin_of.values())[19]
    sheet = open(summary["contact_sheet"]).read()
    assert sheet.count('<img src="data:image/jpeg;base64,') == 20

    _, spread = review("spread", "--n", "6", "--per-class")
    predicted = spread["predicted_label"].tolist()
    assert len(set(predicted)) == min(6, rows["label"].nunique())
    twins = {str(folder / "bag" / first), str(folder / "bag" / "copy-of-first.png")}
    _, everything = review("all", "--n", "1000")
    _, deduped = review("dedup", "--n", "1000", "--dedup", "0.9999")
    assert twins <= set(everything["path"]) and len(twins & set(deduped["path"])) == 1

    filled = by_margin.assign(label=by_margin["path"].map(lambda p: os.path.basename(os.path.dirname(p))))
    filled.to_csv(tmp_path / "filled.csv", index=False)
    images = list_labelled_images(str(tmp_path / "filled.csv"))
    assert images.paths == by_margin["path"].tolist() and set(images.labels) <= {"bag", "coat", "sneaker"}

    shutil.rmtree(tmp_path / "no-emb", ignore_errors=True)
    run("predict", "--model", checkpoint_28, "--input", str(folder / "coat"), "--output", str(tmp_path / "no-emb"))
    result = CliRunner().invoke(cli, ["review", "--predictions", str(tmp_path / "no-emb"), "--output",
                                      str(tmp_path / "x"), "--dedup", "0.9"])
    assert "has no embeddings: label with --embeddings" in error_line(result)


@pytest.mark.slow  # four commands, one of them a training run: in CI, not in the quick loop
def test_a_labelled_tar_is_reviewed_filled_in_and_trained_and_evaluated_on(ray_cluster, fmnist_root, tmp_path):
    """The review loop on a tar of real images: `imgcls predict` names its rows TAR#MEMBER,
    `imgcls review` picks them and shows each (the tar read once for all), the person
    fills in the labels, and the filled-in review.csv is `imgcls train --init-from` input
    (decoded, split, tested with the model it started from) and `imgcls evaluate --data`
    input. A row naming a member the tar lacks fails evaluate in one line naming it."""
    import tarfile

    from conftest import add_tar_member
    from imgcls.inference.read import member_path

    classes = ["bag", "coat", "sneaker"]
    model = str(tmp_path / "model")
    torch.manual_seed(0)
    save_checkpoint(model, create_model("small_cnn", 3), JobConfig(model=ModelConfig(arch="small_cnn", image_size=28)),
                    classes, history=[])
    shard, truth = str(tmp_path / "inbox.tar"), {}
    with tarfile.open(shard, "w") as tar:
        for c in classes:
            for name in sorted(os.listdir(os.path.join(fmnist_root, c)))[:12]:
                member = f"scans/{len(truth):03d}.png"
                add_tar_member(tar, member, (Path(fmnist_root) / c / name).read_bytes())
                truth[member_path(shard, member)] = c
    run("predict", "--model", model, "--input", shard, "--output", str(tmp_path / "labels"))
    out = run("review", "--predictions", str(tmp_path / "labels"), "--output", str(tmp_path / "review"), "--n", "100")
    picks = pd.read_csv(json.loads(out[out.index("{"):])["manifest"], keep_default_na=False)
    assert sorted(picks["path"]) == sorted(truth)
    assert open(tmp_path / "review" / "review.html").read().count('<img src="data:image/jpeg;base64,') == 36

    filled = str(tmp_path / "filled.csv")
    picks.assign(label=picks["path"].map(truth)).to_csv(filled, index=False)
    out = run("train", "--root", filled, "--init-from", model, "--arch", "small_cnn", "--image-size", "28",
              "--epochs", "1", "--batch-size", "16", "--num-workers", "1", "--val-fraction", "0.2",
              "--test-fraction", "0.2", "--storage-path", str(tmp_path / "runs"), "--name", "from-tar")
    summary, _ = json.JSONDecoder().raw_decode(out[out.index("\n{") + 1:])  # Ray's log lines may follow
    val = pd.read_parquet(tmp_path / "runs" / "from-tar" / "splits" / "val.parquet")
    assert summary["classes"] == classes and summary["val"]["val_samples"] == len(val) > 0
    test = pd.read_parquet(tmp_path / "runs" / "from-tar" / "splits" / "test.parquet")
    # the old model saved no splits: it trained on none of the test images
    assert summary["test"]["num_samples"] == summary["init_from_test"]["num_samples"] == len(test) > 0
    run("evaluate", "--model", summary["checkpoint"], "--data", filled, "--output", str(tmp_path / "eval"))
    metrics = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert metrics["num_samples"] == 36 and metrics["errors"] == 0

    lacking = member_path(shard, "scans/999.png")
    with open(filled, "a") as f:
        f.write(f"{lacking},,,,bag\n")
    result = CliRunner().invoke(cli, ["evaluate", "--model", model, "--data", filled, "--output",
                                      str(tmp_path / "eval-bad")])
    line = error_line(result)
    assert "1 of the 37 labelled images cannot be found" in line and f"{lacking} (FileNotFoundError: " in line
