"""agentctl as a user meets it: every exit status of the README's table, arguments, wording.

Each status of the README's sysexits table is produced here the way a user
would meet it (a daemon that is not running, a tampered ledger, a state
directory another user owns, a second daemon on the same state). Most run
``main()`` in this process; the ones that need another uid fork and drop
privileges for real, and the lock is held by a real second process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from agent import ledger, switch
from agent.cli import build_parser, main
from agent.cli.cmd_collect import COLLECTORS
from agent.collectors.registry import NAMES
from agent.store import open_db
from tests.support.daemon import base_config

REPO = Path(__file__).resolve().parents[1]

#: The README's table (CLI reference): every status in it is exercised below.
README_CODES = {0, 64, 65, 66, 69, 70, 73, 75, 77, 78}


@pytest.fixture
def box() -> Iterator[Path]:
    """A folder others may enter, with a configuration and no daemon running."""
    root = Path(tempfile.mkdtemp(prefix="pbx-agent-cli-"))
    root.chmod(0o755)  # the unprivileged callers below must reach the configuration
    cfg = base_config(root)
    (root / "agent.yaml").write_text(yaml.safe_dump(cfg))
    (root / "agent.yaml").chmod(0o644)
    yield root
    shutil.rmtree(root)


def ctl(box: Path, *args: str) -> int:
    """``agentctl -c BOX/agent.yaml ARGS…`` in this process; its exit status."""
    return main(["-c", str(box / "agent.yaml"), *args])


def as_user(uid: int, gid: int, argv: list[str]) -> int:
    """``main(argv)`` in a forked child that dropped to ``uid``/``gid`` for real."""
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            code = main(argv)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_readme_lists_the_codes_tested_here() -> None:
    """The README's sysexits sentence names exactly the statuses this file exercises."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## CLI reference (`agentctl`)", 1)[1].split("| command |", 1)[0]
    named = {int(n) for n in re.findall(r"\b(\d{1,2}) [a-z]", section)}
    assert named == README_CODES


