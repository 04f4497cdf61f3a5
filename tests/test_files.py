"""The shared volume's primitives: the job lock (one worker per job; a dead owner's or a stale lock taken over
by one worker alone) and errors that say what to do when the volume refuses a write."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, SAMPLE
from files import JobLock
from job import JobError


def test_a_live_lock_refuses_a_second_worker_and_a_dead_owners_lock_is_taken_over(tmp_path):
    lock = tmp_path / "job.lock"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lock.write_text(json.dumps({"token": "x", "host": socket.gethostname(), "pid": live.pid, "started": time.time()}))
    try:
        with pytest.raises(JobError, match=f"already running on another worker \\(pid {live.pid}"):
            JobLock(lock).acquire()
    finally:
        live.kill()
        live.wait()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": time.time()}))
    taken = JobLock(lock)
    taken.acquire()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    taken.release()
    assert not lock.exists()


def test_a_lock_whose_heartbeat_stopped_is_stale(tmp_path):
    lock = tmp_path / "job.lock"
    lock.write_text(json.dumps({"host": "another-worker", "pid": 1, "started": 0}))
    with pytest.raises(JobError, match="already running"):
        JobLock(lock, stale_after_s=600).acquire()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    JobLock(lock, stale_after_s=600).acquire()


def test_a_restarted_container_reusing_our_pid_is_not_mistaken_for_a_live_owner(tmp_path):
    lock = tmp_path / "job.lock"
    lock.write_text(json.dumps({"token": "an-earlier-life", "host": socket.gethostname(), "pid": os.getpid(),
                                "started": 0}))
    taken = JobLock(lock)
    taken.acquire()  # same pid, not our token: the previous container's lock
    other = JobLock(lock)
    other.held = True  # a worker that lost its lock to us must not delete ours
    other.release()
    assert json.loads(lock.read_text())["token"] == taken.token
    taken.release()
    assert not lock.exists()


def test_two_workers_taking_over_one_stale_lock_leave_one_owner(tmp_path, monkeypatch):
    """B judged the dead worker's lock stale, then paused; A took it over meanwhile. B must not then move A's fresh
    lock away (it did: both ran the job)."""
    lock_path = tmp_path / "job" / "job.lock"
    lock_path.parent.mkdir()
    lock_path.write_text(json.dumps({"token": "dead", "host": "gone-host", "pid": 1, "started": 0}))
    os.utime(lock_path, (0, 0))  # its heartbeat stopped long ago
    judged, go_on = threading.Event(), threading.Event()
    real_is_stale = JobLock._is_stale

    def judging_then_pausing(self, owner):
        verdict = real_is_stale(self, owner)
        if not judged.is_set():
            judged.set()
            go_on.wait(60)
        return verdict

    monkeypatch.setattr(JobLock, "_is_stale", judging_then_pausing)
    b, outcome = JobLock(lock_path), {}

    def worker_b():
        try:
            b.acquire()
            outcome["b"] = "acquired"
        except Exception as exc:  # noqa: BLE001
            outcome["b"] = str(exc)

    thread = threading.Thread(target=worker_b)
    thread.start()
    assert judged.wait(30)
    a = subprocess.Popen([sys.executable, "-c", (  # worker A, another process: takes over and holds the lock
        "import sys, time; from pathlib import Path; from files import JobLock\n"
        "lock = JobLock(Path(sys.argv[1])); lock.acquire(); print('held', flush=True); time.sleep(60)\n"),
        str(lock_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert a.stdout.readline().strip() == "held"
        a_token = json.loads(lock_path.read_text())["token"]
        go_on.set()
        thread.join(30)
        assert "already running on another worker" in outcome["b"]
        assert json.loads(lock_path.read_text())["token"] == a_token and not b.held  # A still owns it, alone
    finally:
        go_on.set()
        a.kill()


@pytest.mark.slow  # starts processes
def test_a_read_only_volume_is_named_with_what_to_do_not_an_internal_error(tmp_path):
    """The job directory exists (an earlier attempt made it) and the volume is now mounted read-only: the lock cannot
    be written. It was "internal error ... report the job id"."""
    jobs = tmp_path / "volume" / "jobs"
    (jobs / "job-ro").mkdir(parents=True)
    script = ("import json, sys; from handler import handler\n"
              f"print(json.dumps(handler({{'id': 'job-ro', 'input': {{'dataset_url': '{SAMPLE.as_uri()}'}}}})))\n")
    env = {**os.environ, "JOBS_DIR": str(jobs), "MODEL_CACHE_DIR": str(tmp_path / "models"), "ALLOW_FILE_URLS": "true",
           "VOLUME_DELIVERY": "true"}
    volume = tmp_path / "volume"
    if os.geteuid() != 0:  # permissions bind a worker that is not root: a directory it may not write
        os.chmod(jobs / "job-ro", 0o500)
        command, expected = [sys.executable, "-c", script], "Permission denied"
    elif shutil.which("unshare") and subprocess.run(["unshare", "-m", "true"]).returncode == 0:
        command = ["unshare", "-m", "sh", "-c", f'mount --bind "{volume}" "{volume}" && mount -o remount,bind,ro '
                   f'"{volume}" && exec "{sys.executable}" -c "$0"', script]  # a real read-only mount, seen by it only
        expected = "Read-only file system"
    else:
        pytest.skip("root without mount namespaces: no way to make a directory this worker cannot write")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    error = json.loads(done.stdout.strip().splitlines()[-1])["error"]
    assert error.startswith(f"starting: could not use {jobs / 'job-ro' / 'job.lock'} ({expected})"), error
    assert "internal error" not in error and "resubmit" in error
