import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imgcls.evaluation.evaluate import COL_TRUE, report_from_predictions
from imgcls.evaluation.report import write_report


def test_report_writes_metrics_plots_and_html(tmp_path):
    paths = []
    for i in range(6):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(p)
        paths.append(str(p))
    df = pd.DataFrame({
        "path": paths + [str(tmp_path / "broken.jpg")],
        "status": ["ok"] * 6 + ["error"],
        "label": ["cat", "cat", "dog", "dog", "cat", "dog", None],
        "score": [0.9, 0.8, 0.7, 0.95, 0.6, 0.99, None],
        "topk_labels": [["cat", "dog"], ["cat", "dog"], ["dog", "cat"], ["dog", "cat"], ["cat", "dog"],
                        ["dog", "cat"], []],
        COL_TRUE: ["cat", "cat", "cat", "dog", "dog", "dog", "dog"],
    })
    report = report_from_predictions(df, ["cat", "dog"])
    assert report["accuracy"] == 4 / 6 and report["errors"] == 1 and report["top2_accuracy"] == 1.0
    assert report["top_k"] == 2 and "top5_accuracy" not in report  # 2 classes: it is top-2, and says so
    assert report["confusion_matrix"] == [[2, 1], [1, 2]]
    history = [{"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.2 / (e + 1), "train_accuracy": 0.5 + e / 10,
                "val_accuracy": 0.45 + e / 10} for e in range(3)]
    files = write_report(str(tmp_path / "out"), report, df, COL_TRUE, history=history)
    for key in ("confusion_matrix", "class_distribution", "training_curves", "confident_mistakes"):
        assert os.path.getsize(files[key]) > 1000
        assert os.path.basename(files[key]) in open(files["report"]).read()
    assert json.load(open(files["metrics"]))["macro_f1"] == report["macro_f1"]
    assert "embedding_map" not in files  # these predictions carry no embeddings


def test_embedding_map_projects_on_principal_components_and_marks_mistakes(tmp_path):
    from imgcls.evaluation.report import pca_2d, plot_embedding_map

    rng = np.random.default_rng(0)
    # Points spread along (1, 1, 0) and a little along (0, 0, 1): the first component is
    # the long axis, up to sign.
    t, u = rng.normal(size=200) * 5, rng.normal(size=200) * 0.5
    points = np.stack([t, t, u], axis=1) + rng.normal(size=(200, 3)) * 0.01
    xy = pca_2d(points)
    assert abs(np.corrcoef(xy[:, 0], t)[0, 1]) > 0.99 and abs(np.corrcoef(xy[:, 1], u)[0, 1]) > 0.99
    df = pd.DataFrame({"path": [f"{i}.png" for i in range(200)], "status": "ok",
                       "label": np.where(t > 0, "b", "a"), COL_TRUE: np.where(t > 1, "b", "a"),
                       "embedding": list(points.astype(np.float32))})
    path = plot_embedding_map(df, COL_TRUE, str(tmp_path / "map.png"))
    assert os.path.getsize(path) > 5000
    report = report_from_predictions(df.assign(score=0.9, topk_labels=[["a", "b"]] * 200), ["a", "b"])
    files = write_report(str(tmp_path / "out"), report, df.assign(score=0.9), COL_TRUE)
    assert "embedding_map.png" in open(files["report"]).read()


