"""The systemd notify protocol: READY=1, STATUS=, WATCHDOG=1, STOPPING=1.

systemd-python's ``daemon.notify`` is used where it is installed; otherwise we
speak the protocol ourselves, which is one datagram to ``$NOTIFY_SOCKET`` (a
leading ``@`` names an abstract socket). Outside systemd every call is a no-op.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable


def _native() -> Callable[[str], object] | None:
    try:
        from systemd import daemon  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return None
    notify: Callable[[str], object] = daemon.notify
    return notify


class Notifier:
    """Sends state changes to the service manager, if there is one."""

    def __init__(self) -> None:
        self._address = os.environ.get("NOTIFY_SOCKET") or None
        self._native = _native() if self._address else None
        self._sock: socket.socket | None = None
        self._stopping = False

    @property
    def enabled(self) -> bool:
        """Whether a service manager is listening."""
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when unset."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 1e6 / 2
        except ValueError:
            return None

    def notify(self, message: str) -> None:
        """Send one notification such as ``READY=1`` or ``STATUS=...``."""
        if self._address is None:
            return
        if self._native is not None:
            self._native(message)
            return
        address = self._address
        if address.startswith("@"):
            address = "\0" + address[1:]
        if self._sock is None:
            # Non-blocking: a manager that does not read must never stall the event loop.
            self._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
        try:
            self._sock.sendto(message.encode(), address)
        except OSError:
            # The manager went away or its queue is full: a lost STATUS= line is harmless,
            # and a missed WATCHDOG=1 is followed by the next one.
            pass

    def ready(self, status: str = "") -> None:
        """Tell systemd we are up."""
        self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, status: str) -> None:
        """Update the one-line status shown by ``systemctl status``."""
        self.notify(f"STATUS={status}")

    def reloading(self) -> None:
        """Announce a configuration reload."""
        self.notify("RELOADING=1")

    def watchdog(self) -> None:
        """Keep the watchdog from firing."""
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        """Announce the shutdown, once: as it begins, or on the way out if it began otherwise."""
        if not self._stopping:
            self._stopping = True
            self.notify("STOPPING=1")

    def close(self) -> None:
        """Close the notify socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
