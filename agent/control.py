"""The local control socket: newline-delimited JSON between ``agentctl`` and the daemon.

A request is one line ``{"cmd": NAME, ...args}``; the reply is one line
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": TEXT, "code": CODE}``.
Who is asking is read from the kernel (``SO_PEERCRED``), never from the
request: members of the read group may ask for status; changes need root, the
daemon's own user, or a member of the admin group. A malformed, oversized or
unknown request gets an error reply; it never takes the daemon down.

The server half runs in the daemon (asyncio). The client half is plain
blocking sockets, so that ``agentctl status`` does not pay for importing asyncio.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from agent.errors import ControlError, DaemonNotRunning, PermissionDenied

if TYPE_CHECKING:
    import asyncio

PROTOCOL_VERSION = 1
CLIENT_TIMEOUT = 10.0


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
        except KeyError:
            pass  # a uid with no passwd entry has only its primary group
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


class RequestError(Exception):
    """A request the server answers with an error reply (internal to this module's users)."""

    def __init__(self, message: str, code: str = "bad-request") -> None:
        super().__init__(message)
        self.code = code


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
    ) -> None:
        self.path = path
        self.read_gid = group_id(read_group)
        self.admin_gid = group_id(admin_group)
        self.max_request = max_request
        self.routes: dict[str, Route] = {}
        self.log = log
        self._server: asyncio.Server | None = None

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
            return True
        return self.admin_gid is not None and self.admin_gid in peer.groups()

    async def start(self) -> None:
        """Bind the socket (replacing a stale one) and start serving."""
        import asyncio

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        old_umask = os.umask(0o117)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=self.max_request
            )
        finally:
            os.umask(old_umask)
        # The group that may read status must be able to connect; everyone else may not.
        if self.read_gid is not None:
            try:
                os.chown(self.path, -1, self.read_gid)
            except PermissionError:
                self.log.warning(
                    "control_socket_chgrp_failed", path=str(self.path), group_id=self.read_gid
                )
        os.chmod(self.path, 0o660)

    async def close(self) -> None:
        """Stop serving and remove the socket."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio

        sock = writer.get_extra_info("socket")
        peer = peer_of(sock)
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), timeout=30)
                except (asyncio.LimitOverrunError, ValueError):
                    await self._reply(
                        writer,
                        _error(f"request too large (limit {self.max_request} bytes)", "too-large"),
                    )
                    break
                except TimeoutError:
                    break
                if not line:
                    break
                reply = await self._dispatch(line, peer)
                await self._reply(writer, reply)
        except (ConnectionError, BrokenPipeError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, BrokenPipeError):
                pass

    async def _reply(self, writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        writer.write(json.dumps(reply, default=str).encode() + b"\n")
        await writer.drain()

    async def _dispatch(self, line: bytes, peer: Peer) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _error(f"request is not JSON: {exc}", "bad-request")
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return _error('request must be an object with a "cmd" string', "bad-request")
        name = request["cmd"]
        route = self.routes.get(name)
        if route is None:
            return _error(
                f"unknown command {name[:64]!r} (known: {', '.join(sorted(self.routes))})",
                "unknown-command",
            )
        allowed = self.may_change(peer) if route.admin else self.may_read(peer)
        if not allowed:
            self.log.warning("control_denied", cmd=name, uid=peer.uid, pid=peer.pid)
            need = "root or the admin group" if route.admin else "the agent's read group"
            return _error(
                f"{name}: permission denied for uid {peer.uid}; needs {need}", "permission"
            )
        try:
            result = await route.handler(request, peer)
        except RequestError as exc:
            return _error(str(exc), exc.code)
        except ControlError as exc:
            return _error(str(exc), "failed")
        return {"ok": True, "result": result}


def _error(message: str, code: str) -> dict[str, Any]:
    return {"ok": False, "error": message, "code": code}


def request(path: Path, cmd: str, timeout: float = CLIENT_TIMEOUT, **args: Any) -> Any:
    """Send one request to the daemon and return its result; raises on an error reply."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunning(
                f"the daemon is not running (nothing listens on {path})"
            ) from exc
        except PermissionError as exc:
            raise PermissionDenied(
                f"cannot connect to {path}: permission denied; run as root or as a member of "
                "the agent's group"
            ) from exc
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ControlError(f"the daemon closed the connection on {path} without a reply")
            buf += chunk
    except TimeoutError as exc:
        raise ControlError(f"the daemon did not answer within {timeout:g} s on {path}") from exc
    finally:
        sock.close()
    reply = json.loads(buf)
    if not reply.get("ok"):
        if reply.get("code") == "permission":
            raise PermissionDenied(reply.get("error", "permission denied"))
        raise ControlError(reply.get("error", "the daemon refused the request"))
    return reply.get("result")
