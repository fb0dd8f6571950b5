import json
import os

import numpy as np
import pandas as pd
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
    pages.append(open(monitor.write_report(monitor.compare(ref, cur, permutations=20), ref, cur,
                                           str(tmp_path / "drift"))["report"]).read())
    pages.append(open(write_review(select(df, "margin", 5), str(tmp_path / "review"), "margin",
                                   str(labels))["contact_sheet"]).read())
    for page, data in zip(pages, ["data/test", f"reference {labels} (40 rows), current s3://bucket/labels (40 rows)",
                                  str(labels)]):
        header = page[page.index('<header class="imgcls-report"'):page.index("</header>")]
        facts = dict(re.findall(r"<dt[^>]*>(.*?)</dt><dd[^>]*>(.*?)</dd>", header))
        assert facts["model"] == "runs/fmnist/best" and facts["data"] == data, facts
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", facts["date"]) and facts["imgcls"] == version()
        assert page.index("<header") < min(page.index(t) for t in ("<table", "<figure") if t in page)  # at the top
