import json
import os

import numpy as np
import pandas as pd
from PIL import Image

from imgcls.evaluate import COL_TRUE, report_from_predictions
from imgcls.report import write_report


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
