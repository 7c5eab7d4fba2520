"""``agentctl enroll --token TOKEN``: get this box's certificate from the vendor, once.

The daemon does the exchange (:mod:`agent.uplink.enroll`: it runs as the service
user, so the key it makes there is that user's, and it holds the switch and the
ledger). This command then writes an ``uplink`` section naming the installed
files into the configuration file when there is none, and asks the daemon to
reload it: the uplink connects with the new certificate.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from agent.cli.common import UsageError, load_config


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``enroll`` subcommand."""
    p = sub.add_parser(
        "enroll", help="get this box's certificate from the vendor with a one-time token"
    )
    p.add_argument("--token", required=True, help="the token the vendor gave for this box")
    p.add_argument("--url", help="the vendor's enrollment endpoint (default: enroll.url)")
    p.add_argument(
        "--broker",
        help="mqtts://HOST[:PORT] for the uplink section written when there is none "
        "(default: enroll.broker)",
    )
    p.set_defaults(func=run)


def uplink_section(broker: str, files: dict[str, Any]) -> str:
    """The YAML appended to the configuration file."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return (
        f"\n# Written by `agentctl enroll` on {stamp}: the certificate enrolled for this box.\n"
        "uplink:\n"
        f"  broker: {broker}\n"
        f"  ca_file: {files['ca_file']}\n"
        f"  cert_file: {files['cert_file']}\n"
        f"  key_file: {files['key_file']}\n"
    )


def write_uplink(path: Path, section: str) -> None:
    """Append ``section`` to the configuration file, validated first, replaced atomically."""
    from agent.config import loads

    old = path.read_text()
    new = old + ("" if old.endswith("\n") else "\n") + section
    loads(new, path)  # ConfigError (exit 78) names the problem; the file is untouched
    st = path.stat()
    tmp = path.with_name(f".{path.name}.enroll{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, st.st_mode & 0o777)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(new)
            fh.flush()
            os.fsync(fh.fileno())
        if os.geteuid() == 0:
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace) -> int:
    """Enroll through the daemon; write the uplink section if there is none."""
    from agent import control

    config = load_config(args)
    broker = args.broker or (config.enroll.broker if config.enroll else None)
    if config.uplink is None and broker is None:
        # Before the token is spent: it is single use.
        raise UsageError(
            "there is no uplink section and no broker to write one: give "
            "--broker mqtts://HOST[:PORT] or set enroll.broker"
        )
    timeout = (config.enroll.timeout if config.enroll else 30.0) + 15
    request: dict[str, Any] = {"token": args.token}
    if args.url:
        request["url"] = args.url
    result = control.request(config.paths.control_socket, "enroll", timeout=timeout, **request)
    days = (result["not_after"] - time.time()) / 86400
    print(f"enrolled: {result['subject']}, issued by {result['issuer']}")
    print(f"  certificate {result['cert_file']} (valid {days:.0f} more days)")
    print(f"  key         {result['key_file']} (made on this box, mode 0600)")
    if config.uplink is None:
        assert broker is not None
        try:
            write_uplink(config.source, uplink_section(broker, result))
        except OSError as exc:
            print(
                f"agentctl: cannot write {config.source} ({exc.strerror}); add this yourself:"
                + uplink_section(broker, result),
                file=sys.stderr,
            )
            return 73
        control.request(config.paths.control_socket, "reload")
        print(f"  wrote the uplink section to {config.source}; the daemon reloads it")
    elif (config.uplink.cert_file, config.uplink.key_file) != (
        Path(result["cert_file"]),
        Path(result["key_file"]),
    ):
        print(
            f"  note: uplink.cert_file and key_file in {config.source} name other files; "
            f"point them at {result['cert_file']} and {result['key_file']} to use this one"
        )
    return 0
