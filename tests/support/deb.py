"""Build pbx-agent's .deb for tests, and look at what an install leaves on the machine.

The package is built once per session by packaging/build-deb (gzip -1: xz costs
half a minute on this machine), with the wheel cache in build/wheels so that a
rebuild downloads nothing. A "next version" is the same tree with its version
bumped (and, when asked, a changed default agent.yaml), made with dpkg-deb
directly: seconds, where a second real build would cost a venv.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "packaging" / "build-deb"
PACKAGE = "pbx-agent"
V1 = "0.1.0~test1"  # the session's real build (conftest's deb_v1)
USER = "pbx-agent"
GROUPS = ("pbx-agent", "pbx-agent-admin")
# Where the package or its scripts put anything; a purge must leave none of it.
ROOTS = ("/etc", "/opt", "/var/lib", "/run", "/usr/lib", "/usr/share", "/usr/bin", "/lib/systemd")


def unavailable() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "installs a Debian package: needs root"
    for tool in ("dpkg-deb", "dpkg", "objdump", "strip"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (make test installs it)"
    if not Path("/usr/bin/python3.11").exists():
        return "Debian's /usr/bin/python3.11 is missing"
    if status() != "":
        return f"{PACKAGE} is installed on this machine: not touching it"
    if user_exists():
        return f"the user {USER} exists (make install?): not touching it"
    return None


def build(out: Path, version: str) -> Path:
    """The real build (packaging/build-deb), fast compression, into ``out`` (absolute)."""
    env = dict(os.environ, DEB_VERSION=version, DEB_COMPRESS="gzip", DEB_COMPRESS_LEVEL="1")
    done = subprocess.run(
        [str(BUILD), str(out)], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"build-deb failed:\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def rebuild(
    deb: Path,
    out: Path,
    version: str,
    *,
    conf_suffix: str = "",
    edit: Callable[[Path], None] | None = None,
) -> Path:
    """The same package as another version: ``conf_suffix`` appended to its default
    agent.yaml, ``edit`` given the unpacked tree (md5sums are not redone for it)."""
    tree = out / f"tree-{version}"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    lines = [
        f"Version: {version}" if ln.startswith("Version:") else ln
        for ln in control.read_text().splitlines()
    ]
    control.write_text("\n".join(lines) + "\n")
    if conf_suffix:
        conf = tree / "etc" / "pbx-agent" / "agent.yaml"
        conf.write_text(conf.read_text() + conf_suffix)
        sums = tree / "DEBIAN" / "md5sums"
        digest = subprocess.run(
            ["md5sum", "etc/pbx-agent/agent.yaml"], cwd=tree, capture_output=True, text=True
        ).stdout
        kept = [ln for ln in sums.read_text().splitlines() if "etc/pbx-agent/agent.yaml" not in ln]
        sums.write_text("\n".join([*kept, digest.strip()]) + "\n")
    if edit is not None:
        edit(tree)
    new = out / f"{PACKAGE}_{version}_amd64.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "--build", str(tree), str(new)],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(tree)
    return new


def dpkg(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """dpkg with the arguments, never prompting on a terminal (answers come from ``stdin``).

    The machine is shared: while another apt or dpkg holds the lock, wait for it
    (up to two minutes) rather than fail.
    """
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(
            ["dpkg", *args], input=stdin, capture_output=True, text=True, check=False, timeout=120
        )
        locked = done.returncode == 2 and "lock" in done.stderr
        if not locked or time.monotonic() > deadline:
            return done
        time.sleep(0.5)


def status() -> str:
    """dpkg's status of the package ('' when dpkg has never heard of it or it is purged)."""
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", PACKAGE], capture_output=True, text=True
    )
    text = out.stdout.strip()
    return "" if text in ("", "unknown ok not-installed", "deinstall ok not-installed") else text


def version() -> str:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", PACKAGE], capture_output=True, text=True
    )
    return out.stdout.strip()


def user_exists() -> bool:
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return False
    return True


def groups_present() -> list[str]:
    present = []
    for name in GROUPS:
        try:
            grp.getgrnam(name)
        except KeyError:
            continue
        present.append(name)
    return present


def traces() -> set[str]:
    """Every path under the package's roots whose name says pbx-agent (the probe's aside)."""
    found: set[str] = set()
    for root in ROOTS:
        out = subprocess.run(
            ["find", root, "-xdev", "-maxdepth", "4", "-name", "*pbx-agent*",
             "!", "-name", "*probe*"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        found.update(ln for ln in out.stdout.splitlines() if ln)
    return found


def purge() -> None:
    """Take the package off the machine, whatever state a test left it in."""
    dpkg("--purge", "--force-remove-reinstreq", PACKAGE)
