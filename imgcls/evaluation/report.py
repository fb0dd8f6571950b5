"""Evaluation report: metrics.json, PNG plots and one report.html that shows them."""

from __future__ import annotations

import html
import json
import os
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from imgcls.inference.schema import COL_LABEL, COL_PATH, COL_SCORE, COL_STATUS, STATUS_OK
from imgcls.inference.read import iter_inputs  # noqa: E402

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"


def plot_confusion_matrix(cm: Sequence[Sequence[int]], classes: Sequence[str], path: str) -> str:
    cm = np.asarray(cm)
    norm = cm / np.clip(cm.sum(1, keepdims=True), 1, None)  # row-normalised: recall on the diagonal
    size = max(5, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title("Confusion matrix (counts; colour = row share)")
    return _save(fig, path)


def plot_class_distribution(counts: dict[str, int], path: str, title: str = "Images per class") -> str:
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(counts) + 2), 4))
    ax.bar(list(counts), list(counts.values()), color="#4C72B0")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=45)
    return _save(fig, path)


def plot_training_curves(history: list[dict], path: str) -> Optional[str]:
    """Loss and accuracy per epoch; None without epochs of training (a linear probe's)."""
    if not history or any("train_loss" not in h for h in history):
        return None
    epochs = [h["epoch"] + 1 for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    left.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    left.set_title("loss")
    right.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    right.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="val")
    right.set_title("accuracy")
    for ax in (left, right):
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_confident_mistakes(df: pd.DataFrame, true_col: str, path: str, n: int = 16) -> Optional[str]:
    """A grid of the wrong predictions with the highest scores."""
    from imgcls.preprocess import decode_image

    ok = df[df[COL_STATUS] == STATUS_OK]
    wrong = ok[ok[COL_LABEL] != ok[true_col]].sort_values(COL_SCORE, ascending=False).head(n)
    if wrong.empty:
        return None
    cols = min(4, len(wrong))
    rows = int(np.ceil(len(wrong) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    read = dict(iter_inputs(wrong[COL_PATH].tolist()))  # each tar streamed once for all its mistakes
    for ax, (_, r) in zip(axes.flat, wrong.iterrows()):
        try:
            ax.imshow(decode_image(read[r[COL_PATH]]))
        except Exception:  # unreadable now (the read's error in its place); still show the row's text
            pass
        ax.set_title(f"true {r[true_col]}\npred {r[COL_LABEL]} ({r[COL_SCORE]:.2f})", fontsize=9)
    fig.suptitle("Most confident mistakes")
    return _save(fig, path)


def pca_2d(embeddings: np.ndarray) -> np.ndarray:
    """(n, F) -> (n, 2): the embeddings on their first two principal components."""
    centred = embeddings - embeddings.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def plot_embedding_map(df: pd.DataFrame, true_col: str, path: str, max_points: int = 5000) -> Optional[str]:
    """The embeddings' 2-D PCA projection, coloured by true class, mistakes marked with x."""
    if "embedding" not in df.columns:
        return None
    ok = df[(df[COL_STATUS] == STATUS_OK) & df["embedding"].notna()]
    if len(ok) < 3:
        return None
    if len(ok) > max_points:
        ok = ok.sample(max_points, random_state=0)
    xy = pca_2d(np.stack(ok["embedding"].to_numpy()).astype(np.float64))
    wrong = (ok[COL_LABEL] != ok[true_col]).to_numpy()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, c in enumerate(sorted(ok[true_col].unique())):
        right = ((ok[true_col] == c).to_numpy()) & ~wrong
        ax.scatter(xy[right, 0], xy[right, 1], s=6, alpha=0.6, color=plt.cm.tab20(i % 20), label=str(c))
        miss = ((ok[true_col] == c).to_numpy()) & wrong
        ax.scatter(xy[miss, 0], xy[miss, 1], s=24, marker="x", color=plt.cm.tab20(i % 20))
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(f"Embeddings by true class (x: mistakes, {int(wrong.sum())} of {len(ok)})")
    # Beside the points, not over them: with ten classes "best" still covers some.
    ax.legend(fontsize=8, markerscale=2, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return _save(fig, path)


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # a legend placed outside the axes is kept
    plt.close(fig)
    return path


def write_report(output: str, report: dict, predictions: pd.DataFrame, true_col: str,
                 history: Optional[list[dict]] = None, title: str = "imgcls evaluation",
                 class_counts: Optional[dict[str, int]] = None, model: Optional[str] = None,
                 data: str = "") -> dict:
    """Writes metrics.json, the plots and report.html into the local folder ``output``;
    ``model`` and ``data`` are named at the top of report.html.

    ``class_counts`` (rows per true class) stands for the counts of ``predictions`` when
    those are only the rows the pictures need (``evaluate.score_predictions``).
    """
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, METRICS_FILE), "w") as f:
        json.dump(report, f, indent=2)
    classes = report["classes"]
    if class_counts is None:
        counts = predictions[true_col].value_counts().reindex(classes, fill_value=0).astype(int).to_dict()
    else:
        counts = {c: int(class_counts.get(c, 0)) for c in classes}
    plots = {
        "confusion_matrix": plot_confusion_matrix(report["confusion_matrix"], classes,
                                                  os.path.join(output, "confusion_matrix.png")),
        "class_distribution": plot_class_distribution(counts, os.path.join(output, "class_distribution.png")),
        "training_curves": plot_training_curves(history or [], os.path.join(output, "training_curves.png")),
        "confident_mistakes": plot_confident_mistakes(predictions, true_col, os.path.join(output, "mistakes.png")),
        "embedding_map": plot_embedding_map(predictions, true_col, os.path.join(output, "embedding_map.png")),
    }
    plots = {k: v for k, v in plots.items() if v}
    with open(os.path.join(output, REPORT_FILE), "w") as f:
        f.write(_html(report, plots, title, model, data))
    return {"metrics": os.path.join(output, METRICS_FILE), "report": os.path.join(output, REPORT_FILE), **plots}


def _html(report: dict, plots: dict, title: str, model: Optional[str] = None, data: str = "") -> str:
    from imgcls.web import report_header

    summary = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{report[k]:.4f}</td></tr>" if isinstance(report[k], float)
        else f"<tr><th>{html.escape(k)}</th><td>{report[k]}</td></tr>"
        for k in ("accuracy", f"top{report.get('top_k', 5)}_accuracy", "macro_precision", "macro_recall", "macro_f1",
                  "num_samples", "errors")
        if k in report)
    per_class = "".join(
        f"<tr><td>{html.escape(c)}</td><td>{m['precision']:.3f}</td><td>{m['recall']:.3f}</td>"
        f"<td>{m['f1']:.3f}</td><td>{m['support']}</td></tr>" for c, m in report["per_class"].items())
    images = "".join(f"<h2>{html.escape(k.replace('_', ' '))}</h2><img src='{os.path.basename(p)}' alt='{k}'>"
                     for k, p in plots.items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
th{{background:#f3f3f3;text-align:left}}img{{max-width:100%;border:1px solid #eee}}</style></head>
<body>{report_header(title, model, data)}
<table>{summary}</table>
<h2>Per class</h2>
<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>{per_class}</table>
{images}
</body></html>
"""


EXPLANATIONS_BEGIN, EXPLANATIONS_END = "<!-- explanations -->", "<!-- /explanations -->"


def link_explanations(evaluation_folder: str, results: Sequence[dict]) -> str:
    """Adds to the evaluation's report.html (replacing an earlier one) a section that links
    each of its most confident mistakes to the overlay that ``imgcls explain
    --mistakes-from`` drew for it (``results``: explain_images' records); the links are
    relative, so the two folders can move together."""
    path = os.path.join(evaluation_folder, REPORT_FILE)
    with open(path) as f:
        page = f.read()
    if EXPLANATIONS_BEGIN in page:
        page = page[:page.index(EXPLANATIONS_BEGIN)] + page[page.index(EXPLANATIONS_END) + len(EXPLANATIONS_END):]

    def rel(p: str) -> str:
        return html.escape(os.path.relpath(os.path.abspath(p), os.path.abspath(evaluation_folder)))

    rows = "".join(
        f"<tr><td><a href='{rel(r['overlay'])}'><img src='{rel(r['overlay'])}' alt='overlay' style='width:160px'>"
        f"</a></td><td style='text-align:left'>{html.escape(r['path'])}</td>"
        f"<td>{html.escape(str(r['true_label']))}</td><td>{html.escape(r['label'])}</td><td>{r['score']:.3f}</td></tr>"
        for r in results)
    page_link = os.path.join(os.path.dirname(results[0]["overlay"]), "explain.html") if results else None
    section = (f"{EXPLANATIONS_BEGIN}<h2>most confident mistakes, explained</h2>"
               + (f"<p><a href='{rel(page_link)}'>all overlays beside their inputs</a></p>" if page_link else "")
               + "<table><tr><th>overlay</th><th>path</th><th>true</th><th>predicted</th><th>score</th></tr>"
               f"{rows}</table>{EXPLANATIONS_END}")
    page = page.replace("</body>", section + "\n</body>", 1)
    with open(path, "w") as f:
        f.write(page)
    return path
