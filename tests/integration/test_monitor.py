"""imgcls monitor on real Fashion-MNIST predictions of a real (briefly trained) model:
shifted sets are flagged, random halves of one set are not."""

import json
import os

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import train_small_cnn
from PIL import Image, ImageOps

from imgcls.inference.bulk import label_images
from imgcls.cli import cli
from imgcls.config import PredictConfig
from imgcls.labelled import LabelledImages
from imgcls.evaluation.evaluate import REFERENCE_FILE, write_reference
from imgcls.evaluation.monitor import compare, frame_sample

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # trains a model and labels four sets first

REMOVED = "trouser"


@pytest.fixture(scope="module")
def runs(ray_cluster, fmnist_root, tmp_path_factory):
    """Predictions (with embeddings) of a small CNN trained here for 3 epochs on 100 images
    a class, over held-out images: a reference set and a current set of 50 a class each,
    the current set without one class, and the current set inverted. The four sets are
    labelled in one run of the pipeline, whose rows are then split by set into runs of
    their own (one part file each)."""
    root = tmp_path_factory.mktemp("monitor")
    classes = sorted(d for d in os.listdir(fmnist_root) if os.path.isdir(os.path.join(fmnist_root, d)))
    files = {c: sorted(os.listdir(os.path.join(fmnist_root, c))) for c in classes}
    ckpt = train_small_cnn(fmnist_root, {c: files[c][:100] for c in classes}, str(root / "model"), epochs=3)

    sets = {"reference": {c: files[c][100:150] for c in classes}, "current": {c: files[c][150:200] for c in classes}}
    sets["removed"] = {c: names for c, names in sets["current"].items() if c != REMOVED}
    out = {}
    for name, chosen in [*sets.items(), ("inverted", sets["current"])]:
        folder = root / "sets" / name
        for c, names in chosen.items():
            (folder / c).mkdir(parents=True)
            for n in names:
                image = Image.open(os.path.join(fmnist_root, c, n))
                (ImageOps.invert(image.convert("L")) if name == "inverted" else image).save(folder / c / n)
    summary = label_images(PredictConfig(model=ckpt, input=str(root / "sets"), output=str(root / "labels-all"),
                                         embeddings=True))
    labelled = pq.read_table(root / "labels-all")
    assert summary.errors == 0 and labelled.num_rows == summary.files == 4 * 500 - 50
    for name in ("reference", "current", "removed", "inverted"):
        out[name] = str(root / f"labels-{name}")
        os.makedirs(out[name])
        rows = labelled.filter(pc.match_substring(labelled["path"], f"/sets/{name}/"))
        pq.write_table(rows, os.path.join(out[name], "part-000000.parquet"))
    # What imgcls train saves in its best checkpoint: the model's predictions of its
    # validation split, here the reference set's images.
    reference = [(os.path.join(fmnist_root, c, n), c) for c, names in sets["reference"].items() for n in names]
    write_reference(ckpt, LabelledImages([p for p, _ in reference], [c for _, c in reference]))
    out["checkpoint"] = ckpt
    return out


def frame(uri):
    return pq.read_table(uri).to_pandas().sort_values("path").reset_index(drop=True)


def test_shifted_sets_drift_and_a_like_set_does_not(runs):
    def check(name):
        return compare(frame_sample(frame(runs["reference"]), embedding_sample=500),
                       frame_sample(frame(runs[name]), embedding_sample=500, seed=1), permutations=200)

    same = check("current")
    assert not same["drift"], same["tests"]
    removed = check("removed")
    assert "classes" in removed["drifted"], removed["tests"]["classes"]
    assert removed["tests"]["classes"]["psi"] > same["tests"]["classes"]["psi"]
    inverted = check("inverted")
    assert {"embeddings", "confidence"} <= set(inverted["drifted"]), inverted["tests"]
    for name in inverted["drifted"]:  # drift: significant and large
        t = inverted["tests"][name]
        assert t["p_value"] < 0.01 and t["effect"] >= t["threshold"] and t["decided_by"] == "p-value and effect", t


def test_a_threshold_leaves_a_large_enough_change_out(runs):
    """A class gone is a Jensen-Shannon distance of about 0.2: significant, but under a
    class threshold of 0.5, so it is not drift, and the report says the effect decided."""
    from imgcls.config import DriftThresholds

    ref = frame_sample(frame(runs["reference"]))
    removed = frame_sample(frame(runs["removed"]), seed=1)
    default = compare(ref, removed)["tests"]["classes"]
    relaxed = compare(ref, removed, thresholds=DriftThresholds(class_threshold=0.5))["tests"]["classes"]
    assert default["drift"] and 0.1 < default["effect"] < 0.5 and default["threshold"] == 0.03
    assert relaxed["significant"] and not relaxed["drift"] and relaxed["decided_by"] == "effect"


