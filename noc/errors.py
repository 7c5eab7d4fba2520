"""The NOC's errors: one root, each with the sysexits code its command exits with.

Library errors (psycopg, paho, OS) are translated where they enter the NOC
(``raise NocError(...) from exc``); nothing above that boundary imports them.

    NocError (70, software)
    ├── ConfigError (78)     the NOC's configuration file is wrong; names file and key
    ├── StoreError (75)      PostgreSQL cannot be reached or refused a statement
    ├── BrokerError (69)     the broker cannot be reached or refused us
    ├── CommandError (69)    a command was not answered in time, or cannot be sent
    └── UsageError (64)      bad arguments
"""

from __future__ import annotations


class NocError(Exception):
    """Root of the NOC's errors."""

    exit_code = 70


class ConfigError(NocError):
    """The configuration file cannot be used; the message names the file and key."""

    exit_code = 78


class StoreError(NocError):
    """PostgreSQL is unreachable or refused a statement."""

    exit_code = 75


class BrokerError(NocError):
    """The broker is unreachable or refused the NOC's client."""

    exit_code = 69


class CommandError(NocError):
    """A command could not be sent, or was not answered within its timeout."""

    exit_code = 69


class UsageError(NocError):
    """Bad arguments on the command line."""

    exit_code = 64