def test_ok_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    """0: --version, --help and `version` (anyone, no configuration needed)."""
    from agent import __version__

    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert "sysexits" in capsys.readouterr().out
    assert main(["version"]) == 0


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--bogus"],
        ["nosuch"],
        ["uplink", "maybe"],
        ["collect", "nosuch"],
        ["audit", "--since", "soon"],
        ["audit", "--kind", "everything"],
    ],
)
def test_usage_errors_are_64(
    box: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """64: argparse's own errors, an unknown collector (daemon or not), a bad --since."""
    assert ctl(box, *argv) == 64
    err = capsys.readouterr().err
    assert "agentctl" in err and "Traceback" not in err


def test_collector_names_agree_with_the_registry() -> None:
    """`collect`'s choices are the registry's collectors (kept apart for a fast start)."""
    assert COLLECTORS == NAMES


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_option_before_or_after_the_subcommand(
    box: Path, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-c FILE` is accepted before and after the subcommand, nested ones included."""
    cfg = str(box / "agent.yaml")
    argv = ["-c", cfg, "config", "check", "-q"] if where == "before" else ["config", "check"]
    if where == "after":
        argv += ["-q", "-c", cfg]
    assert main(argv) == 0
    assert f"{cfg}: ok" in capsys.readouterr().err
    assert main(["status", "--config", cfg]) == 69  # read, not refused: no daemon here


def test_after_wins_over_before(box: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The subcommand's -c is the one used when both are given (the nearer one)."""
    assert (
        main(["-c", "/nonexistent.yaml", "config", "check", "-q", "-c", str(box / "agent.yaml")])
        == 0
    )
    assert main(["-c", str(box / "agent.yaml"), "config", "check", "-q", "-c", "/nope.yaml"]) == 78
    capsys.readouterr()


def test_every_subcommand_takes_config() -> None:
    """Every parser below the top level has -c/--config (so no subcommand refuses it)."""
    import argparse

    def walk(
        p: argparse.ArgumentParser, trail: str
    ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, child in a.choices.items():
                    yield f"{trail} {name}", child
                    yield from walk(child, f"{trail} {name}")

    found = list(walk(build_parser(), "agentctl"))
    assert len(found) > 10
    for trail, p in found:
        assert "--config" in p._option_string_actions, trail


def test_daemon_not_running_is_69_said_once(box: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """69: status without a daemon, in one plain sentence, with the switch it would read."""
    assert ctl(box, "status") == 69
    out = capsys.readouterr().out
    assert out.startswith(f"daemon: not running (nothing listens on {box}/run/control.sock)\n")
    assert out.count("not running") == 1
    assert "uplink switch: on" in out
    assert ctl(box, "collect", "health") == 69  # a known collector, but nobody to run it


def test_internal_error_is_70(
    box: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """70: a bug (an exception no layer translated) exits 70 with its traceback, not 1."""
    from agent.cli import cmd_version

    def broken(args: object) -> int:
        raise KeyError("a bug")

    monkeypatch.setattr(cmd_version, "run", broken)
    assert main(["version"]) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "internal error" in err


def test_no_state_yet_is_73(box: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """73: the ledger cannot be read because the daemon never made it."""
    assert ctl(box, "audit") == 73
    assert "has not run yet" in capsys.readouterr().err


def _ledger(state: Path, entries: int = 4) -> None:
    conn, _ = open_db(state)
    lg = ledger.Ledger(conn)
    for i in range(entries):
        lg.record("switch", {"state": "off" if i % 2 == 0 else "on", "uid": 0, "via": "test"})
    conn.close()


def test_broken_chain_is_65(box: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """65: `audit verify` on a ledger altered with plain SQL names the entry."""
    state = box / "state"
    _ledger(state)
    assert ctl(box, "audit", "verify") == 0
    conn, _ = open_db(state)
    conn.execute("UPDATE ledger SET data = replace(data, 'off', 'on') WHERE n = 3")
    conn.close()
    capsys.readouterr()
    assert ctl(box, "audit", "verify") == 65
    assert "BROKEN at entry 3" in capsys.readouterr().out


def test_lost_ledger_is_66(box: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """66: the anchor says a ledger of 7 entries existed; the database is gone."""
    state = box / "state"
    state.mkdir()
    anchor = {"db_id": "x", "seq": 9, "ledger_n": 7, "ledger_hash": "ab" * 32, "queued": 2}
    (state / "anchor.json").write_text(json.dumps(anchor))
    assert ctl(box, "audit", "verify") == 66
    assert "ledger LOST" in capsys.readouterr().out


def test_second_daemon_is_75(box: Path) -> None:
    """75: `agentctl run` on a state directory whose lock another process holds."""
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from agent import statelock;"
            "lock = statelock.acquire(Path(sys.argv[1])); print('held', flush=True);"
            "sys.stdin.read()",
            str(box / "state"),
        ],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as holder:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        run = subprocess.run(
            [sys.executable, "-m", "agent.cli", "-c", str(box / "agent.yaml"), "run"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert run.returncode == 75, run.stderr
        assert f"pid {holder.pid}" in run.stderr
        holder.kill()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run agentctl under another uid")
def test_permission_is_77(box: Path) -> None:
    """77: a user outside the agent's group may neither read the ledger nor flip the switch.

    (The control socket's own refusal, 77 too, is tested with a daemon in test_daemon.py.)
    """
    state = box / "state"
    _ledger(state)
    state.chmod(0o700)
    cfg = str(box / "agent.yaml")
    nobody, nogroup = 65534, 65534
    assert as_user(nobody, nogroup, ["-c", cfg, "audit"]) == 77
    assert as_user(nobody, nogroup, ["-c", cfg, "audit", "verify"]) == 77
    assert as_user(nobody, nogroup, ["-c", cfg, "uplink", "off"]) == 77
    assert switch.read_switch(state).on  # refused, not half done
    assert ctl(box, "audit") == 0  # root still may


def test_bad_configuration_is_78(box: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """78: a configuration with a wrong value names file, key and line."""
    bad = box / "bad.yaml"
    bad.write_text("device_id: x\ncollectors:\n  health:\n    interval: soon\n")
    assert main(["config", "check", str(bad)]) == 78
    assert f"{bad}:4: collectors.health.interval" in capsys.readouterr().err
    assert main(["-c", str(bad), "callstats"]) == 78


def test_uplink_off_twice_is_one_flip(box: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`uplink off` twice records one flip and says the second changed nothing."""
    assert ctl(box, "uplink", "off") == 0
    assert ctl(box, "uplink", "off") == 0
    out = capsys.readouterr().out
    assert "already off: nothing changed, no flip recorded" in out
    assert [f.state for f in switch.read_switch(box / "state").history] == ["off"]
    assert ctl(box, "uplink", "on") == 0
    assert [f.state for f in switch.read_switch(box / "state").history] == ["off", "on"]


def test_audit_table_has_a_header_local_times_and_names(
    box: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The audit table has a header, times are local (never raw epoch), uids have names."""
    state = box / "state"
    conn, _ = open_db(state)
    ledger.Ledger(conn).record(
        "switch", {"state": "off", "uid": 0, "via": "agentctl", "at": 1764600000.25}
    )
    conn.close()
    assert ctl(box, "audit") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["entry", "time", "(local)", "kind", "what"]
    assert "1764600000" not in out
    assert "uid=root(0)" in out
    from datetime import datetime

    local = datetime.fromtimestamp(1764600000.25).strftime("%Y-%m-%dT%H:%M:%S")
    assert f"at={local}" in out