def test_random_halves_of_one_set_rarely_drift(runs):
    """20 seeded random splits of the reference and current sets pooled (one
    distribution): at the default alpha, at most 2 report drift (10%)."""
    pooled = pd.concat([frame(runs["reference"]), frame(runs["current"])], ignore_index=True)
    alarms = []
    for seed in range(20):
        order = np.random.default_rng(seed).permutation(len(pooled))
        a, b = pooled.iloc[order[:500]], pooled.iloc[order[500:]]
        result = compare(frame_sample(a, embedding_sample=250, seed=seed),
                         frame_sample(b, embedding_sample=250, seed=seed), permutations=200, seed=seed)
        alarms.append(result["drifted"])
    assert sum(bool(a) for a in alarms) <= 2, alarms


def test_monitor_command_writes_the_report_and_exits_1_on_drift(runs, tmp_path, mlflow_server, mlflow_experiment):
    """... and, with a tracking URI, logs each verdict as an MLflow run (see test_tracking.py)."""
    ok = CliRunner().invoke(cli, ["monitor", "--reference", runs["reference"], "--current", runs["current"],
                                  "--output", str(tmp_path / "same"), "--permutations", "100",
                                  "--tracking-uri", mlflow_server])
    assert ok.exit_code == 0, ok.output[-2000:]
    report = json.loads((tmp_path / "same" / "drift.json").read_text())
    assert not report["drift"] and set(report["tests"]) == {"classes", "confidence", "errors", "embeddings"}
    assert report["rows"] == {"reference": 500, "current": 500}
    assert report["thresholds"] == {"classes": 0.03, "confidence": 0.1, "errors": 0.03, "embeddings": 0.005}
    for name, t in report["tests"].items():  # each effect size beside its threshold, and what decided
        assert t["threshold"] == report["thresholds"][name] and isinstance(t["effect"], float), t
        assert t["decided_by"] in ("p-value", "effect", "p-value and effect") and t["effect_size"], t
    drifted = CliRunner().invoke(cli, ["monitor", "--reference", runs["reference"], "--current", runs["inverted"],
                                       "--output", str(tmp_path / "inv"), "--permutations", "100",
                                       "--confidence-threshold", "0.25", "--tracking-uri", mlflow_server])
    assert drifted.exit_code == 1, drifted.output[-2000:]
    assert "imgcls monitor: drift in" in drifted.stderr
    inverted = json.loads((tmp_path / "inv" / "drift.json").read_text())
    assert inverted["tests"]["confidence"]["threshold"] == 0.25
    html = (tmp_path / "inv" / "drift.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "DRIFT" in html
    confidence = inverted["tests"]["confidence"]
    assert (f"<td>Wasserstein distance / reference std</td><td>{confidence['effect']:.4f}</td><td>0.25</td>"
            in html), html[:3000]
    from imgcls.tracking import client

    c = client(mlflow_server)
    logged = c.search_runs([c.get_experiment_by_name(mlflow_experiment).experiment_id], order_by=["start_time ASC"])
    assert [r.data.metrics["drift"] for r in logged] == [0.0, 1.0]
    for run, folder in zip(logged, ("same", "inv")):
        verdict = json.loads((tmp_path / folder / "drift.json").read_text())
        assert run.data.metrics["tests.confidence.p_value"] == pytest.approx(verdict["tests"]["confidence"]["p_value"])
        assert {a.path for a in c.list_artifacts(run.info.run_id)} == {"drift.json", "drift.html"}


def test_large_runs_read_with_ray_data_count_the_same(runs, monkeypatch):
    """The Ray Data reading (runs over IN_PROCESS_ROWS rows) gives the same counts, and
    samples of the sizes asked, as the reading here."""
    import imgcls.evaluation.monitor as monitor

    here = monitor.read_run(runs["removed"], sample=100, embedding_sample=50)
    monkeypatch.setattr(monitor, "IN_PROCESS_ROWS", 0)
    cluster = monitor.read_run(runs["removed"], sample=100, embedding_sample=50)
    assert cluster.rows == here.rows == 450 and cluster.errors == here.errors == 0
    assert cluster.class_counts == here.class_counts and REMOVED not in cluster.class_counts
    assert len(cluster.scores) == len(here.scores) == 100 and set(cluster.scores) <= set(frame(runs["removed"]).score)
    assert cluster.embeddings.shape == here.embeddings.shape == (50, 128)


def test_a_checkpoint_is_its_own_reference(runs, tmp_path):
    """--reference CHECKPOINT compares with the validation predictions it holds."""
    from imgcls.evaluation.monitor import run_monitor

    saved = pq.read_table(os.path.join(runs["checkpoint"], REFERENCE_FILE)).to_pandas()
    assert len(saved) == 500 and saved["embedding"].map(len).eq(128).all() and saved["true_label"].notna().all()
    assert sorted(saved["path"].map(os.path.basename)) == sorted(frame(runs["reference"])["path"].map(os.path.basename))
    same = run_monitor(runs["checkpoint"], runs["current"], str(tmp_path / "same"), permutations=100)
    assert same["reference"].endswith(REFERENCE_FILE) and not same["drift"], same["tests"]
    inverted = run_monitor(runs["checkpoint"], runs["inverted"], str(tmp_path / "inv"), permutations=100)
    assert inverted["drift"] and "embeddings" in inverted["drifted"]
