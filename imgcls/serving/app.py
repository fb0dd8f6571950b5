"""The Serve application of ``imgcls serve``: one deployment, ``ImageClassifier``, behind FastAPI.

Each replica runs what bulk labelling runs, so that a file gets the same label and
scores from an HTTP request as from ``imgcls predict``:

- ``inference.decode.Decoder`` decodes a request's bytes, or refuses them with the
  same ``error_type`` and error text as a file with those bytes;
- ``inference.program.build_program`` makes the model program (BatchNorm folded,
  traced), and ``inference.model_stage.Classifier`` runs it and makes the rows.

Requests are batched by ``serve.batch``: those that reach a replica within
``batch_wait_ms`` of each other share one forward pass (at most ``max_batch_size``).
The model is Serve's ``user_config`` (``{"model", "runtime", "tta"}``): a changed one
reaches the running replicas through ``reconfigure``, which loads the new program
beside the old and swaps them between two batches, so no request waits or fails for an
update. Serve bounds the queue (``max_queued_requests``: 503 with ``Retry-After``), and
the body is read here up to ``max_body_mb`` and no further (Serve sets no limit).

Endpoints:
- ``POST /v1/classify``: one image as the body, or several as multipart/form-data;
  ``?embedding=true`` adds the features.
- The Open Inference Protocol (KServe V2): ``GET /v2/health/live``,
  ``/v2/health/ready``, ``/v2/models/{name}``, ``/v2/models/{name}/ready`` and
  ``POST /v2/models/{name}/infer`` with one BYTES input (base64 strings in JSON, or raw
  bytes with the binary-data extension).

- ``POST /v1/explain``: one image as the body; its Grad-CAM overlay as a PNG (the
  predicted class's heatmap over the pixels the model sees), computed with ``imgcls
  explain``'s code on the checkpoint's eager model, loaded on the first such request.
  The traced program has no gradients to take, and an ONNX export no layers to hook:
  with runtime onnxruntime, or an ensemble, it answers 501 and says so.
- ``GET /``: the try page (``imgcls/pages/try.html``): drop or pick an image, see the
  top-k as bars, the heatmap, and the model's name, classes and checkpoint. The page
  itself holds nothing secret and is served without a token; its calls go to the
  endpoints above and carry the token typed into its token field, where one is set.

The server reads no file or URI a request names: clients send bytes.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations
# (``request: Request``) as types, and strings defined in a class Serve wraps do not resolve.
import asyncio
import base64
import hashlib
import hmac
import html
import io
import ipaddress
import json
import logging
import os
import struct
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from imgcls.errors import ERROR_DECODE, ERROR_EMPTY, ERROR_TOO_LARGE, ERROR_UNSUPPORTED

logger = logging.getLogger("ray.serve")

DEPLOYMENT = "ImageClassifier"
# The HTTP status of a refused image, by its error_type (bulk labelling's error types).
STATUS_FOR_ERROR = {ERROR_TOO_LARGE: 413, ERROR_UNSUPPORTED: 415, ERROR_DECODE: 422, ERROR_EMPTY: 422}
BAD_REQUEST = "request"  # the error_type of a malformed request (no image in it, bad JSON)
V2_PLATFORM = {"torch": "pytorch_torchscript", "onnxruntime": "onnxruntime_onnx"}
V2_BINARY_HEADER = "inference-header-content-length"  # the binary-data extension's header
TOKEN_ENV = "IMGCLS_SERVE_TOKEN"

app = FastAPI(title="imgcls", docs_url=None, redoc_url=None, openapi_url=None)


class BodyTooLarge(Exception):
    pass


def error_response(status: int, error: str, error_type: str, **extra) -> JSONResponse:
    return JSONResponse({"error": error, "error_type": error_type, **extra}, status_code=status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused (``BodyTooLarge``) as soon as it passes ``limit`` bytes:
    by its Content-Length before a byte is read, or while a chunked body streams in."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def multipart_files(request: Request, body: bytes) -> list[tuple[str, bytes]]:
    """(filename, bytes) of each file part of a multipart/form-data ``body`` already read."""
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, receive).form(max_files=1000, max_fields=1000)
    return [(value.filename or key, await value.read()) for key, value in form.multi_items()
            if hasattr(value, "read")]


def answer(row: dict, embedding: bool) -> dict:
    """A predictions row as the JSON answer for one image."""
    if row["status"] != "ok":
        return {"error": row["error"], "error_type": row["error_type"], "model_id": row["model_id"],
                "request_id": row["request_id"]}
    out = {key: row[key] for key in ("label", "score", "topk_labels", "topk_scores", "model_id", "request_id")}
    if embedding:
        out["embedding"] = row["embedding"]
    return out


def v2_bytes_input(body: bytes, binary_header: Optional[str]) -> tuple[Optional[str], list[bytes]]:
    """(request id, the images) of an Open Inference Protocol infer request: one BYTES
    input, its elements base64 strings in JSON, or, with the binary-data extension
    (``Inference-Header-Content-Length``), raw elements each after a 4-byte
    little-endian length. Raises ValueError for anything else."""
    if binary_header is not None:
        size = int(binary_header)
        header, rest = json.loads(body[:size]), body[size:]
    else:
        header, rest = json.loads(body), b""
    inputs = header.get("inputs") or []
    if len(inputs) != 1 or inputs[0].get("datatype") != "BYTES":
        raise ValueError("the request must have exactly one input, of datatype BYTES, holding the images")
    tensor = inputs[0]
    binary_size = (tensor.get("parameters") or {}).get("binary_data_size")
    if binary_size is not None:
        raw, images = rest[:binary_size], []
        while raw:
            (n,), raw = struct.unpack("<I", raw[:4]), raw[4:]
            images.append(raw[:n])
            raw = raw[n:]
    else:
        data = tensor.get("data")
        if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
            raise ValueError("the BYTES input's data must be a list of base64 strings")
        images = [base64.b64decode(d, validate=True) for d in data]
    if not images:
        raise ValueError("the BYTES input holds no image")
    return header.get("id"), images


@dataclass
class Loaded:
    """A model ready to answer: its program run by the bulk path's stages."""

    model: str
    runtime: str
    model_id: str
    classes: tuple[str, ...]
    image_size: int
    decoder: Any  # inference.decode.Decoder
    classifier: Any  # inference.model_stage.Classifier

    def classify(self, named: list[tuple[str, bytes]]):
        """(path, bytes) -> the predictions table's rows (embeddings included)."""
        return self.classifier.label(self.decoder.decode(named))


