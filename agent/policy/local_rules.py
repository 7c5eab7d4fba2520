"""An administrator's own redaction rules (``collectors.config.redact.extra``).

Local rules can only *add* masking: they are consulted beside the built-in
tables, never instead of them, and there is no way to write one that keeps a
value the built-in rules mask. Three kinds:

- ``keys``: regular expressions over key and variable names (searched,
  case-insensitively): a match makes the name secret wherever it is assigned,
  in every syntax (``local-key``);
- ``values``: regular expressions searched in every line of every file; the
  match (or its first group, when the expression has one) is masked
  (``local-value``);
- ``arguments``: dialplan applications or functions and the 1-based positions
  of their secret arguments, for custom AGI scripts, macros and subroutines
  (``local-argument``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.policy.masks import Mask

__all__ = ["NO_LOCAL_RULES", "LocalRules", "compile_rules"]

_APP_NAME = re.compile(r"[A-Za-z_][\w.-]{0,63}")


@dataclass(frozen=True, slots=True)
class LocalRules:
    """Compiled local rules; ``source`` is what they were made from (for :attr:`digest`)."""

    keys: tuple[re.Pattern[str], ...] = ()
    values: tuple[re.Pattern[str], ...] = ()
    arguments: Mapping[str, frozenset[int]] = field(default_factory=dict)
    source: str = ""

    def __bool__(self) -> bool:
        return bool(self.keys or self.values or self.arguments)

    @property
    def digest(self) -> str:
        """A short digest of the rules: cached results made under other rules are redone."""
        if not self:
            return ""
        return hashlib.sha256(self.source.encode()).hexdigest()[:12]

    def key_matches(self, name: str) -> bool:
        """Whether a local key pattern calls ``name`` secret."""
        return any(p.search(name) for p in self.keys)

    def value_masks(self, text: str) -> list[Mask]:
        """What the local value patterns find in ``text``."""
        out: list[Mask] = []
        for i, p in enumerate(self.values, start=1):
            group = 1 if p.groups else 0
            for m in p.finditer(text):
                if m.end(group) > m.start(group) >= 0:
                    out.append(Mask(m.start(group), m.end(group), "local-value", f"value rule {i}"))
        return out

    def secret_arguments(self, app: str) -> frozenset[int]:
        """The positions local rules declare secret for application or function ``app``."""
        return self.arguments.get(app.lower(), frozenset())


NO_LOCAL_RULES = LocalRules()


def compile_rules(
    keys: list[str], values: list[str], arguments: list[tuple[str, list[int]]]
) -> tuple[LocalRules, list[tuple[str, str]]]:
    """Compile local rules; returns them and the problems found as (where, reason).

    ``where`` is ``keys[2]``, ``values[0]``, ``arguments.NAME`` … so that the
    configuration loader can name the key and line.
    """
    problems: list[tuple[str, str]] = []
    key_rx: list[re.Pattern[str]] = []
    value_rx: list[re.Pattern[str]] = []
    for kind, items, out in (("keys", keys, key_rx), ("values", values, value_rx)):
        for i, text in enumerate(items):
            if not text:
                problems.append((f"{kind}[{i}]", "an empty pattern would match everything"))
                continue
            try:
                rx = re.compile(text, re.IGNORECASE)
            except re.error as exc:
                problems.append((f"{kind}[{i}]", f"not a valid regular expression: {exc}"))
                continue
            if rx.search("") is not None:
                problems.append((f"{kind}[{i}]", "the pattern matches the empty string"))
                continue
            out.append(rx)
    args: dict[str, frozenset[int]] = {}
    for name, positions in arguments:
        if not _APP_NAME.fullmatch(name):
            problems.append((f"arguments.{name}", "is not an application or function name"))
            continue
        if not positions or any(p < 1 or p > 128 for p in positions):
            problems.append((f"arguments.{name}", "expected argument numbers from 1 to 128"))
            continue
        args[name.lower()] = args.get(name.lower(), frozenset()) | frozenset(positions)
    source = repr((sorted(keys), sorted(values), sorted((k, sorted(v)) for k, v in args.items())))
    rules = LocalRules(tuple(key_rx), tuple(value_rx), args, source)
    return rules, problems
