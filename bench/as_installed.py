"""Run ``agentctl`` with only the libraries ``pip install .`` would give it.

The development virtualenv also holds the test and lint tools, and some of
them are imported when present: structlog's console renderer imports ``rich``
(brought by import-linter) and with it pygments, about 8 MiB. A box has none of
them. This launcher hides every installed distribution outside the closure of
pbx-agent's own requirements (extras excluded), so the bench measures the
daemon as a box runs it:

    python -m bench.as_installed -c agent.yaml run
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import re
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def required(root: str = "pbx-agent") -> set[str]:
    """The distributions ``pip install ROOT`` installs (normalised names), ROOT included."""
    from importlib import metadata

    seen: set[str] = set()
    todo = [root]
    while todo:
        name = _key(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for req in reqs:
            if "extra ==" in req.replace('"', "").replace("'", ""):
                continue  # an optional extra: not installed on a box
            m = _NAME.match(req)
            if m:
                todo.append(m.group(0))
    return seen


def _top_level(dist: Any) -> set[str]:
    text = dist.read_text("top_level.txt")
    if text:
        return {line.strip() for line in text.splitlines() if line.strip()}
    out = set()
    for f in dist.files or ():
        top = f.parts[0]
        if top.endswith((".dist-info", ".egg-info", ".pth")) or top in ("..", "__pycache__"):
            continue
        out.add(top.removesuffix(".py").split(".")[0])
    return out


def hidden() -> set[str]:
    """Top-level module names of the installed distributions a box would not have."""
    from importlib import metadata

    keep = required()
    kept: set[str] = set()
    other: set[str] = set()
    for dist in metadata.distributions():
        names = _top_level(dist)
        (kept if _key(dist.metadata["Name"]) in keep else other).update(names)
    return other - kept - {"agent", "bench", "tests"}


class _Hide(importlib.abc.MetaPathFinder):
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: not on a box)", name=name)
        return None


#: The names to hide, computed by the caller: finding them loads importlib.metadata (and
#: email, zipfile ...), which must not stay resident in the process being measured.
ENV = "PBX_BENCH_HIDE"


def environment() -> dict[str, str]:
    """What to put in the daemon's environment so that it hides without looking."""
    return {ENV: ",".join(sorted(hidden()))}


def main() -> int:
    """Hide what a box lacks, then run agentctl with this process's arguments."""
    names = os.environ.get(ENV)
    sys.meta_path.insert(0, _Hide(set(names.split(",")) if names else hidden()))
    from agent.cli import main as agentctl

    return agentctl(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