def load_model(config: dict, settings: dict) -> Loaded:
    """``user_config`` -> a ``Loaded`` model (in a replica; seconds: builds the program)."""
    import torch

    from imgcls.inference.decode import Decoder
    from imgcls.inference.model_stage import Classifier
    from imgcls.inference.program import build_program

    model, runtime = config["model"], config.get("runtime", "torch")
    payload = build_program(model, runtime, config.get("tta", "none"))
    use_gpu = bool(settings.get("use_gpu")) and torch.cuda.is_available()
    classifier = Classifier(payload, top_k=settings["top_k"], embeddings=True, threads=settings.get("threads"),
                            use_gpu=use_gpu, precision=settings.get("precision", "auto"),
                            max_pixels=settings["max_pixels"])
    decoder = Decoder(payload.image_size, settings["max_pixels"], max_images=settings["max_batch_size"])
    return Loaded(model, runtime, payload.model_id, payload.classes, payload.image_size, decoder, classifier)


class Explainer:
    """Grad-CAM for one checkpoint: its eager model (the replica's ``Loaded`` holds only the
    traced program), loaded when first asked, and one explanation at a time (hooks on a
    shared model)."""

    def __init__(self, model: str):
        from imgcls.checkpoint import load_checkpoint
        from imgcls.preprocess import ClassificationPresetEval

        self.model = model
        self.loaded = load_checkpoint(model)
        self.preset = ClassificationPresetEval(self.loaded.image_size, self.loaded.mean, self.loaded.std)
        self.lock = threading.Lock()

    def png(self, data: bytes) -> bytes:
        from PIL import Image

        from imgcls.evaluation.explain import explain_image

        with self.lock:
            image, _, _ = explain_image(self.loaded, self.preset, data)
        out = io.BytesIO()
        Image.fromarray(image).save(out, format="PNG")
        return out.getvalue()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_digest(token: str) -> str:
    """What the replicas hold of the bearer token: its SHA-256, not the token."""
    return hashlib.sha256(token.encode()).hexdigest()


