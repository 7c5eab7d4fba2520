"""One exception hierarchy for the agent.

Every error the agent raises on purpose derives from :class:`AgentError` and
carries a message a person can act on. Errors of the libraries we use
(sqlite3, paho-mqtt, paramiko, OSError) are translated where they enter, with
``raise ... from exc``, so no other layer needs to import them.

::

    AgentError
    ├── ConfigError            bad configuration: names file, key path, line (exit 78)
    ├── StateError             state directory, switch file, outbox or ledger unusable
    │   └── StateLocked        another daemon holds the state directory's lock (exit 75)
    ├── ControlError           talking to the daemon over the control socket failed
    │   ├── DaemonNotRunning   no daemon is listening on the socket (exit 69)
    │   ├── PermissionDenied   peer credentials do not allow the request (exit 77)
    │   └── DaemonRefused      the daemon answered with an error (exit: the code it named)
    ├── PolicyError            a record the gate must refuse (class denied, switch off)
    ├── CollectorError         a collector could not gather (source missing, unreadable)
    └── UplinkError            the uplink could not be set up or used
        ├── TLSMaterialError   key/cert/CA unusable: loose permissions, expired, mismatch
        ├── BrokerRefused      the broker refused us (certificate, ACL, protocol)
        └── SupportError       remote support refused (no window, wrong ticket, switch off)
            │                  or failed (bastion unreachable, key refused, forward refused)
            └── HostKeyMismatch  the bastion showed a host key other than the pinned one
"""

from __future__ import annotations

import os

# sysexits(3): the codes systemd's RestartPreventExitStatus= and scripts rely on.
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""

    exit_code: int = EX_SOFTWARE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(AgentError):
    """The configuration cannot be used. Each problem names file, key path and line."""

    exit_code = EX_CONFIG

    def __init__(self, problems: list[ConfigProblem] | ConfigProblem) -> None:
        self.problems = problems if isinstance(problems, list) else [problems]
        super().__init__("\n".join(str(p) for p in self.problems))


class ConfigProblem:
    """One thing wrong in a configuration file, located as precisely as we know."""

    __slots__ = ("file", "key", "line", "reason")

    def __init__(
        self, file: str | os.PathLike[str], key: str, reason: str, line: int | None = None
    ):
        self.file = os.fspath(file)
        self.key = key
        self.reason = reason
        self.line = line

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.key}: {self.reason}" if self.key else f"{where}: {self.reason}"

    def __repr__(self) -> str:
        return f"ConfigProblem({self!s})"


class StateError(AgentError):
    """The state directory or a file in it cannot be used."""

    exit_code = EX_CANTCREAT


class StateLocked(StateError):
    """Another daemon holds the state directory: try again once it has stopped."""

    exit_code = EX_TEMPFAIL


class ControlError(AgentError):
    """The control socket conversation failed."""

    exit_code = EX_UNAVAILABLE


class DaemonNotRunning(ControlError):
    """Nothing answers on the control socket."""

    exit_code = EX_UNAVAILABLE


class PermissionDenied(ControlError):
    """The caller's credentials do not allow the request."""

    exit_code = EX_NOPERM


class DaemonRefused(ControlError):
    """The daemon answered a control request with an error, naming its exit status.

    A ``StateError`` raised in the daemon (73) reaches ``agentctl``'s exit status
    as 73, not as a generic "unavailable".
    """

    def __init__(self, message: str, *, code: str, exit_code: int) -> None:
        super().__init__(message)
        self.code = code
        self.exit_code = exit_code


class PolicyError(AgentError):
    """The gate refused a record."""

    exit_code = EX_DATAERR


class CollectorError(AgentError):
    """A collector could not gather its data."""

    exit_code = EX_UNAVAILABLE


class UplinkError(AgentError):
    """The uplink could not be set up or used."""

    exit_code = EX_UNAVAILABLE


class TLSMaterialError(UplinkError):
    """A key, certificate or CA file is unusable; the message names the file."""

    exit_code = EX_CONFIG


class BrokerRefused(UplinkError):
    """The broker refused the connection or an operation."""


class SupportError(UplinkError):
    """Remote support was refused by a lock, or its tunnel could not be set up or kept."""


class HostKeyMismatch(SupportError):
    """The bastion's host key is not the one pinned in the configuration: never connect."""
