"""apt and dpkg, confined to the vendor's source: the update unit's one boundary to them.

apt runs with its own sources file, lists, caches and preferences (``-o``
options), so the machine's own sources are never read or changed, and the
machine's ``apt upgrade`` never sees the vendor's repository: only this unit,
under the customer's switch and setting, does. The sources file must pin the
vendor's key with ``Signed-By``; apt itself checks the signature and refuses a
Release past its ``Valid-Until`` (a frozen mirror).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from agent.errors import UpdateError

PACKAGE = "pbx-agent"
DEFAULT_SOURCES = Path("/etc/pbx-agent/apt/pbx-agent.sources")
APT_TIMEOUT = 300.0
LOCK_WAIT = 300.0


@dataclass(frozen=True)
class VendorApt:
    """apt limited to the vendor's sources file, with its state under ``work``."""

    sources: Path
    work: Path
    package: str = PACKAGE

    def _options(self) -> list[str]:
        empty = self.work / "empty.d"
        return [
            "-o", f"Dir::Etc::SourceList={self.sources}",
            "-o", f"Dir::Etc::SourceParts={empty}",
            "-o", f"Dir::Etc::Preferences={empty}/none",
            "-o", f"Dir::Etc::PreferencesParts={empty}",
            "-o", f"Dir::State::Lists={self.work}/lists",
            "-o", f"Dir::Cache={self.work}/cache",
            "-o", "APT::Get::List-Cleanup=1",
            # Only the vendor's signed source: no unauthenticated fallback, ever, and a
            # Release past its Valid-Until refused whatever the machine's apt.conf.d says
            # (images that mirror snapshots often turn these checks off).
            "-o", "Acquire::Check-Valid-Until=true",
            "-o", "Acquire::Check-Date=true",
            "-o", "Acquire::AllowInsecureRepositories=false",
            "-o", "Acquire::AllowDowngradeToInsecureRepositories=false",
        ]  # fmt: skip

    def _prepare(self) -> None:
        if not self.sources.is_file():
            raise UpdateError(f"{self.sources}: no vendor source is configured")
        text = self.sources.read_text()
        if not re.search(r"^Signed-By:\s*\S", text, re.MULTILINE):
            raise UpdateError(f"{self.sources}: the vendor source must pin its key with Signed-By")
        for sub in ("empty.d", "lists/partial", "cache/archives/partial", "debs"):
            (self.work / sub).mkdir(parents=True, exist_ok=True, mode=0o755)

    def _run(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
        try:
            return subprocess.run(
                list(args), capture_output=True, text=True, env=env, cwd=cwd,
                timeout=APT_TIMEOUT, check=False,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UpdateError(f"{args[0]}: {exc}") from exc

    def refresh(self) -> None:
        """Fetch the vendor's index; :class:`UpdateError` naming apt's complaint if refused."""
        self._prepare()
        done = self._run("apt-get", *self._options(), "--error-on=any", "-q", "update")
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.splitlines() if ln.startswith(("E:", "W:", "Err:"))]
            raise UpdateError(
                "the vendor source was refused: " + " | ".join(lines or [done.stderr])
            )

    def installed(self) -> str | None:
        """The installed version, or None."""
        done = self._run("dpkg-query", "-W", "-f=${db:Status-Abbrev} ${Version}", self.package)
        if done.returncode != 0 or not done.stdout.startswith("ii"):
            return None
        return done.stdout.split()[-1]

    def candidate(self) -> str | None:
        """The newest version the vendor's (verified) index offers, or None."""
        done = self._run("apt-cache", *self._options(), "madison", self.package)
        versions = [ln.split("|")[1].strip() for ln in done.stdout.splitlines() if "|" in ln]
        best: str | None = None
        for v in versions:
            if best is None or newer(v, best):
                best = v
        return best

    def offers(self, version: str) -> bool:
        """Whether the vendor's index has this exact version."""
        done = self._run("apt-cache", *self._options(), "madison", self.package)
        return any(
            ln.split("|")[1].strip() == version for ln in done.stdout.splitlines() if "|" in ln
        )

    def download(self, version: str) -> Path:
        """Fetch one version into ``work/debs`` (apt checks it against the signed index)."""
        debs = self.work / "debs"
        kept = self.kept(version)
        if kept is not None:
            return kept
        done = self._run(
            "apt-get", *self._options(), "-q", "download", f"{self.package}={version}", cwd=debs
        )
        got = self.kept(version)
        if done.returncode != 0 or got is None:
            raise UpdateError(f"cannot download {self.package} {version}: {done.stderr.strip()}")
        return got

    def kept(self, version: str) -> Path | None:
        """A copy of this version already in ``work/debs``, or None."""
        quoted = version.replace(":", "%3a")
        found = sorted((self.work / "debs").glob(f"{self.package}_{quoted}_*.deb"))
        return found[0] if found else None

    def install(self, deb: Path) -> None:
        """Install a downloaded package; an edited agent.yaml is kept, never asked about."""
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            done = self._run("dpkg", "--force-confold", "--force-confdef", "-i", str(deb))
            # Another package manager (unattended-upgrades, an administrator) holds the lock.
            if done.returncode != 2 or "lock" not in done.stderr or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        if done.returncode != 0:
            raise UpdateError(f"dpkg -i {deb.name} failed: {done.stderr.strip()[-2000:]}")

    def prune(self, keep: set[str]) -> None:
        """Delete kept packages other than these versions."""
        for deb in (self.work / "debs").glob(f"{self.package}_*.deb"):
            if not any(deb == self.kept(v) for v in keep):
                deb.unlink(missing_ok=True)


def newer(a: str, b: str) -> bool:
    """Whether Debian version ``a`` sorts after ``b`` (dpkg's own comparison)."""
    return subprocess.run(["dpkg", "--compare-versions", a, "gt", b], check=False).returncode == 0
