"""Drift monitoring: does a new labelling run still look like the reference it is compared with?

In: two predictions folders or files (``imgcls predict``'s Parquet), a reference and a
current run. Only the columns each test needs are read: class and error counts in full,
the confidence scores and embeddings sampled (``--sample``, ``--embedding-sample``); a
run of over IN_PROCESS_ROWS rows is read with Ray Data (``_read_with_ray_data``), so
runs of tens of millions of rows work. ``check_runs`` checks both inputs (paths,
columns, embeddings where asked) first, in well under a second, before any of that.
Out: ``drift.json`` (every test's p-value beside ``alpha`` and its effect size beside
its threshold, and which of the two decided), ``drift.html`` with the same table and
the plots, and a verdict.

The verdict, as the established drift tools reach theirs (Evidently's presets switch
from a statistical test to a distance with a threshold above 1,000 rows): a test
reports drift when the change is both significant and large, that is when its p-value
is below ``alpha`` and its effect size is at least its threshold
(``config.DriftThresholds``, whose fields say where each default comes from). The
significance tests see a sample of fixed size, at most ``--sample`` rows a side
(``--embedding-sample`` for the embeddings), so that their power stops growing with
the runs: over a million rows a side, a chi-square test of the full counts calls a
0.5% change of the class shares significant. The effect sizes use every row counted.
On small runs the test is what holds an alarm back (two samples of 1,000 rows of one
class mix are 0.05 apart in Jensen-Shannon distance, above the class threshold); on
large ones the effect size is. Each test is at ``alpha``: four tests at 0.01 give at
most about 4% false alarms between two samples of one distribution, fewer where an
effect size holds one back. The tests, from scipy (``scipy.stats``: maintained, 35 MB;
frouros pins numpy < 2.2 and matplotlib < 3.10, which imgcls's versions are past, and
alibi-detect brings hundreds of MB of dependencies for the same tests):

- predicted classes: chi-square test of the two runs' class counts
  (``chi2_contingency``) on ``--sample`` rows a side drawn from the counts; effect:
  the Jensen-Shannon distance of the class shares (natural log, Evidently's
  categorical distance), with the population stability index beside it (the usual
  reading: < 0.1 stable, 0.1-0.25 a moderate shift, > 0.25 a large one);
- confidence (the top-1 score): two-sample Kolmogorov-Smirnov (``ks_2samp``); effect:
  the Wasserstein distance over the reference's standard deviation (Evidently's
  numerical distance);
- error rows: chi-square test of the error and ok counts, on ``--sample`` rows a side;
  effect: the Jensen-Shannon distance of the error and ok shares;
- embeddings: maximum mean discrepancy with a Gaussian kernel (bandwidth by the median
  heuristic), its p-value by ``scipy.stats.permutation_test`` over the pooled sample;
  effect: the unbiased estimate of MMD^2 (Gretton et al. 2012).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from imgcls import storage
from imgcls.config import DriftThresholds

DRIFT_FILE, REPORT_FILE = "drift.json", "drift.html"

EFFECTS = {"classes": "Jensen-Shannon distance", "confidence": "Wasserstein distance / reference std",
           "errors": "Jensen-Shannon distance", "embeddings": "MMD^2 (unbiased)"}
REQUIRED_COLUMNS = ("status", "label", "score")


class MonitorError(ValueError):
    """Runs that cannot be compared (no ok rows, no embeddings where asked)."""


@dataclass
class RunSample:
    """What the tests need of one run: counts in full, scores and embeddings sampled."""

    uri: str
    rows: int
    errors: int
    class_counts: dict[str, int]
    scores: np.ndarray  # top-1 scores of a sample of the ok rows
    embeddings: Optional[np.ndarray] = None  # (n, F) of a sample of the ok rows
    meta: dict = field(default_factory=dict)


IN_PROCESS_ROWS = 2_000_000  # up to this many rows a run is read here, with pyarrow; beyond, with Ray Data


def resolve_reference(reference: str) -> str:
    """The predictions a reference names: a checkpoint folder's validation predictions
    (``reference.parquet``, saved by ``imgcls train``), or ``reference`` itself."""
    saved = storage.join(reference, "reference.parquet")
    return saved if storage.exists(saved) else reference


def open_run(uri: str, embedding_sample: int = 0, what: str = ""):
    """The Parquet dataset of a predictions run (a pyarrow ``Dataset``; footers only,
    no rows read), checked: the path exists, it holds ``imgcls predict``'s columns,
    and embeddings where ``embedding_sample`` asks for them. ``what`` (e.g. the flag)
    leads the error messages."""
    named = f"{what} {uri}" if what else uri
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"{named}: no such file or folder")
    import pyarrow.dataset as pads  # 0.5 s of imports (pandas)

    dataset = pads.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=True)
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.schema.names]
    if missing:
        raise MonitorError(f"{named} holds no imgcls predictions: no Parquet with the column(s) {', '.join(missing)}")
    if embedding_sample and "embedding" not in dataset.schema.names:
        raise MonitorError(f"{named} has no embeddings: label with --embeddings, or monitor with --embedding-sample 0")
    return dataset


def check_runs(reference: str, current: str, embedding_sample: int = 0) -> str:
    """Both inputs checked as ``open_run`` does, before anything slow starts (Ray takes
    seconds); returns the reference's predictions (``resolve_reference``)."""
    reference = resolve_reference(reference)
    open_run(reference, embedding_sample, "--reference")
    open_run(current, embedding_sample, "--current")
    return reference


