"""The shell blocks of the README and the docs pages, run as a user types them, in a copy
of the checkout.

The blocks are read from README.md and docs/*.md (```bash fences, each identified by its
file and the heading above it; RUNS lists those that run, in order), so a change to a
page changes what runs here. A block that must not run (it needs a cluster, a cloud
bucket, or installs) says so in the page, in a comment right above its fence:
``<!-- not run: why -->``; every other block must be in RUNS. Each line runs as written, through
``bash -c`` in the copy's folder with the copy's ``.venv/bin`` first on PATH, unless a
rule below matches it: SKIPPED lines are not run, SUBSTITUTIONS rewrite placeholders and
cap sizes (small data, one epoch), PREPARED files are made (or filled in, as a person
would) before the first line that names them.
These three tables are everything that is not run exactly as written; a line that no
rule matches and that fails, fails the test.

All commands join one local Ray cluster (RAY_ADDRESS): the test session's, started in a
folder of its own, as ``ray start`` would be. Ray's workers then run in that folder, not
the command's, so every relative path a command takes must be resolved by the command.
"""

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]  # every page whose blocks are read
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(.+?)\s*-->$")  # the mark above a block that must not run

# Each run is a fresh copy of the checkout; its (page, heading) blocks run there in this
# order: the walk-through first, since the later blocks use its out/ folder. A line that,
# but for its comment and spacing, is an imgcls command already run (the Training block
# repeats the walk-through's fetch and train, the Evaluation block its evaluate and
# explain of the predictions, the README's tour most of it) is not run again: a train
# would only train into the same run folder, which refuses a second run without --resume
# or --overwrite. `imgcls serve` is the exception: each block that serves starts, asks
# and stops a server of its own.
RUNS = {
    "walk-through": [("docs/index.md", "Walk-through: from training to bulk labelling to a report"),
                     ("docs/labelling.md", "Labelling a folder or a bucket"),
                     ("docs/evaluation.md", "Evaluating a model"),
                     ("docs/evaluation.md", "Grad-CAM explanations"),
                     ("docs/evaluation.md", "Export"),
                     ("docs/model-in-use.md", "Reviewing uncertain predictions"),
                     ("docs/model-in-use.md", "Retraining from the last model, and ensembles"),
                     ("docs/model-in-use.md", "Monitoring drift between labelling runs"),
                     ("docs/serving.md", "Serving"),
                     ("README.md", "A ten-line tour"),
                     ("docs/training.md", "Training"),
                     ("docs/training.md", "Fine-tuning a small photo collection"),
                     ("docs/training.md", "Hyperparameter search"),
                     ("docs/model-in-use.md", "Tracking runs and the model registry"),
                     ("docs/development.md", "The docs site")],
}

SKIPPED = [  # (pattern, why the line is not run)
    (r"^ray start --head\b", "the commands join the test session's cluster (RAY_ADDRESS), which stands in for it"),
    (r"^mlflow ui\b", "a web server that runs until stopped; tests/integration/test_tracking.py reads a real "
                     "mlflow server's runs"),
]

SUBSTITUTIONS = [  # (pattern, replacement, why), applied in order
    (r"^bash scripts/install\.sh && ", "", "the copy links the checkout's installed .venv; installing takes minutes"),
    (r"--per-class \d+", "--per-class 30", "small data: 30 images per class"),
    (r"^(imgcls fetch-data fashion-mnist \S+)(?!.*--per-class)", r"\1 --per-class 30",
     "small data: 30 images per class"),
    (r"--epochs \d+", "--epochs 1", "one epoch"),
    (r"^(imgcls (?:train|tune)\b(?!.*--epochs).*?)(\s+#.*)?$", r"\1 --epochs 1\2", "one epoch"),
    (r"^(imgcls train --config jobs/configs/dogs_cats_finetune\.yaml\b(?!.*--image-size).*?)(\s+#.*)?$",
     r"\1 --image-size 96\2", "small images: 96 px, not the recipe's 224 (a third of the time)"),
    (r"--num-samples \d+", "--num-samples 1", "one trial (tests/integration/test_tune.py runs several)"),
    (r"^(imgcls monitor .*--current out/serve-log\b.*)$", r"\1 || test $? -eq 1",
     "a hundred requests may or may not drift from the validation split: exit status 1 (drift) is an answer too; "
     "the test checks drift.json below"),
    (r"^imgcls label (\S+).*$",
     r"imgcls label \1 & pid=$!; for i in $(seq 120); do curl -sf http://127.0.0.1:8765/api/state >/dev/null && "
     r"break; sleep 1; done; curl -sf http://127.0.0.1:8765/ | grep -q 'imgcls label'; ok=$?; kill $pid; "
     r"wait $pid; exit $ok",
     "the labelling page serves until Ctrl-C: started, asked for its state and its page, then stopped "
     "(tests/integration/test_pages.py answers picks in a real browser)"),
    (r"\bCKPT\b", "out/runs/fashion-mnist/best", "a checkpoint: the walk-through's best"),
    (r"\bout/demo/", "out/", "the demo's data and run: the walk-through made the same recipe's under out/"),
    (r"s3://bucket/images/", "out/data/fashion-mnist/", "a placeholder bucket: the walk-through's images"),
    (r"s3://bucket/labels/", "out/labels-bulk/", "a placeholder bucket: a local folder"),
    (r"--input \.\.\. --output \.\.\.", "--input out/data/fashion-mnist --output out/labels-onnx",
     "placeholders: the walk-through's images, a local folder"),
]


