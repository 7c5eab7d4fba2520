"""Configuration roots are configuration trees; patterns compile: otherwise exit 78 at check time.

Each refusal is a configuration problem naming the file, the key and the line,
reported by ``agentctl config check`` before a daemon ever walks the tree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent import config
from agent.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
FILE = Path("/etc/pbx-agent/agent.yaml")


def problems(text: str) -> list[str]:
    """The problems the loader reports for ``text``."""
    with pytest.raises(ConfigError) as info:
        config.loads(text, FILE)
    return [str(p) for p in info.value.problems]


def with_roots(*roots: str) -> str:
    return f"device_id: pbx-0001\ncollectors:\n  config:\n    roots: {json.dumps(list(roots))}\n"


@pytest.mark.parametrize(
    ("root", "says"),
    [
        ("/", "the whole machine"),
        ("/proc", "processes"),
        ("/sys/class/net", "lies inside /sys"),
        ("/dev", "device files"),
        ("/run", "runtime state"),
        ("/home", "home directories"),
        ("/home/alice/pbx", "lies inside /home"),
        ("/root", "root's home"),
        ("/var/spool/asterisk", "spool"),
        ("/var/spool/asterisk/voicemail/default", "lies inside /var/spool"),
        ("/var/lib/asterisk", "sounds, keys"),
        ("/var/lib/asterisk/sounds/custom", "lies inside /var/lib/asterisk"),
        ("/var/log/asterisk", "call detail records"),
        ("/etc/shadow", "password hashes"),
        ("/etc/gshadow", "group password hashes"),
        ("/etc/ssh", "SSH host keys"),
        ("/etc/ssh/sshd_config.d", "lies inside /etc/ssh"),
        ("/etc/asterisk/keys", "key material"),
        ("/etc", "contains /etc/shadow"),
        ("/var", "contains /var/spool"),
        ("/etc/pbx-agent", "device key"),
    ],
)
def test_forbidden_root_is_a_configuration_error(root: str, says: str) -> None:
    """A root that is, lies in or contains a private tree: refused with file, key and line."""
    (p,) = problems(with_roots("/etc/asterisk", root))
    assert p.startswith(f"{FILE}:4: collectors.config.roots: {root} "), p
    assert says in p, p


def test_configuration_trees_are_accepted(tmp_path: Path) -> None:
    """The default roots, a FreePBX file and a folder of one's own are fine."""
    cfg = config.loads(
        with_roots("/etc/asterisk", "/etc/freepbx.conf", "/etc/amportal.conf", str(tmp_path)),
        FILE,
    )
    assert Path("/etc/freepbx.conf") in cfg.collectors.config.roots


def test_root_that_leads_to_a_private_tree_through_a_link(tmp_path: Path) -> None:
    """A link named like a configuration tree is judged by where it really leads."""
    link = tmp_path / "asterisk"
    link.symlink_to("/")
    (p,) = problems(with_roots(str(link)))
    assert f"{link} (really /) is the whole machine" in p


@pytest.mark.parametrize(
    ("inside", "says"),
    [
        ("state", "(this agent's state and redaction key)"),
        ("run", "(this agent's control socket)"),
        ("cdr/Master.csv", "(call detail records (collectors.callstats.source.csv))"),
    ],
)
def test_root_over_the_agents_own_state_or_the_cdrs(tmp_path: Path, inside: str, says: str) -> None:
    """The state folder (redaction key), the socket and the CDR file are out of a root's reach."""
    root = tmp_path / "tree"
    where = {k: tmp_path / "elsewhere" / k for k in ("state", "run", "cdr/Master.csv")}
    where[inside] = root / inside
    text = (
        "device_id: pbx-0001\n"
        f"paths: {{state_dir: {where['state']}, runtime_dir: {where['run']}}}\n"
        "collectors:\n"
        f"  config: {{roots: [{tmp_path / 'pbx'}, {root}]}}\n"
        f"  callstats: {{source: {{csv: {where['cdr/Master.csv']}}}}}\n"
    )
    (p,) = problems(text)
    assert f"collectors.config.roots: {root} contains {root / inside} {says}" in p


def test_invalid_process_pattern_is_a_configuration_error() -> None:
    """collectors.health.pbx_processes are regexes: one that does not compile is refused."""
    (p,) = problems(
        "device_id: pbx-0001\ncollectors:\n  health:\n    pbx_processes: [asterisk, 'fop(']\n"
    )
    assert p.startswith(f"{FILE}:4: collectors.health.pbx_processes: invalid regular expression")
    assert "'fop('" in p


def test_process_pattern_that_breaks_out_of_its_group_is_refused() -> None:
    """A pattern valid alone but not inside the collector's ^(?:...)$ wrapper is refused."""
    (p,) = problems("device_id: pbx-0001\ncollectors:\n  health:\n    pbx_processes: ['a)|(b']\n")
    assert "collectors.health.pbx_processes: invalid regular expression" in p


def test_invalid_glob_is_a_configuration_error() -> None:
    """An include or exclude glob whose character class cannot compile is refused."""
    text = "device_id: pbx-0001\ncollectors:\n  config:\n    exclude: ['/etc/asterisk/[z-a]*']\n"
    (p,) = problems(text)
    assert p.startswith(f"{FILE}:4: collectors.config.exclude: invalid glob '/etc/asterisk/[z-a]*'")


def test_callstats_patterns_are_checked() -> None:
    """Direction rules and the trunk pattern that do not compile are refused, each named."""
    text = (
        "device_id: pbx-0001\ncollectors:\n  callstats:\n"
        "    trunk_pattern: '[A-Z'\n"
        "    directions:\n      - {direction: inbound, context: 'from-(trunk'}\n"
    )
    found = " | ".join(problems(text))
    assert "collectors.callstats.trunk_pattern: invalid regular expression" in found
    assert "collectors.callstats.directions[0].context: invalid regular expression" in found


def test_config_check_refuses_a_forbidden_root(tmp_path: Path) -> None:
    """'agentctl config check' exits 78 and names the root, the key and the line."""
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(with_roots("/etc/asterisk", "/etc/shadow"))
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "config", "check", str(cfg)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
        timeout=60,
    )
    assert r.returncode == 78, r.stderr
    assert f"{cfg}:4: collectors.config.roots: /etc/shadow holds password hashes" in r.stderr
