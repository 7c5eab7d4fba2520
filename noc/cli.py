"""``noc``: the NOC service's command line.

    noc [-c noc.yaml] migrate                      apply pending schema migrations
    noc [-c noc.yaml] ingest [--name N]            one ingest worker (run several)
    noc [-c noc.yaml] web                          the dashboard
    noc [-c noc.yaml] alerts                       alert rules, webhook, periodic prune
    noc [-c noc.yaml] prune                        apply the retention settings once
    noc [-c noc.yaml] send DEVICE CMD [key=value]  send a command, print the reply
    noc [-c noc.yaml] org add SLUG NAME
    noc [-c noc.yaml] user add NAME (--staff | --org SLUG)   password from NOC_PASSWORD or a prompt
    noc [-c noc.yaml] device add ID [--org SLUG] [--cert FILE]   prints a one-time enrollment
                                                   token unless --cert is given
    noc [-c noc.yaml] device token ID              a new enrollment token for ID
    noc [-c noc.yaml] device revoke ID [--serial N]  revoke its certificates, drop its session
    noc [-c noc.yaml] crl                          write the broker's CRL again (daily)
    noc [-c noc.yaml] enroll                       the enrollment endpoint (HTTPS, EST-shaped)
    noc ca ...                                     the vendor CA (python -m noc.ca)
    noc keys init-root --out DIR                   the offline root of command signing
    noc keys issue-command-key --root KEY --out FILE [--days N]   a command key it certifies

Exit codes follow sysexits: 64 usage, 69 broker or box unreachable, 75
database unavailable, 78 bad configuration.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from noc.config import DEFAULT_PATH, NocConfig, load
from noc.errors import NocError, UsageError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="noc", description="The pbx-agent NOC service.")
    p.add_argument(
        "-c", "--config", type=Path, default=None,
        help=f"configuration file (default $NOC_CONFIG or {DEFAULT_PATH})",
    )  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("migrate", help="apply pending schema migrations")
    s = sub.add_parser("ingest", help="run one ingest worker")
    s.add_argument("--name", default="1", help="worker name: its MQTT session is noc-ingest-NAME")
    s.add_argument(
        "--standby", action="store_true", default=None,
        help="also hold the standby session that covers a broker restart (one worker is enough)",
    )  # fmt: skip
    sub.add_parser("web", help="run the dashboard")
    sub.add_parser("enroll", help="run the enrollment endpoint (HTTPS, EST-shaped)")
    sub.add_parser("alerts", help="evaluate alert rules, deliver the webhook, prune periodically")
    sub.add_parser("prune", help="delete rows older than the retention settings, once")
    s = sub.add_parser("send", help="send an allow-listed command and wait for the reply")
    s.add_argument("device")
    s.add_argument("command", help="ping, policy, collect, narrow")
    s.add_argument(
        "args", nargs="*", help="key=value (collect collector=health, narrow class=config)"
    )
    s.add_argument("--timeout", type=float, help="seconds to wait for the reply")
    s.add_argument("--as", dest="sent_by", default=None, help="who sends it (default: $USER)")
    s = sub.add_parser("org", help="organizations")
    s.add_argument("action", choices=["add"])
    s.add_argument("slug")
    s.add_argument("name")
    s = sub.add_parser("user", help="dashboard users")
    s.add_argument("action", choices=["add"])
    s.add_argument("username")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--staff", action="store_true", help="NOC staff: the whole fleet, commands")
    g.add_argument("--org", help="a customer of this organization (its slug)")
    s = sub.add_parser("device", help="devices")
    s.add_argument("action", choices=["add", "token", "revoke"])
    s.add_argument("device")
    s.add_argument("--org", help="the organization that owns the box")
    s.add_argument("--cert", type=Path, help="its certificate: the expiry is recorded")
    s.add_argument(
        "--serial", action="append", default=[],
        help="revoke: also this serial (decimal), e.g. of a hand-made certificate",
    )  # fmt: skip
    sub.add_parser("crl", help="write the broker's CRL again and make it reload it")
    sub.add_parser("ca", help="the vendor CA (see python -m noc.ca --help)", add_help=False)
    sub.add_parser("keys", help="command-signing keys (see noc keys --help)", add_help=False)
    return p


def _config(args: argparse.Namespace) -> NocConfig:
    path = args.config
    if path is None and os.environ.get("NOC_CONFIG"):
        path = Path(os.environ["NOC_CONFIG"])
    if path is None and DEFAULT_PATH.exists():
        path = DEFAULT_PATH
    return load(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    i = 0
    while i < len(argv) and argv[i] in ("-c", "--config", "--log-level"):
        i += 2  # the global options take a value each
    if i < len(argv) and argv[i] == "ca":
        from noc import ca

        return ca.main(argv[i + 1 :])  # the CA needs no configuration file
    if i < len(argv) and argv[i] == "keys":
        from noc import signing

        return signing.main(argv[i + 1 :])  # the root is offline: no configuration either
    args = _parser().parse_args(argv)
    from noc import logs

    logs.setup(args.log_level)
    try:
        return _run(args)
    except NocError as exc:
        print(f"noc: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    config = _config(args)
    from noc import db

    if args.cmd == "migrate":
        done = db.migrate(config.database)
        for m in done:
            print(f"applied {m.version:04d}_{m.name}")
        print("schema up to date" if not done else f"{len(done)} migration(s) applied")
        return 0
    if args.cmd == "ingest":
        from noc import ingest

        return ingest.serve(config, name=args.name, standby=args.standby)
    if args.cmd == "web":
        from noc.web import app

        return app.serve(config)
    if args.cmd == "alerts":
        from noc import alerts

        return alerts.serve(config)
    if args.cmd == "enroll":
        from noc import enroll

        return enroll.serve(config)
    pool = db.pool(config.database, max_size=2)
    try:
        return _admin(args, config, pool)
    finally:
        pool.close()


def _admin(args: argparse.Namespace, config: NocConfig, pool: object) -> int:
    from psycopg_pool import ConnectionPool

    from noc import accounts, commands, retention

    assert isinstance(pool, ConnectionPool)
    if args.cmd == "prune":
        with pool.connection() as conn:
            counts = retention.prune(conn, config.retention)
        print(" ".join(f"{k}={v}" for k, v in counts.items()))
        return 0
    if args.cmd == "send":
        who = args.sent_by or os.environ.get("USER") or getpass.getuser()
        sent = commands.send(
            config, pool, args.device, args.command, commands.parse_args(args.args),
            sent_by=f"cli:{who}", timeout=args.timeout,
        )  # fmt: skip
        if sent.reply is None:
            print(
                f"noc: no reply from {args.device} to {args.command} (id {sent.command['id']}) "
                f"within {sent.seconds:.1f}s: is it connected?",
                file=sys.stderr,
            )
            return 69
        print(json.dumps(sent.reply, indent=2))
        return 0 if sent.reply.get("ok") else 2
    if args.cmd == "org":
        with pool.connection() as conn:
            org_id = accounts.add_org(conn, args.slug, args.name)
        print(f"organization {args.slug} (id {org_id})")
        return 0
    if args.cmd == "user":
        password = os.environ.get("NOC_PASSWORD") or getpass.getpass(
            f"password for {args.username}: "
        )
        role = accounts.Role.STAFF if args.staff else accounts.Role.CUSTOMER
        with pool.connection() as conn:
            accounts.add_user(conn, args.username, password, role=role, org=args.org)
        print(f"user {args.username} ({role}{'' if args.staff else ' of ' + args.org})")
        return 0
    if args.cmd == "crl":
        from noc import revoke

        listed = revoke.refresh(config, pool)
        print(f"CRL {config.revocation.crl_file}: {listed} revoked certificate(s); broker reloaded")
        return 0
    if args.cmd == "device" and args.action == "revoke":
        from noc import revoke

        done = revoke.revoke(config, pool, args.device, args.serial)
        print(
            f"device {args.device}: {len(done['serials'])} certificate(s) revoked, CRL of "
            f"{done['crl_entries']} reloaded by the broker (pid {done['broker_pid']}), live "
            "session dropped"
        )
        return 0
    if args.cmd == "device" and args.action == "token":
        print(_token(args, config, pool))
        return 0
    if args.cmd == "device":
        not_after = None
        if args.cert is not None:
            not_after = _cert_expiry(args.cert)
        with pool.connection() as conn:
            accounts.assign_device(conn, args.device, args.org, not_after)
        print(
            f"device {args.device}"
            + (f" (certificate valid until {not_after:%Y-%m-%d})" if not_after else "")
        )
        if args.cert is None:
            print(_token(args, config, pool))
        return 0
    raise UsageError(f"unknown command {args.cmd}")


def _token(args: argparse.Namespace, config: NocConfig, pool: Any) -> str:
    """A one-time enrollment token for the device, and how to use it (shown once)."""
    from noc import enroll

    who = os.environ.get("USER") or getpass.getuser()
    with pool.connection() as conn:
        token = enroll.new_token(
            conn, args.device, ttl=config.enroll.token_ttl, created_by=f"cli:{who}"
        )
    hours = config.enroll.token_ttl / 3600
    return (
        f"enrollment token (single use, valid {hours:g} h, for {args.device} only):\n"
        f"  {token}\n"
        f"on the box: agentctl enroll --token {token}"
    )


def _cert_expiry(path: Path) -> dt.datetime:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not a readable PEM certificate: {exc}") from exc
    return cert.not_valid_after_utc