def make_photo(copy: Path) -> None:
    """A real image: the first Fashion-MNIST 'bag' of the walk-through's data, as a JPEG."""
    from PIL import Image

    bags = copy / "out" / "data" / "fashion-mnist" / "bag"
    Image.open(bags / sorted(os.listdir(bags))[0]).convert("RGB").save(copy / "photo.jpg", quality=95)


def fill_in_review(copy: Path) -> None:
    """A person's part: each pick of review.csv given its label, the name of its class
    folder (the walk-through labels its own images, whose folders are their classes)."""
    import csv

    path = copy / "out" / "review" / "review.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(not r["label"] for r in rows), "review.csv should come with an empty label column"
    for r in rows:
        r["label"] = Path(r["path"]).parent.name
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


# A file a line names, made (or, for review.csv, filled in as a person would) in the
# copy's folder before the first line that names it runs.
PREPARED = {"photo.jpg": make_photo, "out/review/review.csv": fill_in_review}


def readme_blocks(text: str) -> list[tuple[str, list[str], str | None]]:
    """(heading, commands, why not run) of each ```bash block of a page, under the
    nearest heading above it; ``why`` is the reason of a ``<!-- not run: why -->`` mark
    on the last non-blank line above the fence, else None. Other fenced blocks (YAML,
    text, diagrams) are passed over whole. Comment-only and blank lines are dropped;
    backslash continuations joined."""
    blocks, heading, block, fence, above = [], None, None, None, ""
    for line in text.splitlines():
        if fence is not None:  # inside a fence: its lines are not headings or marks
            if line.strip() == "```":
                if block is not None:
                    blocks.append((heading, block, why))
                fence, block = None, None
            elif block is not None:
                block.append(line)
            continue
        if line.strip().startswith("```"):
            fence = line.strip()[3:]
            if fence == "bash":
                mark = NOT_RUN.match(above.strip())
                block, why = [], (mark.group(1) if mark else None)
        elif re.match(r"#{1,6} ", line):
            heading = re.sub(r"\s*\{#[^}]*\}$", "", line.lstrip("#").strip())  # less a {#id}
        if line.strip():
            above = line
    out = []
    for heading, lines, why in blocks:
        commands, pending = [], ""
        for line in lines:
            pending += line
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            if pending.strip() and not pending.strip().startswith("#"):
                commands.append(pending.strip())
            pending = ""
        out.append((heading, commands, why))
    return out


def page_blocks() -> list[tuple[tuple[str, str], list[str], str | None]]:
    """((page, heading), commands, why not run) of every bash block of the pages."""
    return [((str(page.relative_to(ROOT)), heading), commands, why)
            for page in PAGES for heading, commands, why in readme_blocks(page.read_text())]


def run_lines(blocks, key: tuple[str, str]) -> list[str]:
    """The lines of the blocks under ``key`` that run (not marked)."""
    return [line for k, commands, why in blocks if k == key and why is None for line in commands]


def as_run(line: str) -> tuple[str | None, list[str]]:
    """The command to run for a README line (None: skipped) and the reasons it differs."""
    for pattern, why in SKIPPED:
        if re.search(pattern, line):
            return None, [why]
    reasons = []
    for pattern, replacement, why in SUBSTITUTIONS:
        new = re.sub(pattern, replacement, line)
        if new != line:
            line = new
            reasons.append(why)
    return line, reasons


