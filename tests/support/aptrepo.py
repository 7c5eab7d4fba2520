"""A signed apt repository for the update tests: a GPG key made for the test,
packaging/make-repo (reprepro), and a loopback HTTP server that counts requests.

``expire()`` turns the repository into a frozen mirror: its Release dated in
the past with a Valid-Until already gone, signed again with the same key.
"""

from __future__ import annotations

import functools
import http.server
import re
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MAKE_REPO = REPO / "packaging" / "make-repo"


class Key:
    """An ed25519 signing key in its own GNUPGHOME."""

    def __init__(self, home: Path, name: str) -> None:
        self.home = home
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.env = {"GNUPGHOME": str(home), "PATH": "/usr/bin:/bin"}
        subprocess.run(
            ["gpg", "--batch", "--quick-gen-key", "--passphrase", "", f"{name} <{name}@invalid>",
             "ed25519", "sign", "1d"],
            env=self.env, check=True, capture_output=True,
        )  # fmt: skip
        out = subprocess.run(
            ["gpg", "--batch", "--list-keys", "--with-colons"],
            env=self.env, check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        self.fingerprint = next(ln.split(":")[9] for ln in out.splitlines() if ln.startswith("fpr"))

    def close(self) -> None:
        """Stop the gpg-agent that signing started for this home (it outlives the test)."""
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "gpg-agent"],
                       env=self.env, check=False, capture_output=True)  # fmt: skip

    def export(self, path: Path) -> Path:
        """The public key, binary, as Signed-By wants it."""
        path.write_bytes(
            subprocess.run(
                ["gpg", "--batch", "--export", self.fingerprint],
                env=self.env, check=True, capture_output=True,
            ).stdout
        )  # fmt: skip
        return path

    def sign(self, release: Path) -> None:
        """InRelease and Release.gpg for a Release file."""
        base = ["gpg", "--batch", "--yes", "--local-user", self.fingerprint]
        inrel, detached = release.with_name("InRelease"), release.with_name("Release.gpg")
        subprocess.run([*base, "--clearsign", "-o", str(inrel), str(release)],
                       env=self.env, check=True, capture_output=True)  # fmt: skip
        subprocess.run([*base, "--detach-sign", "--armor", "-o", str(detached), str(release)],
                       env=self.env, check=True, capture_output=True)  # fmt: skip


class Repo:
    """A reprepro repository in ``root``, signed by ``key``."""

    def __init__(self, root: Path, key: Key) -> None:
        self.root, self.key = root, key

    def publish(self, *debs: Path) -> None:
        env = dict(self.key.env, PATH="/usr/sbin:/usr/bin:/sbin:/bin")
        done = subprocess.run(
            [str(MAKE_REPO), str(self.root), self.key.fingerprint, *map(str, debs)],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr

    @property
    def release(self) -> Path:
        return self.root / "dists" / "bookworm" / "Release"

    def expire(self) -> None:
        """A frozen mirror: Date ten days ago, Valid-Until three days ago, signed."""
        now = datetime.now(UTC)
        date = format_datetime(now - timedelta(days=10), usegmt=True)
        until = format_datetime(now - timedelta(days=3), usegmt=True)
        text = self.release.read_text()
        text = re.sub(r"^Date: .*$", f"Date: {date}", text, flags=re.MULTILINE)
        text = re.sub(r"^Valid-Until: .*$", f"Valid-Until: {until}", text, flags=re.MULTILINE)
        self.release.write_text(text)
        self.key.sign(self.release)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        server: Server = self.server  # type: ignore[assignment]
        server.requests.append(self.path)


class Server(http.server.ThreadingHTTPServer):
    """The repository over HTTP on a free loopback port; ``requests`` lists every path asked."""

    def __init__(self, root: Path) -> None:
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)


def sources(path: Path, url: str, keyring: Path) -> Path:
    """A deb822 sources file for the repository, its key pinned with Signed-By."""
    path.write_text(
        f"Types: deb\nURIs: {url}\nSuites: bookworm\nComponents: main\nSigned-By: {keyring}\n"
    )
    return path