def read_run(uri: str, sample: int = 10_000, embedding_sample: int = 0, seed: int = 0) -> RunSample:
    """What the tests need of one run, reading only the columns needed: up to
    IN_PROCESS_ROWS rows in this process (status, label and score whole, embeddings only
    for the sampled rows); beyond, with Ray Data (counts per block summed here, scores
    and embeddings sampled by the cluster), where starting Ray Data's operators would
    take longer than the reading for a small run (500 rows: 60 s against under 1 s)."""
    dataset = open_run(uri, embedding_sample)
    if dataset.count_rows() > IN_PROCESS_ROWS:
        return _read_with_ray_data(uri, sample, embedding_sample, seed)
    df = dataset.to_table(columns=["status", "label", "score"]).to_pandas()
    run = frame_sample(df, uri, sample, 0, seed)
    if embedding_sample:
        ok = np.flatnonzero((df["status"] == "ok").to_numpy())
        rng = np.random.default_rng(seed + 7)
        rows = np.sort(rng.choice(ok, min(embedding_sample, len(ok)), replace=False))
        run.embeddings = np.stack(dataset.take(rows, columns=["embedding"]).column("embedding").to_numpy(
            zero_copy_only=False)).astype(np.float32)
    return run


def _counts(batch):
    """Ray Data stage: one block's rows -> its (status, label, count) rows."""
    import pandas as pd

    counts = batch.groupby(["status", "label"], dropna=False).size().reset_index(name="count")
    return counts if len(counts) else pd.DataFrame({"status": [], "label": [], "count": []})


def _read_with_ray_data(uri: str, sample: int, embedding_sample: int, seed: int) -> RunSample:
    import ray

    fs, path = storage.filesystem(uri)
    columns = ["status", "label", "score"] + (["embedding"] if embedding_sample else [])
    ds = ray.data.read_parquet(path, filesystem=fs, columns=columns)
    counts = ds.select_columns(["status", "label"]).map_batches(_counts, batch_format="pandas",
                                                                batch_size=None).to_pandas()
    counts = counts.groupby(["status", "label"], dropna=False)["count"].sum().reset_index()
    ok = counts[counts["status"] == "ok"]
    rows, n_ok = int(counts["count"].sum()), int(ok["count"].sum())
    if not n_ok:
        raise MonitorError(f"{uri} has no prediction rows with status ok")
    rng = np.random.default_rng(seed)
    ok_rows = ds.filter(expr="status == 'ok'")

    def sampled(column: str, n: int) -> np.ndarray:
        part = ok_rows.select_columns([column])
        if n_ok > n:  # a Bernoulli sample a fifth larger than asked, cut to size here
            part = part.random_sample(min(1.0, 1.2 * n / n_ok), seed=seed)
        values = [b[column] for b in part.iter_batches(batch_format="numpy", batch_size=None) if len(b[column])]
        values = np.concatenate([np.stack(v) if column == "embedding" else v for v in values])
        return values[rng.choice(len(values), n, replace=False)] if len(values) > n else values

    return RunSample(uri=uri, rows=rows, errors=rows - n_ok,
                     class_counts={str(k): int(v) for k, v in zip(ok["label"], ok["count"])},
                     scores=sampled("score", sample).astype(np.float64),
                     embeddings=sampled("embedding", embedding_sample).astype(np.float32) if embedding_sample
                     else None)


