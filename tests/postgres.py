"""A throwaway PostgreSQL cluster for the tests: `with running_postgres() as dsn: ...`.

It uses the server binaries of an installed PostgreSQL (Debian's `postgresql` package puts them in
/usr/lib/postgresql/<major>/bin; `apt-get install postgresql` if there are none) and, as `initdb` and
`postgres` refuse to run as root, runs them as the `postgres` OS user when the tests run as root (as they do
in the container and in CI), or as the current user otherwise.

The cluster lives in a new temporary directory (removed at the end), trusts every local connection, listens on
127.0.0.1 only, on a free port, with its unix socket in that directory, runs with fsync off (nothing in it has
to survive a crash), in UTC, and has one database, `brightrun`, owned by the superuser `postgres`.
It is stopped with `pg_ctl stop -m immediate` when the `with` block ends.
"""

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

DATABASE = "brightrun"
SUPERUSER = "postgres"


def postgres_bin_dir() -> Path:
    """The newest installed PostgreSQL's server binaries (initdb, pg_ctl, postgres)."""
    found = sorted((Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if (Path(p) / "initdb").exists()),
                   key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if not found:
        raise RuntimeError("no PostgreSQL server found in /usr/lib/postgresql/*/bin: the Supabase stand-in's tests "
                           "need a real PostgreSQL (`apt-get install postgresql`, Debian's postgresql-15 or newer)")
    return found[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _others_can_enter(path: Path) -> bool:
    """Whether every folder from / down to `path` lets other users through (the postgres user needs that)."""
    for folder in [path, *path.parents]:
        if not folder.stat().st_mode & 0o001:
            return False
    return True


def _as_postgres_user() -> tuple[list[str], int | None, int | None]:
    """(command prefix, uid, gid) that run a server binary as a user that may: `postgres` when we are root."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError("the tests run as root, and initdb refuses root, but there is no `postgres` OS user to "
                           "run it as (`apt-get install postgresql` creates one)") from None
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", "postgres", "--"], user.pw_uid, user.pw_gid


def _run(cmd: list[str], what: str):
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {' '.join(cmd)}\n{done.stdout}{done.stderr}")


@contextmanager
def running_postgres(database: str = DATABASE):
    """Start a fresh PostgreSQL cluster; yield a DSN (libpq key=value string) for `database` in it."""
    import psycopg  # the tests' dependency (requirements-dev.txt), imported here so collection never needs it
    import psycopg.sql

    bin_dir = postgres_bin_dir()
    prefix, uid, gid = _as_postgres_user()
    base = Path(tempfile.gettempdir())
    if uid is not None and not _others_can_enter(base):
        base = Path("/tmp")  # e.g. TMPDIR under /root: the postgres user could not reach its own directory
    root = Path(tempfile.mkdtemp(prefix="pg-test-", dir=base))
    data, log = root / "data", root / "postgres.log"
    started = False
    try:
        if uid is not None:
            os.chown(root, uid, gid)
        _run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", SUPERUSER, "-E", "UTF8",
              "--locale=C", "--no-sync"], "initdb")
        for attempt in range(5):  # the free port can be taken by someone else before postgres binds it
            port = _free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off "
                       "-c full_page_writes=off -c timezone=UTC -c max_connections=100")
            done = subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                                   "-w", "-t", "60", "start"], stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=90)
            if done.returncode == 0:
                started = True
                break
            if attempt == 4 or "could not bind" not in (log.read_text(errors="replace") if log.exists() else ""):
                raise RuntimeError(f"pg_ctl start failed (exit {done.returncode}):\n{done.stdout}{done.stderr}\n"
                                   + (log.read_text(errors="replace") if log.exists() else ""))
            time.sleep(0.1)
        admin = f"host=127.0.0.1 port={port} user={SUPERUSER} dbname=postgres connect_timeout=10"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(database)))
        yield f"host=127.0.0.1 port={port} user={SUPERUSER} dbname={database} connect_timeout=10"
    finally:
        try:
            if started:
                subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        finally:
            shutil.rmtree(root, ignore_errors=True)
