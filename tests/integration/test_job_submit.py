"""`ray job submit` of jobs/train.py to a real head started with `ray start --head` on 127.0.0.1."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command's name: state, parent pid, ..."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def head_processes(temp_dir: str, gcs_port: int) -> set[int]:
    """This head's processes, found without `ray stop` (which would also stop the other
    Ray clusters on the machine): those whose command line names its temp folder or its
    GCS port (`ray start` leaves them to init), and every process they started. The
    dashboard agent and the runtime-env agent are the raylet's children and retitle
    themselves, naming neither: missed, the dashboard agent of a killed head spun at a
    whole core for the rest of the test session."""
    commands, parents = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                commands[int(pid)] = f.read()
            parents[int(pid)] = int(proc_stat(int(pid))[1])
        except OSError:
            pass
    port = re.compile(rb":%d(\0|\s|$)" % gcs_port)
    found = {pid for pid, cmd in commands.items() if temp_dir.encode() in cmd or port.search(cmd)}
    while True:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        if not children:
            return found
        found |= children


def kill_head(temp_dir: str, gcs_port: int) -> set[int]:
    """SIGKILLs the head's processes (``head_processes``); returns those it found."""
    pids = head_processes(temp_dir, gcs_port)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return pids


def alive(pid: int) -> bool:
    try:
        return proc_stat(pid)[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def test_submit_train_job_to_local_head(fmnist_root, tmp_path):
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    # Every port the head opens is a free one: another Ray cluster on this machine (the
    # test session's own, say) already holds the defaults, and a job agent that cannot
    # bind its port leaves the head answering "No available agent" for good.
    gcs, dashboard, client, agent_http, agent_grpc, runtime_env, metrics = free_ports(7)
    ray = [os.path.join(bin_dir, "ray")]
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    subprocess.run(ray + ["start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
                          "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                          "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_http),
                          "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env),
                          "--metrics-export-port", str(metrics), "--num-cpus", "2", "--include-dashboard", "true",
                          "--disable-usage-stats", "--temp-dir", temp_dir],
                   env=env, check=True, capture_output=True, timeout=180)
    try:
        runs = tmp_path / "runs"
        command = ray + ["job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", ".", "--",
                         "python", "jobs/train.py", "--root", fmnist_root, "--max-per-class", "40", "--image-size",
                         "28", "--epochs", "1", "--batch-size", "32", "--storage-path", str(runs), "--name", "submitted"]
        for _ in range(20):
            submit = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
            # The head answers before its job agent has registered; `ray job submit` then says so.
            if "No available agent" not in submit.stderr:
                break
            time.sleep(3)
        assert "succeeded" in submit.stdout, submit.stdout[-3000:] + submit.stderr[-3000:]
        # One line per epoch in the job's output (Ray Train's patched print wrote it twice).
        assert (submit.stdout + submit.stderr).count("epoch 1/1 ") == 1, submit.stdout[-3000:]
        # and not Ray Train's INFO logs of each report and checkpoint (shown with --verbose)
        for noise in ("Reporting training result", "Checkpoint successfully created", "Started training worker group"):
            assert noise not in submit.stdout + submit.stderr, submit.stdout[-3000:]
        assert (runs / "submitted" / "best" / "model.pt").is_file()
        assert json.loads((runs / "submitted" / "best" / "test_metrics.json").read_text())["num_samples"] > 0
        status = subprocess.run(ray + ["job", "list", "--address", f"http://127.0.0.1:{dashboard}"],
                                env=env, capture_output=True, text=True, timeout=120)
        assert "SUCCEEDED" in status.stdout
    finally:
        killed = kill_head(temp_dir, gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert len(killed) >= 5  # GCS, raylet, dashboard, its agent, ...
    deadline = time.time() + 30
    while any(map(alive, killed)) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(map(alive, killed)) and not head_processes(temp_dir, gcs), "the head left processes running"
