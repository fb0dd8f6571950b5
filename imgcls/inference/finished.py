"""Whether a bulk-labelling output is complete, checked from its files alone: no torch, no Ray.

``imgcls predict`` asks ``finished_summary`` before it starts Ray (13-26 s on 2 cores)
and imports torch (5-10 s): a rerun over an output that is complete prints its summary
at once. Complete means what ``imgcls.inference.bulk.label_images`` would find:

- the input plan (``_inputs/_plan.json``) is of the same input, shard size and manifest
  version (``imgcls.inference.inputs.plan_inputs`` refuses any other);
- the job's fingerprint (``_job.json``) equals the one this run would write: the same
  plan, the same model (its id is the hash of the checkpoint's ``model.pt``, or of the
  export's ``model.onnx``, as ``program.build_program`` computes it) and the same
  settings, those that change a row (``ROW_SETTINGS``);
- every planned shard has its part, and no killed run left temporary files behind.

Anything else, or any failure to read these files, answers None and the job runs as
usual: a complete output never becomes a wrong answer, and another model or other
inputs are refused by ``label_images`` as before. This module reads the files that
``imgcls.inference.bulk`` and ``imgcls.inference.inputs`` write, by names a unit test checks against theirs.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from imgcls import storage
from imgcls.config import PredictConfig
from imgcls.paths import members

# The output folder's layout, defined here (a module without torch or Ray) and imported
# by imgcls.inference.inputs and imgcls.inference.bulk, which write it.
PLAN_DIR = "_inputs"  # the input plan
PLAN_FILE = "_plan.json"  # written last: the plan is complete
JOB_FILE = "_job.json"  # the job's fingerprint
STAGING_DIR = "_staging"
PART_NAME = re.compile(r"^part-(\d+)\.parquet$")
PART_TEMPLATE = "part-{:06d}.parquet"
COUNTS_KEY = b"imgcls.counts"  # Parquet footer metadata of each part: its rows, ok and errors
MODEL_FILES = {"torch": "model.pt", "onnxruntime": "model.onnx"}  # what program.build_program hashes


def source_stat(uri: str) -> Optional[dict]:
    """A manifest file's size and modification time or ETag, as ``imgcls.inference.inputs`` records it."""
    if not uri.lower().endswith(storage.MANIFEST_EXTENSIONS):
        return None
    fs, path = storage.filesystem(uri)
    info = fs.info(path)
    keep = ("size", "ETag", "etag", "mtime", "LastModified", "last_modified", "md5Hash")
    return {k: str(info[k]) for k in keep if k in info}


def combined_id(ids: list[str], tta: str) -> str:
    """An ensemble's (or a test-time-augmented model's) id, from its members' ids."""
    if len(ids) == 1 and tta == "none":
        return ids[0]
    return "ens-" + hashlib.sha256(f"{','.join(ids)} tta={tta}".encode()).hexdigest()[:12]


def model_id(model: str, runtime: str, tta: str = "none") -> str:
    """The id ``program.build_program`` gives ``model``: the hash of its weights' file, or
    ``models:/NAME/VERSION`` for a registered version (of each member's, combined, for an
    ensemble or with test-time augmentation)."""
    from imgcls.tracking import local_model, registered_id

    folders = [local_model(m) for m in members(model)]
    return combined_id([registered_id(m) or hashlib.sha256(storage.read_bytes(storage.join(m, MODEL_FILES[runtime])))
                        .hexdigest()[:16] for m in folders], tta)


# The settings (PredictConfig's fields) that change a row, recorded in ``_job.json``: a
# rerun that differs in one is refused, never mixed into the same output. The image size
# and the classes are the checkpoint's, recorded through ``model_id`` (its weights' hash).
ROW_SETTINGS = (
    "files_per_shard",  # which files share a part
    "model", "runtime",  # the model (its weights' hash is model_id) and what runs it
    "tta", "program", "precision",  # the scores: mirrored images averaged; traced or exported program; dtype
    "max_pixels",  # which images are refused as decompression bombs (an error row instead of a label)
    "max_file_mb",  # which files are refused as too large, unread (an error row instead of a label)
    "gpu_decode",  # JPEGs decoded by nvjpeg or torchvision instead of PIL: other pixels, other scores
    "top_k", "embeddings",  # the columns and their lengths
)
# PredictConfig's other fields, and why they are not recorded: they change where and how
# fast rows are made, not what a row holds (a unit test checks that every field is in one
# of the two lists).
UNRECORDED_SETTINGS = {
    "input": "recorded as the hash of the planned paths (inputs_sha256); the plan checks the URI",
    "output": "the folder itself",
    "batch_size": "images per model call; each image is labelled on its own (eval mode, BatchNorm folded)",
    "num_actors": "how many actors label shards",
    "use_gpu": "where the model runs; but --precision 'auto' follows the device (bf16 on GPUs, float32 on CPUs), so "
               "bulk also records the kind of device that made the rows then, and refuses a resume on the other",
    "separate_decode": "which processes decode: the same decoder, the same pixels",
    "buffer_mb": "memory for blocks in flight",
}


def program_form(program: str) -> str:
    """The form ``program.build_program`` gives a torch model for ``--program``."""
    return "torchscript" if program == "auto" else program


