"""The local control socket: newline-delimited JSON between ``agentctl`` and the daemon.

A request is one line ``{"cmd": NAME, ...args}``; the reply is one line
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": TEXT, "code": CODE,
"exit": N}``, where ``exit`` is the sysexits status ``agentctl`` ends with.
Who is asking is read from the kernel (``SO_PEERCRED``), never from the
request: members of the read group may ask for status; changes need root, the
daemon's own user, or a member of the admin group. A malformed, oversized or
unknown request gets an error reply, and so does any error a handler raises;
nothing a client sends takes the daemon down or ends its connection without
an answer.

Connections are bounded, because anyone in the read group can open them:
those who may only read get at most :attr:`Limits.per_uid` each and
:attr:`Limits.total` together; root, the daemon's user and the admin group
have :attr:`Limits.reserve` more on top, so ``agentctl status`` as root is
answered while the read group is full. A connection over its limit gets a
``busy`` reply (exit 75) and is closed at once. The limits sit well below the
descriptor limit (``LimitNOFILE=`` in the unit); should ``accept()`` fail
anyway (EMFILE, ENFILE), accepting pauses briefly and that is logged once.
Idle connections are closed after 30 s, or after 2 s while the server is under
pressure. Refusals are counted in status and logged at most once per interval.

The server half runs in the daemon (asyncio). The client half is plain
blocking sockets, so that ``agentctl status`` does not pay for importing asyncio.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import resource
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from agent import strictjson
from agent.errors import (
    EX_NOPERM,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    AgentError,
    ControlError,
    DaemonNotRunning,
    DaemonRefused,
    MalformedJSON,
    PermissionDenied,
    RequestRefused,
)
from agent.logs import Throttle

if TYPE_CHECKING:
    import asyncio

PROTOCOL_VERSION = 1
CLIENT_TIMEOUT = 10.0
MAX_REQUEST_DEPTH = 8  # a request is one flat object; room for arguments, not for recursion
LISTEN_BACKLOG = 128
ACCEPT_BATCH = 64  # connections taken per wake-up, so that one burst cannot hog the loop
ACCEPT_PAUSE = 0.5  # seconds without accepting after EMFILE/ENFILE
WRITE_TIMEOUT = 5.0  # a client that does not read its reply is dropped after this
SWEEP_INTERVAL = 0.5
PRESSURE_WINDOW = 10.0  # seconds a refusal keeps the server "under pressure"

# The exit status (sysexits) each error code of a reply stands for.
EXIT_OF_CODE = {
    "bad-request": EX_USAGE,
    "unknown-command": EX_USAGE,
    "too-large": EX_USAGE,
    "permission": EX_NOPERM,
    "busy": EX_TEMPFAIL,
    "internal": EX_SOFTWARE,
}


class Peer(NamedTuple):
    """The process at the other end of the socket, as the kernel reports it."""

    pid: int
    uid: int
    gid: int

    def groups(self) -> set[int]:
        """The peer's primary and supplementary group ids (from the user database)."""
        gids = {self.gid}
        try:
            name = pwd.getpwuid(self.uid).pw_name
            gids.update(os.getgrouplist(name, self.gid))
        except (KeyError, OSError):
            pass  # no passwd entry (or no descriptor to read it): only the primary group
        return gids


