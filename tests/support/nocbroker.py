"""mosquitto run with the broker configuration the project ships (etc/mosquitto-example.conf).

Why it exists: "the shipped configuration does not lose a message" can only be
proven by running that file. Only what must differ on a test machine is
replaced (port, certificate paths, ACL and persistence locations, logging);
every queueing and persistence setting is taken as shipped, and so is the ACL.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.mosquitto import Mosquitto
from tests.support.pki import PKI

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONF = REPO / "etc" / "mosquitto-example.conf"
SHIPPED_ACL = REPO / "etc" / "mosquitto-acl.example"


class NocBroker(Mosquitto):
    """The shipped configuration on a free loopback port; sessions persist across restarts."""

    def __init__(self, pki: PKI, **kwargs: object) -> None:
        super().__init__(pki, acl=SHIPPED_ACL.read_text(), **kwargs)  # type: ignore[arg-type]
        store = self.workdir / "store"
        store.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("mosquitto")
            os.chown(store, pw.pw_uid, pw.pw_gid)

    def config_text(self, *, max_queued_messages: int, extra: str) -> str:
        """The shipped file, each machine-specific line replaced in place.

        ``max_queued_messages`` is ignored: the shipped value is the point.
        """
        values = {
            "listener": f"{self.port} {self.host}",
            "protocol": "mqtt",
            "cafile": str(self.pki.ca_file),
            "certfile": str(self.broker_cert),
            "keyfile": str(self.broker_key),
            "acl_file": str(self.acl_file),
            "persistence_location": f"{self.workdir / 'store'}/",
            "log_dest": "stderr",
        }
        out = []
        for line in SHIPPED_CONF.read_text().splitlines():
            key = line.split(maxsplit=1)[0] if line.strip() and not line.startswith("#") else ""
            out.append(f"{key} {values[key]}" if key in values else line)
        return "\n".join(out) + "\n" + extra
