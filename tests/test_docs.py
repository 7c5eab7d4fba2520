"""Man pages and completion are generated, committed, and cover every command and key.

The committed files must be what ``python -m agent.cli.docs`` makes now (so a
new option without regenerated docs fails here); every subcommand is in
agentctl(8) and the completions; every key the configuration has (all of
them, as ``config check`` prints them) is in agent.yaml(5). The bash
completion is run in a real bash.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.cli import build_parser
from agent.cli.docs import REPO, generated, reference_rows, tree, walk
from agent.cli.effective import effective
from agent.config import loads
from tests.test_config_roundtrip import _everything

#: Mappings whose keys are the user's own names (services, applications), not settings.
FREE_FORM = {"support.services", "collectors.config.redact.extra.arguments"}


def test_committed_files_are_current() -> None:
    """man/ and completion/ are exactly what the generator makes from today's parser and README."""
    stale = [
        str(rel)
        for rel, text in generated().items()
        if not (REPO / rel).exists() or (REPO / rel).read_text() != text
    ]
    assert not stale, f"regenerate with `python -m agent.cli.docs`: {stale}"


def test_every_command_is_documented_and_completed() -> None:
    """Each (sub)command is a section of agentctl(8) and a word of both completions."""
    files = generated()
    man = files[Path("man/agentctl.8")]
    bash = files[Path("completion/agentctl.bash")]
    zsh = files[Path("completion/_agentctl")]
    commands = list(walk(tree(build_parser())))
    assert len(commands) > 12
    for cmd in commands:
        name = cmd.path[-1]
        if not cmd.children:
            assert ".SS " + " ".join(cmd.path).replace("-", "\\-") in man, cmd.path
        assert re.search(rf"\b{re.escape(name)}\b", bash) and f"'{name}:" in zsh, cmd.path
    assert "78 bad configuration" in man and "PBX_AGENT_LOG_FORMAT" in man.replace("\\", "")


def _leaves(data: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in FREE_FORM:
            out += _leaves(value, path + ".")
        else:
            out.append(path)
    return out


def _documented() -> set[str]:
    keys = set()
    for cell, _, _ in reference_rows((REPO / "README.md").read_text()):
        names = re.findall(r"`([^`]+)`", cell)
        first = names[0]
        keys.add(first)
        parent = first.rsplit(".", 1)[0] + "." if "." in first else ""
        keys.update(parent + n for n in names[1:])  # `a.b.x` / `y`: a.b.y
    return keys


def test_every_configuration_key_is_in_the_reference(tmp_path: Path) -> None:
    """Every key of a configuration using every section is a row of agent.yaml(5)."""
    config = loads(_everything(tmp_path), tmp_path / "agent.yaml")
    documented = _documented()
    missing = [k for k in _leaves(effective(config)) if k not in documented]
    assert not missing, f"keys missing from the README's configuration reference: {missing}"
    man = generated()[Path("man/agent.yaml.5")].replace("\\-", "-").replace("\\fB", "")
    for key in ("collectors.callstats.source.mariadb", "support.bastion.host_key", "uplink"):
        assert key in man


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completion_completes(tmp_path: Path) -> None:
    """Sourced in bash: subcommands, nested ones, choices and options come back."""
    script = REPO / "completion" / "agentctl.bash"

    def complete(*words: str) -> set[str]:
        line = " ".join(f"'{w}'" for w in words)
        cmd = (
            f"source {script}; COMP_WORDS=(agentctl {line}); "
            f"COMP_CWORD={len(words)}; _agentctl; printf '%s\\n' \"${{COMPREPLY[@]}}\""
        )
        out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=True)
        return set(out.stdout.split())

    assert {"status", "uplink", "diagnose", "collect"} <= complete("")
    assert complete("up") == {"update", "uplink"}
    assert complete("uplink", "") >= {"off", "on", "status", "--json"}
    assert complete("-c", "/etc/x.yaml", "support", "") >= {"open", "close", "status"}
    assert complete("support", "open", "--") >= {"--for", "--ticket", "--service"}
    assert complete("collect", "") >= {"health", "config", "callstats", "--show"}


@pytest.mark.skipif(shutil.which("zsh") is None, reason="no zsh (not in make deps)")
def test_zsh_completion_completes() -> None:
    """Run in zsh with the completion system's functions stubbed: the same words come back."""
    script = REPO / "completion" / "_agentctl"
    harness = (
        f"source {script}\n"
        '_describe() { print -r -- "D ${(j: :)${(P)${@[-1]}}}"; }\n'
        'compadd() { print -r -- "A ${(j: :)${(P)${@[-1]}}}"; }\n'
        "_files() { print F; }\n"
        'words=(agentctl uplink ""); CURRENT=3; _agentctl\n'
        'words=(agentctl -c ""); CURRENT=3; _agentctl\n'
        "words=(agentctl -c /x support open --); CURRENT=6; _agentctl\n"
    )
    out = subprocess.run(["zsh", "-c", harness], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert set(lines[0].split()[1:]) >= {"off", "on", "status", "--json"}
    assert lines[1] == "F"  # a file after -c
    assert set(lines[2].split()[1:]) >= {"--for", "--ticket", "--service"}
