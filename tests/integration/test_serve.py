"""imgcls serve on a real Ray Serve application, over real HTTP, with real photos.

One application (the module's ``served``) answers every test, on the session's Ray
cluster: deployed by ``serving.deploy`` from the config ``imgcls serve`` deploys, with
a bearer token, a small queue and the online log on. Tests that change it (the model
update) run last but one; the log's test runs last, over everything sent before.
"""

import asyncio
import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from conftest import EXPECTED_ERRORS

from imgcls.checkpoint import save_checkpoint
from imgcls.config import JobConfig, ModelConfig, PredictConfig, ServeConfig
from imgcls.inference.bulk import label_images
from imgcls.models import create_model
from imgcls.serving import deploy

pytestmark = pytest.mark.integration

TOKEN = "a-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# The HTTP status of each damaged file of conftest's bad_corpus (its EXPECTED_ERRORS types).
STATUS = {"too-large": 413, "unsupported": 415, "decode": 422, "empty": 422}


@dataclass
class Served:
    url: str
    models: list  # two checkpoints: the one deployed, and the update's
    log_dir: str
    photos: list  # real photos, local paths
    sent: list = field(default_factory=list)  # request ids answered, for the log's test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_cluster, dogs_cats_root, tmp_path_factory):
    from ray import serve

    folder = tmp_path_factory.mktemp("serve")
    models = []
    for seed in (0, 1):  # two real (untrained) small CNNs: different weights, so different model ids
        torch.manual_seed(seed)
        models.append(str(folder / f"model-{seed}"))
        save_checkpoint(models[-1], create_model("small_cnn", 2), JobConfig(model=ModelConfig(arch="small_cnn",
                                                                                              image_size=64)),
                        ["cat", "dog"], history=[])
    photos = folder / "photos"
    photos.mkdir()
    for cls in ("cat", "dog"):
        for name in sorted(os.listdir(os.path.join(dogs_cats_root, cls)))[:6]:
            shutil.copy(os.path.join(dogs_cats_root, cls, name), photos / f"{cls}-{name}")
    port = free_port()
    cfg = ServeConfig(model=models[0], port=port, num_replicas="1", replica_cpus=0.25, threads=1,
                      max_batch_size=8, batch_wait_ms=5, max_ongoing_requests=8, max_queued_requests=16,
                      max_body_mb=2, log_dir=str(folder / "log"), log_images=True, log_flush_s=1)
    serve.shutdown()  # a Serve left running on the cluster would keep its own port
    deploy.deploy(deploy.serve_config(cfg, TOKEN))
    yield Served(f"http://127.0.0.1:{port}", models, cfg.log_dir, sorted(str(p) for p in photos.iterdir()))
    serve.shutdown()


def classify(client: httpx.Client, url: str, data: bytes, served: Served) -> httpx.Response:
    response = client.post(f"{url}/v1/classify", content=data, headers=AUTH, timeout=60)
    if response.status_code == 200 or response.status_code in STATUS.values():
        served.sent.append(response.json()["request_id"])
    return response


class SteadyLoad(threading.Thread):
    """Sends a real photo every ``interval`` seconds until stopped; keeps (time, status, model_id)."""

    def __init__(self, served: Served, interval: float = 0.05):
        super().__init__(daemon=True)
        self.served, self.interval, self.stop = served, interval, threading.Event()
        self.results: list[tuple[float, int, str]] = []
        self.data = open(served.photos[0], "rb").read()

    def run(self):
        with httpx.Client() as client:
            while not self.stop.is_set():
                r = classify(client, self.served.url, self.data, self.served)
                self.results.append((time.monotonic(), r.status_code,
                                     r.json().get("model_id") if r.status_code == 200 else None))
                time.sleep(self.interval)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join(60)