def frame_sample(df, uri: str = "(frame)", sample: int = 10_000, embedding_sample: int = 0,
                 seed: int = 0) -> RunSample:
    """``read_run`` of predictions already in a pandas DataFrame; only the sampled rows'
    embeddings are stacked, so a frame of a million rows takes a fraction of a second."""
    ok = df[df["status"] == "ok"]
    if ok.empty:
        raise MonitorError(f"{uri} has no prediction rows with status ok")
    rng = np.random.default_rng(seed)
    scores = ok["score"].to_numpy(np.float64)
    if len(scores) > sample:
        scores = rng.choice(scores, sample, replace=False)
    embeddings = None
    if embedding_sample:
        column = ok["embedding"].to_numpy()
        if len(column) > embedding_sample:
            column = column[rng.choice(len(column), embedding_sample, replace=False)]
        embeddings = np.stack(column).astype(np.float32)
    return RunSample(uri=uri, rows=len(df), errors=len(df) - len(ok),
                     class_counts={str(k): int(v) for k, v in ok["label"].value_counts().items()},
                     scores=scores, embeddings=embeddings)


def psi(expected: np.ndarray, actual: np.ndarray, floor: float = 1e-4) -> float:
    """Population stability index of two count vectors over the same bins."""
    p = np.maximum(expected / max(1, expected.sum()), floor)
    q = np.maximum(actual / max(1, actual.sum()), floor)
    return float(((q - p) * np.log(q / p)).sum())


def jensen_shannon(expected: np.ndarray, actual: np.ndarray) -> float:
    """Jensen-Shannon distance (natural log: 0 to 0.83) of two count vectors over the same bins."""
    from scipy.spatial.distance import jensenshannon

    return float(jensenshannon(expected, actual)) if expected.sum() and actual.sum() else 0.0