def peer_of(sock: socket.socket) -> Peer:
    """Read SO_PEERCRED from a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


def group_id(name: str | None) -> int | None:
    """The gid of a group name, or None when unset or unknown on this system."""
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


Handler = Callable[[dict[str, Any], Peer], Awaitable[Any]]


class Route(NamedTuple):
    """A control command: its handler and whether it changes anything."""

    handler: Handler
    admin: bool


@dataclass(frozen=True, kw_only=True)
class Limits:
    """How many control connections the server holds, and for how long when idle."""

    total: int = 64  # from peers who may only read, together
    per_uid: int = 8  # from any one such uid
    reserve: int = 16  # more, for root, the daemon's user and the admin group only
    idle: float = 30.0  # seconds a connection may take to send its request
    idle_under_pressure: float = 2.0

    @classmethod
    def for_descriptors(cls, nofile: int) -> Limits:
        """Defaults, shrunk so that the socket never holds more than a quarter of ``nofile``.

        The rest is the daemon's: SQLite and its journal, the MQTT connection, the
        collectors' files, the CDR database, a snapshot's walk.
        """
        budget = max(nofile // 4, 6)
        reserve = min(cls.reserve, max(2, budget // 4))
        total = min(cls.total, budget - reserve)
        return cls(total=total, per_uid=min(cls.per_uid, total), reserve=reserve)


@dataclass(eq=False)
class _Conn:
    """One open control connection."""

    peer: Peer
    privileged: bool
    transport: asyncio.WriteTransport | None = None
    waiting_since: float | None = field(default_factory=time.monotonic)


class ControlServer:
    """Serves the control socket for the daemon."""

    def __init__(
        self,
        path: Path,
        *,
        read_group: str | None,
        admin_group: str | None,
        max_request: int,
        log: Any,
        limits: Limits | None = None,
    ) -> None:
        self.path = path
        self.read_gid = group_id(read_group)
        self.admin_gid = group_id(admin_group)
        self.max_request = max_request
        self.routes: dict[str, Route] = {}
        self.log = log
        self.limits = limits or Limits.for_descriptors(
            resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        )
        self.refused: Counter[str] = Counter()  # by reason: per-uid, total, reserve
        self.timed_out = 0
        self.accept_pauses = 0
        self.failed_requests = 0  # handlers that raised something other than AgentError
        self._conns: set[_Conn] = set()
        self._per_uid: Counter[int] = Counter()
        self._last_refusal = -PRESSURE_WINDOW
        self._quiet = Throttle()
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        import asyncio  # the server's alone: agentctl's client side never loads asyncio

        self._open = asyncio.Event()  # set when a connection is accepted: the sweeper wakes
        self._resume: asyncio.TimerHandle | None = None

    def route(self, name: str, handler: Handler, *, admin: bool) -> None:
        """Register a command."""
        self.routes[name] = Route(handler, admin)

    def may_read(self, peer: Peer) -> bool:
        """Whether the peer may read status."""
        if self.may_change(peer):
            return True
        return self.read_gid is not None and self.read_gid in peer.groups()

    def may_change(self, peer: Peer) -> bool:
        """Whether the peer may change anything (switch, support windows)."""
        if peer.uid in (0, os.geteuid()):
            return True  # decided without a look-up: works with no descriptor to spare
        return self.admin_gid is not None and self.admin_gid in peer.groups()

    def stats(self) -> dict[str, Any]:
        """Connections, limits and refusals, for status."""
        return {
            "connections": len(self._conns),
            "limits": {
                "total": self.limits.total,
                "per_uid": self.limits.per_uid,
                "reserve": self.limits.reserve,
            },
            "under_pressure": self._under_pressure(),
            "refused": dict(self.refused),
            "timed_out": self.timed_out,
            "accept_pauses": self.accept_pauses,
            "failed_requests": self.failed_requests,
        }

    # -- serving -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the socket (replacing a stale one) and start serving."""
        import asyncio

        self._loop = asyncio.get_running_loop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o117)
        try:
            sock.bind(str(self.path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        self._sock = sock
        # The group that may read status must be able to connect; everyone else may not.
        if self.read_gid is not None:
            try:
                os.chown(self.path, -1, self.read_gid)
            except PermissionError:
                self.log.warning(
                    "control_socket_chgrp_failed", path=str(self.path), group_id=self.read_gid
                )
        os.chmod(self.path, 0o660)
        self._loop.add_reader(sock.fileno(), self._accept)
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="control-sweeper")

    async def close(self) -> None:
        """Stop serving, close every connection and remove the socket."""
        from agent.aio import cancel_and_wait

        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._sweeper is not None:
            await cancel_and_wait(self._sweeper)
            self._sweeper = None
        for task in list(self._tasks):
            await cancel_and_wait(task, 1.0)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _accept(self) -> None:
        """The listening socket is readable: take a batch of connections."""
        assert self._sock is not None and self._loop is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting(exc)
                    return
                if exc.errno == errno.ECONNABORTED:
                    continue
                self._note("control_accept_failed", error=str(exc))
                return
            self._admit(conn)

    def _pause_accepting(self, exc: OSError) -> None:
        """Out of descriptors: stop accepting for a moment instead of spinning on the error."""
        assert self._sock is not None and self._loop is not None
        self.accept_pauses += 1
        self._loop.remove_reader(self._sock.fileno())
        # Idle connections, anyone's, are the descriptors we can give back.
        self._sweep(pressed=True, everyone=True)
        self._note(
            "control_accept_paused",
            error=errno.errorcode.get(exc.errno or 0, str(exc)),
            pause=ACCEPT_PAUSE,
            connections=len(self._conns),
            pauses=self.accept_pauses,
        )

        def resume() -> None:
            self._resume = None
            if self._sock is not None and self._loop is not None:
                self._loop.add_reader(self._sock.fileno(), self._accept)

        self._resume = self._loop.call_later(ACCEPT_PAUSE, resume)

    def _admit(self, conn: socket.socket) -> None:
        """Check a new connection against the limits; serve it or refuse it at once."""
        import asyncio

        try:
            conn.setblocking(False)
            peer = peer_of(conn)
        except OSError:
            conn.close()
            return
        privileged = self.may_change(peer)
        reason = self._over_limit(peer, privileged)
        if reason is not None:
            self._refuse(conn, peer, reason)
            return
        record = _Conn(peer, privileged)
        self._conns.add(record)
        self._open.set()
        if not privileged:
            self._per_uid[peer.uid] += 1
        task = asyncio.ensure_future(self._serve(conn, record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _over_limit(self, peer: Peer, privileged: bool) -> str | None:
        lim = self.limits
        if privileged:
            return "reserve" if len(self._conns) >= lim.total + lim.reserve else None
        if self._per_uid[peer.uid] >= lim.per_uid:
            return "per-uid"
        if len(self._conns) - self._privileged_count() >= lim.total:
            return "total"
        return None

    def _privileged_count(self) -> int:
        return sum(1 for c in self._conns if c.privileged)

    def _refuse(self, conn: socket.socket, peer: Peer, reason: str) -> None:
        self.refused[reason] += 1
        self._last_refusal = time.monotonic()
        lim = self.limits
        limit = {"per-uid": lim.per_uid, "total": lim.total}.get(reason, lim.total + lim.reserve)
        message = (
            f"the daemon is busy: too many control connections ({reason} limit {limit}); try again"
        )
        try:
            conn.send(_encode(_error(message, "busy")))  # a few bytes: fits the empty buffer
        except OSError:
            pass
        conn.close()
        self._sweep(pressed=True)
        self._note(
            "control_connection_refused",
            uid=peer.uid,
            reason=reason,
            refused=sum(self.refused.values()),
            connections=len(self._conns),
        )

    async def _serve(self, conn: socket.socket, record: _Conn) -> None:
        import asyncio

        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn, limit=self.max_request)
            record.transport = writer.transport
            while True:
                record.waiting_since = time.monotonic()
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    message = f"request too large (limit {self.max_request} bytes)"
                    await self._reply(writer, _error(message, "too-large"))
                    break
                record.waiting_since = None
                if not line or writer.transport.is_closing():
                    break  # the client left, or the sweep closed it mid-request
                reply = await self._dispatch(line, record.peer)
                await self._reply(writer, reply)
        except (ConnectionError, TimeoutError):
            pass  # the client went away, or would not read its reply
        except Exception as exc:  # a bug: answer no more on this connection, log it once
            self.failed_requests += 1
            self._note("control_connection_failed", error=repr(exc), exc_info=True)
        finally:
            self._conns.discard(record)
            if not record.privileged:
                self._per_uid[record.peer.uid] -= 1
                if self._per_uid[record.peer.uid] <= 0:
                    del self._per_uid[record.peer.uid]
            if writer is not None:
                writer.transport.abort()
            else:
                conn.close()

    async def _reply(self, writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        import asyncio

        writer.write(_encode(reply))
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()

    async def _dispatch(self, line: bytes, peer: Peer) -> dict[str, Any]:
        try:
            request = strictjson.loads(line, max_depth=MAX_REQUEST_DEPTH)
        except MalformedJSON as exc:
            return _error(f"request is not acceptable JSON: {exc}", "bad-request")
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return _error('request must be an object with a "cmd" string', "bad-request")
        name = strictjson.printable(request["cmd"])
        route = self.routes.get(request["cmd"])
        if route is None:
            return _error(
                f"unknown command {name!r} (known: {', '.join(sorted(self.routes))})",
                "unknown-command",
            )
        allowed = self.may_change(peer) if route.admin else self.may_read(peer)
        if not allowed:
            self._note("control_denied", cmd=name, uid=peer.uid, pid=peer.pid)
            need = "root or the admin group" if route.admin else "the agent's read group"
            return _error(
                f"{name}: permission denied for uid {peer.uid}; needs {need}", "permission"
            )
        try:
            result = await route.handler(request, peer)
        except RequestRefused as exc:
            return _error(str(exc), exc.code)
        except AgentError as exc:
            return _error(str(exc), "failed", exit_code=exc.exit_code)
        except Exception as exc:  # a bug reached by a request: answer, and log it once
            self.failed_requests += 1
            self._note("control_request_failed", cmd=name, error=repr(exc), exc_info=True)
            return _error(
                f"{name}: internal error ({type(exc).__name__}); the daemon's log has details",
                "internal",
            )
        return {"ok": True, "result": result}

    # -- idle connections ------------------------------------------------------------------

    def _under_pressure(self) -> bool:
        recent = time.monotonic() - self._last_refusal < PRESSURE_WINDOW
        return recent or len(self._conns) >= self.limits.total // 2

    async def _sweep_loop(self) -> None:
        import asyncio

        while True:
            if not self._conns:
                # Nothing to sweep: sleep until a connection comes, not twice a second
                # for the daemon's whole idle life (issue 17).
                self._open.clear()
                await self._open.wait()
            await asyncio.sleep(SWEEP_INTERVAL)
            self._sweep()

    def _sweep(self, *, pressed: bool = False, everyone: bool = False) -> None:
        """Close connections idle past the limit, shorter under pressure.

        Under pressure the shorter limit applies to those who may only read; when
        descriptors have run out (``everyone``), to every connection.
        """
        pressed = pressed or self._under_pressure()
        now = time.monotonic()
        for record in list(self._conns):
            since = record.waiting_since
            if since is None or record.transport is None:
                continue
            idle = self.limits.idle
            if pressed and (everyone or not record.privileged):
                idle = self.limits.idle_under_pressure
            if now - since >= idle:
                self.timed_out += 1
                record.waiting_since = None
                record.transport.abort()  # the reader sees the end; _serve cleans up

    def _note(self, event: str, *, exc_info: bool = False, **fields: Any) -> None:
        """Log ``event`` at most once per interval, saying how many were held back."""
        held = self._quiet.admit(event)
        if held is not None:
            self.log.warning(event, not_logged_since_last=held, exc_info=exc_info, **fields)


def _error(message: str, code: str, *, exit_code: int | None = None) -> dict[str, Any]:
    exit_status = exit_code if exit_code is not None else EXIT_OF_CODE.get(code, EX_SOFTWARE)
    return {"ok": False, "error": message, "code": code, "exit": exit_status}


def _encode(reply: dict[str, Any]) -> bytes:
    try:
        return json.dumps(reply, default=str).encode() + b"\n"
    except (TypeError, ValueError, RecursionError) as exc:
        fallback = _error(f"the reply could not be encoded ({type(exc).__name__})", "internal")
        return json.dumps(fallback).encode() + b"\n"


def request(path: Path, cmd: str, timeout: float = CLIENT_TIMEOUT, **args: Any) -> Any:
    """Send one request to the daemon and return its result; raises on an error reply.

    An error reply raises :class:`PermissionDenied` (exit 77) or
    :class:`DaemonRefused` carrying the exit status the daemon named.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        try:
            while True:
                try:
                    sock.connect(str(path))
                    break
                except BlockingIOError:
                    # The listen backlog is full (a Unix socket says EAGAIN rather than
                    # waiting when a timeout is set): the daemon is busy accepting.
                    if time.monotonic() > deadline:
                        raise TimeoutError from None
                    time.sleep(0.005)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunning(
                f"the daemon is not running (nothing listens on {path})"
            ) from exc
        except PermissionError as exc:
            raise PermissionDenied(
                f"cannot connect to {path}: permission denied; run as root or as a member of "
                "the agent's group"
            ) from exc
        try:
            sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused at once (busy): its reply may still be waiting to be read
        buf = bytearray()
        while not buf.endswith(b"\n"):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise ControlError(f"the daemon closed the connection on {path} without a reply")
            buf += chunk
    except TimeoutError as exc:
        raise ControlError(f"the daemon did not answer within {timeout:g} s on {path}") from exc
    finally:
        sock.close()
    try:
        reply = json.loads(buf)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise ControlError(f"the daemon's reply on {path} is not a JSON object")
    if not reply.get("ok"):
        message = str(reply.get("error") or "the daemon refused the request")
        code = str(reply.get("code") or "failed")
        if code == "permission":
            raise PermissionDenied(message)
        exit_code = reply.get("exit")
        if type(exit_code) is not int or not 0 < exit_code < 126:
            exit_code = EX_UNAVAILABLE  # a daemon from before replies named their status
        raise DaemonRefused(message, code=code, exit_code=exit_code)
    return reply.get("result")
