"""The labelling page in a real browser (headless Chromium, conftest's ``browser``), on a
real labelling run's review picks: answered by clicks and by keys, its server killed
midway and restarted, the filled file trained on. The try page's test is in
test_serve.py, on that module's Serve application."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
from conftest import screenshot, train_small_cnn
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from imgcls.config import PredictConfig
from imgcls.inference.bulk import label_images

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # trains, labels, trains again: in CI, not the quick loop

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ("bag", "coat", "sneaker", "trouser")
PICKS = 24


@pytest.fixture(scope="module")
def labels(ray_cluster, fmnist_root, tmp_path_factory):
    """(predictions folder, work folder): a small CNN trained one epoch on 30 images per
    class, then imgcls predict over 10 other real images per class, in class folders."""
    folder = tmp_path_factory.mktemp("pages")
    names = {c: sorted(os.listdir(os.path.join(fmnist_root, c)))[:40] for c in CLASSES}
    model = train_small_cnn(fmnist_root, {c: n[:30] for c, n in names.items()}, str(folder / "model"), epochs=1,
                            width=16)
    for c, ns in names.items():
        (folder / "images" / c).mkdir(parents=True)
        for n in ns[30:]:
            shutil.copy(os.path.join(fmnist_root, c, n), folder / "images" / c / n)
    label_images(PredictConfig(model=model, input=str(folder / "images"), output=str(folder / "labels")))
    return str(folder / "labels"), folder


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], port: int, log: Path) -> subprocess.Popen:
    """An imgcls command that serves the labelling page on ``port``, once it answers."""
    proc = subprocess.Popen([sys.executable, "-m", "imgcls.cli", *args, "--port", str(port)],
                            stdout=log.open("a"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/state", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    raise AssertionError(f"the labelling page did not start: {log.read_text()[-3000:]}")


def text(browser, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def wait_until(browser, condition, what: str, timeout: float = 30):
    WebDriverWait(browser, timeout).until(lambda _: condition(), message=what)


def at_pick(browser, i: int, csv_rows: pd.DataFrame) -> None:
    """Waits until pick ``i`` (0-based) is shown, its image loaded."""
    name = os.path.basename(csv_rows.loc[i, "path"])
    wait_until(browser, lambda: text(browser, "position") == f"Pick {i + 1} of {PICKS}" and
               text(browser, "name") == name and
               browser.execute_script("const m = document.getElementById('image'); "
                                      "return m.complete && m.naturalWidth > 0"), f"pick {i + 1} shown")


def test_picks_answered_by_clicks_and_keys_survive_a_killed_server_and_train(labels, browser, ray_address, tmp_path):
    """imgcls review --serve: 10 picks labelled by clicking their class, 10 by number
    keys, one skipped (key s), one "not any of these" (its button); back shows the
    answers given. The server is killed (SIGKILL); imgcls label on the same file resumes
    at the first open pick. review.csv then holds exactly the answers given, and
    imgcls train --root review.csv trains one epoch on its labelled picks."""
    predictions, folder = labels
    review = folder / "review"
    csv = review / "review.csv"
    port = free_port()
    log = tmp_path / "server.log"
    server = start(["review", "--predictions", predictions, "--output", str(review), "--n", str(PICKS), "--serve"],
                   port, log)
    rows = pd.read_csv(csv, dtype=str, keep_default_na=False)
    truth = [Path(p).parent.name for p in rows["path"]]  # each image's class folder: the person's answer
    browser.get(f"http://127.0.0.1:{port}/")
    at_pick(browser, 0, rows)
    assert text(browser, "progress") == f"0 / {PICKS} labelled"
    classes = [b.get_attribute("data-label") for b in browser.find_elements(By.CSS_SELECTOR, "#classes button")]
    assert classes == list(CLASSES)  # the model's classes, from review.json
    assert len(browser.find_elements(By.CSS_SELECTOR, "#topk li")) == len(CLASSES)  # its top-k, all four here
    # 28-pixel images shown large, scaled by a whole factor with nearest neighbour.
    width, rendering = browser.execute_script("const m = document.getElementById('image'); "
                                              "return [m.getBoundingClientRect().width, getComputedStyle(m).imageRendering]")
    assert width >= 28 * 10 and width % 28 == 0 and rendering == "pixelated"
    screenshot(browser, tmp_path, "label-page")

    for i in range(10):  # by clicks
        at_pick(browser, i, rows)
        browser.find_element(By.CSS_SELECTOR, f'#classes button[data-label="{truth[i]}"]').click()
        wait_until(browser, lambda: text(browser, "progress").startswith(f"{i + 1} / {PICKS} labelled"), "saved")
    for i in range(10, 20):  # by keys: 1 to 4
        at_pick(browser, i, rows)
        ActionChains(browser).send_keys(str(classes.index(truth[i]) + 1)).perform()
        wait_until(browser, lambda: text(browser, "progress").startswith(f"{i + 1} / {PICKS} labelled"), "saved")
    at_pick(browser, 20, rows)
    ActionChains(browser).send_keys("s").perform()
    at_pick(browser, 21, rows)
    browser.find_element(By.ID, "none").click()
    at_pick(browser, 22, rows)
    assert text(browser, "progress") == f"20 / {PICKS} labelled · 1 skipped · 1 not any of these"
    ActionChains(browser).send_keys("\ue012").perform()  # left arrow: back
    at_pick(browser, 21, rows)
    assert text(browser, "answer") == "Not any of these"
    browser.find_element(By.ID, "back").click()
    at_pick(browser, 20, rows)
    assert text(browser, "answer") == "Skipped"

    server.send_signal(signal.SIGKILL)  # no goodbye: what was answered must already be in the file
    server.wait(30)
    server = start(["label", str(csv)], port, log)
    try:
        browser.refresh()
        at_pick(browser, 22, rows)  # the first pick not answered
        assert text(browser, "progress") == f"20 / {PICKS} labelled · 1 skipped · 1 not any of these"
        browser.find_element(By.CSS_SELECTOR, f'#classes button[data-label="{truth[22]}"]').click()
        at_pick(browser, 23, rows)
        assert text(browser, "progress").startswith(f"21 / {PICKS} labelled")
        screenshot(browser, tmp_path, "label-page-resumed")
    finally:
        server.terminate()
        server.wait(30)

    filled = pd.read_csv(csv, dtype=str, keep_default_na=False)
    assert filled["path"].tolist() == rows["path"].tolist()
    want_labels = truth[:20] + ["", "", truth[22], ""]
    assert filled["label"].tolist() == want_labels
    assert filled["review"].tolist() == [""] * 20 + ["skipped", "none-of-these", "", ""]

    env = {**os.environ, "RAY_ADDRESS": ray_address}
    done = subprocess.run([sys.executable, "-m", "imgcls.cli", "train", "--config", "jobs/configs/fashion_mnist.yaml",
                           "--root", str(csv), "--epochs", "1", "--num-workers", "1", "--warmup-epochs", "0",
                           "--storage-path", str(tmp_path / "runs"), "--name", "from-review"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 review pick(s) without a label left out (1 none-of-these, 1 not answered, 1 skipped)" in done.stderr
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert set(summary["classes"]) == set(want_labels) - {""} and os.path.isdir(summary["checkpoint"])
    train = pd.read_parquet(os.path.join(summary["checkpoint"], "splits", "train.parquet"))
    val_test = [pd.read_parquet(os.path.join(summary["checkpoint"], "splits", f"{s}.parquet")) for s in ("val", "test")]
    used = pd.concat([train, *val_test])  # every labelled pick, with the label given, and nothing else
    assert dict(zip(used["path"], used["label"])) == {p: label for p, label in zip(rows["path"], want_labels) if label}
