"""One exception hierarchy for the agent: what went wrong, and what was refused.

Every exception the agent raises on purpose is drawn here and carries a
message a person can act on and the sysexits status a command line exits with.
Errors of the libraries we use (sqlite3, paho-mqtt, paramiko, OSError) are
translated where they enter, with ``raise ... from exc``, so no other layer
needs to import them. (Private exceptions that never leave their module, used
to unwind a parser or a loop, are not drawn.)

Two roots, because a refusal is not a failure. An :class:`AgentError` means
something could not be done (a file, a peer, the disk) and is logged as an
error. A :class:`Refusal` is the answer to a request that was understood and
said no: the gate declining a record while the switch is off, a control
request without the right group, a NOC command outside the allow-list. It is
answered, counted and ledgered where the promise says so, and logged at most
as a warning: an error log line is for something a person must fix.

::

    AgentError                 something could not be done
    ├── InputError             bytes from outside that cannot be used as they are (exit 65)
    │   ├── MalformedJSON      not the strict JSON a peer must send (strictjson)
    │   ├── KeyFormatError     an SSH key or known_hosts line that is not well formed
    │   ├── IncompleteSnapshot a snapshot's parts do not add up (reassembly)
    │   └── BodyError          an envelope body that cannot be decoded (wire encoding)
    ├── SecretFileError        a secret file missing, unreadable or readable by others (exit 78)
    ├── ConfigError            bad configuration: names file, key path, line (exit 78)
    ├── StateError             state directory, switch file, outbox or ledger unusable
    │   ├── StateLocked        another daemon holds the state directory's lock (exit 75)
    │   └── StatePermissionDenied  this user may not read or write it (exit 77)
    ├── ControlError           talking to the daemon over the control socket failed
    │   ├── DaemonNotRunning   no daemon is listening on the socket (exit 69)
    │   ├── PermissionDenied   peer credentials do not allow the request (exit 77)
    │   └── DaemonRefused      the daemon answered with an error (exit: the code it named)
    ├── CollectorError         a collector could not gather (source missing, unreadable)
    ├── UpdateError            an update could not be checked, fetched or applied (exit 69)
    └── UplinkError            the uplink could not be set up or used
        ├── TLSMaterialError   key/cert/CA unusable: loose permissions, expired, mismatch
        ├── BrokerRefused      the broker refused us (certificate, ACL, protocol)
        ├── EnrollmentError    enrollment failed at a named step (key, request, connect,
        │                      token, response, check, install)
        └── SupportError       remote support refused (no window, wrong ticket, switch off)
            │                  or failed (bastion unreachable, key refused, forward refused)
            └── HostKeyMismatch  the bastion showed a host key other than the pinned one

    Refusal                    a request understood and declined: answered, not an error
    ├── PolicyRefused          the gate declines a record (class denied, switch off, policy,
    │                          narrowed, secret material) (exit 65)
    ├── RequestRefused         a control request answered with an error reply (its ``code``)
    └── CommandRefused         a NOC command answered with an error reply and ledgered
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


class StatePermissionDenied(StateError):
    """The caller may not read or write the state directory (a user outside its group)."""

    exit_code = EX_NOPERM


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


class InputError(AgentError):
    """Bytes from outside the agent that cannot be used as they are."""

    exit_code = EX_DATAERR


class MalformedJSON(InputError):
    """Not the strict JSON a peer must send; the message says why (it never quotes much)."""


class KeyFormatError(InputError):
    """An SSH public key or known_hosts line that is not well formed."""


class IncompleteSnapshot(InputError):
    """The parts of a configuration snapshot do not add up (missing, altered, mixed)."""


class BodyError(InputError):
    """An envelope body whose encoding cannot be decoded (``agent/policy/wire.py``)."""


class SecretFileError(AgentError):
    """A secret file (such as the AMI secret) is missing, unreadable or readable by others."""

    exit_code = EX_CONFIG


class CollectorError(AgentError):
    """A collector could not gather its data."""

    exit_code = EX_UNAVAILABLE


class UpdateError(AgentError):
    """An update could not be checked (source, signature, Valid-Until), fetched or applied."""

    exit_code = EX_UNAVAILABLE


class UplinkError(AgentError):
    """The uplink could not be set up or used."""

    exit_code = EX_UNAVAILABLE


class TLSMaterialError(UplinkError):
    """A key, certificate or CA file is unusable; the message names the file."""

    exit_code = EX_CONFIG


class BrokerRefused(UplinkError):
    """The broker refused the connection or an operation."""


class EnrollmentError(UplinkError):
    """Enrollment failed; ``step`` names where (key, request, connect, token, response,
    check, install) and the message says why."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"enrollment failed at step '{step}': {message}")
        self.step = step


class SupportError(UplinkError):
    """Remote support was refused by a lock, or its tunnel could not be set up or kept."""


class HostKeyMismatch(SupportError):
    """The bastion's host key is not the one pinned in the configuration: never connect."""


class Refusal(Exception):
    """Root of every refusal: a request understood and declined (see the module docstring)."""

    exit_code: int = EX_DATAERR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PolicyRefused(Refusal):
    """The gate declined a record: the message says which check (switch, policy, ...)."""


class RequestRefused(Refusal):
    """A control request answered with an error reply; ``code`` names the kind of refusal."""

    def __init__(self, message: str, code: str = "bad-request") -> None:
        super().__init__(message)
        self.code = code


class CommandRefused(Refusal):
    """A NOC command answered with an error reply (and a ledger entry)."""
