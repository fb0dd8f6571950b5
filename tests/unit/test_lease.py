"""The output folder's lease (imgcls.inference.lease) between real processes, on a local
folder and on the loopback S3 server; and the job fingerprint's refusals (finished)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields

import pytest

from imgcls.config import PredictConfig
from imgcls.inference import finished, lease
from imgcls.inference.lease import LEASE_FILE, Lease, LeaseHeldError, read_lease, refuse_if_held

# A second process that takes the lease through the real lease code and holds it until
# its stdin closes. It sets Python's own Ctrl-C handler, as a job started from a terminal
# has it: a suite run in the background inherits SIGINT ignored (as a non-interactive
# shell starts its background jobs), and Python then leaves it ignored.
HOLDER = """
import signal
import sys
from imgcls.inference.lease import Lease
signal.signal(signal.SIGINT, signal.default_int_handler)
with Lease(sys.argv[1], job_id=sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
print("released", flush=True)
"""


def start_holder(output, job_id: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(output), job_id], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n", proc.stderr.read()
    return proc


def test_a_live_jobs_lease_refuses_imgcls_predict_at_once_naming_it(tmp_path):
    """Another process holds the lease: ``imgcls predict`` into that folder fails in
    seconds, before starting Ray, with one line naming the holder's job id, pid and host
    and when its lease would go stale; the holder's lease is left as it was."""
    out, images = tmp_path / "out", tmp_path / "images"
    out.mkdir()
    images.mkdir()
    (images / "a.png").write_bytes(b"")
    holder = start_holder(out, "job-first")
    try:
        held = json.loads((out / LEASE_FILE).read_text())
        began = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "imgcls.cli", "predict", "--model", str(tmp_path),
                                 "--input", str(images), "--output", str(out)], capture_output=True, text=True,
                                timeout=120)
        seconds = time.monotonic() - began
        assert second.returncode == 2, second.stderr
        assert second.stderr.startswith(f"imgcls predict: error: {out} is being written by labelling job job-first "
                                        f"(pid {holder.pid} on host {socket.gethostname()}, started ")
        assert re.search(r"If that job is dead, its lease goes stale in \d+ s and a rerun then takes it over$",
                         second.stderr.strip())
        assert seconds < 30 and holder.poll() is None  # no Ray started; the first job runs on
        assert json.loads((out / LEASE_FILE).read_text())["job_id"] == held["job_id"] == "job-first"
    finally:
        holder.stdin.close()
    assert holder.wait(timeout=30) == 0 and holder.stdout.read() == "released\n"
    assert not (out / LEASE_FILE).exists()
    refuse_if_held(str(out))  # free again


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_a_job_stopped_by_a_signal_leaves_no_lease_behind(tmp_path, how):
    """Ctrl-C (SIGINT) or a pod's SIGTERM: the job ends through its ``finally`` and
    removes its lease, so a rerun right after is not blocked."""
    holder = start_holder(tmp_path, "job-stopped")
    assert read_lease(str(tmp_path))["job_id"] == "job-stopped"
    holder.send_signal(getattr(signal, how))
    assert holder.wait(timeout=30) != 0
    assert not (tmp_path / LEASE_FILE).exists()
    with Lease(str(tmp_path)):
        pass


def test_a_second_lease_is_refused_and_a_released_one_is_free(tmp_path):
    first = Lease(str(tmp_path), job_id="job-a").acquire()
    with pytest.raises(LeaseHeldError, match=f"labelling job job-a \\(pid {os.getpid()} on host "):
        Lease(str(tmp_path), job_id="job-b").acquire()
    with pytest.raises(LeaseHeldError, match="job-a"):
        refuse_if_held(str(tmp_path))
    first.release()
    assert not (tmp_path / LEASE_FILE).exists()
    with Lease(str(tmp_path), job_id="job-b") as second:
        assert read_lease(str(tmp_path))["job_id"] == second.job_id == "job-b"


def write_lease(folder, **record):
    now = time.time()
    record = {"job_id": "job-dead", "host": "pod-1", "pid": 4242, "started": now - 600, "heartbeat": now, **record}
    (folder / LEASE_FILE).write_text(json.dumps(record))


def test_a_stale_lease_is_taken_over_with_a_warning(tmp_path, monkeypatch):
    """Another host's lease whose heartbeat is older than STALE_S (a driver pod that
    died): taken over, saying whose it was; a fresh one of that host is refused, saying
    in how many seconds it goes stale."""
    monkeypatch.setattr(lease, "CONFIRM_S", 0.2)
    write_lease(tmp_path, heartbeat=time.time() - lease.STALE_S + 20)
    with pytest.raises(LeaseHeldError, match=r"job-dead \(pid 4242 on host pod-1.*last heartbeat 40 s ago.*"
                                             r"goes stale in 20 s"):
        Lease(str(tmp_path)).acquire()
    write_lease(tmp_path, heartbeat=time.time() - lease.STALE_S - 5)
    said = []
    with Lease(str(tmp_path), say=said.append) as taken:
        assert read_lease(str(tmp_path))["job_id"] == taken.job_id
    assert said == [f"warning: taking over the lease of {tmp_path} from labelling job job-dead (pid 4242 on host "
                    f"pod-1), which looks dead: its last heartbeat was 65 s ago (stale after 60 s)"]
    assert not (tmp_path / LEASE_FILE).exists()