def test_reports_name_model_data_date_and_version_at_the_top(tmp_path):
    """report.html, drift.html and the review contact sheet open with the same header: the
    model (for drift and review, the labelling job's, from its _job.json), the data, the
    date and the imgcls version."""
    import re

    from imgcls.evaluation import monitor
    from imgcls.evaluation.review import select, write_review
    from imgcls.web import version

    labels = tmp_path / "labels"
    labels.mkdir()
    json.dump({"model": "runs/fmnist/best"}, open(labels / "_job.json", "w"))
    df = pd.DataFrame({"path": [str(tmp_path / f"{i}.png") for i in range(40)], "status": "ok",
                       "label": ["cat", "dog"] * 20, "score": np.linspace(0.5, 1, 40),
                       "topk_scores": [[s, 1 - s] for s in np.linspace(0.5, 1, 40)],
                       "topk_labels": [["cat", "dog"]] * 40, COL_TRUE: ["cat", "dog"] * 20})
    report = report_from_predictions(df, ["cat", "dog"])
    pages = [open(write_report(str(tmp_path / "eval"), report, df, COL_TRUE, model="runs/fmnist/best",
                               data="data/test")["report"]).read()]
    ref = monitor.frame_sample(df, str(labels))
    cur = monitor.frame_sample(df, "s3://bucket/labels")
    drift = monitor.compare(ref, cur, permutations=20)
    pages.append(open(monitor.write_report(drift, ref, cur, str(tmp_path / "drift"))["report"]).read())
    # The verdict in words, with its numbers: the same runs, so no drift, and every test's figures.
    classes = drift["tests"]["classes"]
    assert (f"No drift: no test has both a p-value below alpha and an effect at least its threshold: classes "
            f"(p-value {classes['p_value']:.3g} &gt;= alpha 0.01; {classes['effect_size']} {classes['effect']:.4g} &lt; "
            f"threshold {classes['threshold']:g}), confidence (p-value") in pages[-1]
    shifted = monitor.compare(ref, monitor.frame_sample(df.assign(label="cat"), "s3://bucket/cats"), permutations=20)
    moved = shifted["tests"]["classes"]
    assert monitor.verdict_in_words(shifted).startswith(
        f"Drift: the current run differs from the reference in classes (p-value {moved['p_value']:.3g} < alpha 0.01; "
        f"{moved['effect_size']} {moved['effect']:.4g} >= threshold {moved['threshold']:g})")
    pages.append(open(write_review(select(df, "margin", 5), str(tmp_path / "review"), "margin",
                                   str(labels))["contact_sheet"]).read())
    for page, data in zip(pages, ["data/test", f"reference {labels} (40 rows), current s3://bucket/labels (40 rows)",
                                  str(labels)]):
        header = page[page.index('<header class="imgcls-report"'):page.index("</header>")]
        facts = dict(re.findall(r"<dt[^>]*>(.*?)</dt><dd[^>]*>(.*?)</dd>", header))
        assert facts["model"] == "runs/fmnist/best" and facts["data"] == data, facts
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", facts["date"]) and facts["imgcls"] == version()
        assert page.index("<header") < min(page.index(t) for t in ("<table", "<figure") if t in page)  # at the top


@pytest.fixture(scope="module")
def checkpoint(fmnist_root, tmp_path_factory):
    """An untrained small CNN over the Fashion-MNIST classes (plenty of mistakes to count)."""
    import torch

    from imgcls.checkpoint import save_checkpoint
    from imgcls.config import JobConfig, ModelConfig
    from imgcls.models import create_model

    classes = sorted(d for d in os.listdir(fmnist_root) if os.path.isdir(os.path.join(fmnist_root, d)))
    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("ckpt"))
    save_checkpoint(folder, create_model("small_cnn", 10), JobConfig(model=ModelConfig(image_size=28)), classes,
                    history=[])
    return folder, classes