@serve.deployment(name=DEPLOYMENT)
@serve.ingress(app)
class ImageClassifier:
    """One replica: the model, the request batcher, the online log and the counters.

    ``settings`` (fixed for the deployment's life): top_k, max_batch_size,
    batch_wait_ms, max_body_mb, max_pixels, precision, threads, use_gpu, name, host,
    insecure, token_sha256 (None: the token of the replica's IMGCLS_SERVE_TOKEN, or
    none), log_dir, log_images, log_flush_rows, log_flush_s. The model comes with
    ``reconfigure``. A replica behind a non-loopback host with no token refuses to start
    unless ``insecure``.
    """

    def __init__(self, settings: dict):
        from ray.util import metrics

        from imgcls.serving.online_log import OnlineLog

        self.settings = settings
        self.name = settings["name"]
        self.max_body = int(settings["max_body_mb"] * 1024 * 1024)
        # The token: its digest in the config (imgcls serve's own deploy), or the replica's
        # environment (a Kubernetes Secret in cluster/kuberay/rayservice.yaml).
        token = os.environ.get(TOKEN_ENV)
        self.token_sha256 = settings.get("token_sha256") or (token_digest(token) if token else None)
        if self.token_sha256 is None and not (is_loopback(settings["host"]) or settings["insecure"]):
            raise RuntimeError(f"refusing to serve on {settings['host']} without a token: set {TOKEN_ENV} in the "
                               "nodes' environment, or deploy with --insecure")
        self.loaded: Optional[Loaded] = None
        self.explainer: Optional[Explainer] = None
        self.log = OnlineLog(settings["log_dir"], settings["log_flush_rows"], settings["log_flush_s"],
                             settings["log_images"]) if settings.get("log_dir") else None
        self.flusher: Optional[asyncio.Task] = None
        self.classify_batch.set_max_batch_size(settings["max_batch_size"])
        self.classify_batch.set_batch_wait_timeout_s(settings["batch_wait_ms"] / 1000)
        self.predictions = metrics.Counter("imgcls_predictions", "Images classified, by predicted class and model.",
                                           tag_keys=("label", "model_id"))
        self.refused = metrics.Counter("imgcls_refused_images", "Images refused, by error_type (bulk labelling's "
                                       "types, and 'request' for a malformed request).", tag_keys=("error_type",))

    async def reconfigure(self, config: dict) -> None:
        """Loads the model ``config`` names beside the one answering now, then swaps them:
        a batch runs on one model from start to end, and the rows logged before the swap
        are written as the old model's part."""
        loaded = await asyncio.to_thread(load_model, config, self.settings)
        if self.log is not None:
            await asyncio.to_thread(self.log.flush)
            if self.flusher is None:
                self.flusher = asyncio.get_running_loop().create_task(self._flush_when_due())
        previous, self.loaded = self.loaded, loaded
        logger.info("imgcls serve: model %s (%s) now answers%s", loaded.model, loaded.model_id,
                    f", after {previous.model_id}" if previous else "")

    async def _flush_when_due(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.settings["log_flush_s"]))
            if self.log.due():
                await asyncio.to_thread(self.log.flush)

    def __del__(self):
        # Serve calls this on a graceful shutdown (an update that replaces the replica,
        # scaling down, serve.delete): what is buffered is written.
        if getattr(self, "log", None) is not None:
            self.log.flush()

    # -- the model, batched ----------------------------------------------------------
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def classify_batch(self, items: list[tuple[str, bytes]]) -> list[dict]:
        loaded = self.loaded  # one model for the whole batch, even if an update lands meanwhile
        return await asyncio.to_thread(self._classify, loaded, items)

    def _classify(self, loaded: Loaded, items: list[tuple[str, bytes]]) -> list[dict]:
        from imgcls.serving.online_log import request_path

        ids = [request_id for request_id, _ in items]
        paths = [self.log.image_uri(i, data) if self.log else request_path(i) for i, data in items]
        table = loaded.classify(list(zip(paths, (data for _, data in items))))
        if self.log is not None:
            self.log.append(table, ids)
        rows = table.to_pylist()
        for row, request_id in zip(rows, ids):
            row["request_id"] = request_id
            if row["status"] == "ok":
                self.predictions.inc(tags={"label": row["label"], "model_id": row["model_id"]})
            else:
                self.refused.inc(tags={"error_type": row["error_type"]})
        return rows

    async def _rows(self, images: list[bytes]) -> list[dict]:
        return list(await asyncio.gather(*(self.classify_batch((uuid.uuid4().hex, data)) for data in images)))

    # -- HTTP ------------------------------------------------------------------------
    def _denied(self, request: Request) -> Optional[JSONResponse]:
        """401 unless the request carries the bearer token, where one is set."""
        if self.token_sha256 is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token_digest(token.strip()), self.token_sha256):
            return None
        return JSONResponse({"error": "a bearer token is required (Authorization: Bearer $IMGCLS_SERVE_TOKEN)"},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request):
        """The body, or the 401/413 answer that refuses the request."""
        denied = self._denied(request)
        if denied is not None:
            return None, denied
        try:
            return await read_body(request, self.max_body), None
        except BodyTooLarge:
            self.refused.inc(tags={"error_type": ERROR_TOO_LARGE})
            return None, error_response(413, f"the request body is over {self.settings['max_body_mb']:g} MB "
                                             "(imgcls serve --max-body-mb)", ERROR_TOO_LARGE)

    def _bad_request(self, message: str) -> JSONResponse:
        self.refused.inc(tags={"error_type": BAD_REQUEST})
        return error_response(400, message, BAD_REQUEST)

    @app.post("/v1/classify")
    async def classify(self, request: Request) -> JSONResponse:
        """One image as the body (its label, score, top-k, model_id, request_id), or
        several as multipart/form-data (``{"results": [...]}`` in the parts' order, each
        with its ``filename``; a refused one carries ``error`` and ``error_type``)."""
        body, refused = await self._body(request)
        if refused is not None:
            return refused
        embedding = request.query_params.get("embedding", "").lower() in ("1", "true", "yes")
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            try:
                files = await multipart_files(request, body)
            except Exception as e:  # noqa: BLE001 - a malformed multipart body
                return self._bad_request(f"cannot parse the multipart body: {e}")
            if not files:
                return self._bad_request("the multipart body has no file part")
            rows = await self._rows([data for _, data in files])
            return JSONResponse({"results": [{"filename": name, **answer(row, embedding)}
                                             for (name, _), row in zip(files, rows)]})
        row = (await self._rows([body]))[0]
        status = 200 if row["status"] == "ok" else STATUS_FOR_ERROR.get(row["error_type"], 422)
        return JSONResponse(answer(row, embedding), status_code=status)

    def _explainer(self, loaded: Loaded) -> Explainer:
        if self.explainer is None or self.explainer.model != loaded.model:  # loaded again after an update
            self.explainer = Explainer(loaded.model)
        return self.explainer

    @app.post("/v1/explain")
    async def explain(self, request: Request) -> Response:
        """One image as the body: its Grad-CAM overlay as image/png. A refused image gets
        ``/v1/classify``'s status, error and error_type."""
        body, refused = await self._body(request)
        if refused is not None:
            return refused
        loaded = self.loaded
        if loaded.runtime != "torch" or "," in loaded.model:
            return error_response(501, f"Grad-CAM needs one checkpoint's eager torch model; this server runs "
                                       f"{'an ensemble' if ',' in loaded.model else loaded.runtime}", "unsupported")
        # Refused as /v1/classify refuses it (the decoder's checks), but not classified or
        # logged again: the try page classifies first, and that is the request's log row.
        checked = await asyncio.to_thread(loaded.decoder.decode, [("request", body)])
        if checked["status"][0] != "ok":
            kind = str(checked["error_type"][0])
            self.refused.inc(tags={"error_type": kind})
            return error_response(STATUS_FOR_ERROR.get(kind, 422), str(checked["error"][0]), kind)
        explainer = await asyncio.to_thread(self._explainer, loaded)
        return Response(await asyncio.to_thread(explainer.png, body), media_type="image/png")

    @app.get("/")
    async def try_page(self) -> HTMLResponse:
        from imgcls.web import page, version

        text = page("try.html").decode().replace("__MODEL_NAME__", html.escape(self.name, quote=True))
        return HTMLResponse(text.replace("__VERSION__", html.escape(version())))

    @app.get("/pages.css")
    async def page_css(self) -> Response:
        from imgcls.web import page

        return Response(page("pages.css"), media_type="text/css")

    @app.get("/v2/health/live")
    async def live(self) -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready(self) -> JSONResponse:
        return JSONResponse({"ready": self.loaded is not None}, status_code=200 if self.loaded else 503)

    def _unknown_model(self, name: str) -> Optional[JSONResponse]:
        if name == self.name:
            return None
        return JSONResponse({"error": f"no model named {name!r}; this server has {self.name!r}"}, status_code=404)

    @app.get("/v2/models/{name}")
    async def metadata(self, name: str, request: Request) -> JSONResponse:
        refused = self._unknown_model(name) or self._denied(request)
        if refused is not None:
            return refused
        m = self.loaded
        k = min(self.settings["top_k"], len(m.classes))
        return JSONResponse({
            "name": self.name, "versions": [m.model_id], "platform": V2_PLATFORM[m.runtime],
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                        {"name": "score", "datatype": "FP32", "shape": [-1]},
                        {"name": "topk_labels", "datatype": "BYTES", "shape": [-1, k]},
                        {"name": "topk_scores", "datatype": "FP32", "shape": [-1, k]}],
            "parameters": {"classes": list(m.classes), "image_size": m.image_size, "checkpoint": m.model}})

    @app.get("/v2/models/{name}/ready")
    async def model_ready(self, name: str) -> JSONResponse:
        return self._unknown_model(name) or await self.ready()

    @app.post("/v2/models/{name}/infer")
    async def infer(self, name: str, request: Request) -> JSONResponse:
        """An Open Inference Protocol request: every image in the batch answered, or the
        first refused one's error (its status as ``/v1/classify``'s, its index named)."""
        refused = self._unknown_model(name)
        if refused is not None:
            return refused
        body, refused = await self._body(request)
        if refused is not None:
            return refused
        try:
            request_id, images = v2_bytes_input(body, request.headers.get(V2_BINARY_HEADER))
        except (ValueError, KeyError, TypeError, struct.error) as e:  # json.JSONDecodeError is a ValueError
            return self._bad_request(f"not an inference request with one BYTES input: {e}")
        rows = await self._rows(images)
        for i, row in enumerate(rows):
            if row["status"] != "ok":
                return error_response(STATUS_FOR_ERROR.get(row["error_type"], 422), f"image {i}: {row['error']}",
                                      row["error_type"])
        n, k = len(rows), len(rows[0]["topk_labels"])
        out = {"model_name": self.name, "model_version": rows[0]["model_id"],
               "outputs": [{"name": "label", "datatype": "BYTES", "shape": [n], "data": [r["label"] for r in rows]},
                           {"name": "score", "datatype": "FP32", "shape": [n], "data": [r["score"] for r in rows]},
                           {"name": "topk_labels", "datatype": "BYTES", "shape": [n, k],
                            "data": [x for r in rows for x in r["topk_labels"]]},
                           {"name": "topk_scores", "datatype": "FP32", "shape": [n, k],
                            "data": [x for r in rows for x in r["topk_scores"]]}]}
        if request_id is not None:
            out["id"] = request_id
        return JSONResponse(out)


def build(args: dict):
    """The application builder that Serve's config names (``import_path``): ``args`` is
    ``{"settings": {...}}``, the replicas' fixed settings (see ``ImageClassifier``)."""
    return ImageClassifier.bind(args["settings"])
