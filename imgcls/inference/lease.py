"""One labelling job per output folder at a time: the folder's lease, ``_lease.json``.

A run starts by clearing what a killed run left: ``.tmp-*`` parts, ``_staging/``, a
half-written plan. Done while another job writes there, that deletes the other job's
parts before their renames, as when KubeRay's ``backoffLimit`` resubmits a job whose
first driver still runs. So a job first takes the lease: a small JSON file with its
job id, host, pid, boot id, start time and a heartbeat that a thread rewrites every
``HEARTBEAT_S`` seconds.

- A lease whose heartbeat is less than ``STALE_S`` old is a live job's: a second job
  fails at once, before it deletes anything, saying whose the lease is and in how many
  seconds it goes stale if that job is dead (a driver pod that died).
- An older lease is a dead job's: it is taken over, with a warning. So is a lease of
  this very machine (its host name and boot id) whose process is gone: a rerun right
  after ``kill -9`` need not wait.
- The job removes its lease when it ends, also on an error, on Ctrl-C and on SIGTERM
  (which Ray's driver, or else the lease itself, turns into SystemExit), so that a rerun
  right after is not blocked.

Races: in a local folder the lease is created with O_EXCL, atomically. An object store
has no create-if-absent in general, so there (and when taking over a stale lease
anywhere) a job writes its lease, waits ``CONFIRM_S`` and reads it back: of two jobs
that both found no lease, or the same stale one, the later writer keeps it and the
earlier one finds the other's and fails. The window left open is a job whose read and
write of the lease lie more than ``CONFIRM_S`` apart (a stalled request): it can miss a
rival's lease. Staleness compares a heartbeat with the reader's clock, so the hosts'
clocks must agree (NTP) to well within ``STALE_S``. A job that finds its lease taken
(its heartbeats stalled past ``STALE_S``) warns, and fails at its end (``check``).

This module imports only ``storage``: the CLI checks the lease (``refuse_if_held``)
before it starts Ray, so a second job fails in a second rather than after Ray's start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Callable, Optional

from imgcls import storage

LEASE_FILE = "_lease.json"
HEARTBEAT_S = 10.0  # seconds between two rewrites of a held lease
STALE_S = 60.0  # a lease whose heartbeat is this old is a dead job's: six heartbeats missed
CONFIRM_S = 2.0  # wait between writing a lease and reading it back, where no atomic create exists


class LeaseHeldError(RuntimeError):
    """The output folder's lease belongs to another job that is alive (or died less than
    ``STALE_S`` seconds ago); or this job's lease was taken by another while it ran."""


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def read_lease(output: str) -> Optional[dict]:
    """The lease of the output folder ``output``, or None when there is none."""
    uri = storage.join(output, LEASE_FILE)
    try:
        return storage.read_json(uri)
    except FileNotFoundError:
        return None
    except ValueError:  # a local file caught mid-write by another process: read it again
        time.sleep(0.2)
        try:
            return storage.read_json(uri)
        except FileNotFoundError:
            return None
        except ValueError:  # unreadable: a dead job's, cut short; its file time says how old
            fs, path = storage.filesystem(uri)
            written = fs.modified(path).timestamp()
            return {"job_id": "?", "host": "?", "pid": -1, "started": written, "heartbeat": written}


def _boot_id() -> Optional[str]:
    """This kernel's boot id (Linux): with the host name, it tells that a lease's pid is of
    this very machine, where two machines share a host name."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def stale_reason(lease: dict, stale_s: float = STALE_S, now: Optional[float] = None) -> Optional[str]:
    """Why ``lease`` is a dead job's, or None when its job may be alive."""
    age = (time.time() if now is None else now) - float(lease["heartbeat"])
    if age >= stale_s:
        return f"its last heartbeat was {age:.0f} s ago (stale after {stale_s:.0f} s)"
    here = lease["host"] == socket.gethostname() and lease.get("boot_id") == _boot_id()
    if here and not _pid_alive(int(lease["pid"])):
        return f"its process {lease['pid']} is gone from this host"
    return None


