"""Per configuration file type: which keys hold secrets by position, dialplan or variables.

Asterisk reads the same ``key => value`` syntax in every file, but what a
value means depends on the file. A file's *type* is its name's first word
(``meetme_additional.conf`` is a MeetMe file, ``extensions_custom.conf`` and
FreePBX's ``globals_custom.conf`` are dialplan), because FreePBX splits each
module's configuration into ``NAME.conf``, ``NAME_additional.conf`` and
``NAME_custom.conf`` and includes them into one another.

- :data:`POSITIONAL`: comma-separated fields that are secret, by file type and
  key (MeetMe rooms, chan_agent's agents; voicemail mailboxes have their own
  rules in :mod:`agent.policy.redact`);
- :data:`VARIABLE_KEYS`: keys whose value is ``NAME=VALUE``, a variable set on
  a channel (``setvar``, ``set_var``): the name decides, as in ``Set()``;
- :data:`DIALPLAN_KEYS`: keys whose value holds dialplan application calls;
- ``[globals]`` (and all of a ``globals*`` file) holds dialplan variables;
- ``[applicationmap]`` of features.conf runs an application with arguments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "DIALPLAN_FAMILIES",
    "DIALPLAN_KEYS",
    "FULL_PARSE_FAMILIES",
    "POSITIONAL",
    "SECTIONED_FAMILIES",
    "VARIABLE_KEYS",
    "FieldSpec",
    "family_of",
    "is_variables_section",
    "maps_names",
]


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """Secret fields (1-based) of a comma-separated value; the last of ``nargs`` takes the rest."""

    fields: tuple[int, ...]
    nargs: int
    what: str
    doc: str


#: (file type, key) → the secret fields of its value.
POSITIONAL: dict[tuple[str, str], FieldSpec] = {
    ("meetme", "conf"): FieldSpec(
        (2, 3),
        3,
        "the user PIN and the admin PIN of a room",
        "meetme.conf [rooms]: conf => confno[,pin][,adminpin] (apps/app_meetme.c find_conf)",
    ),
    ("agents", "agent"): FieldSpec(
        (2,),
        3,
        "the agent's password",
        "agents.conf (chan_agent, Asterisk 11 and older): agent => agentid,agentpassword,name",
    ),
}

#: Keys whose value is ``NAME=VALUE`` (a channel variable), in any file.
VARIABLE_KEYS = frozenset({"setvar", "set_var"})

#: Keys whose value holds dialplan calls (extensions.conf and anything it includes).
DIALPLAN_KEYS = frozenset({"exten", "same"})

#: File types whose every key is a dialplan variable or extension.
DIALPLAN_FAMILIES = frozenset({"extensions", "globals"})

#: File types whose rules depend on the section a key is in.
SECTIONED_FAMILIES = frozenset({"extensions", "globals", "res_ldap", "features", "meetme"})

#: File types small and rich enough to be read line by line in full (no fast path).
FULL_PARSE_FAMILIES = frozenset({"meetme", "agents", "features"})


_FREEPBX_SUFFIX = re.compile(r"_(?:additional|custom|general|registrations|override|post)(?:_.*)?$")


def family_of(name: str) -> str:
    """The type of a configuration file from its name.

    ``meetme_additional.conf`` → ``meetme``, ``pjsip.auth.conf`` → ``pjsip``,
    ``sip_general_custom.conf`` → ``sip``, ``res_ldap.conf`` → ``res_ldap``.
    """
    base = name.rsplit("/", 1)[-1].lower().split(".", 1)[0]
    return _FREEPBX_SUFFIX.sub("", base)


def is_variables_section(family: str, section: str) -> bool:
    """Whether ``[section]`` of a file of type ``family`` holds dialplan variables.

    Only dialplan files: res_curl.conf, for one, has a ``[globals]`` of settings.
    """
    if family == "globals":
        return not section or section.lower() == "globals"
    return family == "extensions" and section.lower() == "globals"


def maps_names(family: str, section: str) -> bool:
    """Whether keys of ``[section]`` name fields and values name columns or attributes.

    res_ldap.conf maps Asterisk's fields to LDAP attributes
    (``md5secret = AstAccountRealmedPassword``) outside ``[_general]``: those
    values are names, not secrets.
    """
    return family == "res_ldap" and section.lower() not in ("_general", "")
