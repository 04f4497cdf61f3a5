"""Writing on a shared volume: never a half-written file where a reader looks, never through a planted link.

Anyone with write access to the network volume can plant a symbolic link where the worker will write (a job's
`dataset.download.part` pointing at a file in site-packages, say), and the worker writes as root. So a new file is
created exclusively (`O_EXCL`), without following a link (`O_NOFOLLOW`), readable by the worker only, after whatever
was at its name (a file or a link: the link itself, never its target) is removed; a directory the worker writes in
has no link on its way down from the setting that names it (`real_dir`: job directories, the model cache's downloads);
a file that must not be seen half-written is written under a temporary name, flushed to the disk and renamed into place.

Workers sharing the volume take turns through a lock file (`JobLock`): one worker per job, one download per model.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from job import JobError

log = logging.getLogger(__name__)

PRIVATE_FILE, PRIVATE_DIR = 0o600, 0o700


def remove(path: Path) -> None:
    """Remove what is at `path`: a file, a link (not what it points to) or a directory tree."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def new_file(path: Path, append: bool = False) -> int:
    """A file descriptor of `path` opened for writing: created anew and exclusively, or (`append`) an existing
    regular file; a link at `path` is removed first, never followed."""
    path = Path(path)
    if path.is_symlink() or (not append and path.exists()):
        remove(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_EXCL)
    return os.open(path, flags, PRIVATE_FILE)


@contextmanager
def atomic_file(path: Path, mode: str = "wb"):
    """Write `path` through a temporary file: readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with os.fdopen(new_file(tmp), mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # replaces a link at `path` itself, never its target
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomically(path: Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


@contextmanager
def atomic_dir(path: Path):
    """Build a directory under a temporary name beside `path` (a fresh private one: mkdtemp), and rename it into
    place when the block ends without an error, replacing what was there; on an error nothing is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{path.name}.tmp-"))
    try:
        yield tmp
        if path.is_symlink() or path.exists():
            remove(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def real_dir(path: Path, root: Path | None = None, mode: int = PRIVATE_DIR) -> Path:
    """`path` as a real directory, with no symbolic link from `root` (trusted: the directory a setting names, such as
    MODEL_CACHE_DIR; by default `path`'s parent) down to it: each directory on the way is created (`mode`) where
    missing, and a link on the way is refused, naming it (never followed, never removed: the operator may have made it).
    Anyone who can write to the volume can plant such a link, and the worker, writing as root, would write where it
    points."""
    path, here = Path(path), Path(path.parent if root is None else root)
    here.mkdir(parents=True, exist_ok=True)
    for part in path.relative_to(here).parts:
        here = here / part
        if here.is_symlink():
            raise NotADirectoryError(f"{here} is a symbolic link (to {os.readlink(here)}) where the worker makes a "
                                     "directory of its own, and it never writes through a link: remove the link and "
                                     "resubmit")
        here.mkdir(mode=mode, exist_ok=True)
    return path


def private_dir(path: Path) -> Path:
    """`path` as a real directory readable by the worker only (`real_dir`): a job's directory, its checkpoints."""
    return real_dir(path)


_FIXES = {
    errno.EROFS: "the volume is mounted read-only: attach the network volume read-write (or set JOBS_DIR, or "
                 "MODEL_CACHE_DIR if the path is a model's, to a writable directory) and resubmit",
    errno.ENOSPC: "the volume is full: free space on it, or enlarge it, and resubmit",
    errno.EDQUOT: "the volume's quota is used up: free space on it, or enlarge it, and resubmit",
    errno.EFBIG: "the file is larger than the volume allows: free space or enlarge the volume, and resubmit",
    errno.EACCES: "the worker may not write there: give it write access (or set JOBS_DIR, or MODEL_CACHE_DIR if "
                  "the path is a model's, to a writable directory) and resubmit",
    errno.EPERM: "the worker may not write there: give it write access (or set JOBS_DIR, or MODEL_CACHE_DIR if "
                 "the path is a model's, to a writable directory) and resubmit",
    errno.EIO: "the volume failed to read or write: resubmit; if it happens again, check the network volume",
}


def volume_fault(exc: BaseException) -> str | None:
    """What to tell the user when `exc` is a fault of the volume (read-only, full, not ours), not of the worker's
    code; None otherwise."""
    if not isinstance(exc, OSError) or exc.errno not in _FIXES:
        return None
    where = f" {exc.filename}" if exc.filename else ""
    return f"could not use{where} ({exc.strerror or os.strerror(exc.errno)}): {_FIXES[exc.errno]}"


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class JobLock:
    """One worker per job directory, also across workers sharing a network volume.

    The lock file holds its owner's random token, host, pid and start time; its mtime is a heartbeat,
    refreshed by a background thread while the lock is held (downloads and model loads included). A
    lock is stale, and taken over, when its heartbeat is older than `stale_after_s`, or when its owner
    is a process of this host that no longer exists (a pid equal to ours that is not our lock counts:
    container restarts reuse pids). A takeover happens under an exclusive marker file and judges the
    lock again there, so of two workers that both saw it stale only one can win, and a late one never
    removes the winner's fresh lock; ownership is checked by token, never by pid.
    """

    def __init__(self, path: Path, stale_after_s: float = 600.0, heartbeat_s: float = 30.0):
        self.path, self.stale_after_s, self.heartbeat_s = Path(path), stale_after_s, heartbeat_s
        self.token, self.held = secrets.token_hex(16), False
        self._stop = threading.Event()

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _is_stale(self, owner: dict) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        if age > self.stale_after_s:
            return True
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
            if owner["pid"] == os.getpid():
                return owner.get("token") != self.token
            try:
                os.kill(owner["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return not owner and age > 5  # unreadable and not being written right now

    def acquire(self) -> None:
        for _ in range(50):  # each round either takes the lock, finds it held, or waits out a takeover
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if not self._is_stale(owner):
                    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(owner.get("started", 0)))
                    raise JobError(f"job {self.path.parent.name} is already running on another worker (pid "
                                   f"{owner.get('pid')} on {owner.get('host')}, since {since}); wait for it to finish, "
                                   "or submit with another job_id") from None
                self._take_over(owner)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "started": time.time()}, f)
            self.held = True
            threading.Thread(target=self._beat, daemon=True).start()
            return
        raise JobError(f"could not take the lock of job {self.path.parent.name}; retry in a minute")

    def _take_over(self, owner: dict) -> None:
        """Remove a stale lock, under an exclusive marker: a worker that judged the lock stale and then paused must
        not remove the fresh lock another worker has taken meanwhile, so the lock is judged again under the marker."""
        marker = self.path.with_name(f"{self.path.name}.takeover")
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            try:  # a marker left by a worker that died while taking over
                if time.time() - marker.stat().st_mtime > 60:
                    marker.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.2)
            return
        try:
            owner = self._owner()
            if self.path.exists() and self._is_stale(owner):
                self.path.unlink(missing_ok=True)
                log.warning("took over the stale lock of job %s (%s)", self.path.parent.name, owner or "unreadable")
        finally:
            marker.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.heartbeat()

    def heartbeat(self) -> None:
        if self.held and self._owner().get("token") == self.token:
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self.held and self._owner().get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.held = False
