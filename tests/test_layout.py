"""Each line of code knows its room: collectors never touch the network, only uplink/ connects out.

Checked on the imports of every module, so that a shortcut (a collector that
posts somewhere, a second MQTT client) fails here before review.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

AGENT = Path(__file__).resolve().parents[1] / "agent"
NETWORK = {
    "socket",
    "ssl",
    "aiomqtt",
    "paho",
    "paramiko",
    "http",
    "urllib.request",
    "requests",
    "httpx",
    "aiohttp",
    "smtplib",
    "ftplib",
    "asyncssh",
}
# The CDR database is a local data source (FreePBX's MariaDB), read through its driver.
DB_DRIVERS = {"pymysql"}
# Asterisk's Manager Interface is the other local source: one module may connect to it.
AMI_CLIENT = "collectors/health/ami.py"
CONNECTS = {
    "open_connection",
    "open_unix_connection",
    "create_connection",
    "create_unix_connection",
    "create_datagram_connection",
    "sock_connect",
    "start_server",
    "start_tls",
}


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (at any depth in the file), with each parent package.

    ``urllib.parse`` yields ``urllib`` and ``urllib.parse``: the checks name the
    exact modules that reach the network (``urllib.request``), not whole packages.
    """
    tree = ast.parse(path.read_text(), str(path))
    full: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            full.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            full.add(node.module)
    names: set[str] = set()
    for name in full:
        parts = name.split(".")
        names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return names


def modules(folder: Path) -> list[Path]:
    """Python files under ``folder``."""
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def test_collectors_never_touch_the_network() -> None:
    """No collector imports a network library (the MariaDB driver reads a local source)."""
    offenders = {
        str(p.relative_to(AGENT)): sorted(imports_of(p) & NETWORK)
        for p in modules(AGENT / "collectors")
        if imports_of(p) & NETWORK
    }
    assert offenders == {}
    users = {p.name for p in modules(AGENT / "collectors") if imports_of(p) & DB_DRIVERS}
    assert users <= {"mariadb_source.py"}


def test_only_uplink_connects_out() -> None:
    """MQTT, TLS and SSH libraries appear only under agent/uplink/."""
    outbound = {"aiomqtt", "paho", "paramiko", "ssl", "asyncssh"}
    offenders = sorted(
        str(p.relative_to(AGENT))
        for p in modules(AGENT)
        if "uplink" not in p.relative_to(AGENT).parts and imports_of(p) & outbound
    )
    assert offenders == []


def test_only_the_gate_makes_envelopes() -> None:
    """Envelope is constructed in agent/policy/gate.py and nowhere else in the agent."""
    makers = []
    for p in modules(AGENT):
        for node in ast.walk(ast.parse(p.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "Envelope"
            ):
                makers.append(str(p.relative_to(AGENT)))
    assert set(makers) == {"policy/gate.py"}


def connection_calls(path: Path) -> set[str]:
    """Names of the calls in ``path`` that open a connection (asyncio or socket style)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            f = node.func
            name = (
                f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            )
            if name in CONNECTS:
                found.add(name)
    return found


def test_only_the_ami_client_opens_a_connection() -> None:
    """Under collectors/, only the AMI module opens a connection (to Asterisk on the box).

    The exception is named here so that it stays one module: the health package's
    other modules, and every other collector, open none (the MariaDB driver opens
    its own, through pymysql, in mariadb_source.py only).
    """
    openers = {
        str(p.relative_to(AGENT)): sorted(connection_calls(p))
        for p in modules(AGENT / "collectors")
        if connection_calls(p)
    }
    assert openers == {AMI_CLIENT: ["open_connection"]}
    # ... and it reaches nothing but AMI: no MQTT, TLS, HTTP or SSH library.
    assert imports_of(AGENT / AMI_CLIENT) & NETWORK == set()


NOC = Path(__file__).resolve().parents[1] / "noc"
# The NOC's own dependencies (the `noc` extra): never on a PBX, never imported by the agent.
NOC_DEPS = {
    "psycopg",
    "psycopg_pool",
    "starlette",
    "uvicorn",
    "jinja2",
    "markupsafe",
    "argon2",
    "multipart",
    "python_multipart",
    "selenium",
    "noc",
}


def test_agent_never_imports_noc_dependencies() -> None:
    """No module under agent/ imports the NOC's packages (they are not installed on a PBX)."""
    offenders = {
        str(p.relative_to(AGENT)): sorted(imports_of(p) & NOC_DEPS)
        for p in modules(AGENT)
        if imports_of(p) & NOC_DEPS
    }
    assert offenders == {}


def test_noc_service_does_not_use_the_agents_internals() -> None:
    """The NOC service (ingest, store, web, alerts, commands) has its own MQTT/TLS code."""
    offenders = sorted(
        str(p.relative_to(NOC))
        for p in modules(NOC)
        if any(m == "agent" or m.startswith("agent.") for m in imports_of(p))
    )
    assert offenders == []


def test_one_mqtt_boundary() -> None:
    """paho is imported by agent/uplink/mqtt.py alone; no agent module imports aiomqtt."""
    paho_users = sorted(
        str(p.relative_to(AGENT)) for p in modules(AGENT) if "paho" in imports_of(p)
    )
    assert paho_users == ["uplink/mqtt.py"]
    assert [str(p) for p in modules(AGENT) if "aiomqtt" in imports_of(p)] == []


PRIVATE_REACH = re.compile(r"\._client\b|\b_sock_close\b|\.__aexit__\(|\._client_connect\b")


def test_no_reaching_into_a_librarys_private_parts() -> None:
    """No agent module touches an MQTT client's private attributes or calls __aexit__ by hand."""
    offenders = [
        f"{p.relative_to(AGENT)}:{n}"
        for p in modules(AGENT)
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if PRIVATE_REACH.search(line) and not line.lstrip().startswith("#")
    ]
    assert offenders == []


def test_paramiko_only_in_the_tunnel_and_only_when_it_comes_up() -> None:
    """paramiko is imported by agent/uplink/sshlink.py alone, and never at module level (only
    inside a function, or for the type checker): an idle daemon does not load it."""
    where = []
    for p in modules(AGENT):
        tree = ast.parse(p.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n.split(".")[0] == "paramiko" for n in names):
                where.append((str(p.relative_to(AGENT)), id(node) in top))
    assert where and all(path == "uplink/sshlink.py" for path, _ in where)
    assert not any(module_level for _, module_level in where)