@pytest.fixture(scope="module")
def labelled(fmnist_root, checkpoint, tmp_path_factory):
    """Real labelling output (in process, the pipeline's own stage, with embeddings) of
    <class>/ files of three classes, a tar of coats, an 'inbox' of files the model has no
    class for, and a corrupt file."""
    import shutil
    import tarfile

    from imgcls.inference.pipeline import predict_here

    folder, paths = tmp_path_factory.mktemp("images"), []
    for c in ("bag", "coat", "sneaker", "inbox"):
        os.makedirs(folder / c)
        for name in sorted(os.listdir(os.path.join(fmnist_root, "shirt" if c == "inbox" else c)))[:6]:
            paths.append(str(shutil.copy(os.path.join(fmnist_root, "shirt" if c == "inbox" else c, name),
                                         folder / c / name)))
    with tarfile.open(folder / "coat" / "shard.tar", "w") as tar:
        for name in sorted(os.listdir(os.path.join(fmnist_root, "coat")))[6:10]:
            tar.add(os.path.join(fmnist_root, "coat", name), arcname=f"inner/{name}")
    (folder / "bag" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return predict_here(paths + [str(folder / "coat" / "shard.tar"), str(folder / "bag" / "corrupt.png")],
                        checkpoint[0], embeddings=True)


def test_predictions_scored_in_batches_as_in_one_frame(labelled, checkpoint, tmp_path, monkeypatch):
    """evaluate --predictions over parts read 4 rows at a time: the report of the whole
    frame (true labels from parent folders, a tar member's from its tar's; the inbox left
    out and counted; the error row counted), the rows it scored written back with their
    true labels, and for the pictures the 16 most confident mistakes and a sample of the
    rows with embeddings (5 here)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from imgcls.evaluation import evaluate
    from imgcls.evaluation.evaluate import score_predictions, scorable_rows
    from imgcls.inference.read import source_file

    monkeypatch.setattr(evaluate, "MAP_POINTS", 5)
    classes = checkpoint[1]
    (tmp_path / "labels").mkdir()
    for part, (lo, hi) in enumerate([(0, 9), (9, 10), (10, labelled.num_rows)]):
        pq.write_table(labelled.slice(lo, hi - lo), tmp_path / "labels" / f"part-{part:06d}.parquet")
    report, pictures, counts = score_predictions(str(tmp_path / "labels"), classes,
                                                 str(tmp_path / "scored.parquet"), batch_rows=4)

    df = labelled.to_pandas()
    df[COL_TRUE] = df["path"].map(source_file).str.rsplit("/", n=2).str[-2]
    assert (df[df["path"].str.contains("shard.tar#")][COL_TRUE] == "coat").sum() == 4
    kept, left_out = scorable_rows(df, classes)
    assert report == {**report_from_predictions(kept, classes), **left_out}
    assert report["num_samples"] == 22 and report["errors"] == 1 and left_out["unknown_true_labels"] == {"inbox": 6}
    assert counts == {c: int((kept[COL_TRUE] == c).sum()) for c in classes}
    scored = pq.read_table(tmp_path / "scored.parquet")
    assert scored.equals(pa.Table.from_pandas(kept, preserve_index=False).cast(scored.schema))
    ok = kept[kept["status"] == "ok"]
    wrong = ok[ok["label"] != ok[COL_TRUE]].sort_values("score", ascending=False, kind="stable")
    assert len(wrong) > 16 and set(wrong["path"][:16]) <= set(pictures["path"])
    assert pictures["embedding"].notna().sum() == 5 and set(pictures["path"]) <= set(ok["path"])
    assert pictures["path"].tolist() == sorted(pictures["path"], key=ok["path"].tolist().index)


def test_topk_accuracy_is_named_by_the_k_the_rows_carry(labelled, checkpoint, tmp_path):
    """Predictions made with --top-k 1 carry one label a row (the first of the top 5):
    their top-k accuracy is top-1, the accuracy itself, and its key says so (not
    top5_accuracy); with --top-k 3, top-3."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from imgcls.evaluation.evaluate import score_predictions, topk_key

    classes = checkpoint[1]
    reports = {}
    for k in (1, 3, 5):
        rows = labelled.set_column(labelled.schema.get_field_index("topk_labels"), "topk_labels",
                                   pc.list_slice(labelled.column("topk_labels"), 0, k))
        pq.write_table(rows, tmp_path / f"top{k}.parquet")
        reports[k] = score_predictions(str(tmp_path / f"top{k}.parquet"), classes, str(tmp_path / f"out{k}.parquet"))[0]
        assert reports[k]["top_k"] == k and topk_key(reports[k]) == f"top{k}_accuracy"
        assert [key for key in reports[k] if key.startswith("top") and key != "top_k"] == [f"top{k}_accuracy"]
        frame = rows.to_pandas().assign(**{COL_TRUE: "coat"})
        assert report_from_predictions(frame, classes)["top_k"] == k
    assert reports[1]["top1_accuracy"] == reports[1]["accuracy"] <= reports[3]["top3_accuracy"] <= reports[5][
        "top5_accuracy"]