def test_the_lease_of_a_process_gone_from_this_host_is_taken_over_at_once(tmp_path, monkeypatch):
    """A job killed on this host (kill -9: no release): its rerun takes the lease over at
    once, without waiting for it to go stale."""
    monkeypatch.setattr(lease, "CONFIRM_S", 0.2)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_lease(tmp_path, host=socket.gethostname(), pid=int(dead.stdout), boot_id=lease._boot_id())
    said = []
    with Lease(str(tmp_path), say=said.append):
        pass
    assert len(said) == 1 and f"its process {int(dead.stdout)} is gone from this host" in said[0]
    # Another machine of the same host name: its pid says nothing here; the lease is fresh.
    write_lease(tmp_path, host=socket.gethostname(), pid=int(dead.stdout), boot_id="another-machine")
    with pytest.raises(LeaseHeldError, match="job-dead"):
        Lease(str(tmp_path)).acquire()


def test_the_heartbeat_keeps_the_lease_fresh_and_notices_a_takeover(tmp_path):
    held = Lease(str(tmp_path), job_id="job-a", heartbeat_s=0.05, say=lambda line: None).acquire()
    first = read_lease(str(tmp_path))["heartbeat"]
    time.sleep(0.5)
    assert read_lease(str(tmp_path))["heartbeat"] > first
    held.check()
    write_lease(tmp_path, job_id="job-b")  # another job took it (ours had stalled)
    time.sleep(0.5)
    with pytest.raises(LeaseHeldError, match="labelling job job-b \\(host pod-1\\) took over"):
        held.check()
    held.release()
    assert read_lease(str(tmp_path))["job_id"] == "job-b"  # not ours to remove


def test_lease_on_an_object_store(s3_server, monkeypatch):
    """On S3 (no create-if-absent): written, read back after CONFIRM_S, refused to a
    second job, removed on release."""
    monkeypatch.setattr(lease, "CONFIRM_S", 0.2)
    output = "s3://imgcls/leased"
    with Lease(output, job_id="job-s3"):
        assert read_lease(output)["job_id"] == "job-s3"
        with pytest.raises(LeaseHeldError, match="job-s3"):
            Lease(output).acquire()
        assert read_lease(output)["job_id"] == "job-s3"
    assert read_lease(output) is None


def test_every_predict_setting_is_recorded_or_said_why_not():
    """A new PredictConfig field must be put in the fingerprint or given a reason."""
    names = {f.name for f in fields(PredictConfig)}
    assert set(finished.ROW_SETTINGS) | set(finished.UNRECORDED_SETTINGS) == names
    assert not set(finished.ROW_SETTINGS) & set(finished.UNRECORDED_SETTINGS)


def job(**settings) -> dict:
    plan = {"sha256": "abc", "files": 21, "shards": 2}
    return json.loads(json.dumps(finished.fingerprint(plan, "0123456789abcdef", PredictConfig(
        model="m", input="in", output="out", **settings))))  # as _job.json holds it


def test_a_rerun_with_other_row_settings_is_refused_naming_each():
    assert finished.refusal("out", job(precision="bf16"), job(precision="bf16", batch_size=8, num_actors=3)) is None
    said = finished.refusal("out", job(precision="bf16"), job(precision="fp32", max_pixels=1000, gpu_decode=True))
    assert said == ("out holds the output of another job: --precision was bf16 for the rows already written, now "
                    "fp32; --max-pixels was 64000000 for the rows already written, now 1000; --gpu-decode was false "
                    "for the rows already written, now true. Use another --output, or the same settings")
    assert "--program was torchscript for the rows already written, now export" in \
        finished.refusal("out", job(), job(program="export"))
    assert finished.refusal("out", job(program="auto"), job(program="torchscript")) is None  # the same program
    assert "--tta was none for the rows already written, now flip" in finished.refusal("out", job(), job(tta="flip"))
    onnx = job(runtime="onnxruntime")
    assert onnx["precision"] is None and finished.refusal("out", onnx, job(runtime="onnxruntime", precision="bf16")) \
        is None  # onnxruntime ignores --precision


def test_an_older_job_file_is_refused_saying_what_it_lacks():
    old = {k: v for k, v in job().items() if k not in ("tta", "program", "precision", "max_pixels", "gpu_decode")}
    said = finished.refusal("out", old, job())
    assert said.startswith("out/_job.json was written by an older imgcls, which did not record --tta, --program, "
                           "--precision, --max-pixels, --gpu-decode: ")
    assert said.endswith("Use another --output, or, if they were made with these settings, delete _job.json and "
                         "run again")
