"""What a CDR row is, as Asterisk writes it, and the few fields we keep of it.

``cdr_csv`` (Asterisk ``cdr/cdr_csv.c``, ``build_csv_record``) writes one line
per call to ``Master.csv``: every string field in double quotes with inner
quotes doubled, the three times as quoted ``%Y-%m-%d %T`` in the box's local
time (UTC when ``cdr.conf [csv] usegmtime=yes``), an unset time as an empty
unquoted field, duration and billsec as bare integers, then ``uniqueid`` and
``userfield`` only when ``loguniqueid``/``loguserfield`` are on. So a good row
has 16, 17 or 18 columns, in this order::

    accountcode, src, dst, dcontext, clid, channel, dstchannel, lastapp,
    lastdata, start, answer, end, duration, billsec, disposition, amaflags,
    [uniqueid], [userfield]

Of those, the counters need only the destination context and the two channel
names (to decide direction and trunk, then forgotten), the start and end times,
duration, billsec and disposition. Numbers, caller names, account codes,
unique ids and user fields are never copied out of the row.
"""

from __future__ import annotations

import calendar
import enum
import time
from typing import Final

COLUMNS: Final = (
    "accountcode",
    "src",
    "dst",
    "dcontext",
    "clid",
    "channel",
    "dstchannel",
    "lastapp",
    "lastdata",
    "start",
    "answer",
    "end",
    "duration",
    "billsec",
    "disposition",
    "amaflags",
)
OPTIONAL_COLUMNS: Final = ("uniqueid", "userfield")
MIN_COLUMNS: Final = len(COLUMNS)
MAX_COLUMNS: Final = len(COLUMNS) + len(OPTIONAL_COLUMNS)

I_DCONTEXT: Final = 3
I_CHANNEL: Final = 5
I_DSTCHANNEL: Final = 6
I_START: Final = 9
I_END: Final = 11
I_DURATION: Final = 12
I_BILLSEC: Final = 13
I_DISPOSITION: Final = 14

#: The ``:MM:SS`` end of a ``%T`` time (second 60: a leap second) → seconds into the hour.
#: One look-up both validates and converts it; 3,660 entries.
MINUTE_SECONDS: Final = {
    f":{m:02d}:{sec:02d}": m * 60 + sec for m in range(60) for sec in range(61)
}

#: ast_cdr_disp2str's values; anything else is counted as OTHER.
DISPOSITIONS: Final = ("ANSWERED", "NO ANSWER", "BUSY", "FAILED", "CONGESTION")
ANSWERED: Final = "ANSWERED"


class Skip(enum.StrEnum):
    """Why a row was not counted. Each reason has its own counter in status."""

    COLUMNS = "wrong_column_count"
    DATE = "bad_date"
    NUMBER = "bad_number"
    ENCODING = "non_utf8"
    NEGATIVE = "negative_duration"
    TOO_OLD = "too_old"
    REFUSED = "bucket_refused"


class DateParser:
    """``"2024-05-01 10:05:07"`` → seconds since the epoch, fast.

    ``time.strptime`` costs several microseconds a call, more than everything
    else a row needs. A CDR file holds few distinct hours, so the epoch of each
    ``YYYY-MM-DD HH`` prefix is computed once (through ``mktime`` in the box's
    time zone, or ``timegm`` for ``usegmtime``) and kept in :attr:`hours`; the
    ``:MM:SS`` rest is one look-up in :data:`MINUTE_SECONDS`.
    """

    __slots__ = ("_utc", "hours")

    def __init__(self, *, utc: bool) -> None:
        self._utc = utc
        #: ``YYYY-MM-DD HH`` → epoch, for the hot loop (see :meth:`hour_epoch`).
        self.hours: dict[str, int] = {}

    def hour_epoch(self, prefix: str) -> int:
        """The epoch of ``YYYY-MM-DD HH`` (cached); ValueError when it is not a valid hour."""
        t = self.hours.get(prefix)
        if t is not None:
            return t
        bad = ValueError(f"not a %Y-%m-%d %H hour: {prefix!r}")
        if len(prefix) != 13 or prefix[4] != "-" or prefix[7] != "-" or prefix[10] != " ":
            raise bad
        digits = prefix[0:4] + prefix[5:7] + prefix[8:10] + prefix[11:13]
        if not (digits.isascii() and digits.isdigit()):
            raise bad
        y, mo, d, h = int(prefix[0:4]), int(prefix[5:7]), int(prefix[8:10]), int(prefix[11:13])
        if not (1970 <= y <= 9999 and 1 <= mo <= 12 and 0 <= h <= 23):
            raise bad
        if not 1 <= d <= calendar.monthrange(y, mo)[1]:
            raise bad
        tup = (y, mo, d, h, 0, 0, 0, 0, -1)
        t = calendar.timegm(tup) if self._utc else int(time.mktime(tup))
        # CDRs arrive in time order, so a cleared cache refills at once; the bound keeps
        # memory flat on a file spanning more than ten years of hours.
        if len(self.hours) > 100_000:
            self.hours.clear()
        self.hours[prefix] = t
        return t

    def __call__(self, s: str) -> int:
        """Parse one ``%Y-%m-%d %T`` time; ValueError when it is not one."""
        rest = MINUTE_SECONDS.get(s[13:])
        if rest is None:
            raise ValueError(f"not a %Y-%m-%d %H:%M:%S time: {s!r}")
        return self.hour_epoch(s[:13]) + rest
