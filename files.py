"""Writing on a shared volume: never a half-written file where a reader looks, never through a planted link.

Anyone with write access to the network volume can plant a symbolic link where the worker will write (a job's
`dataset.download.part` pointing at a file in site-packages, say), and the worker writes as root. So a new file is
created exclusively (`O_EXCL`), without following a link (`O_NOFOLLOW`), readable by the worker only, after whatever
was at its name (a file or a link: the link itself, never its target) is removed; a directory the worker writes in
has no link on its way down from the setting that names it (`real_dir`: job directories, the model cache's downloads);
a file that must not be seen half-written is written under a temporary name, flushed to the disk and renamed into place.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

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
    Anyone who can write to the volume can plant such a link, and the worker, writing as root, would write where it points."""
    path, here = Path(path), Path(path.parent if root is None else root)
    here.mkdir(parents=True, exist_ok=True)
    for part in path.relative_to(here).parts:
        here = here / part
        if here.is_symlink():
            raise NotADirectoryError(f"{here} is a symbolic link (to {os.readlink(here)}) where the worker makes a directory "
                                     "of its own, and it never writes through a link: remove the link and resubmit")
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
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
