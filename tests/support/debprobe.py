"""A tiny Debian package that behaves like a daemon's package on install.

Its postinst does what debhelper writes for openssh-server, mosquitto and
postgresql: ``deb-systemd-helper enable`` (links in
/etc/systemd/system/multi-user.target.wants), ``update-rc.d defaults`` (S links
in /etc/rc?.d) and ``invoke-rc.d start``. Where no init system runs (this CI machine),
invoke-rc.d cannot tell the runlevel and starts nothing anyway; on a booted box
it asks /usr/sbin/policy-rc.d first, so the postinst records that answer
(``POLICY_ANSWER``) for the tests to check. Tests install it to see what an
install does to the machine.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

NAME = "pbx-agent-probe-svc"
SERVICE = "pbx-agent-probe-svc"
MARKER = Path("/run") / f"{SERVICE}.started"
POLICY_ANSWER = Path("/run") / f"{SERVICE}.policy"
WANTS_LINK = Path("/etc/systemd/system/multi-user.target.wants") / f"{SERVICE}.service"

_CONTROL = f"""\
Package: {NAME}
Version: 1.0
Architecture: all
Maintainer: pbx-agent tests <tests@invalid>
Description: probe package for pbx-agent's tests (remove freely)
"""

_UNIT = """\
[Unit]
Description=pbx-agent test probe

[Service]
ExecStart=/bin/true

[Install]
WantedBy=multi-user.target
"""

_INIT = f"""\
#!/bin/sh
### BEGIN INIT INFO
# Provides:          {SERVICE}
# Required-Start:
# Required-Stop:
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: pbx-agent test probe
### END INIT INFO
case "$1" in
  start) touch {MARKER} ;;
  stop) rm -f {MARKER} ;;
esac
exit 0
"""

_POSTINST = f"""\
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if [ -x /usr/sbin/policy-rc.d ]; then
        rc=0; /usr/sbin/policy-rc.d {SERVICE} start || rc=$?; echo $rc >{POLICY_ANSWER}
    else echo absent >{POLICY_ANSWER}; fi
    deb-systemd-helper unmask {SERVICE}.service >/dev/null || true
    deb-systemd-helper enable {SERVICE}.service >/dev/null || true
    update-rc.d {SERVICE} defaults >/dev/null
    invoke-rc.d {SERVICE} start || true
fi
"""

_POSTRM = f"""\
#!/bin/sh
set -e
if [ "$1" = purge ]; then
    update-rc.d {SERVICE} remove >/dev/null
    deb-systemd-helper purge {SERVICE}.service >/dev/null || true
    deb-systemd-helper unmask {SERVICE}.service >/dev/null || true
fi
rm -f {MARKER} {POLICY_ANSWER}
"""


def build(out_dir: Path) -> Path:
    """Build the probe package in ``out_dir`` and return the .deb's path."""
    root = out_dir / "probe-root"
    files = {
        "DEBIAN/control": (_CONTROL, 0o644),
        "DEBIAN/postinst": (_POSTINST, 0o755),
        "DEBIAN/postrm": (_POSTRM, 0o755),
        f"lib/systemd/system/{SERVICE}.service": (_UNIT, 0o644),
        f"etc/init.d/{SERVICE}": (_INIT, 0o755),
    }
    for rel, (text, mode) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
    deb = out_dir / f"{NAME}_1.0_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)],
        check=True,
        capture_output=True,
    )
    return deb


def rc_links() -> list[Path]:
    """The probe's start links in /etc/rc?.d (an enabled SysV service has them)."""
    return sorted(Path("/etc").glob(f"rc?.d/S??{SERVICE}"))


def purge() -> None:
    """Remove the probe package and everything its scripts made."""
    subprocess.run(["dpkg", "--purge", NAME], capture_output=True, check=False)
    MARKER.unlink(missing_ok=True)
    POLICY_ANSWER.unlink(missing_ok=True)