def fingerprint(plan: dict, model_id: str, cfg: PredictConfig) -> dict:
    """What ``_job.json`` records, and a rerun must match: the plan ``plan`` (the
    ``_plan.json`` record), the model of id ``model_id`` and ``ROW_SETTINGS``. 'auto'
    programs are recorded as the form they make; --program and --precision as None for
    runtime 'onnxruntime', which ignores them. ``bulk`` writes it, and ``finished_summary``
    rebuilds it without torch."""
    from imgcls.inference.schema import output_schema  # pyarrow, no torch

    settings = {name: getattr(cfg, name) for name in ROW_SETTINGS}
    if cfg.runtime == "torch":
        settings["program"] = program_form(cfg.program)
    else:
        settings["program"] = settings["precision"] = None
    return {"inputs_sha256": plan["sha256"], "files": plan["files"], "shards": plan["shards"], "model_id": model_id,
            **settings, "columns": output_schema(cfg.embeddings).names}  # parts of another schema do not mix


# How a refusal names what differs, for what is not a setting (a setting is its flag).
_RECORDED = {"inputs_sha256": "the inputs' hash (inputs_sha256)", "files": "the number of input files",
             "shards": "the number of shards", "model_id": "the model's weights (model_id)",
             "columns": "the output columns"}


def refusal(output: str, previous: dict, current: dict) -> Optional[str]:
    """Why a job of fingerprint ``current`` may not write into ``output``, whose
    ``_job.json`` holds ``previous``; None when they agree.

    A ``_job.json`` of an older imgcls lacks settings recorded since: the settings of
    its rows are unknown, so it is refused too, with how to go on."""
    missing = [k for k in current if k not in previous]
    if missing:
        return (f"{output}/{JOB_FILE} was written by an older imgcls, which did not record "
                f"{', '.join(_name(k) for k in missing)}: the rows already written may have been made with other "
                f"settings. Use another --output, or, if they were made with these settings, delete "
                f"{JOB_FILE} and run again")
    changed = [k for k in current if previous[k] != current[k]]
    if not changed:
        return None
    said = "; ".join(f"{_name(k)} was {_value(previous[k])} for the rows already written, now {_value(current[k])}"
                     for k in changed)
    return f"{output} holds the output of another job: {said}. Use another --output, or the same settings"


def _name(key: str) -> str:
    return _RECORDED.get(key, "--" + key.replace("_", "-"))


def _value(value) -> str:
    if value is None:
        return "unused (runtime onnxruntime)"
    return json.dumps(value) if isinstance(value, (bool, list)) else str(value)


def job_model(predictions: str) -> Optional[str]:
    """The model (checkpoint or export folder) of the labelling job whose output is
    ``predictions`` (a folder, or a part file in it), from its ``_job.json``; None for
    predictions without one (an online log, an evaluation's file)."""
    base = predictions.rstrip("/")
    for folder in (base, base.rsplit("/", 1)[0] if "/" in base else "."):
        uri = storage.join(folder, JOB_FILE)
        try:
            if storage.exists(uri):
                return storage.read_json(uri).get("model")
        except (OSError, ValueError):  # unreadable: no model to name
            return None
    return None


def finished_summary(cfg: PredictConfig) -> Optional[dict]:
    """The summary of the labelling job ``cfg`` when its output is already complete (the
    shape of ``bulk.LabelSummary``, every shard skipped, none labelled now); else None."""
    start = time.perf_counter()
    try:
        return _finished(cfg, start)
    except Exception:  # noqa: BLE001 - unreadable or unexpected: the full job decides, and says why
        return None


def _finished(cfg: PredictConfig, start: float) -> Optional[dict]:
    plan_uri, job_uri = storage.join(cfg.output, PLAN_DIR, PLAN_FILE), storage.join(cfg.output, JOB_FILE)
    if not (storage.exists(plan_uri) and storage.exists(job_uri)):
        return None
    plan, job = storage.read_json(plan_uri), storage.read_json(job_uri)
    if (plan["input"], plan["files_per_shard"], plan.get("source_stat")) != \
            (cfg.input, cfg.files_per_shard, source_stat(cfg.input)):
        return None
    if refusal(cfg.output, job, fingerprint(plan, model_id(cfg.model, cfg.runtime, cfg.tta), cfg)) is not None:
        return None
    fs, folder = storage.filesystem(cfg.output)
    fs.invalidate_cache(folder)
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)}
    if STAGING_DIR in names or any(n.startswith(".tmp-") for n in names):
        return None  # a killed run's leftovers: the full job cleans them up
    done = {int(m.group(1)) for m in map(PART_NAME.match, names) if m}
    shards = range(int(plan["shards"]))
    if not set(shards) <= done:
        return None
    counts = _part_counts(fs, folder, shards)
    return {"files": plan["files"], "rows": sum(c["rows"] for c in counts), "ok": sum(c["ok"] for c in counts),
            "errors": sum(c["errors"] for c in counts), "shards": len(shards), "shards_skipped": len(shards),
            "seconds": round(time.perf_counter() - start, 2), "images_per_s": 0.0, "output": cfg.output,
            "plan_seconds": 0.0, "shards_by_node": {}}


def _part_counts(fs, folder: str, shards) -> list[dict]:
    """The counts (rows, ok, errors) each part's Parquet footer records, read concurrently."""
    import pyarrow.parquet as pq

    def one(shard: int) -> dict:
        with fs.open(f"{folder.rstrip('/')}/{PART_TEMPLATE.format(shard)}", "rb") as f:
            return json.loads((pq.read_metadata(f).metadata or {})[COUNTS_KEY])

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, shards))
