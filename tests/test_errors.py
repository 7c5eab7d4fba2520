"""The exception tree: every exception the agent raises on purpose is drawn in agent/errors.py.

A module that invents its own exception class outside the tree (or a class in
the tree missing from its drawing) fails here, so the docstring a newcomer
reads stays the whole truth.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from agent import errors
from agent.errors import AgentError, Refusal

AGENT = Path(__file__).resolve().parents[1] / "agent"
EXCEPTION_BASES = {"Exception", "ValueError", "RuntimeError", "OSError", "LookupError"}


def test_no_public_exception_class_outside_errors_py() -> None:
    """Only private exceptions (a parser's or a loop's own, never leaving its module) live
    elsewhere; every public one is in agent/errors.py."""
    outside = []
    for path in sorted(AGENT.rglob("*.py")):
        if path.name == "errors.py" and path.parent == AGENT:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = {b.id for b in node.bases if isinstance(b, ast.Name)}
                if bases & EXCEPTION_BASES:
                    outside.append(f"{path.relative_to(AGENT)}:{node.name}")
    assert outside == []


def test_every_class_in_the_tree_has_a_root_an_exit_status_and_a_place_in_the_drawing() -> None:
    """Each exception in errors.py derives from AgentError or Refusal, has a sysexits status
    and is named in the module's drawing."""
    drawing = errors.__doc__ or ""
    classes = [
        c
        for _, c in inspect.getmembers(errors, inspect.isclass)
        if issubclass(c, BaseException) and c.__module__ == errors.__name__
    ]
    assert {AgentError, Refusal} <= set(classes)
    for c in classes:
        assert issubclass(c, AgentError | Refusal), c
        assert 0 < c.exit_code < 126, c
        assert c.__name__ in drawing, f"{c.__name__} is not drawn in agent/errors.py"


def test_refusals_are_not_errors() -> None:
    """A refusal is an answer, not a failure: no handler for AgentError catches one by accident."""
    assert not issubclass(Refusal, AgentError)
    assert not issubclass(AgentError, Refusal)
