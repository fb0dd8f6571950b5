"""How well `imgcls monitor` detects drift, and how long it takes over 1 million rows.

On real Fashion-MNIST predictions: the small CNN is trained with `imgcls train`'s own
`fit` on 300 images a class, then labels (with `--embeddings`) a held-out pool of the
other images, and the same pool blurred (Gaussian, radius 1). The pool is cut into two
halves: references are drawn from one half, current sets from the other, so that no
image is in both. Each condition draws `--repeats` reference/current pairs of n images
each and runs monitor's tests (`imgcls.evaluation.monitor.compare`, alpha 0.01, embeddings on a
sample of 500 a side):

- none: both drawn uniformly over the classes (every flag is a false alarm);
- prior10 / prior30: the current set's class shares moved by a total variation of 0.10 /
  0.30 (half the classes up, half down, equally);
- blur: the current set's images blurred, classes drawn uniformly.

Power is the share of pairs flagged (any test, and each test on its own).

Then the same at 1,000,000 rows a side (`--rows`), where a test of the full counts finds
any change significant: each of `--million-repeats` pairs splits the pool into halves
anew and draws each run's rows with replacement from its half, with the class shares
of its condition (uniform, or moved by a total variation of 0.01, 0.10, 0.30, or the
blurred images'), and compares them as `imgcls monitor` would (the class and error
tests on 10,000 rows a side, the confidence on 10,000 scores, the embeddings on 500).
The 1% shift must not alarm; the 10% and 30% shifts and the blur must. A half holds
18,500 images, so each is about 54 times in a run: the two runs differ by what two sets
of 18,500 images differ by (Jensen-Shannon distance of the class shares about 0.01),
more than two sets of a million distinct images would.

Then the wall time of `imgcls monitor --embedding-sample 0` over two runs of 1,000,000
prediction rows each (the pool's rows repeated), from the command's start, Ray's
included.

    python bench/monitor.py            # bench/results/monitor.json

What the figures say: at a million rows a side every test of the full counts would be
significant, and the effect sizes decide: the median Jensen-Shannon distance of the
class shares was 0.007 for the same mix (the two halves' images differ), 0.009 for a 1%
shift, 0.057 for 10%, 0.18 for 30% and 0.13 for the blurred images, against the
threshold 0.03. The confidence test leaves the prior shifts to the classes' (their
Wasserstein distance, 0.03 and 0.07, is under 0.1) and flags the blur (0.44). A 10%
prior shift needs the larger sets to be seen every time. The million-row timing ran
beside other jobs on the same 2 cores (15.6 s in a quieter run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

CONDITIONS = ("none", "prior10", "prior30", "blur")
MILLION_CONDITIONS = ("none", "prior1", "prior10", "prior30", "blur")
PRIOR_SHIFTS = {"prior1": 0.01, "prior10": 0.10, "prior30": 0.30}  # total variation of the class shares


def shifted_shares(num_classes: int, tv: float) -> np.ndarray:
    """Class shares at total variation ``tv`` from uniform: half the classes up, half down."""
    shares = np.full(num_classes, 1.0 / num_classes)
    half = num_classes // 2
    shares[:half] += tv / half
    shares[half:2 * half] -= tv / half
    return shares


def draw(frame, n: int, rng, shares=None, replace: bool = False) -> np.ndarray:
    """Row indices of ``frame`` (columns label_index) drawn without replacement (or with):
    uniformly, or with class ``shares``."""
    if shares is None:
        return rng.choice(len(frame), n, replace=replace)
    by_class = [np.flatnonzero(frame["label_index"].to_numpy() == c) for c in range(len(shares))]
    counts = rng.multinomial(n, shares)
    return np.concatenate([rng.choice(idx, k, replace=replace) for idx, k in zip(by_class, counts)])


def train_model(root: str, workdir: str, per_class: int) -> tuple[str, set]:
    from imgcls.config import DataConfig, JobConfig, ModelConfig, TrainConfig
    from imgcls.training.trainer import fit

    job = JobConfig(data=DataConfig(root=root, augment="light", max_per_class=per_class),
                    model=ModelConfig(arch="small_cnn", image_size=28),
                    train=TrainConfig(epochs=4, batch_size=64, lr=3e-3, num_workers=2,
                                      storage_path=os.path.join(workdir, "runs"), name="monitor", overwrite=True))
    result = fit(job)
    print(f"model: val_accuracy {result.metrics['val_accuracy']:.3f}", flush=True)
    return result.best_checkpoint, {os.path.abspath(p) for split in result.splits.values() for p in split.paths}


def label(model: str, folder: str, output: str) -> "object":
    import pyarrow.parquet as pq

    from imgcls.inference.bulk import label_images
    from imgcls.config import PredictConfig

    shutil.rmtree(output, ignore_errors=True)
    summary = label_images(PredictConfig(model=model, input=folder, output=output, embeddings=True))
    print(f"labelled {summary.rows} files of {folder} in {summary.seconds:.0f} s", flush=True)
    return pq.read_table(output).to_pandas()


def build_pools(root: str, used: set, workdir: str) -> tuple[str, str]:
    """The images the model did not see, as an ImageFolder tree, and the same blurred."""
    from PIL import Image, ImageFilter

    plain, blurred = os.path.join(workdir, "pool"), os.path.join(workdir, "pool-blurred")
    for folder in (plain, blurred):
        shutil.rmtree(folder, ignore_errors=True)
    for label_name in sorted(os.listdir(root)):
        if label_name.startswith("."):
            continue
        for folder in (plain, blurred):
            os.makedirs(os.path.join(folder, label_name))
        for name in sorted(os.listdir(os.path.join(root, label_name))):
            path = os.path.join(root, label_name, name)
            if os.path.abspath(path) in used:
                continue
            os.link(path, os.path.join(plain, label_name, name))
            Image.open(path).filter(ImageFilter.GaussianBlur(1)).save(os.path.join(blurred, label_name, name))
    return plain, blurred


def indexed(plain, blurred) -> tuple:
    """Both frames in one row order, each row's true class as label_index; the classes."""
    classes = sorted(plain["true_label"].unique())
    for frame in (plain, blurred):
        frame["label_index"] = frame["true_label"].map({c: i for i, c in enumerate(classes)})
    return (plain.sort_values("path").reset_index(drop=True), blurred.sort_values("path").reset_index(drop=True),
            classes)


