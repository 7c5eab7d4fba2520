"""Dashboard accounts: organizations, users with argon2 hashes, server-side sessions, throttling.

Passwords are hashed with argon2id (argon2-cffi's defaults follow RFC 9106's
second recommendation). A session is a random 256-bit token in a cookie; the
database keeps only its SHA-256, so a leaked database holds no usable session.
Each session carries its own CSRF token for the one form that acts.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import psycopg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from noc.errors import UsageError

_hasher = PasswordHasher()
# Compared against when the user does not exist, so that a wrong name costs as long.
_DUMMY = _hasher.hash(secrets.token_hex(16))
SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
USERNAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
MIN_PASSWORD = 10

Conn = psycopg.Connection[Any]


class Role(StrEnum):
    """Staff see the fleet and may send commands; customers see their organization."""

    STAFF = "staff"
    CUSTOMER = "customer"


@dataclass(frozen=True, slots=True)
class User:
    """A logged-in user, as the dashboard sees them."""

    id: int
    username: str
    role: Role
    org_id: int | None
    org_name: str | None
    csrf: str

    @property
    def staff(self) -> bool:
        """Whether the user is NOC staff."""
        return self.role is Role.STAFF


def hash_password(password: str) -> str:
    """An argon2id hash; UsageError for a password too short to be one."""
    if len(password) < MIN_PASSWORD:
        raise UsageError(f"a password has at least {MIN_PASSWORD} characters")
    return _hasher.hash(password)


def add_org(conn: Conn, slug: str, name: str) -> int:
    """Create (or rename) an organization; returns its id."""
    if not SLUG.match(slug):
        raise UsageError(f"organization {slug!r}: lower-case letters, digits and '-'")
    row = conn.execute(
        "INSERT INTO orgs (slug, name) VALUES (%s, %s)"
        " ON CONFLICT (slug) DO UPDATE SET name = EXCLUDED.name RETURNING id",
        (slug, name),
    ).fetchone()
    assert row is not None
    return int(row[0])


def add_user(conn: Conn, username: str, password: str, *, role: Role, org: str | None) -> int:
    """Create a user or set a new password; customers name their organization's slug."""
    if not USERNAME.match(username):
        raise UsageError(f"user name {username!r}: letters, digits and . _ @ -")
    org_id = None
    if role is Role.CUSTOMER:
        if not org:
            raise UsageError("a customer user belongs to an organization (--org SLUG)")
        r = conn.execute("SELECT id FROM orgs WHERE slug = %s", (org,)).fetchone()
        if r is None:
            raise UsageError(f"no organization {org!r} (noc org add {org} NAME)")
        org_id = int(r[0])
    elif org:
        raise UsageError("staff belong to no organization")
    row = conn.execute(
        "INSERT INTO users (username, password_hash, role, org_id) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (username) DO UPDATE SET password_hash = EXCLUDED.password_hash,"
        " role = EXCLUDED.role, org_id = EXCLUDED.org_id RETURNING id",
        (username, hash_password(password), role.value, org_id),
    ).fetchone()
    assert row is not None
    return int(row[0])


def assign_device(
    conn: Conn, device: str, org: str | None, cert_not_after: dt.datetime | None
) -> None:
    """Register a device, give it to an organization, record its certificate's expiry."""
    org_id = None
    if org:
        r = conn.execute("SELECT id FROM orgs WHERE slug = %s", (org,)).fetchone()
        if r is None:
            raise UsageError(f"no organization {org!r}")
        org_id = int(r[0])
    conn.execute(
        "INSERT INTO devices (device_id, org_id, cert_not_after) VALUES (%s, %s, %s)"
        " ON CONFLICT (device_id) DO UPDATE SET org_id = COALESCE(EXCLUDED.org_id, devices.org_id),"
        " cert_not_after = COALESCE(EXCLUDED.cert_not_after, devices.cert_not_after)",
        (device, org_id, cert_not_after),
    )


#: An address may fail this many times more than a user name: many people share one NAT.
ADDRESS_FACTOR = 4


def throttled(conn: Conn, keys: list[str], *, window: float, limit: int) -> bool:
    """Whether the user name failed ``limit`` times within ``window`` (an address: 4 times that).

    ``keys`` are ``user:NAME`` and ``ip:ADDRESS``.
    """
    rows = conn.execute(
        "SELECT key, count(*) FROM login_failures WHERE key = ANY(%s)"
        " AND at > now() - make_interval(secs => %s) GROUP BY key",
        (keys, window),
    ).fetchall()
    for key, n in rows:
        if int(n) >= (limit * ADDRESS_FACTOR if str(key).startswith("ip:") else limit):
            return True
    return False


def check_login(conn: Conn, username: str, password: str) -> int | None:
    """The user's id if the password is right; None otherwise (same work either way)."""
    row = conn.execute(
        "SELECT id, password_hash FROM users WHERE username = %s", (username,)
    ).fetchone()
    stored = str(row[1]) if row else _DUMMY
    try:
        _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return None
    return int(row[0]) if row else None


def record_failure(conn: Conn, keys: list[str]) -> None:
    """Count a failed login against each key."""
    conn.execute("INSERT INTO login_failures (key) SELECT unnest(%s::text[])", (keys,))


def new_session(conn: Conn, user_id: int, ttl: float) -> str:
    """Start a session; returns the cookie value (only its hash is stored)."""
    token = secrets.token_urlsafe(32)
    conn.execute(
        "INSERT INTO sessions (token_hash, user_id, csrf, expires_at)"
        " VALUES (%s, %s, %s, now() + make_interval(secs => %s))",
        (_digest(token), user_id, secrets.token_urlsafe(24), ttl),
    )
    return token


def session_user(conn: Conn, token: str) -> User | None:
    """The user of a live session, or None."""
    row = conn.execute(
        "SELECT u.id, u.username, u.role, u.org_id, o.name, s.csrf FROM sessions s"
        " JOIN users u ON u.id = s.user_id LEFT JOIN orgs o ON o.id = u.org_id"
        " WHERE s.token_hash = %s AND s.expires_at > now()",
        (_digest(token),),
    ).fetchone()
    if row is None:
        return None
    return User(int(row[0]), str(row[1]), Role(row[2]), row[3], row[4], str(row[5]))


def end_session(conn: Conn, token: str) -> None:
    """Log out."""
    conn.execute("DELETE FROM sessions WHERE token_hash = %s", (_digest(token),))


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
