"""PostgreSQL access: one connection pool, and the schema migrations kept in the repository.

Migrations are numbered SQL files in ``noc/migrations`` (``0001_initial.sql``,
``0002_…``). :func:`migrate` applies those not yet in ``schema_migrations``, each
in its own transaction, under an advisory lock so that two processes starting
at once do not both apply one. A file is never edited once released: a change
is a new file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg_pool import ConnectionPool

from noc.errors import StoreError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_ID = 0x4E4F43  # "NOC": the advisory lock that serialises migration runs


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file."""

    version: int
    name: str
    path: Path


def migrations(folder: Path = MIGRATIONS) -> list[Migration]:
    """The migration files in order; a misnamed or duplicated number is an error."""
    found: dict[int, Migration] = {}
    for p in sorted(folder.glob("*.sql")):
        m = _NAME.match(p.name)
        if m is None:
            raise StoreError(f"{p}: a migration is named NNNN_name.sql")
        version = int(m.group(1))
        if version in found:
            raise StoreError(f"{p}: migration {version} exists twice ({found[version].path.name})")
        found[version] = Migration(version, m.group(2), p)
    return [found[v] for v in sorted(found)]


def connect(dsn: str, **kwargs: object) -> psycopg.Connection[tuple[object, ...]]:
    """One connection; StoreError naming the server when it cannot be made."""
    try:
        return psycopg.connect(dsn, **kwargs)  # type: ignore[arg-type]
    except psycopg.Error as exc:
        raise StoreError(f"cannot connect to PostgreSQL ({_where(dsn)}): {exc}") from exc


def pool(dsn: str, *, min_size: int = 1, max_size: int = 4, name: str = "noc") -> ConnectionPool:
    """An open connection pool; waits until one connection works (StoreError if not in 10 s)."""
    p = ConnectionPool(dsn, min_size=min_size, max_size=max_size, name=name, open=False)
    try:
        p.open(wait=True, timeout=10)
    except psycopg.Error as exc:
        p.close()
        raise StoreError(f"cannot connect to PostgreSQL ({_where(dsn)}): {exc}") from exc
    except Exception as exc:  # psycopg_pool.PoolTimeout is not a psycopg.Error
        p.close()
        raise StoreError(f"cannot connect to PostgreSQL ({_where(dsn)}): {exc}") from exc
    return p


def _where(dsn: str) -> str:
    """The DSN without its password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return "the configured database"
    return " ".join(f"{k}={v}" for k, v in info.items() if k in ("host", "port", "dbname", "user"))


def applied(conn: psycopg.Connection[tuple[object, ...]]) -> set[int]:
    """Versions already applied (empty on a new database)."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version integer PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    return {int(str(r[0])) for r in conn.execute("SELECT version FROM schema_migrations")}


def migrate(dsn: str, folder: Path = MIGRATIONS) -> list[Migration]:
    """Apply the pending migrations; returns those applied now (in order)."""
    done: list[Migration] = []
    with connect(dsn, autocommit=True) as conn:
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
            have = applied(conn)
            for m in migrations(folder):
                if m.version in have:
                    continue
                sql = m.path.read_text()
                with conn.transaction():
                    conn.execute(sql.encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (m.version, m.name),
                    )
                done.append(m)
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
        except psycopg.Error as exc:
            raise StoreError(f"migration failed: {exc}") from exc
    return done
