"""The labelling page's server (no Ray, no browser): images streamed by index from local
files, S3 and tar members; answers written to review.csv at once; a review file as
training input. The page itself, in a real browser: tests/integration/test_pages.py."""

import io
import os
import tarfile
import threading

import httpx
import pandas as pd
import pytest
from conftest import add_tar_member
from PIL import Image

from imgcls.evaluation.labelling import LabelError, ReviewFile, make_server
from imgcls.labelled import DataError, list_labelled_images


@pytest.fixture
def page_of():
    """Serves a ReviewFile on a free loopback port; yields a function that starts one."""
    servers = []

    def start(review: ReviewFile) -> str:
        server = make_server(review)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_images_stream_from_files_s3_and_tar_members_by_index_only(s3_server, fmnist_root, tmp_path, page_of):
    import s3fs

    bags = sorted(os.listdir(os.path.join(fmnist_root, "bag")))[:4]
    raw = [open(os.path.join(fmnist_root, "bag", n), "rb").read() for n in bags]
    fs = s3fs.S3FileSystem()
    fs.pipe("imgcls/label-page/one.png", raw[0])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add_tar_member(tar, "shard/two.png", raw[1])
    fs.pipe("imgcls/label-page/shard.tar", buf.getvalue())
    local_tar = tmp_path / "local.tar"
    with tarfile.open(local_tar, "w") as tar:
        add_tar_member(tar, "three.png", raw[2])
    ppm = tmp_path / "four.ppm"  # a format browsers do not show: sent as PNG
    Image.open(io.BytesIO(raw[3])).save(ppm)
    paths = [os.path.join(fmnist_root, "bag", bags[0]), "s3://imgcls/label-page/one.png",
             "s3://imgcls/label-page/shard.tar#shard/two.png", f"{local_tar}#three.png", "four.ppm",  # beside the file
             str(tmp_path / "gone.png")]
    csv = tmp_path / "review.csv"
    pd.DataFrame({"path": paths, "predicted_label": "bag", "score": "0.5", "uncertainty": "0.5",
                  "label": ""}).to_csv(csv, index=False)
    url = page_of(ReviewFile.open(str(csv), classes=["bag", "coat"]))
    with httpx.Client(base_url=url) as client:
        for i, want in enumerate([raw[0], raw[0], raw[1], raw[2]]):
            r = client.get("/api/image", params={"i": i})
            assert r.status_code == 200 and r.content == want and r.headers["content-type"] == "image/png"
        r = client.get("/api/image", params={"i": 4})
        assert r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).tobytes() == Image.open(ppm).convert("RGB").tobytes()
        gone = client.get("/api/image", params={"i": 5})
        assert gone.status_code == 422 and "gone.png" in gone.json()["error"]
        # No path in, no path out: picks are named by index, and shown by base name.
        assert client.get("/api/image", params={"i": "../../etc/passwd"}).status_code == 404
        assert client.get("/api/image", params={"i": 6}).status_code == 404
        assert client.get("/etc/passwd").status_code == 404
        assert client.get("/api/pick", params={"i": 2}).json()["name"] == "two.png"
        assert client.get("/").headers["content-type"].startswith("text/html")