def test_answers_are_bulk_labellings_rows(served, ray_cluster, tmp_path):
    """Each real photo gets the label and scores imgcls predict gives it (within 1e-5,
    float32), sent alone, in a multipart request, and through the Open Inference Protocol
    as base64 JSON and as binary data; requests sent together are batched."""
    out = tmp_path / "bulk"
    label_images(PredictConfig(model=served.models[0], input=os.path.dirname(served.photos[0]), output=str(out)))
    bulk = {os.path.basename(r["path"]): r for r in ds.dataset(str(out), format="parquet").to_table().to_pylist()}
    assert len(bulk) == len(served.photos) and all(r["status"] == "ok" for r in bulk.values())
    data = {os.path.basename(p): open(p, "rb").read() for p in served.photos}

    def same(name, label, scores):
        assert label == bulk[name]["label"], name
        np.testing.assert_allclose(scores, bulk[name]["topk_scores"], atol=1e-5, rtol=0)

    with httpx.Client() as client:  # all at once, from threads: the replica batches them
        threads, answers = [], {}
        for name, raw in data.items():
            t = threading.Thread(target=lambda n=name, b=raw: answers.__setitem__(n, classify(client, served.url, b,
                                                                                                served)))
            threads.append(t)
            t.start()
        for t in threads:
            t.join()
        for name, r in answers.items():
            assert r.status_code == 200, r.text
            same(name, r.json()["label"], r.json()["topk_scores"])
            assert r.json()["model_id"] == bulk[name]["model_id"]
        names = list(data)[:3]
        r = client.post(f"{served.url}/v1/classify?embedding=true", headers=AUTH,
                        files=[("image", (n, data[n], "image/jpeg")) for n in names] + [("text", ("notes.txt", b"no"))])
        results = r.json()["results"]
        assert [x["filename"] for x in results] == names + ["notes.txt"]
        for n, x in zip(names, results):
            same(n, x["label"], x["topk_scores"])
            assert len(x["embedding"]) > 0
        assert results[-1]["error_type"] == "decode" and "cannot identify image file" in results[-1]["error"]
        served.sent += [x["request_id"] for x in results]
        # The Open Inference Protocol: JSON with base64 elements, then the binary-data extension.
        infer = f"{served.url}/v2/models/imgcls/infer"
        r = client.post(infer, headers=AUTH, json={"id": "q1", "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [2], "data": [base64.b64encode(data[n]).decode()
                                                                            for n in names[:2]]}]})
        assert r.status_code == 200, r.text
        outputs = {o["name"]: o for o in r.json()["outputs"]}
        assert r.json()["id"] == "q1" and outputs["topk_scores"]["shape"] == [2, 2]
        for i, n in enumerate(names[:2]):
            same(n, outputs["label"]["data"][i], outputs["topk_scores"]["data"][2 * i:2 * i + 2])
        elements = b"".join(struct.pack("<I", len(data[n])) + data[n] for n in names[:2])
        header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                                         "parameters": {"binary_data_size": len(elements)}}]}).encode()
        r = client.post(infer, headers={**AUTH, "Inference-Header-Content-Length": str(len(header)),
                                        "Content-Type": "application/octet-stream"}, content=header + elements)
        assert r.status_code == 200, r.text
        assert [o for o in r.json()["outputs"] if o["name"] == "label"][0]["data"] == outputs["label"]["data"]
        meta = client.get(f"{served.url}/v2/models/imgcls", headers=AUTH).json()
        assert meta["versions"] == [bulk[names[0]]["model_id"]] and meta["parameters"]["classes"] == ["cat", "dog"]
        assert client.get(f"{served.url}/v2/models/other", headers=AUTH).status_code == 404


