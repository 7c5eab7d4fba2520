"""The dashboard in a real browser (Debian's headless Chromium) against ``noc web`` and PostgreSQL.

The history shown is stored through the ingest code (tests/support/nocseed.py);
the pages are served by a real ``noc web`` process; screenshots are kept in
``test-artifacts/`` (or ``$NOC_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.support.browser import Browser, BrowserUnavailable, require_browser
from tests.support.mosquitto import Mosquitto
from tests.support.nocseed import PASSWORD, history, seed_accounts, set_status, store_history
from tests.support.nocservice import NocProcess, noc_settings, start_web
from tests.support.pki import PKI
from tests.support.postgres import Postgres

pytestmark = pytest.mark.integration
ARTIFACTS = Path(
    os.environ.get("NOC_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts")
)
DEVICES = {
    "acme-pbx-01": ("acme", "online"),
    "acme-pbx-02": ("acme", "severed"),
    "globex-pbx-01": ("globex", "online"),
    "pbx-lab-1": (None, "offline"),
}


class Site:
    """The running dashboard: its URL and database."""

    def __init__(self, url: str, dsn: str, proc: NocProcess) -> None:
        self.url, self.dsn, self.proc = url, dsn, proc


@pytest.fixture(scope="module")
def site(
    postgres: Postgres, pki: PKI, broker: Mosquitto, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Site]:
    """A seeded database and ``noc web`` serving it."""
    try:
        require_browser()
    except BrowserUnavailable as exc:
        pytest.skip(str(exc))
    from noc import accounts, db

    dsn = postgres.create_database("t_web")
    db.migrate(dsn)
    with psycopg.connect(dsn) as conn:
        seed_accounts(conn)
        for n, (dev, (org, status)) in enumerate(DEVICES.items()):
            accounts.assign_device(conn, dev, org, None)
            if org:
                store_history(conn, history(dev, seed=n, hours=24, days=30))
            set_status(conn, dev, status)
        conn.execute(
            "UPDATE devices SET cert_not_after = now() + interval '9 days'"
            " WHERE device_id = 'globex-pbx-01'"
        )
        conn.commit()
    data = noc_settings(pki, broker, dsn, command_timeout="1s")
    data["alerts"] = {"heartbeat": "1h"}  # seeded heartbeats are old: keep "online" online
    proc, url = start_web(tmp_path_factory.mktemp("web"), data)
    try:
        yield Site(url, dsn, proc)
    finally:
        proc.stop()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def http(
    site: Site, path: str, *, data: dict[str, str] | None = None, cookie: str | None = None
) -> tuple[int, dict[str, str], str]:
    """One request without following redirects: status, headers, body."""
    req = urllib.request.Request(
        site.url + path, data=urllib.parse.urlencode(data).encode() if data is not None else None
    )
    if cookie:
        req.add_header("Cookie", f"noc_session={cookie}")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def login_cookie(site: Site, user: str) -> str:
    """A session made through the real login form."""
    status, headers, _ = http(
        site, "/login", data={"username": user, "password": PASSWORD, "next": "/"}
    )
    assert status == 303, status
    cookie = headers["set-cookie"]
    return cookie.split(";", 1)[0].split("=", 1)[1]


def test_pages_without_login_redirect_to_login(site: Site) -> None:
    """Every page asks for a login first; the fragment endpoint answers 401."""
    for path in ("/fleet", "/report", "/devices/acme-pbx-01", "/alerts"):
        status, headers, _ = http(site, path)
        assert status == 303 and headers["location"].startswith("/login?next="), path
    assert http(site, "/fleet/rows")[0] == 401


def test_session_cookie_is_secure_httponly_samesite(site: Site) -> None:
    """The session cookie is Secure, HttpOnly and SameSite=Strict; the page has a strict CSP."""
    status, headers, _ = http(site, "/login", data={"username": "noc-admin", "password": PASSWORD})
    assert status == 303
    cookie = headers["set-cookie"].lower()
    assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    _, headers, _ = http(site, "/login")
    assert "default-src 'none'" in headers["content-security-policy"]


def test_staff_fleet_and_device_pages_in_chromium(site: Site) -> None:
    """Staff log in; the fleet lists every device with its state and refreshes in place;
    a device page has its health and call charts and its command form."""
    with Browser(site.url.replace("127.0.0.1", "localhost")) as b:
        b.get("/fleet")
        assert b.path.startswith("/login"), "a page without login goes to the login form"
        b.login("noc-admin", PASSWORD, then="/fleet")
        assert b.path.startswith("/fleet"), b.path
        rows = b.css("#fleet-rows tr.row")
        states = {r.get_attribute("data-device"): r.get_attribute("data-state") for r in rows}
        assert states == {d: s for d, (_, s) in DEVICES.items()}
        assert "severed by customer" in b.text()
        b.screenshot(ARTIFACTS / "fleet.png")
        # The table refreshes itself (fetch of /fleet/rows): its stamp changes without a reload.
        first = b.css("#refreshed")[0].text
        deadline = time.monotonic() + 15
        while b.css("#refreshed")[0].text == first:
            assert time.monotonic() < deadline, "the fleet table did not refresh"
            time.sleep(0.2)
        assert len(b.css("#fleet-rows tr.row")) == len(DEVICES)
        b.get("/fleet?state=severed")
        assert [r.get_attribute("data-device") for r in b.css("#fleet-rows tr.row")] == [
            "acme-pbx-02"
        ]
        b.get("/devices/acme-pbx-01")
        assert len(b.css("svg.chart")) >= 4
        assert b.css("svg.chart polyline.line") and b.css("svg.chart rect.bar")
        assert b.css("form.command input[name=csrf]")
        b.screenshot(ARTIFACTS / "device.png")


def test_customer_sees_only_their_organization(site: Site) -> None:
    """A customer's report lists only their boxes; another organization's device URL is 404,
    and so is the staff fleet page."""
    with Browser(site.url.replace("127.0.0.1", "localhost")) as b:
        b.login("alice", PASSWORD, then="/report")
        assert b.path.startswith("/report")
        shown = {r.get_attribute("data-device") for r in b.css("tr.row")}
        assert shown == {"acme-pbx-01", "acme-pbx-02"}
        text = b.text()
        assert "Reports stop while you have disconnected" in text
        assert "disconnected by you" in text
        assert "globex" not in text.lower()
        assert b.css("svg.chart rect.bar")
        b.screenshot(ARTIFACTS / "report.png")
    cookie = login_cookie(site, "alice")
    assert http(site, "/devices/acme-pbx-01", cookie=cookie)[0] == 200
    for path in (
        "/devices/globex-pbx-01",
        "/devices/pbx-lab-1",
        "/devices/no-such-box",
        "/fleet",
        "/alerts",
    ):
        status, _, body = http(site, path, cookie=cookie)
        assert status == 404, path
        assert "globex" not in body.lower()
    status, _, body = http(site, "/fleet/rows", cookie=cookie)
    assert status == 401 and "globex" not in body


def test_command_form_needs_csrf_and_records_the_sender(site: Site) -> None:
    """Without the session's CSRF token the command is refused; with it, it is recorded
    with the staff user's name (the box is not connected: no reply)."""
    cookie = login_cookie(site, "noc-admin")
    status, _, _ = http(site, "/devices/acme-pbx-01/commands", data={"cmd": "ping"}, cookie=cookie)
    assert status == 403
    with psycopg.connect(site.dsn) as conn:
        row = conn.execute(
            "SELECT s.csrf FROM sessions s JOIN users u ON u.id = s.user_id"
            " WHERE u.username = 'noc-admin' ORDER BY s.created_at DESC LIMIT 1"
        ).fetchone()
    assert row is not None
    status, headers, _ = http(
        site, "/devices/acme-pbx-01/commands", data={"cmd": "ping", "csrf": row[0]}, cookie=cookie
    )
    assert status == 303 and "no+reply" in headers["location"]
    with psycopg.connect(site.dsn) as conn:
        sent = conn.execute(
            "SELECT cmd, sent_by FROM commands WHERE device_id = 'acme-pbx-01'"
        ).fetchall()
    assert sent == [("ping", "web:noc-admin")]
    customer = login_cookie(site, "bob")
    assert (
        http(site, "/devices/globex-pbx-01/commands", data={"cmd": "ping"}, cookie=customer)[0]
        == 404
    )


def test_login_is_throttled(site: Site) -> None:
    """After five wrong passwords for a name, even the right one is refused for a while."""
    for _ in range(5):
        assert (
            http(site, "/login", data={"username": "bob", "password": "wrong-password"})[0] == 401
        )
    status, _, body = http(site, "/login", data={"username": "bob", "password": PASSWORD})
    assert status == 429 and "Too many" in body


def test_fleet_rows_sort_and_filter(site: Site) -> None:
    """The fleet fragment sorts by any column both ways and filters by name and state."""
    import re

    cookie = login_cookie(site, "noc-admin")

    def order(query: str) -> list[str]:
        status, _, body = http(site, f"/fleet/rows?{query}", cookie=cookie)
        assert status == 200
        return re.findall(r'data-device="([^"]+)"', body)

    assert order("sort=device") == sorted(DEVICES)
    assert order("sort=device&dir=desc") == sorted(DEVICES, reverse=True)
    by_org = order("sort=org")
    assert by_org.index("acme-pbx-01") < by_org.index("globex-pbx-01")
    assert order("q=globex") == ["globex-pbx-01"]
    assert order("state=offline") == ["pbx-lab-1"]
    assert order("sort=nonsense'--") == sorted(DEVICES)  # unknown column: the default order