def test_every_answer_is_in_the_file_at_once_and_the_file_trains(fmnist_root, tmp_path, page_of, capsys):
    """Each answer rewrites review.csv before the reply (no temporary file left beside
    it); a form post (not JSON) and unknown classes are refused; reopened, the file
    resumes at its first open pick. As a manifest its unlabelled picks are left out and
    counted; a plain manifest with an empty label is still refused."""
    names = {c: sorted(os.listdir(os.path.join(fmnist_root, c)))[:3] for c in ("bag", "coat")}
    paths = [os.path.join(fmnist_root, c, n) for c, ns in names.items() for n in ns]
    csv = tmp_path / "review.csv"
    pd.DataFrame({"path": paths, "predicted_label": "bag", "score": "0.51", "uncertainty": "0.98",
                  "label": ""}).to_csv(csv, index=False)
    url = page_of(ReviewFile.open(str(csv), classes=["bag", "coat"]))
    answers = [{"label": "bag"}, {"label": "coat"}, {"review": "skipped"}, {"review": "none-of-these"},
               {"label": "coat"}]
    with httpx.Client(base_url=url) as client:
        assert client.get("/api/state").json()["first_open"] == 0
        for i, body in enumerate(answers):
            state = client.post("/api/answer", json={"index": i, **body}).json()
            written = pd.read_csv(csv, dtype=str, keep_default_na=False)
            assert written.loc[i, "label"] == body.get("label", "") and written.loc[i, "review"] == body.get("review", "")
        assert (state["labelled"], state["skipped"], state["none"], state["open"], state["first_open"]) == (3, 1, 1, 1, 5)
        assert client.post("/api/answer", data={"index": 5, "label": "bag"}).status_code == 415
        assert client.post("/api/answer", json={"index": 5, "label": "shoe"}).status_code == 400
        assert client.post("/api/answer", json={"index": 5, "label": "bag", "review": "skipped"}).status_code == 400
    assert os.listdir(tmp_path) == ["review.csv"]
    written = pd.read_csv(csv, dtype=str, keep_default_na=False)
    assert written["score"].tolist() == ["0.51"] * 6  # the file's other columns as written
    assert ReviewFile.open(str(csv), classes=["bag", "coat"]).first_open() == 5

    images = list_labelled_images(str(csv))
    assert images.paths == [paths[0], paths[1], paths[4]] and images.labels == ["bag", "coat", "coat"]
    assert "3 review pick(s) without a label left out (1 none-of-these, 1 not answered, 1 skipped)" in \
        capsys.readouterr().err
    written.drop(columns="review").to_csv(tmp_path / "plain.csv", index=False)
    with pytest.raises(DataError, match="rows without a label"):
        list_labelled_images(str(tmp_path / "plain.csv"))
    with pytest.raises(LabelError, match="local review CSV"):
        ReviewFile.open("s3://imgcls/review.csv")


def test_context_names_the_models_classes_or_those_the_predictions_rank(tmp_path):
    """review.json: with the labelling job's record (_job.json), the checkpoint's classes
    (all of them, in its order) and its path; for an online log, which has none, every
    class the top-k lists name. Each pick gets its own top-k pairs."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from imgcls.evaluation.labelling import write_context
    from imgcls.inference.schema import output_schema

    labels = tmp_path / "labels"
    labels.mkdir()
    rows = [{"path": f"/data/{i}.png", "status": "ok", "error": None, "error_type": None, "label": "coat",
             "score": 0.6, "topk_labels": ["coat", "bag"] if i else ["shirt", "coat"], "topk_scores": [0.6, 0.3],
             "model_id": "m"} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows, schema=output_schema()), labels / "part-00000.parquet")
    csv = tmp_path / "review" / "review.csv"
    csv.parent.mkdir()
    pd.DataFrame({"path": ["/data/1.png", "/data/0.png"], "label": ""}).to_csv(csv, index=False)

    context = json.load(open(write_context(str(csv), str(labels))))
    assert context["classes"] == ["bag", "coat", "shirt"] and context["model"] is None
    assert context["topk"] == {"/data/1.png": [["coat", 0.6], ["bag", 0.3]], "/data/0.png": [["shirt", 0.6], ["coat", 0.3]]}
    model = tmp_path / "model"
    model.mkdir()
    json.dump(["trouser", "bag", "coat", "shirt"], open(model / "classes.json", "w"))
    json.dump({"model": str(model)}, open(labels / "_job.json", "w"))
    context = json.load(open(write_context(str(csv), str(labels))))
    assert context["classes"] == ["trouser", "bag", "coat", "shirt"] and context["model"] == str(model)
    review = ReviewFile.open(str(csv))
    assert review.classes == context["classes"] and review.pick(1)["topk"] == [["shirt", 0.6], ["coat", 0.3]]