def test_a_token_is_required_but_not_for_health(served):
    photo = open(served.photos[0], "rb").read()
    with httpx.Client() as client:
        assert client.post(f"{served.url}/v1/classify", content=photo).status_code == 401
        wrong = client.post(f"{served.url}/v1/classify", content=photo, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert client.post(f"{served.url}/v2/models/imgcls/infer", json={}).status_code == 401
        assert client.get(f"{served.url}/v2/health/live").json() == {"live": True}
        assert client.get(f"{served.url}/v2/health/ready").status_code == 200


def test_every_damaged_file_gets_its_4xx_under_load(served, bad_corpus):
    """While a steady load runs: each file of the damaged-file corpus gets the status of
    its error_type, with bulk labelling's error_type; a body over --max-body-mb gets 413
    before it is read; no request gets a 5xx but 503; the server stays ready."""
    files = sorted(p for p in bad_corpus.rglob("*") if p.is_file())
    with SteadyLoad(served) as load, httpx.Client() as client:
        for path in files:
            r = classify(client, served.url, path.read_bytes(), served)
            want = STATUS[EXPECTED_ERRORS[path.name]] if path.name in EXPECTED_ERRORS else 200
            assert r.status_code == want, (path.name, r.text)
            if want != 200:
                assert r.json()["error_type"] == EXPECTED_ERRORS[path.name]
        big = os.urandom(3 * 1024 * 1024)  # over the app's 2 MB
        r = client.post(f"{served.url}/v1/classify", content=big, headers=AUTH)
        assert r.status_code == 413 and r.json()["error_type"] == "too-large"
        r = client.post(f"{served.url}/v2/models/imgcls/infer", content=b"{not json", headers=AUTH)
        assert r.status_code == 400 and r.json()["error_type"] == "request"
        time.sleep(0.5)
    statuses = [status for _, status, _ in load.results]
    assert statuses and set(statuses) <= {200, 503}, statuses
    assert httpx.get(f"{served.url}/v2/health/ready").status_code == 200


def test_a_full_queue_answers_503_with_retry_after(served):
    """Far more requests at once than the replica takes (8) and Serve queues (16): the
    rest get 503 with Retry-After at once, never an unbounded wait; the accepted ones are
    answered."""
    photo = open(served.photos[0], "rb").read()

    async def burst(n: int):
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{served.url}/v1/classify", content=photo, headers=AUTH)
                                          for _ in range(n)))

    responses = asyncio.run(burst(200))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected and codes.count(200) >= 8, codes
    assert all(r.headers.get("retry-after") == str(deploy.RETRY_AFTER_S) for r in rejected)
    served.sent += [r.json()["request_id"] for r in responses if r.status_code == 200]


def test_try_page_shows_bars_heatmap_and_the_apis_error_in_a_browser(served, browser, bad_corpus, tmp_path):
    """GET / in headless Chromium: with the token typed in, the page names the model, its
    classes and checkpoint; a real photo chosen gives the top-k as bars (the scores
    /v1/classify gives) and the Grad-CAM overlay (the PNG of imgcls explain's code on the
    checkpoint); a corrupt file gives /v1/classify's own error as one line."""
    import io

    from conftest import screenshot
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from imgcls.checkpoint import load_checkpoint
    from imgcls.evaluation.explain import explain_image
    from imgcls.preprocess import ClassificationPresetEval

    def wait(condition, what):
        WebDriverWait(browser, 60).until(lambda _: condition(), message=what)

    def text(element_id):
        return browser.find_element(By.ID, element_id).text

    page = httpx.get(f"{served.url}/")  # the page itself: no token, nothing secret in it
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    browser.get(f"{served.url}/")
    wait(lambda: "needs its token" in text("error"), "the page asks for the token")
    browser.find_element(By.ID, "token").send_keys(TOKEN + "\t")  # typed, then focus moves on: 'change'
    wait(lambda: "Checkpoint" in text("model"), "the model's details")
    assert served.models[0] in text("model") and "cat, dog" in text("model") and text("error") == ""

    photo = served.photos[0]
    browser.find_element(By.ID, "file").send_keys(photo)
    wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#bars li")) == 2, "the bars")
    wait(lambda: browser.execute_script("const m = document.getElementById('heatmap'); "
                                        "return !!m.getAttribute('src') && m.complete && m.naturalWidth > 0"),
         "the heatmap")
    with httpx.Client() as client:
        api = client.post(f"{served.url}/v1/classify", content=open(photo, "rb").read(), headers=AUTH).json()
        heat = client.post(f"{served.url}/v1/explain", content=open(photo, "rb").read(), headers=AUTH)
        assert client.post(f"{served.url}/v1/explain", content=b"x").status_code == 401
    bars = [li.text.split("\n") for li in browser.find_elements(By.CSS_SELECTOR, "#bars li")]
    assert bars == [[label, f"{score:.3f}"] for label, score in zip(api["topk_labels"], api["topk_scores"])]
    shown = browser.execute_script("""
        const m = document.getElementById('heatmap'), c = document.createElement('canvas');
        c.width = m.naturalWidth; c.height = m.naturalHeight; c.getContext('2d').drawImage(m, 0, 0);
        return c.toDataURL('image/png');""")
    on_page = np.asarray(Image.open(io.BytesIO(base64.b64decode(shown.split(",", 1)[1]))).convert("RGB"))
    loaded = load_checkpoint(served.models[0])
    want, label, _ = explain_image(loaded, ClassificationPresetEval(loaded.image_size, loaded.mean, loaded.std),
                                   open(photo, "rb").read())
    assert heat.headers["content-type"] == "image/png" and label == api["label"]
    # The same code on the same weights; other threads may sum in another order (a unit of rounding).
    served_png = np.asarray(Image.open(io.BytesIO(heat.content)).convert("RGB"))
    assert served_png.shape == on_page.shape == want.shape == (64, 64, 3)  # the pixels the model sees, overlaid
    assert np.abs(served_png.astype(int) - want).max() <= 1 and np.abs(on_page.astype(int) - want).max() <= 1
    screenshot(browser, tmp_path, "try-page")

    corrupt = bad_corpus / "truncated.jpg"
    browser.find_element(By.ID, "file").send_keys(str(corrupt))
    wait(lambda: text("error") != "", "the error line")
    refused = httpx.post(f"{served.url}/v1/classify", content=corrupt.read_bytes(), headers=AUTH).json()
    assert text("error") == f"truncated.jpg: {refused['error']} ({refused['error_type']})"
    explained = httpx.post(f"{served.url}/v1/explain", content=corrupt.read_bytes(), headers=AUTH)
    assert explained.status_code == 422 and explained.json()["error"] == refused["error"]
    assert "\n" not in text("error") and not browser.find_element(By.ID, "results").is_displayed()
    screenshot(browser, tmp_path, "try-page-error")


