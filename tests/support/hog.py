"""A hostile local client: holds as many idle control connections as it can, and keeps trying.

Why it exists: any member of the read group may connect to the control socket;
one that opens connections and never speaks must not starve the daemon of
descriptors or keep root from being answered. :class:`Hog` forks a child that
drops to that member's uid and gid for real (as ``tests/test_daemon.py`` does
for agentctl), raises its own descriptor limit, and opens ``count``
connections without sending a byte. It reports what happened (opened, refused
at connect, closed by the daemon) and, with ``churn``, reopens every
connection the daemon closes, as an attacker who reconnects at once would.
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import socket
import time
from pathlib import Path
from typing import Any

CONNECT_TIMEOUT = 2.0


def _connect(path: str) -> socket.socket | None:
    """One connection, retried while the listen backlog is full (EAGAIN), for a while."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            if time.monotonic() > deadline:
                return None
            time.sleep(0.001)
            continue
        except OSError:
            s.close()
            return None
        return s


def _hold(path: str, count: int, churn: float, report: int, stop: int) -> None:
    """The child's work: open, report, churn, hold until ``stop`` reaches end of file."""
    sel = selectors.DefaultSelector()
    stats = {"opened": 0, "refused": 0, "closed_by_daemon": 0, "reopened": 0, "open_now": 0}

    def say() -> None:
        stats["open_now"] = len(sel.get_map()) - 1
        os.write(report, json.dumps(stats).encode() + b"\n")

    sel.register(stop, selectors.EVENT_READ)
    for _ in range(count):
        s = _connect(path)
        if s is None:
            stats["refused"] += 1
            continue
        stats["opened"] += 1
        sel.register(s, selectors.EVENT_READ)

    def watch(until: float, reopen: bool) -> bool:
        """Count the connections the daemon closes until ``until``; False once told to stop."""
        while time.monotonic() < until:
            for key, _ in sel.select(timeout=0.05):
                if key.fileobj == stop:
                    return False
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    continue  # a refusal line; the end of the connection follows
                sel.unregister(sock)
                sock.close()
                stats["closed_by_daemon"] += 1
                if reopen:
                    again = _connect(path)
                    if again is None:
                        stats["refused"] += 1
                    else:
                        stats["reopened"] += 1
                        sel.register(again, selectors.EVENT_READ)
        return True

    watch(time.monotonic() + 1.0, reopen=False)  # refusals at accept come at once
    say()
    if churn > 0:
        # Back up to ``count`` at once, and every closed connection reopened as it closes:
        # a reconnect storm against the limits.
        for _ in range(count - (len(sel.get_map()) - 1)):
            again = _connect(path)
            if again is None:
                stats["refused"] += 1
            else:
                stats["reopened"] += 1
                sel.register(again, selectors.EVENT_READ)
        if watch(time.monotonic() + churn, reopen=True):
            say()
    while watch(time.monotonic() + 3600, reopen=False):
        pass


class Hog:
    """A forked child holding idle connections to ``path`` as ``uid``/``gid``."""

    def __init__(self, path: Path, count: int, *, uid: int, gid: int, churn: float = 0.0) -> None:
        self.path = path
        self.count = count
        self.uid = uid
        self.gid = gid
        self.churn = churn
        self.pid: int | None = None
        self._report: Any = None
        self._stop: int | None = None

    def start(self, timeout: float = 60.0) -> dict[str, int]:
        """Fork, open the connections; return the first report."""
        report_r, report_w = os.pipe()
        stop_r, stop_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: become the unprivileged member, then misbehave
            code = 70
            try:
                os.close(report_r)
                os.close(stop_w)
                _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                want = max(hard, self.count + 64)
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
                os.setgroups([])
                os.setgid(self.gid)
                os.setuid(self.uid)
                _hold(str(self.path), self.count, self.churn, report_w, stop_r)
                code = 0
            finally:
                os._exit(code)
        os.close(report_w)
        os.close(stop_r)
        self.pid = pid
        self._stop = stop_w
        self._report = os.fdopen(report_r, "r")
        return self.next_report(timeout)

    def next_report(self, timeout: float = 60.0) -> dict[str, int]:
        """The child's next report line."""
        sel = selectors.DefaultSelector()
        sel.register(self._report, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"the hog did not report within {timeout} s")
        line = self._report.readline()
        if not line:
            raise AssertionError("the hog exited without a report")
        result: dict[str, int] = json.loads(line)
        return result

    def stop(self) -> None:
        """Tell the child to close everything and exit; reap it."""
        if self._stop is not None:
            os.close(self._stop)
            self._stop = None
        if self.pid is not None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                done, _ = os.waitpid(self.pid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.02)
            else:
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
            self.pid = None
        if self._report is not None:
            self._report.close()
            self._report = None

    def __enter__(self) -> Hog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