def halves(plain, blurred, seed) -> tuple:
    """The pool split in two: references come from one half, current sets from the other
    (plain or blurred), so that no image is in both."""
    half = np.random.default_rng(seed).permutation(len(plain))
    ref_rows, cur_rows = np.sort(half[: len(half) // 2]), np.sort(half[len(half) // 2:])
    return plain.iloc[ref_rows].reset_index(drop=True), {"plain": plain.iloc[cur_rows].reset_index(drop=True),
                                                         "blur": blurred.iloc[cur_rows].reset_index(drop=True)}


def condition_shares(condition: str, num_classes: int):
    """The current set's class shares: shifted for a prior shift, else None (as drawn)."""
    return shifted_shares(num_classes, PRIOR_SHIFTS[condition]) if condition in PRIOR_SHIFTS else None


def flag(ref, cur, permutations: int, seed: int) -> tuple[dict, float]:
    """monitor's result for one pair, and compare's seconds."""
    from imgcls.evaluation.monitor import compare

    began = time.perf_counter()
    result = compare(ref, cur, alpha=0.01, permutations=permutations, seed=seed)
    return result, time.perf_counter() - began


def summary(results: list[dict], seconds: list[float]) -> dict:
    """Share of pairs flagged (by any test, by each) and each test's median effect size."""
    tests = list(results[0]["tests"])
    return {"pairs": len(results), "flagged": float(np.mean([r["drift"] for r in results])),
            "by_test": {k: float(np.mean([r["tests"][k]["drift"] for r in results])) for k in tests},
            "median_effect": {k: float(np.median([r["tests"][k]["effect"] for r in results])) for k in tests},
            "compare_seconds": float(np.median(seconds))}


def power_study(plain, blurred, sizes, repeats: int, embedding_sample: int, permutations: int, seed: int) -> dict:
    from imgcls.evaluation.monitor import frame_sample

    plain, blurred, classes = indexed(plain, blurred)
    ref_pool, cur_pools = halves(plain, blurred, seed)
    out = {}
    for n in sizes:
        out[str(n)] = {}
        for condition in CONDITIONS:
            rng = np.random.default_rng([seed, n, CONDITIONS.index(condition)])
            shares = condition_shares(condition, len(classes))
            pool = cur_pools["blur" if condition == "blur" else "plain"]
            results, seconds = [], []
            for r in range(repeats):
                ref = frame_sample(ref_pool.iloc[draw(ref_pool, n, rng)], "reference", n, embedding_sample, seed + r)
                cur = frame_sample(pool.iloc[draw(pool, n, rng, shares)], "current", n, embedding_sample, seed + r)
                result, took = flag(ref, cur, permutations, seed + r)
                results.append(result)
                seconds.append(took)
            out[str(n)][condition] = summary(results, seconds)
            print(f"n={n} {condition}: flagged {out[str(n)][condition]['flagged']:.2f} "
                  f"{out[str(n)][condition]['by_test']}", flush=True)
    return out


def million_row_study(plain, blurred, rows: int, repeats: int, embedding_sample: int, permutations: int,
                      seed: int) -> dict:
    """Each condition's share of pairs flagged at ``rows`` rows a side: per pair, a new
    split of the pool, and each run drawn with replacement from its half with the class
    shares of the condition (uniform for the reference, the same run and blur)."""
    from imgcls.evaluation.monitor import frame_sample

    plain, blurred, classes = indexed(plain, blurred)
    uniform = shifted_shares(len(classes), 0.0)
    columns = ["status", "label", "score", "embedding", "label_index"]
    out = {}
    for condition in MILLION_CONDITIONS:
        results, seconds = [], []
        for r in range(repeats):
            rng = np.random.default_rng([seed, rows, MILLION_CONDITIONS.index(condition), r])
            ref_pool, cur_pools = halves(plain[columns], blurred[columns], [seed, r])
            pool = cur_pools["blur" if condition == "blur" else "plain"]
            shares = condition_shares(condition, len(classes))
            ref = frame_sample(ref_pool.iloc[draw(ref_pool, rows, rng, uniform, replace=True)], "reference",
                               embedding_sample=embedding_sample, seed=seed + r)
            cur = frame_sample(pool.iloc[draw(pool, rows, rng, uniform if shares is None else shares, replace=True)],
                               "current", embedding_sample=embedding_sample, seed=seed + r + 1)
            result, took = flag(ref, cur, permutations, seed + r)
            results.append(result)
            seconds.append(took)
        out[condition] = summary(results, seconds)
        print(f"{rows:,} rows {condition}: flagged {out[condition]['flagged']:.2f} {out[condition]['by_test']} "
              f"median effects {out[condition]['median_effect']}", flush=True)
    return out


def million_rows(plain, workdir: str, rows: int) -> dict:
    """Two runs of ``rows`` prediction rows (the pool's rows repeated, without
    embeddings), then ``imgcls monitor`` over them from the command's start."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = [c for c in plain.columns if c not in ("embedding", "label_index")]
    table = pa.Table.from_pandas(plain[columns], preserve_index=False)
    runs = {}
    whole = pa.concat_tables([table] * -(-rows // table.num_rows)).slice(0, rows)
    for name, shift in (("reference", 0), ("current", rows // 3)):  # the same rows, in another order
        folder = os.path.join(workdir, f"big-{name}")
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        run = pa.concat_tables([whole.slice(shift), whole.slice(0, shift)])
        for part, lo in enumerate(range(0, rows, 100_000)):  # parts as a labelling job writes them
            pq.write_table(run.slice(lo, 100_000), os.path.join(folder, f"part-{part:06d}.parquet"))
        runs[name] = folder
    counted = {k: pq.ParquetDataset(v).read(columns=["status"]).num_rows for k, v in runs.items()}
    cmd = [sys.executable, "-m", "imgcls.cli", "monitor", "--reference", runs["reference"], "--current",
           runs["current"], "--output", os.path.join(workdir, "big-drift"), "--embedding-sample", "0",
           "--num-cpus", str(os.cpu_count())]
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"imgcls monitor failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(workdir, "big-drift", "drift.json")) as f:
        drift = json.load(f)
    return {"rows": counted, "seconds": seconds, "exit_status": proc.returncode, "drift": drift["drift"],
            "drifted": drift["drifted"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="out/bench/monitor")
    p.add_argument("--per-class", type=int, default=4000,
                   help="Fashion-MNIST images a class (4,000: 40,000, enough for sets of 10,000)")
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--repeats", type=int, default=20, help="pairs drawn per condition and size")
    p.add_argument("--embedding-sample", type=int, default=500)
    p.add_argument("--permutations", type=int, default=200)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of each run in the million-row cases")
    p.add_argument("--million-repeats", type=int, default=40, help="pairs drawn per condition at --rows rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/monitor.json")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from imgcls.datasets import fetch_fashion_mnist

    began = time.perf_counter()
    os.makedirs(args.workdir, exist_ok=True)
    root = fetch_fashion_mnist(os.path.join(args.workdir, "data"), per_class=args.per_class)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    model, used = train_model(root, args.workdir, args.train_per_class)
    plain_dir, blurred_dir = build_pools(root, used, args.workdir)
    plain = label(model, plain_dir, os.path.join(args.workdir, "labels-pool"))
    blurred = label(model, blurred_dir, os.path.join(args.workdir, "labels-blurred"))
    for frame in (plain, blurred):
        frame["true_label"] = frame["path"].map(lambda p: os.path.basename(os.path.dirname(p)))
    accuracy = {name: float((f["label"] == f["true_label"]).mean()) for name, f in (("pool", plain),
                                                                                    ("blurred", blurred))}
    print(f"accuracy on the pool {accuracy}", flush=True)
    # A size is run when each half holds enough of every class for the 30% shift's
    # largest share (0.16 of 10 classes): 10,000 needs --per-class 4,000 or so.
    per_class_half = plain["true_label"].value_counts().min() // 2
    sizes = [n for n in (1000, 10_000) if n * shifted_shares(10, 0.30).max() <= 0.9 * per_class_half]
    power = power_study(plain, blurred, sizes, args.repeats, args.embedding_sample, args.permutations, args.seed)
    million = million_row_study(plain, blurred, args.rows, args.million_repeats, args.embedding_sample,
                                args.permutations, args.seed)
    ray.shutdown()
    big = million_rows(plain, args.workdir, args.rows)
    print(f"monitor over {args.rows:,} rows a run: {big['seconds']:.1f} s", flush=True)
    far = {n: power[n]["none"]["flagged"] for n in power}
    result = {
        "machine": {"cpus": os.cpu_count()}, "date": time.strftime("%Y-%m-%d"),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "pool_images": len(plain), "accuracy": accuracy,
        "power": power, "false_alarm_rate": far, "power_1m": million, "million_rows": big,
        "targets": {"false_alarm_rate_max": 0.10, "million_rows_seconds_max": 60, "false_alarm_rate_1m_max": 0.05,
                    "tiny_shift_alarm_rate_1m_max": 0.05, "power_prior30_1m_min": 0.95},
        "ratios": {"false_alarm_rate_1000": far.get("1000"),
                   "million_rows_seconds_vs_target": big["seconds"] / 60,
                   "false_alarm_rate_1m": million["none"]["flagged"],
                   "tiny_shift_alarm_rate_1m": million["prior1"]["flagged"],
                   "power_prior30_1m": million["prior30"]["flagged"]},
        "seconds": time.perf_counter() - began,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({"false_alarm_rate": far, "million_rows_seconds": big["seconds"], "ratios": result["ratios"]}),
          flush=True)


if __name__ == "__main__":
    main()