def test_tables_are_used_and_every_block_is_classified():
    """No rule is dead, and every bash block of the pages is either run or marked as not run."""
    blocks = page_blocks()
    run_keys = [k for keys in RUNS.values() for k in keys]
    assert len(run_keys) == len(set(run_keys)), "a (page, heading) runs twice"
    for key in run_keys:
        assert run_lines(blocks, key), f"no bash block to run under {key} (missing, or every one marked not run)"
    unclassified = {k for k, _, why in blocks if why is None} - set(run_keys)
    assert not unclassified, f"bash blocks neither run here nor marked <!-- not run: why -->: {sorted(unclassified)}"
    lines = [line for key in run_keys for line in run_lines(blocks, key)]
    for pattern, *_ in SKIPPED + SUBSTITUTIONS:
        assert any(re.search(pattern, line) for line in lines), f"rule {pattern!r} matches no README line"
    for name in PREPARED:
        assert any(name in line for line in lines), f"{name} is named by no README line"
    assert as_run("imgcls train --config x.yaml  # a note") == ("imgcls train --config x.yaml --epochs 1  # a note",
                                                               ["one epoch"])


def test_blocks_are_read_with_their_heading_and_mark():
    text = "\n".join(["# Page", "## Run me {#run}", "```bash", "imgcls train \\", "  --lr 1  # a note", "```",
                      "```yaml", "# not a heading", "```", "<!-- not run: needs a cluster -->", "", "```bash",
                      "ray up x.yaml", "```", "```text", "<!-- not run: shown, not a mark -->", "```", "```bash",
                      "echo hi", "```"])
    assert readme_blocks(text) == [("Run me", ["imgcls train   --lr 1  # a note"], None),
                                   ("Run me", ["ray up x.yaml"], "needs a cluster"),
                                   ("Run me", ["echo hi"], None)]