def subsample_counts(table: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Each row of a count table cut to the counts of ``n`` rows drawn from it without
    replacement (a row of fewer stays whole): what a test of a fixed-size sample of
    each run sees, so that its power does not grow with the runs."""
    rng = np.random.default_rng(seed)
    return np.stack([row if row.sum() <= n else rng.multivariate_hypergeometric(row.astype(np.int64), n)
                     for row in table]).astype(np.float64)


def class_drift(ref: dict[str, int], cur: dict[str, int], sample: int = 10_000, seed: int = 0) -> dict:
    """Chi-square test of the class counts of ``sample`` rows a side; the Jensen-Shannon
    distance and the PSI of the shares of all rows."""
    from scipy.stats import chi2_contingency

    classes = sorted(set(ref) | set(cur))
    table = np.array([[ref.get(c, 0) for c in classes], [cur.get(c, 0) for c in classes]], dtype=np.float64)
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        return {"classes": classes, "chi2": 0.0, "p_value": 1.0, "psi": 0.0, "effect": 0.0}
    tested = subsample_counts(table, sample, seed)
    tested = tested[:, tested.sum(0) > 0]
    result = chi2_contingency(tested) if tested.shape[1] > 1 else None
    return {"classes": classes, "reference_share": (table[0] / table[0].sum()).round(4).tolist(),
            "current_share": (table[1] / table[1].sum()).round(4).tolist(),
            "chi2": float(result.statistic) if result else 0.0, "p_value": float(result.pvalue) if result else 1.0,
            "n": [int(tested[0].sum()), int(tested[1].sum())], "psi": psi(table[0], table[1]),
            "effect": jensen_shannon(table[0], table[1])}


def confidence_drift(ref: np.ndarray, cur: np.ndarray) -> dict:
    """Kolmogorov-Smirnov test of the sampled top-1 scores; the Wasserstein distance over
    the reference's standard deviation (at least 0.001, as Evidently floors it)."""
    from scipy.stats import ks_2samp, wasserstein_distance

    result = ks_2samp(ref, cur)
    return {"ks": float(result.statistic), "p_value": float(result.pvalue), "reference_mean": float(ref.mean()),
            "current_mean": float(cur.mean()), "n": [len(ref), len(cur)],
            "effect": float(wasserstein_distance(ref, cur) / max(float(ref.std()), 1e-3))}


def error_drift(ref: RunSample, cur: RunSample, sample: int = 10_000, seed: int = 0) -> dict:
    """Chi-square test of the error and ok counts of ``sample`` rows a side; the
    Jensen-Shannon distance of the error and ok shares of all rows."""
    from scipy.stats import chi2_contingency

    table = np.array([[ref.errors, ref.rows - ref.errors], [cur.errors, cur.rows - cur.errors]], dtype=np.float64)
    rates = {"reference_rate": ref.errors / max(1, ref.rows), "current_rate": cur.errors / max(1, cur.rows)}
    tested = subsample_counts(table, sample, seed)
    p_value = float(chi2_contingency(tested).pvalue) if tested[:, 0].sum() else 1.0  # no errors: nothing to test
    return {**rates, "p_value": p_value, "n": [int(tested[0].sum()), int(tested[1].sum())],
            "effect": jensen_shannon(table[0], table[1])}


def embedding_drift(ref: np.ndarray, cur: np.ndarray, permutations: int = 500, seed: int = 0) -> dict:
    """MMD^2 (biased estimate, Gaussian kernel at the median pairwise distance) and its
    permutation p-value, and the unbiased estimate as the effect size (the biased one
    is above 0 between samples of one distribution: 0.002 at 500 a side). The kernel
    matrix of the pooled sample is computed once; the permutation test permutes indices
    into it."""
    from scipy.stats import permutation_test

    pooled = np.concatenate([ref, cur]).astype(np.float64)
    sq = (pooled ** 2).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * pooled @ pooled.T, 0)
    bandwidth = float(np.median(d2[np.triu_indices(len(pooled), 1)])) or 1.0
    kernel = np.exp(-d2 / bandwidth)

    def mmd2(x, y, axis=-1):  # x, y: index arrays, (n,) or a batch of permutations (b, n)
        # The mean kernel within x, within y, and across, at once: the quadratic form
        # w K w with w = 1/n on x and -1/m on y (a matrix product, where gathering the
        # three blocks of K per permutation took seconds).
        single = np.ndim(x) == 1
        x, y = np.atleast_2d(x).astype(int), np.atleast_2d(y).astype(int)
        w = np.zeros((len(x), len(pooled)))  # (b, n + m)
        np.put_along_axis(w, x, 1 / x.shape[1], axis=1)
        np.put_along_axis(w, y, -1 / y.shape[1], axis=1)
        value = ((w @ kernel) * w).sum(1)
        return value[0] if single else value

    n, m = len(ref), len(cur)
    result = permutation_test((np.arange(n), np.arange(n, len(pooled))), mmd2, permutation_type="independent",
                              vectorized=True, n_resamples=permutations, alternative="greater",
                              batch=max(1, 20_000_000 // len(pooled) ** 2), rng=seed)
    kxx, kyy = kernel[:n, :n], kernel[n:, n:]  # the unbiased estimate leaves out each point's kernel with itself
    unbiased = ((kxx.sum() - np.trace(kxx)) / max(1, n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / max(1, m * (m - 1))
                - 2 * kernel[:n, n:].mean())
    return {"mmd2": float(result.statistic), "p_value": float(result.pvalue), "n": [n, m],
            "permutations": permutations, "effect": float(unbiased)}


def decide(test: dict, alpha: float, threshold: float) -> dict:
    """A test's verdict: drift when its p-value is below ``alpha`` and its effect size is
    at least ``threshold``; ``decided_by`` names what the verdict rests on: both for
    drift, else whichever of the two (or both) held it back."""
    significant, large = test["p_value"] < alpha, test["effect"] >= threshold
    held = [name for name, crossed in (("p-value", significant), ("effect", large)) if not crossed]
    return {"threshold": threshold, "significant": bool(significant), "large": bool(large),
            "drift": bool(significant and large), "decided_by": " and ".join(held or ["p-value", "effect"])}


def compare(ref: RunSample, cur: RunSample, alpha: float = 0.01, permutations: int = 500, seed: int = 0,
            thresholds: Optional[DriftThresholds] = None, sample: int = 10_000) -> dict:
    """Every test of the two runs, each with its effect size and ``drift`` (``decide``);
    ``sample`` is the rows a side the class and error tests see (the confidence scores
    and embeddings come sampled)."""
    limits = (thresholds or DriftThresholds()).by_test()
    tests = {"classes": class_drift(ref.class_counts, cur.class_counts, sample, seed),
             "confidence": confidence_drift(ref.scores, cur.scores),
             "errors": error_drift(ref, cur, sample, seed + 1)}
    if ref.embeddings is not None and cur.embeddings is not None:
        tests["embeddings"] = embedding_drift(ref.embeddings, cur.embeddings, permutations, seed)
    for name, t in tests.items():
        t["effect_size"] = EFFECTS[name]
        t.update(decide(t, alpha, limits[name]))
    return {"reference": ref.uri, "current": cur.uri, "alpha": alpha, "thresholds": limits,
            "rule": "drift where p-value < alpha and effect >= threshold",
            "rows": {"reference": ref.rows, "current": cur.rows}, "tests": tests,
            "drift": any(t["drift"] for t in tests.values()),
            "drifted": sorted(name for name, t in tests.items() if t["drift"])}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def write_report(result: dict, ref: RunSample, cur: RunSample, output: str) -> dict:
    """drift.json and drift.html (class shares, confidence histograms, and the embeddings
    of both runs on the reference's first two principal components)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, DRIFT_FILE), "w") as f:
        json.dump(result, f, indent=2)
    plots = []
    c = result["tests"]["classes"]
    if "reference_share" in c:
        fig, ax = plt.subplots(figsize=(max(5, len(c["reference_share"]) * 0.6), 3))
        x = np.arange(len(c["reference_share"]))
        ax.bar(x - 0.2, c["reference_share"], 0.4, label="reference")
        ax.bar(x + 0.2, c["current_share"], 0.4, label="current")
        present = [k for k in c["classes"] if ref.class_counts.get(k, 0) + cur.class_counts.get(k, 0)]
        ax.set_xticks(x, present, rotation=45, ha="right")
        ax.set_ylabel("share of predictions")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)  # beside the bars, not over them
        plots.append(("Predicted classes", _png(fig)))
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3))
    bins = np.linspace(0, 1, 41)
    ax.hist(ref.scores, bins, alpha=0.6, density=True, label="reference")
    ax.hist(cur.scores, bins, alpha=0.6, density=True, label="current")
    ax.set_xlabel("top-1 score")
    ax.legend()
    plots.append(("Confidence", _png(fig)))
    plt.close(fig)
    if ref.embeddings is not None and cur.embeddings is not None:
        mean = ref.embeddings.mean(0)
        _, _, vt = np.linalg.svd(ref.embeddings - mean, full_matrices=False)
        fig, ax = plt.subplots(figsize=(5, 4))
        for name, e in (("reference", ref.embeddings), ("current", cur.embeddings)):
            p = (e - mean) @ vt[:2].T
            ax.scatter(p[:, 0], p[:, 1], s=4, alpha=0.5, label=name)
        ax.set_xlabel("PC 1 (reference)")
        ax.set_ylabel("PC 2 (reference)")
        ax.legend()
        plots.append(("Embeddings on the reference's principal components", _png(fig)))
        plt.close(fig)
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{'<b>drift</b>' if t['drift'] else 'no drift'}</td>"
                   f"<td>{html.escape(t['decided_by'])}</td><td>{t['p_value']:.3g}</td><td>{result['alpha']}</td>"
                   f"<td>{html.escape(t['effect_size'])}</td><td>{t['effect']:.4f}</td><td>{t['threshold']}</td>"
                   f"<td>{html.escape(_detail(name, t))}</td></tr>"
                   for name, t in result["tests"].items())
    body = "".join(f"<h2>{html.escape(title)}</h2><img src='data:image/png;base64,{data}'>" for title, data in plots)
    verdict = "DRIFT: " + ", ".join(result["drifted"]) if result["drift"] else "no drift"
    with open(os.path.join(output, REPORT_FILE), "w") as f:
        f.write(f"<!doctype html><meta charset=utf-8><title>imgcls monitor</title><style>body{{font-family:sans-serif}}"
                f"td,th{{padding:2px 10px}}</style>{_header(verdict, ref, cur)}"
                f"<p><b>{html.escape(verdict_in_words(result))}</b></p>"
                f"<p>A test reports drift where its p-value is below alpha and its effect size "
                f"is at least its threshold; <i>decided by</i> names what the verdict rests on.</p>"
                f"<table><tr><th>test</th><th>verdict</th><th>decided by</th><th>p-value</th><th>alpha</th>"
                f"<th>effect size</th><th>effect</th><th>threshold</th><th>statistics</th></tr>{rows}</table>{body}")
    return {"drift_json": os.path.join(output, DRIFT_FILE), "report": os.path.join(output, REPORT_FILE)}


def verdict_in_words(result: dict) -> str:
    """The verdict as a sentence, with the numbers it rests on: each drifted test's p-value
    against alpha and effect against its threshold, or, without drift, every test's."""
    def numbers(name: str, t: dict) -> str:
        return (f"{name} (p-value {t['p_value']:.3g} {'<' if t['significant'] else '>='} alpha {result['alpha']:g}; "
                f"{t['effect_size']} {t['effect']:.4g} {'>=' if t['large'] else '<'} threshold {t['threshold']:g})")

    tests = result["tests"]
    if result["drift"]:
        return (f"Drift: the current run differs from the reference in "
                f"{', '.join(numbers(n, tests[n]) for n in result['drifted'])}.")
    return ("No drift: no test has both a p-value below alpha and an effect at least its threshold: "
            f"{', '.join(numbers(n, t) for n, t in tests.items())}.")


def _header(verdict: str, ref: RunSample, cur: RunSample) -> str:
    """drift.html's top: the verdict, the model (of the reference's labelling job, or the
    checkpoint it came from), both runs, the date and the imgcls version."""
    from imgcls.inference.finished import job_model
    from imgcls.web import report_header

    model = job_model(ref.uri) or job_model(cur.uri)
    if model is None and ref.uri.rstrip("/").endswith("/reference.parquet"):  # a checkpoint's validation split
        model = ref.uri.rstrip("/").rsplit("/", 1)[0]
    return report_header(f"imgcls monitor: {verdict}", model,
                         f"reference {ref.uri} ({ref.rows} rows), current {cur.uri} ({cur.rows} rows)")


def _detail(name: str, t: dict) -> str:
    if name == "classes":
        return f"chi2 {t['chi2']:.1f}, PSI {t['psi']:.3f}"
    if name == "confidence":
        return f"KS {t['ks']:.3f}; mean score {t['reference_mean']:.3f} -> {t['current_mean']:.3f}"
    if name == "errors":
        return f"error rate {t['reference_rate']:.2%} -> {t['current_rate']:.2%}"
    return f"MMD^2 {t['mmd2']:.4f} on {t['n'][0]} + {t['n'][1]} embeddings"


def run_monitor(reference: str, current: str, output: str, alpha: float = 0.01, sample: int = 10_000,
                embedding_sample: int = 500, permutations: int = 500, seed: int = 0,
                thresholds: Optional[DriftThresholds] = None) -> dict:
    """Compares ``current`` with ``reference`` (predictions, or a checkpoint folder that
    holds its validation predictions: ``evaluate.REFERENCE_FILE``) and writes the report;
    ``embedding_sample`` 0 leaves the embeddings out."""
    reference = check_runs(reference, current, embedding_sample)
    ref = read_run(reference, sample, embedding_sample, seed)
    cur = read_run(current, sample, embedding_sample, seed + 1)
    result = compare(ref, cur, alpha, permutations, seed, thresholds, sample)
    return {**result, **write_report(result, ref, cur, output)}

