"""A real PostgreSQL 15 cluster in a temporary folder, on a free loopback port.

Why it exists: the NOC's promises (exactly once across workers, a revision
replacing its bucket, tenant isolation in the queries) are properties of the
real database. ``initdb`` and ``postgres`` refuse to run as root, so as root the
cluster belongs to the ``postgres`` user (Debian's package makes it) and the
server runs as that user (``subprocess`` switches user itself, so the PID kept
is the server's, not a ``runuser`` wrapper's); the socket folder is inside the
temporary folder.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support.mosquitto import free_port, wait_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
RUN_AS = "postgres"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's binaries are missing or the cluster does not start."""


def require_postgres() -> Path:
    """The binaries' folder, or an error saying how to get them."""
    if not (PG_BIN / "initdb").exists():
        raise PostgresUnavailable(
            f"{PG_BIN}/initdb not found: the NOC tests need Debian's postgresql-15 "
            "(`make deps` installs it)"
        )
    return PG_BIN


class Postgres:
    """One throwaway cluster; ``dsn(dbname)`` connects as the superuser ``noc``."""

    def __init__(self, *, fsync: bool = False) -> None:
        require_postgres()
        self.root = Path(tempfile.mkdtemp(prefix="pbx-pg-"))
        os.chmod(self.root, 0o755)
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.log_file = self.root / "postgres.log"
        self.port = free_port()
        self.fsync = fsync
        self._proc: subprocess.Popen[bytes] | None = None
        self._user: tuple[int, int] | None = None
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam(RUN_AS)
            except KeyError as exc:
                raise PostgresUnavailable(f"no {RUN_AS!r} user to run PostgreSQL as") from exc
            self._user = (pw.pw_uid, pw.pw_gid)

    def _as_owner(self) -> dict[str, Any]:
        if self._user is None:
            return {}
        return {"user": self._user[0], "group": self._user[1], "extra_groups": []}

    def start(self, timeout: float = 30.0) -> None:
        """initdb (first time) and start the server; return when it accepts connections."""
        if not self.data.exists():
            self.sock.mkdir()
            self.data.mkdir()
            if self._user:
                for p in (self.sock, self.data):
                    os.chown(p, *self._user)
            out = subprocess.run(
                [
                    str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "noc",
                    "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync",
                ],
                capture_output=True, text=True, check=False, cwd=self.root,
                **self._as_owner(),
            )  # fmt: skip
            if out.returncode != 0:
                raise PostgresUnavailable(f"initdb failed: {out.stderr or out.stdout}")
        log = self.log_file.open("ab")
        if self._user:
            os.chown(self.log_file, *self._user)
        self._proc = subprocess.Popen(
            [
                str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-k", str(self.sock), "-c", "listen_addresses=127.0.0.1",
                "-c", f"fsync={'on' if self.fsync else 'off'}",
                "-c", "max_connections=300", "-c", "shared_buffers=128MB",
            ],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.root,
            **self._as_owner(),
        )  # fmt: skip
        log.close()
        if not wait_port("127.0.0.1", self.port, time.monotonic() + timeout, self._proc):
            raise PostgresUnavailable(
                f"postgres did not start on port {self.port}: {self.log_file.read_text()[-3000:]}"
            )
        deadline = time.monotonic() + timeout
        while True:  # the port opens a moment before it takes logins
            ready = subprocess.run(
                [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True, check=False,
            )  # fmt: skip
            if ready.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq connection string to ``dbname`` over TCP on the loopback."""
        return f"host=127.0.0.1 port={self.port} user=noc dbname={dbname}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` (dropping an older one); return its DSN."""
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then SIGKILL if it lingers."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def close(self) -> None:
        """Stop and remove the cluster."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Postgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
