"""The dashboard's routes: login, the fleet (staff), a device, a customer's report, alerts.

Server-rendered (Jinja2), no front-end build: charts are inline SVG made on the
server (``noc.web.charts``); the fleet table refreshes by fetching its own
rows as an HTML fragment every few seconds (``static/app.js``, a dozen lines).

Security: sessions live in PostgreSQL, the cookie holds a random token
(``Secure``, ``HttpOnly``, ``SameSite=Strict``); the one form that acts (a
command, staff only) carries the session's CSRF token; logins are throttled per
user name and per address; every response has a strict Content-Security-Policy.
"""

from __future__ import annotations

import datetime as dt
import hmac
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import structlog
from jinja2 import Environment, FileSystemLoader, select_autoescape
from psycopg_pool import ConnectionPool
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from noc import accounts, commands
from noc.accounts import User
from noc.config import NocConfig
from noc.errors import NocError
from noc.web import charts, fleetrows, queries

log = structlog.get_logger(__name__)
HERE = Path(__file__).resolve().parent
COOKIE = "noc_session"
#: A device page's spans: seconds shown, health step, calls step (all seconds).
SPANS = {"1h": (3600, 60, 300), "24h": (86400, 300, 3600), "7d": (7 * 86400, 3600, 21600)}
CSP = (
    "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


_age = fleetrows.age


def _when(t: dt.datetime | None) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC") if t else "—"


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f}%"


def _filled(
    rows: list[dict[str, Any]], since: dt.datetime, step: int, count: int
) -> list[dict[str, Any]]:
    """A row per ``step``-second bucket from ``since`` (date_bin's origin); zeros where none."""
    have = {r["t"]: r for r in rows}
    out = []
    for k in range(count):
        t = since + dt.timedelta(seconds=step * k)
        out.append(
            have.get(t)
            or {"t": t, "calls": 0, "answered": 0, "asr": None, "acd": None, "peak": None}
        )
    return out


def _bars(rows: list[dict[str, Any]], fmt: str) -> list[tuple[str, float, float]]:
    return [
        (r["t"].strftime(fmt), r["answered"] or 0, (r["calls"] or 0) - (r["answered"] or 0))
        for r in rows
    ]


def _percent(rows: list[dict[str, Any]]) -> list[tuple[dt.datetime, float | None]]:
    return [(r["t"], None if r["asr"] is None else r["asr"] * 100) for r in rows]


def _dur(v: float | None) -> str:
    if v is None:
        return "—"
    m, s = divmod(round(v), 60)
    return f"{m}:{s:02d}"


class SecurityHeaders(BaseHTTPMiddleware):
    """CSP and friends on every response; Server-Timing says how long the server took."""

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        t0 = time.perf_counter()
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Cache-Control"] = "no-store"
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - t0) * 1000:.1f}"
        return response


