"""The ``collectors.health`` section: the machine, and Asterisk over AMI when configured.

::

    health:
      interval: 60s
      pbx_processes: [asterisk]
      pbx:
        ami:                          # absent: machine health only
          host: 127.0.0.1
          port: 5038
          username: pbx-agent
          secret_file: /etc/pbx-agent/ami.secret   # mode 0600, owned by the service user
          timeout: 5s                 # every action, the connection and the login
          reconnect_max: 60s          # cap of the jittered reconnect backoff

The secret lives in a file of its own, never in agent.yaml (which ``config
check`` prints), and the file is refused when group or others may read or write
it, as ssh refuses a private key. The check runs when the configuration is
loaded (``config check``, start, reload) and again before every login.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.confreader import Section
from agent.errors import SecretFileError

DEFAULT_AMI_PORT = 5038
DEFAULT_AMI_TIMEOUT = 5.0
DEFAULT_RECONNECT_MAX = 60.0
#: A manager.conf user is a section name: no spaces, brackets or separators.
USERNAME_PATTERN = r"[A-Za-z0-9_.@+-]{1,80}"
HOST_PATTERN = r"[A-Za-z0-9.:_-]{1,253}"
#: A secret longer than this is not a manager secret: refuse to read further.
MAX_SECRET = 4096


@dataclass(frozen=True, kw_only=True)
class AmiSettings:
    """How to reach Asterisk's Manager Interface on this box (the secret stays in its file)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_AMI_PORT
    username: str
    secret_file: Path
    timeout: float = DEFAULT_AMI_TIMEOUT
    reconnect_max: float = DEFAULT_RECONNECT_MAX


@dataclass(frozen=True, kw_only=True)
class HealthSettings:
    """The ``collectors.health`` section."""

    enabled: bool = True
    interval: float = 60.0
    pbx_processes: tuple[str, ...] = ("asterisk",)
    ami: AmiSettings | None = None


def read_secret(path: Path) -> str:
    """The secret in ``path``, after the checks ssh makes of a private key.

    Refused: a missing file, anything but a regular file, a file that group or
    others may read or write, an unreadable or empty one. The secret is the
    first line, without its line ending.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SecretFileError(f"{path} does not exist") from None
    except PermissionError:
        raise SecretFileError(
            f"{path} cannot be read by uid {os.geteuid()}: make the service user its owner"
        ) from None
    except OSError as exc:
        raise SecretFileError(f"{path} cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretFileError(f"{path} is not a regular file")
        if st.st_mode & 0o077:
            raise SecretFileError(
                f"{path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run chmod 600 {path}, as ssh requires of a private key"
            )
        data = os.read(fd, MAX_SECRET + 1)
    except OSError as exc:
        raise SecretFileError(f"{path} cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET:
        raise SecretFileError(f"{path} is larger than {MAX_SECRET} bytes: not a manager secret")
    secret = data.decode("utf-8", errors="replace").split("\n", 1)[0].rstrip("\r")
    if not secret:
        raise SecretFileError(f"{path} is empty: write the manager secret on its first line")
    return secret


def _ami(sec: Section) -> AmiSettings:
    host = sec.str("host", "127.0.0.1", pattern=HOST_PATTERN, hint="a host name or IP address")
    port = sec.int("port", DEFAULT_AMI_PORT, min=1, max=65535)
    username = sec.str(
        "username",
        pattern=USERNAME_PATTERN,
        hint="the [section] name of the manager user in manager_custom.conf",
    )
    secret_file = sec.path("secret_file")
    if isinstance(secret_file, Path) and secret_file.is_absolute():
        try:
            read_secret(secret_file)
        except SecretFileError as exc:
            sec.problem("secret_file", str(exc))
    s = AmiSettings(
        host=host,
        port=port,
        username=username,
        secret_file=secret_file,
        timeout=sec.duration("timeout", DEFAULT_AMI_TIMEOUT, min=0.1, max=60),
        reconnect_max=sec.duration("reconnect_max", DEFAULT_RECONNECT_MAX, min=1, max=3600),
    )
    sec.finish()
    return s


def parse_settings(sec: Section) -> HealthSettings:
    """Validate ``collectors.health``; ``pbx.ami`` is checked down to its secret file."""
    d = HealthSettings()
    enabled = sec.bool("enabled", d.enabled)
    interval = sec.duration("interval", d.interval, min=1, max=86400)
    processes = sec.str_list("pbx_processes", list(d.pbx_processes))
    for name in processes:
        try:
            re.compile(name)
            re.compile(rf"^(?:{name})$")  # as machine.py matches it
        except re.error as exc:
            sec.problem("pbx_processes", f"invalid regular expression {name!r}: {exc}")
    pbx = sec.section("pbx")
    ami = _ami(pbx.section("ami")) if pbx.has("ami") else None
    pbx.raw("ami")
    pbx.finish()
    sec.finish()
    return HealthSettings(enabled=enabled, interval=interval, pbx_processes=processes, ami=ami)