def test_update_swaps_the_model_without_a_failed_request(served, ray_address):
    """imgcls serve --update under a steady load: no request fails, the replica is the
    same process (reconfigured, not replaced), and answers carry the new model_id within
    30 s."""
    with httpx.Client() as client:
        before = client.get(f"{served.url}/v2/models/imgcls", headers=AUTH).json()["versions"]
    with SteadyLoad(served, interval=0.02) as load:
        time.sleep(1)
        started = time.monotonic()
        env = {**os.environ, "RAY_ADDRESS": ray_address}
        done = subprocess.run([sys.executable, "-m", "imgcls.cli", "serve", "--update", "--model", served.models[1]],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert f"now answers with {served.models[1]}" in done.stderr
        deadline = started + 30
        while time.monotonic() < deadline and not any(m and m != before[0] for t, _, m in load.results
                                                      if t > started):
            time.sleep(0.2)
        time.sleep(0.5)
    statuses = [status for _, status, _ in load.results]
    assert statuses.count(200) == len(statuses), statuses
    new = [t for t, _, m in load.results if m and m != before[0]]
    assert new and new[0] - started <= 30
    ids = [m for _, _, m in load.results]
    assert ids[0] == before[0] and ids[-1] != before[0]
    # Once switched, never back: a batch runs on one model from start to end.
    switched = ids.index(ids[-1])
    assert set(ids[switched:]) == {ids[-1]}


def test_the_online_log_holds_every_answer_for_monitor_and_review(served, tmp_path):
    """Every answered request is a predictions row in the log (the replica writes its
    parts), with its image kept; imgcls review and imgcls monitor read the log."""
    from imgcls.evaluation.monitor import run_monitor
    from imgcls.evaluation.review import run_review

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        table = ds.dataset(served.log_dir, format="parquet").to_table() if os.path.isdir(served.log_dir) else None
        if table is not None and set(served.sent) <= set(table.column("request_id").to_pylist()):
            break
        time.sleep(0.5)
    rows = table.to_pylist()
    ids = [r["request_id"] for r in rows]
    assert len(ids) == len(set(ids)) and set(served.sent) <= set(ids)
    assert len({r["model_id"] for r in rows}) == 2  # before and after the update
    assert all(os.path.isfile(r["path"]) for r in rows) and all(r["timestamp"] for r in rows)
    assert {r["error_type"] for r in rows if r["status"] == "error"} >= {"decode", "empty", "unsupported", "too-large"}
    review = run_review(served.log_dir, str(tmp_path / "review"), "margin", 5, False, None, 0)
    assert review["picks"] == 5 and review["rows"] == len([r for r in rows if r["status"] == "ok"])
    result = run_monitor(served.log_dir, served.log_dir, str(tmp_path / "drift"), embedding_sample=50,
                         permutations=50)
    assert result["rows"]["current"] == len(rows) and not result["drift"]