def held_message(output: str, lease: dict, stale_s: float = STALE_S) -> str:
    """Whose the lease of ``output`` is, and what to do about it."""
    age = time.time() - float(lease["heartbeat"])
    started = datetime.fromtimestamp(float(lease["started"]), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (f"{output} is being written by labelling job {lease['job_id']} (pid {lease['pid']} on host "
            f"{lease['host']}, started {started}, last heartbeat {max(0.0, age):.0f} s ago): wait for it to end, "
            f"or use another --output. If that job is dead, its lease goes stale in "
            f"{max(0.0, stale_s - age):.0f} s and a rerun then takes it over")


def refuse_if_held(output: str, stale_s: float = STALE_S) -> None:
    """Raises LeaseHeldError when a live job holds the lease of ``output``: a check that
    reads one small file, made before a command starts Ray; ``Lease`` takes the lease."""
    lease = read_lease(output)
    if lease is not None and stale_reason(lease, stale_s) is None:
        raise LeaseHeldError(held_message(output, lease, stale_s))


def _exit_on_sigterm(signum, frame) -> None:
    sys.exit(128 + signum)  # SystemExit unwinds the job, releasing its lease on the way


def _is_local(uri: str) -> bool:
    return storage.protocol(uri) in ("file", "local")


class Lease:
    """The lease of the output folder ``output``, held by this job from ``acquire`` to
    ``release``; as a context manager, released however the block ends.

    Args:
        output: the output folder (local or any fsspec URI); it must exist.
        job_id: this job's id, written in the lease; None makes a new one.
        heartbeat_s, stale_s: the heartbeat's period and the age that makes a lease stale.
        say: where warnings go (stderr).
    """

    def __init__(self, output: str, job_id: Optional[str] = None, heartbeat_s: float = HEARTBEAT_S,
                 stale_s: float = STALE_S, say: Callable[[str], None] = _say):
        self.output, self.uri = output, storage.join(output, LEASE_FILE)
        now = time.time()
        self.record = {"job_id": job_id or uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid(),
                       "boot_id": _boot_id(), "started": now, "heartbeat": now}
        self.heartbeat_s, self.stale_s, self.say = heartbeat_s, stale_s, say
        self.taken_by: Optional[dict] = None  # the lease of the job that took ours while we ran
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._sigterm = None  # the SIGTERM handler this lease replaced

    @property
    def job_id(self) -> str:
        return self.record["job_id"]

    def acquire(self) -> "Lease":
        """Takes the lease, or raises LeaseHeldError naming the live job that holds it."""
        found = read_lease(self.output)
        if found is not None:
            reason = stale_reason(found, self.stale_s)
            if reason is None:
                raise LeaseHeldError(held_message(self.output, found, self.stale_s))
            self.say(f"warning: taking over the lease of {self.output} from labelling job {found['job_id']} "
                     f"(pid {found['pid']} on host {found['host']}), which looks dead: {reason}")
        try:
            if found is None and _is_local(self.uri):
                try:
                    with open(storage.strip(self.uri), "x") as f:  # O_EXCL: of two jobs, one creates it
                        json.dump(self.record, f)
                except FileExistsError:
                    self._refuse_rival()
            else:
                self._write()
                time.sleep(CONFIRM_S)  # a rival that read what we read writes within this; the last writer keeps it
                self._refuse_rival()
        except BaseException:  # a rival's lease, or Ctrl-C while confirming: leave none of ours behind
            self._remove_if_ours()
            raise
        self._thread = threading.Thread(target=self._beat, name="imgcls-lease", daemon=True)
        self._thread.start()
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # a kill would skip the release
            self._sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return self

    def _refuse_rival(self) -> None:
        """Raises LeaseHeldError unless the lease on the store is ours."""
        now = read_lease(self.output)
        if now is None:
            raise LeaseHeldError(f"the lease of {self.output} vanished as this job took it: another job "
                                 "released it meanwhile; run again")
        if now["job_id"] != self.job_id:
            raise LeaseHeldError(held_message(self.output, now, self.stale_s))

    def _write(self) -> None:
        if _is_local(self.uri):  # a reader never sees a half-written local file
            path = storage.strip(self.uri)
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"  # not '.tmp-*', which a run's start deletes
            with open(tmp, "w") as f:
                json.dump(self.record, f)
            os.replace(tmp, path)
        else:  # an object store's PUT replaces the object whole
            storage.write_json(self.uri, self.record)

    def _beat(self) -> None:
        """Rewrites the heartbeat every ``heartbeat_s`` until released or taken."""
        while not self._stop.wait(self.heartbeat_s):
            try:
                found = read_lease(self.output)
                if found is not None and found["job_id"] != self.job_id:
                    self.taken_by = found
                    self.say(f"warning: labelling job {found['job_id']} (pid {found['pid']} on host "
                             f"{found['host']}) took over the lease of {self.output} from this job "
                             f"{self.job_id}, whose heartbeats stalled for {self.stale_s:.0f} s")
                    return
                self.record["heartbeat"] = time.time()
                self._write()
            except Exception as e:  # noqa: BLE001 - a store's hiccup: the next beat tries again
                self.say(f"warning: the lease heartbeat of {self.output} failed ({e}); trying again")

    def check(self) -> None:
        """Raises LeaseHeldError when another job took this job's lease while it ran."""
        if self.taken_by is not None:
            raise LeaseHeldError(f"labelling job {self.taken_by['job_id']} (host {self.taken_by['host']}) took over "
                                 f"{self.output} while this job {self.job_id} ran; its rows are whole, but that job "
                                 "now owns the folder")

    def release(self) -> None:
        """Stops the heartbeat and removes the lease, if it is still this job's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None
        self._remove_if_ours()

    def _remove_if_ours(self) -> None:
        try:
            found = read_lease(self.output)
            if found is not None and found["job_id"] == self.job_id:
                fs, path = storage.filesystem(self.uri)
                fs.rm(path)
        except Exception as e:  # noqa: BLE001 - the job's own outcome matters more; the lease goes stale
            self.say(f"warning: could not remove the lease of {self.output} ({e}); it goes stale in "
                     f"{self.stale_s:.0f} s")

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
