"""The fleet table's rows, rendered in Python: the one page that must stay fast at 500+ rows.

A Jinja2 template spends about 0.3 ms per row here (a dozen escaped
expressions and filters each); one f-string per row with ``html.escape`` on
every text does the same in a tenth of it. The markup is the same the
browser tests read (``tr.row`` with ``data-device`` and ``data-state``).
"""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import quote

from markupsafe import Markup

DEFAULT_AGE_WARN = 180.0


def age(seconds: float | None) -> str:
    """``42 s``, ``7 min``, ``3 h``, ``2 d`` or ``never``."""
    if seconds is None:
        return "never"
    s = int(seconds)
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} d"


def _num(v: Any, fmt: str = "{}") -> str:
    return "—" if v is None else fmt.format(v)


def row(r: dict[str, Any], *, age_warn: float = DEFAULT_AGE_WARN) -> str:
    """One ``<tr>`` of the fleet table."""
    dev = escape(r["device_id"])
    state = escape(r["state"])
    label = "severed by customer" if r["state"] == "severed" else state
    version = f"<small> {escape(r['agent_version'])}</small>" if r.get("agent_version") else ""
    hb = r.get("heartbeat_age")
    queued, dropped, disk = r.get("outbox_queued"), r.get("outbox_dropped"), r.get("disk_pct")
    ast = r.get("asterisk_up")
    asterisk = (
        "—"
        if ast is None
        else ('<span class="ok">● up</span>' if ast else '<span class="bad">● down</span>')
    )
    cert = r.get("cert_days")
    alerts = r.get("open_alerts") or 0
    return (
        f'<tr class="row state-{state}" data-device="{dev}" data-state="{state}">'
        f'<td><a href="/devices/{quote(r["device_id"])}">{dev}</a>{version}</td>'
        f"<td>{escape(r['org']) if r.get('org') else '—'}</td>"
        f'<td><span class="badge {state}">{label}</span></td>'
        f'<td class="num{" warn" if hb and hb > age_warn else ""}">{age(hb)}</td>'
        f'<td class="num{" warn" if queued and queued > 1000 else ""}">{_num(queued)}</td>'
        f'<td class="num{" bad" if dropped else ""}">{_num(dropped)}</td>'
        f'<td class="num{" bad" if disk and disk >= 90 else ""}">{_num(disk, "{:.0f}%")}</td>'
        f'<td class="num">{_num(r.get("load1"), "{:.2f}")}</td>'
        f"<td>{asterisk}</td>"
        f'<td class="num{" bad" if cert is not None and cert < 14 else ""}">'
        f"{_num(None if cert is None else int(cert), '{} d')}</td>"
        f'<td class="num{" bad" if r.get("missing") else ""}">{r.get("missing") or 0}</td>'
        f'<td class="num">'
        f"{f'<span class=pill>{alerts}</span>' if alerts else '<span class=muted>0</span>'}</td>"
        "</tr>\n"
    )


def rows(items: list[dict[str, Any]], *, age_warn: float = DEFAULT_AGE_WARN) -> Markup:
    """Every row, or one saying that nothing matches."""
    if not items:
        return Markup('<tr><td colspan="12" class="empty">No device matches.</td></tr>')
    # S704: every value inside went through html.escape or is a number formatted here.
    return Markup("".join(row(r, age_warn=age_warn) for r in items))  # noqa: S704
