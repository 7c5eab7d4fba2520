"""What a valid configuration still needs from this box at run time, checked before it runs.

``agent.config.load`` judges the file on its own: types, ranges, patterns,
roots. Some things fail only once the daemon runs: an uplink TLS file that is
missing, that the service's user cannot read, or a private key that others
can read (the uplink then fails at every reconnect); a runtime folder that
does not exist (the control socket cannot be bound).

``agentctl config check`` runs :func:`check` for the user the service runs as
(``pbx-agent`` where it exists), so a root administrator learns that the
service will not be able to read a file root can. The daemon runs the same
checks at start for itself and logs each problem as an error; it runs on (the
switch, status and collection are local, and the uplink says the same in
status). A runtime folder it can neither find nor create stops it with exit 73
(:func:`ensure_runtime_dir`).

This module sits beside the daemon, not in the core: it may use
:mod:`agent.uplink.material` (the standard library only), and loads it
only when an uplink is configured.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.config import AgentConfig
from agent.confreader import LineMap, load_yaml, parse_yaml
from agent.errors import EX_USAGE, AgentError, ConfigError, ConfigProblem, StateError

#: The user the service unit runs as (systemd/pbx-agent.service, User=).
SERVICE_USER = "pbx-agent"
_TLS_FILES = (("ca_file", "CA file"), ("cert_file", "certificate file"), ("key_file", "key file"))


class UnknownUser(AgentError):
    """``--user`` names no user of this system."""

    exit_code = EX_USAGE


@dataclass(frozen=True, slots=True)
class ServiceUser:
    """Whose access the checks judge: a uid and its groups."""

    name: str
    uid: int
    gids: frozenset[int]

    def __str__(self) -> str:
        return f"user {self.name} (uid {self.uid})"

    @classmethod
    def current(cls) -> ServiceUser:
        """This process's effective user."""
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return cls(name, uid, frozenset({os.getegid(), *os.getgroups()}))

    @classmethod
    def named(cls, name: str) -> ServiceUser:
        """A user of this system, by name."""
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise UnknownUser(f"--user: no user named {name!r} on this system") from None
        return cls(name, pw.pw_uid, frozenset(os.getgrouplist(name, pw.pw_gid)))


def service_user(name: str | None = None) -> ServiceUser:
    """``name``; else the service's user where it exists; else whoever runs this."""
    if name:
        return ServiceUser.named(name)
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return ServiceUser.current()
    return ServiceUser.named(SERVICE_USER)


def _allows(st: os.stat_result, user: ServiceUser, bit: int) -> bool:
    """Whether the mode bits give ``user`` ``bit`` (4 read, 1 search), as the kernel decides
    without ACLs: owner bits for the owner, group bits for a member, the rest otherwise."""
    if st.st_uid == user.uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid in user.gids:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def unreadable(path: Path, user: ServiceUser) -> str | None:
    """Why ``user`` cannot read the regular file ``path``, or None when it can."""
    real = Path(os.path.realpath(path))
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return "not found"
    except OSError as exc:
        return f"cannot be examined: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if user.uid == 0:
        return None
    for folder in reversed(real.parents):
        fst = os.stat(folder)
        if not _allows(fst, user, 1):
            return f"{user} cannot enter the folder {folder} (mode {stat.S_IMODE(fst.st_mode):04o})"
    if not _allows(st, user, 4):
        owner = f"owner uid {st.st_uid}, group {_group(st.st_gid)}"
        return f"{user} cannot read it ({owner}, mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _lines(config: AgentConfig) -> LineMap:
    try:
        return load_yaml(config.source)
    except ConfigError:
        return parse_yaml("", config.source)


def line_of(data: LineMap, dotted: str) -> int | None:
    """The line of a dotted key in parsed YAML (of its nearest present parent)."""
    node: object = data
    line: int | None = None
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            break
        line = getattr(node, "lines", {}).get(part, line)
        node = node[part]
    return line


def check(config: AgentConfig, *, user: ServiceUser) -> list[ConfigProblem]:
    """Every run-time problem of ``config`` on this box, for ``user``; empty when none."""
    problems: list[ConfigProblem] = []
    up = config.uplink
    if up is None:
        return problems
    data = _lines(config)

    def problem(key: str, reason: str) -> None:
        problems.append(ConfigProblem(config.source, key, reason, line_of(data, key)))

    paths = {key: Path(getattr(up, key)) for key, _ in _TLS_FILES}
    for key, what in _TLS_FILES:
        why = unreadable(paths[key], user)
        if why is not None:
            problem(f"uplink.{key}", f"{paths[key]}: the {what} {why}")
    if problems:
        return problems
    from agent.errors import TLSMaterialError
    from agent.uplink.material import check_key_mode, check_material

    try:
        check_key_mode(paths["key_file"])
        check_material(
            paths["ca_file"], paths["cert_file"], paths["key_file"], device_id=config.device_id
        )
    except TLSMaterialError as exc:
        # The message starts with the file it is about: name its key.
        key = next((k for k, _ in _TLS_FILES if str(exc).startswith(str(paths[k]))), "key_file")
        problem(f"uplink.{key}", str(exc))
    return problems


def ensure_runtime_dir(path: Path) -> None:
    """Make sure the control socket's folder exists and is ours to write, or raise StateError.

    systemd makes it (``RuntimeDirectory=``); run by hand, the daemon makes it
    when it can (mode 0755: clients must reach the socket, whose own mode guards it).
    """
    try:
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(
            f"{path}: the runtime directory (paths.runtime_dir) does not exist and cannot "
            f"be created: {exc.strerror}. Create it for the agent's user (the service unit's "
            "RuntimeDirectory= does) or point paths.runtime_dir elsewhere"
        ) from exc
    if not path.is_dir():
        raise StateError(f"{path}: the runtime directory (paths.runtime_dir) is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise StateError(
            f"{path}: the runtime directory (paths.runtime_dir) is not writable by uid "
            f"{os.geteuid()}; the control socket cannot be made there"
        )