def checkout_copy(dest: Path) -> Path:
    """The checkout's files (tracked, and new ones not ignored) with .venv linked, not copied."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    return dest


def command_key(command: str) -> str:
    """A command without its trailing comment and extra spaces: what it does."""
    return " ".join(re.sub(r"\s+#.*$", "", command).split())


def test_command_key_ignores_comments_and_spacing():
    assert command_key("imgcls train --config x.yaml --epochs 1            # prints epoch lines") == \
        command_key("imgcls train --config x.yaml --epochs 1  # flags override the YAML")
    assert command_key("imgcls train --config x.yaml") != command_key("imgcls train --config y.yaml")


def test_readme_blocks_run_as_written(tmp_path, ray_address):
    blocks = page_blocks()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ray_address}
    done, log, ran, prepared = {}, [], set(), set()
    for run, headings in RUNS.items():
        copy = checkout_copy(tmp_path / run)
        env["PATH"] = f"{copy / '.venv' / 'bin'}:{os.environ['PATH']}"
        for key in headings:
            for line in run_lines(blocks, key):
                command, reasons = as_run(line)
                if command is None:
                    log.append(f"SKIPPED  {line}\n         ({'; '.join(reasons)})")
                    continue
                # Only imgcls commands are run once: a repeated request (the serving block's
                # second classify, which the updated model answers) is a new request, and
                # each block that serves starts and stops its own server.
                if command_key(command) in ran and command.startswith("imgcls ") \
                        and not command.startswith("imgcls serve "):
                    log.append(f"RAN ABOVE {command}")
                    continue
                ran.add(command_key(command))
                for name, make in PREPARED.items():
                    if re.search(rf"(^|\s){re.escape(name)}(\s|$)", command) and (run, name) not in prepared:
                        prepared.add((run, name))
                        make(copy)
                start = time.monotonic()
                proc = subprocess.run(["bash", "-c", command], cwd=copy, env=env, capture_output=True, text=True,
                                      timeout=900)
                seconds = time.monotonic() - start
                log.append(f"{seconds:6.1f} s {command}" + (f"\n         (README: {line}; {'; '.join(reasons)})"
                                                           if reasons else ""))
                assert proc.returncode == 0, (f"line failed ({key[0]}, {key[1]}): {line}\nran: {command}\n"
                                              f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n"
                                              f"--- stderr\n{proc.stderr[-5000:]}")
        done[run] = copy
    print("\n".join(["README commands:", *log]))

    walk = done["walk-through"]
    assert (walk / "out/runs/fashion-mnist/best/model.pt").is_file()
    # imgcls train leaves its validation predictions in the best checkpoint, monitor's reference
    reference = pq.read_table(walk / "out/runs/fashion-mnist/best/reference.parquet").to_pandas()
    val = pq.read_table(walk / "out/runs/fashion-mnist/splits/val.parquet")
    assert len(reference) == val.num_rows > 0 and reference["embedding"].notna().all()
    for labels in ("labels", "labels-bulk", "labels-onnx"):
        assert list((walk / "out" / labels).glob("part-*.parquet")), labels
    assert (walk / "out/eval/report.html").is_file() and (walk / "out/eval/metrics.json").is_file()
    assert len(list((walk / "out/gradcam").glob("*.png"))) >= 2  # mistakes, and photo.jpg
    assert (walk / "out/export/model.onnx").is_file()
    assert (walk / "out/runs/fashion-mnist-tune/tune_best.yaml").is_file()
    again = "RAN ABOVE imgcls train --config jobs/configs/fashion_mnist.yaml"
    assert sum(entry.startswith(again) for entry in log) == 2  # the tour's and the Training block's, as the walk-through's
    # the Evaluation block's (and the tour's evaluate), as the walk-through's
    for again, times in (("evaluate --model out/runs/fashion-mnist/best --predictions", 2),
                         ("explain  --model out/runs/", 1)):
        assert sum(entry.startswith(f"RAN ABOVE imgcls {again}") for entry in log) == times, again
    # Ray Tune runs each trial in a folder of its own: the YAML's relative root was resolved
    # against the command's folder before any trial started, and is saved absolute.
    best = yaml.safe_load((walk / "out/runs/fashion-mnist-tune/tune_best.yaml").read_text())
    assert best["data"]["root"] == str(walk / "out/data/fashion-mnist"), best["data"]
    assert len((walk / "out/review/review.csv").read_text().splitlines()) == 51  # a header and 50 picks
    # the retrain started from the walk-through's model, on its data plus the filled-in picks
    retrain = walk / "out/runs/fashion-mnist-retrain"
    assert (retrain / "best/model.pt").is_file()
    trained_on = pq.read_table(retrain / "splits/train.parquet").to_pandas()
    picks = pd.read_csv(walk / "out/review/review.csv")
    assert set(picks["path"]) & set(trained_on["path"]), "none of the reviewed picks was trained on"
    ensemble = pq.read_table(walk / "out/eval-ensemble/predictions.parquet").to_pandas()
    test_split = pq.read_table(retrain / "splits/test.parquet")
    assert len(ensemble) == test_split.num_rows > 0 and ensemble["model_id"].str.startswith("ens-").all()
    drift = json.loads((walk / "out/drift/drift.json").read_text())  # the same images, model and runtime
    assert not drift["drift"] and drift["rows"]["current"] == drift["rows"]["reference"] > 0
    # the monthly retrain: two registered versions, the retrain tracked in the SQLite store,
    # and the predictions made through the alias name the version it pointed at then
    champion = pq.read_table(walk / "out/labels-champion").to_pandas()
    assert set(champion["model_id"]) == {"models:/fashion-mnist/2"}
    retrain_meta = json.loads((walk / "out/runs/fashion-mnist-2026-02/best/meta.json").read_text())
    assert json.loads((walk / "out/labels-champion/_job.json").read_text())["model_run_id"] == \
        retrain_meta["mlflow_run_id"]
    assert (walk / "out/mlflow.db").is_file() and (walk / "out/mlartifacts").is_dir()
    # the serving example: every request a row of the log, from the two models (and the
    # tour's 20 requests, to the first model, after them); monitor and review read it
    log = pq.read_table(walk / "out/serve-log").to_pandas()
    assert len(log) == 122 and log["model_id"].nunique() == 2 and log["path"].map(os.path.isfile).all()
    served = json.loads((walk / "out/serve-drift/drift.json").read_text())
    assert served["rows"]["current"] == 102
    assert len((walk / "out/serve-review/review.csv").read_text().splitlines()) == 21
    assert (walk / "out/runs/my-photos/best/model.pt").is_file()
    assert (walk / "out/runs/my-probe/checkpoint_linear_probe/model.pt").is_file()
    metrics = json.loads((walk / "out/eval-photos/metrics.json").read_text())
    held_out = pq.read_table(walk / "out/runs/my-photos/splits/test.parquet")
    assert metrics["num_samples"] == held_out.num_rows > 0, metrics  # exactly the run's test split
