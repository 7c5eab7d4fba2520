"""A byte-counting TCP relay between a client and the broker.

Why it exists: the switch's promise is "after ``agentctl uplink off`` returns,
not one more byte goes to the vendor". Only something standing on the wire can
prove that; the relay counts every byte each way and every open connection,
and can wait (with a deadline) until the client has closed its connections.

It runs its own threads, so it works the same for synchronous tests, asyncio
tests and a daemon running in another process.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass
from types import TracebackType


@dataclass(frozen=True)
class Counts:
    """A consistent snapshot of the relay's counters."""

    up: int  # bytes received from clients (towards the broker)
    down: int  # bytes received from the broker (towards clients)
    open: int  # connections currently open
    accepted: int  # connections accepted since the relay started


class Relay:
    """Listen on a loopback port and forward each connection to ``target``."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(0.1)
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._cond = threading.Condition()
        self._up = 0
        self._down = 0
        self._open = 0
        self._accepted = 0
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="relay-accept", daemon=True)
        self._thread.start()

    # -- counters -------------------------------------------------------------

    def counts(self) -> Counts:
        """The counters, read together."""
        with self._cond:
            return Counts(self._up, self._down, self._open, self._accepted)

    @property
    def bytes_up(self) -> int:
        """Bytes the clients sent towards the broker."""
        return self.counts().up

    @property
    def bytes_down(self) -> int:
        """Bytes the broker sent towards the clients."""
        return self.counts().down

    @property
    def connections(self) -> int:
        """Connections open right now."""
        return self.counts().open

    def wait_connections(self, n: int, timeout: float = 5.0) -> bool:
        """Wait until exactly ``n`` connections are open; False when the deadline passes."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._open != n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """Wait until no connection is open; False when the deadline passes."""
        return self.wait_connections(0, timeout)

    def wait_up(self, at_least: int, timeout: float = 5.0) -> bool:
        """Wait until clients have sent at least ``at_least`` bytes in total."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._up < at_least:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    # -- control --------------------------------------------------------------

    def sever(self) -> None:
        """Cut every open connection abruptly (RST), as a network failure would."""
        with self._cond:
            pairs = list(self._pairs)
        for a, b in pairs:
            for s in (a, b):
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        """Stop accepting, cut every connection and join the threads."""
        self._stopping.set()
        self._thread.join(5.0)
        self._listener.close()
        self.sever()

    def __enter__(self) -> Relay:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- machinery ------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5.0)
            except OSError:
                client.close()  # the broker is down: the client sees a refused session
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                self._open += 1
                self._accepted += 1
                self._pairs.append((client, upstream))
                self._cond.notify_all()
            pumps_left = [2]  # the last pump to finish closes the pair
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(
                    target=self._pump,
                    args=(src, dst, up, (client, upstream), pumps_left),
                    name="relay-up" if up else "relay-down",
                    daemon=True,
                ).start()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        up: bool,
        pair: tuple[socket.socket, socket.socket],
        pumps_left: list[int],
    ) -> None:
        # Count what arrives from the source before forwarding: the promise is
        # about what the client sends, whether or not the other side takes it.
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._cond:
                    if up:
                        self._up += len(data)
                    else:
                        self._down += len(data)
                    self._cond.notify_all()
                dst.sendall(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)  # pass the end of stream on, as TCP would
        except OSError:
            pass
        with self._cond:
            pumps_left[0] -= 1
            if pumps_left[0]:
                return
            for s in pair:
                s.close()
            self._open -= 1
            self._pairs.remove(pair)
            self._cond.notify_all()