class Dashboard:
    """The application's state: configuration, pool, templates."""

    def __init__(self, config: NocConfig, pool: ConnectionPool) -> None:
        self.config = config
        self.pool = pool
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(age=_age, when=_when, pct=_pct, dur=_dur)
        self.stale = config.web.silent_after * config.alerts.heartbeat

    # -- helpers -----------------------------------------------------------------------

    def render(self, request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        html = self.env.get_template(name).render(request=request, **ctx)
        return HTMLResponse(html, status_code=status)

    def _user_sync(self, token: str) -> User | None:
        with self.pool.connection() as conn:
            return accounts.session_user(conn, token)

    async def user(self, request: Request) -> User | None:
        token = request.cookies.get(COOKIE)
        if not token or len(token) > 100:
            return None
        return await run_in_threadpool(self._user_sync, token)

    async def require(self, request: Request, *, staff: bool = False) -> User:
        user = await self.user(request)
        if user is None:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise HTTPException(303, headers={"Location": f"/login?next={quote(target)}"})
        if staff and not user.staff:
            raise HTTPException(404)  # a customer does not learn that the page exists
        return user

    def db(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Awaitable[Any]:
        def run() -> Any:
            with self.pool.connection() as conn:
                return fn(conn, *args, **kwargs)

        return run_in_threadpool(run)

    # -- login -------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        nxt = request.query_params.get("next", "/")
        return self.render(request, "login.html", next=_safe_next(nxt), error=None)

    async def login(self, request: Request) -> Response:
        form = await request.form()
        username = str(form.get("username", ""))[:64]
        password = str(form.get("password", ""))[:1024]
        nxt = _safe_next(str(form.get("next", "/")))
        addr = request.client.host if request.client else "?"
        keys = [f"user:{username.lower()}", f"ip:{addr}"]
        w = self.config.web

        def attempt(conn: Any) -> tuple[str | None, bool]:
            if accounts.throttled(conn, keys, window=w.login_window, limit=w.login_max_failures):
                return None, True
            user_id = accounts.check_login(conn, username, password)
            if user_id is None:
                accounts.record_failure(conn, keys)
                return None, False
            return accounts.new_session(conn, user_id, w.session_ttl), False

        token, throttled = await self.db(attempt)
        if token is None:
            log.warning("login_failed", user=username, addr=addr, throttled=throttled)
            error = (
                "Too many failed attempts; try again later."
                if throttled
                else "Wrong user name or password."
            )
            return self.render(
                request, "login.html", status=429 if throttled else 401, next=nxt, error=error
            )
        log.info("login", user=username, addr=addr)
        response = RedirectResponse(nxt, status_code=303)
        response.set_cookie(
            COOKIE, token, max_age=int(w.session_ttl), path="/", secure=w.secure_cookies,
            httponly=True, samesite="strict",
        )  # fmt: skip
        return response

    async def logout(self, request: Request) -> Response:
        token = request.cookies.get(COOKIE)
        if token:
            await self.db(accounts.end_session, token)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # -- pages -------------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        user = await self.require(request)
        return RedirectResponse("/fleet" if user.staff else "/report", status_code=303)

    def _fleet_args(self, request: Request) -> dict[str, Any]:
        p = request.query_params
        sort = p.get("sort", "device")
        return {
            "sort": sort if sort in queries.SORTS else "device",
            "descending": p.get("dir") == "desc",
            "q": p.get("q", "")[:64],
            "state": p.get("state", "") if p.get("state") in queries.STATES else "",
        }

    async def fleet(self, request: Request) -> Response:
        user = await self.require(request, staff=True)
        args = self._fleet_args(request)
        rows = await self.db(queries.fleet, user, stale=self.stale, **args)
        open_alerts = await self.db(lambda c: queries.alerts(c, limit=8))
        return self.render(
            request, "fleet.html", user=user, rows=rows, counts=queries.fleet_counts(rows),
            rows_html=fleetrows.rows(rows, age_warn=self.stale),
            args=args, sort_link=_sort_link(args), silent_after=self.config.web.silent_after,
            alerts=[a for a in open_alerts if not a["resolved_at"]],
        )  # fmt: skip

    async def fleet_rows(self, request: Request) -> Response:
        user = await self.user(request)
        if user is None or not user.staff:
            return PlainTextResponse("login required", status_code=401)
        args = self._fleet_args(request)
        rows = await self.db(queries.fleet, user, stale=self.stale, **args)
        response = HTMLResponse(fleetrows.rows(rows, age_warn=self.stale))
        response.headers["X-Fleet-Counts"] = ",".join(
            f"{k}={v}" for k, v in queries.fleet_counts(rows).items()
        )
        return response

    async def device_page(self, request: Request) -> Response:
        user = await self.require(request)
        device_id = request.path_params["device"]
        dev = await self.db(queries.device, user, device_id, stale=self.stale)
        if dev is None:
            raise HTTPException(404)
        if not user.staff:
            return await self._report(request, user, dev)
        span = request.query_params.get("span", "24h")
        span = span if span in SPANS else "24h"
        seconds, step, call_step = SPANS[span]
        now = dt.datetime.now(dt.UTC)
        since = dt.datetime.fromtimestamp(
            (now.timestamp() - seconds) // call_step * call_step, dt.UTC
        )

        def load(conn: Any) -> dict[str, Any]:
            return {
                "health": queries.health_series(conn, device_id, since, step),
                "calls": queries.calls_series(conn, user, since, call_step, device_id),
                "summary": queries.calls_summary(conn, user, since, device_id),
                "snapshots": queries.snapshots(conn, device_id),
                "commands": queries.commands(conn, device_id),
                "gaps": queries.gaps(conn, device_id),
                "alerts": queries.alerts(conn, device_id=device_id, limit=20),
            }

        d = await self.db(load)
        h = d["health"]
        health_charts = [
            charts.line_chart(
                "CPU and memory", [
                    charts.Series("CPU %", [(r["t"], r["cpu"]) for r in h]),
                    charts.Series("memory %", [(r["t"], r["mem"]) for r in h]),
                    charts.Series("fullest disk %", [(r["t"], r["disk"]) for r in h]),
                ], start=since, end=now, unit="%", y_max=100,
            ),
            charts.line_chart(
                "Load average (1 min)", [
                    charts.Series("load", [(r["t"], r["load"]) for r in h]),
                ], start=since, end=now,
            ),
            charts.line_chart(
                "Outbox backlog (envelopes waiting on the box)", [
                    charts.Series("queued", [(r["t"], r["backlog"]) for r in h], color="#7c3aed"),
                ], start=since, end=now,
            ),
        ]  # fmt: skip
        c = _filled(d["calls"], since, call_step, seconds // call_step + 1)
        fmt = "%H:%M" if span != "7d" else "%d %b"
        per = {3600: "hour", 21600: "6 hours", 300: "5 minutes"}[call_step]
        call_charts = [
            charts.bar_chart(
                f"Calls per {per}", _bars(c, fmt),
                labels=("answered", "not answered"), every=max(len(c) // 8, 1),
            ),
            charts.line_chart(
                "Answer-seizure ratio (ASR)",
                [charts.Series("ASR %", _percent(c))],
                start=since, end=now, unit="%", y_max=100,
            ),
            charts.line_chart(
                "Average call duration (ACD)",
                [charts.Series("ACD, seconds", [(r["t"], r["acd"]) for r in c], color="#16a34a")],
                start=since, end=now, unit="s",
            ),
        ]  # fmt: skip
        return self.render(
            request, "device.html", user=user, dev=dev, span=span, health_charts=health_charts,
            call_charts=call_charts, allowed=commands.FORM_ARGUMENT, **d,
        )  # fmt: skip

    async def snapshot_page(self, request: Request) -> Response:
        user = await self.require(request, staff=True)
        device_id = request.path_params["device"]
        dev = await self.db(queries.device, user, device_id, stale=self.stale)
        if dev is None:
            raise HTTPException(404)
        snap = request.path_params["snapshot"]
        rows = await self.db(queries.diffs, device_id, snap)
        return self.render(request, "snapshot.html", user=user, dev=dev, snap=snap, diffs=rows)

    async def send_command(self, request: Request) -> Response:
        user = await self.require(request, staff=True)
        device_id = request.path_params["device"]
        form = await request.form()
        if not hmac.compare_digest(str(form.get("csrf", "")), user.csrf):
            log.warning("csrf_refused", user=user.username, device=device_id)
            return PlainTextResponse("CSRF token missing or wrong", status_code=403)
        dev = await self.db(queries.device, user, device_id, stale=self.stale)
        if dev is None:
            raise HTTPException(404)
        cmd = str(form.get("cmd", ""))
        arg = str(form.get("arg", "")).strip()
        wanted = commands.FORM_ARGUMENT.get(cmd)
        args = {wanted: arg} if wanted and arg else {}
        try:
            sent = await run_in_threadpool(
                commands.send, self.config, self.pool, device_id, cmd, args,
                sent_by=f"web:{user.username}", timeout=min(self.config.command_timeout, 5.0),
            )  # fmt: skip
            note = "reply received" if sent.reply is not None else "sent; no reply yet"
        except NocError as exc:
            note = f"not sent: {exc}"
        log.info("command_sent", user=user.username, device=device_id, cmd=cmd, note=note)
        return RedirectResponse(
            f"/devices/{quote(device_id)}?{urlencode({'note': note})}#commands", status_code=303
        )

    async def report(self, request: Request) -> Response:
        user = await self.require(request)
        return await self._report(request, user, None)

    async def _report(self, request: Request, user: User, dev: dict[str, Any] | None) -> Response:
        """The customer's graphical reporting: their organization, or one of its boxes."""
        device_id = dev["device_id"] if dev else None
        now = dt.datetime.now(dt.UTC)
        day = (now - dt.timedelta(hours=23)).replace(minute=0, second=0, microsecond=0)
        month = (now - dt.timedelta(days=29)).replace(hour=0, minute=0, second=0, microsecond=0)

        def load(conn: Any) -> dict[str, Any]:
            return {
                "devices": queries.org_devices(conn, user, stale=self.stale)
                if dev is None
                else [dev],
                "hourly": queries.calls_series(conn, user, day, 3600, device_id),
                "daily": queries.calls_series(conn, user, month, 86400, device_id),
                "day": queries.calls_summary(conn, user, day, device_id),
                "month": queries.calls_summary(conn, user, month, device_id),
                "trunks": queries.trunk_usage(conn, user, month, device_id),
                "weeks": queries.weekly(conn, user, 12, device_id),
            }

        d = await self.db(load)
        hourly = _filled(d["hourly"], day, 3600, 24)
        daily = _filled(d["daily"], month, 86400, 30)
        weeks = d["weeks"]
        report_charts = {
            "hourly": charts.bar_chart(
                "Calls per hour, last 24 hours", _bars(hourly, "%H:%M"),
                labels=("answered", "not answered"), every=3,
            ),
            "daily": charts.bar_chart(
                "Calls per day, last 30 days", _bars(daily, "%d %b"),
                labels=("answered", "not answered"), every=4,
            ),
            "weekly": charts.bar_chart(
                "Calls per week, last 12 weeks",
                _bars([{**w, "t": w["week"]} for w in weeks], "%d %b"),
                labels=("answered", "not answered"),
            ),
            "asr": charts.line_chart(
                "Answered ratio per day, last 30 days",
                [charts.Series("answered %", _percent(daily))],
                start=month, end=now, unit="%", y_max=100,
            ),
        }  # fmt: skip
        return self.render(
            request,
            "report.html",
            user=user,
            dev=dev,
            charts=report_charts,
            **d,
        )

    async def alerts_page(self, request: Request) -> Response:
        user = await self.require(request, staff=True)
        rows = await self.db(lambda c: queries.alerts(c, limit=200))
        return self.render(request, "alerts.html", user=user, alerts=rows)

    async def healthz(self, request: Request) -> Response:
        await self.db(lambda c: c.execute("SELECT 1").fetchone())
        return PlainTextResponse("ok")


def _safe_next(nxt: str) -> str:
    """Only a path on this site: never an open redirect."""
    return nxt if nxt.startswith("/") and not nxt.startswith("//") and "\\" not in nxt else "/"


def _sort_link(args: dict[str, Any]) -> Callable[[str], str]:
    def link(col: str) -> str:
        desc = args["sort"] == col and not args["descending"]
        q = {"sort": col, "dir": "desc" if desc else "asc", "q": args["q"], "state": args["state"]}
        return "?" + urlencode({k: v for k, v in q.items() if v})

    return link


async def _not_found(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code in (301, 302, 303) and exc.headers:
        return RedirectResponse(exc.headers["Location"], status_code=exc.status_code)
    return PlainTextResponse(
        "Not found" if exc.status_code == 404 else str(exc.detail), status_code=exc.status_code
    )


def create_app(config: NocConfig, pool: ConnectionPool) -> Starlette:
    """The ASGI application."""
    d = Dashboard(config, pool)
    routes = [
        Route("/", d.home),
        Route("/login", d.login_form, methods=["GET"]),
        Route("/login", d.login, methods=["POST"]),
        Route("/logout", d.logout, methods=["POST"]),
        Route("/fleet", d.fleet),
        Route("/fleet/rows", d.fleet_rows),
        Route("/report", d.report),
        Route("/alerts", d.alerts_page),
        Route("/devices/{device}", d.device_page),
        Route("/devices/{device}/snapshots/{snapshot}", d.snapshot_page),
        Route("/devices/{device}/commands", d.send_command, methods=["POST"]),
        Route("/healthz", d.healthz),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(SecurityHeaders)],
        exception_handlers={HTTPException: _not_found},
    )


def serve(config: NocConfig) -> int:
    """Run the dashboard with uvicorn until SIGTERM/SIGINT (``noc web``)."""
    import uvicorn

    from noc import db

    pool = db.pool(config.database, min_size=2, max_size=8, name="noc-web")
    try:
        app = create_app(config, pool)
        log.info("web_started", url=f"http://{config.web.host}:{config.web.port}/")
        uvicorn.run(
            app, host=config.web.host, port=config.web.port, log_level="warning",
            access_log=False, proxy_headers=False,
        )  # fmt: skip
    finally:
        pool.close()
    return 0
