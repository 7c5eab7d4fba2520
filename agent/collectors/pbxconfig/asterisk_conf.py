"""A reader for Asterisk's configuration syntax, faithful to main/config.c.

Redaction is only as good as the parser under it: a secret hidden by a syntax
rule we got wrong would leave the box. This module follows Asterisk's own rules
(studied in main/config.c, written anew here):

- ``;`` starts a comment anywhere on a line, unless escaped as ``\\;`` (the
  backslash is removed from the value);
- ``;--`` opens a block comment (not ``;---``), ``--;`` closes it; blocks nest
  and span lines; text on either side of a block on one line is joined;
- ``[name]`` starts a section; ``[name](!)`` is a template, ``[name](tpl,…)``
  inherits the templates' variables, ``[name](+)`` adds to an earlier section;
  sections and keys may repeat;
- ``key = value`` and ``key => value`` (an object), ``key += value`` appends to
  the previous value of the key; keys compare case-insensitively;
- ``#include`` / ``#tryinclude`` take a file name bare, in quotes or in angle
  brackets, possibly a glob; ``#exec`` runs a program in Asterisk: here it is
  recorded and never run.

Two layers: :func:`lex` turns text into :class:`Line` objects that keep the raw
text (so a file round-trips byte for byte, even lines we do not understand),
and :func:`load` builds sections with templates and includes through a caller's
``opener``, which decides what may be read.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath

MAX_NESTED_COMMENTS = 128
MAX_INCLUDE_DEPTH = 10


class Kind(enum.Enum):
    """What a physical line is, once comments are set aside."""

    BLANK = "blank"  # nothing but whitespace and comments
    SECTION = "section"  # [name] or [name](options)
    ASSIGN = "assign"  # key = value, key => value, key += value
    DIRECTIVE = "directive"  # #include, #tryinclude, #exec
    UNKNOWN = "unknown"  # Asterisk would warn and skip it


@dataclass(frozen=True, slots=True)
class Segment:
    """A span ``[start, end)`` of a raw line, either code or comment."""

    start: int
    end: int
    comment: bool


@dataclass(slots=True)
class Line:
    """One physical line: the raw text and what Asterisk would make of it."""

    number: int
    raw: str
    segments: tuple[Segment, ...]
    kind: Kind = Kind.BLANK
    code: str = ""  # the code part, comments removed, \\; unescaped, stripped
    key: str = ""
    op: str = ""  # "=", "=>", "+="
    value: str = ""
    section: str = ""
    options: tuple[str, ...] = ()
    directive: str = ""
    argument: str = ""

    @property
    def code_segments(self) -> list[Segment]:
        """The code spans of the raw line."""
        return [s for s in self.segments if not s.comment]

    @property
    def comments(self) -> list[Segment]:
        """The comment spans of the raw line."""
        return [s for s in self.segments if s.comment]


def split_comments(text: str, depth: int) -> tuple[tuple[Segment, ...], int]:
    """Split one line into code and comment spans; returns them and the new block depth.

    ``depth`` is the block-comment nesting at the start of the line. A ``--;``
    outside any block is taken as an ordinary comment start (Asterisk would
    let its counter go negative and ignore the rest of the file).
    """
    segs: list[Segment] = []
    n = len(text)
    pos = 0
    start = 0  # start of the current span
    in_comment = depth > 0
    while True:
        i = text.find(";", pos)
        if i < 0:
            break
        if i > pos and text[i - 1] == "\\":
            pos = i + 1  # \; is not a comment, in code or in a block
        elif text.startswith("--", i + 1) and text[i + 3 : i + 4] != "-":
            if depth < MAX_NESTED_COMMENTS:
                if depth == 0:
                    if i > start:
                        segs.append(Segment(start, i, False))
                    start = i
                    in_comment = True
                depth += 1
            pos = i + 3
        elif depth > 0 and i >= pos + 2 and text[i - 2 : i] == "--":
            depth -= 1
            pos = i + 1
            if depth == 0:
                segs.append(Segment(start, i + 1, True))
                start = i + 1
                in_comment = False
        elif depth == 0:
            if i > start:
                segs.append(Segment(start, i, False))
            segs.append(Segment(i, n, True))
            return tuple(segs), 0
        else:
            pos = i + 1
    if n > start:
        segs.append(Segment(start, n, in_comment))
    return tuple(segs), depth


def unescape(code: str) -> str:
    """Asterisk's value text: ``\\;`` becomes ``;``."""
    return code.replace("\\;", ";")


def classify(line: Line) -> None:
    """Fill in what the line's code means (section, assignment, directive)."""
    code = unescape("".join(line.raw[s.start : s.end] for s in line.code_segments)).strip()
    line.code = code
    if not code:
        line.kind = Kind.BLANK
        return
    if code[0] == "[":
        close = code.find("]")
        if close < 0:
            line.kind = Kind.UNKNOWN
            return
        line.kind = Kind.SECTION
        line.section = code[1:close]
        rest = code[close + 1 :].strip()
        if rest.startswith("("):
            inner = rest[1 : rest.index(")")] if ")" in rest else rest[1:]
            line.options = tuple(o.strip() for o in inner.split(",") if o.strip())
        return
    if code[0] == "#":
        word_end = 1
        while word_end < len(code) and not code[word_end].isspace():
            word_end += 1
        line.kind = Kind.DIRECTIVE
        line.directive = code[1:word_end].lower()
        line.argument = strip_quotes(code[word_end:].strip())
        return
    eq = code.find("=")
    if eq < 0:
        line.kind = Kind.UNKNOWN
        return
    key = code[:eq]
    value = code[eq + 1 :]
    op = "="
    if value.startswith(">"):
        op, value = "=>", value[1:]
    key = key.strip()
    if key.endswith("+"):
        op, key = "+=", key[:-1].rstrip()
    line.kind = Kind.ASSIGN
    line.key, line.op, line.value = key, op, value.strip()


def strip_quotes(arg: str) -> str:
    """``"file"`` and ``<file>`` become ``file``, as Asterisk does for directives."""
    if len(arg) >= 2 and ((arg[0] == '"' and arg[-1] == '"') or (arg[0] == "<" and arg[-1] == ">")):
        return arg[1:-1]
    return arg


def lex(text: str) -> list[Line]:
    """Every physical line of ``text`` with its comment spans and meaning.

    Line endings stay in ``raw`` so that ``"".join(l.raw for l in lex(t)) == t``.
    """
    lines: list[Line] = []
    depth = 0
    for number, raw in enumerate(text.splitlines(keepends=True), start=1):
        body = raw.rstrip("\r\n")
        segs, depth = split_comments(body, depth)
        line = Line(number=number, raw=raw, segments=segs)
        classify(line)
        lines.append(line)
    return lines


def render(lines: list[Line]) -> str:
    """The text the lines came from (the round trip of :func:`lex`)."""
    return "".join(line.raw for line in lines)


# -- the semantic layer: sections, templates, includes ------------------------


@dataclass(slots=True)
class Variable:
    """One ``key = value`` with where it came from."""

    name: str
    value: str
    op: str
    file: str
    line: int
    inherited: bool = False


@dataclass(slots=True)
class Category:
    """A ``[section]``: its variables in order; repeated sections are separate."""

    name: str
    file: str
    line: int
    template: bool = False
    inherits: tuple[str, ...] = ()
    variables: list[Variable] = field(default_factory=list)

    def get(self, key: str) -> str | None:
        """The last value of ``key`` (case-insensitive), as Asterisk's lookups return it."""
        k = key.lower()
        for v in reversed(self.variables):
            if v.name.lower() == k:
                return v.value
        return None

    def get_all(self, key: str) -> list[str]:
        """Every value of a repeated key, in order."""
        k = key.lower()
        return [v.value for v in self.variables if v.name.lower() == k]


@dataclass(frozen=True, slots=True)
class Include:
    """An ``#include``/``#tryinclude``/``#exec`` as written, and where."""

    directive: str
    argument: str
    file: str
    line: int


@dataclass(frozen=True, slots=True)
class Problem:
    """Something Asterisk would warn about; never fatal here."""

    file: str
    line: int | None
    reason: str


@dataclass(slots=True)
class Config:
    """A loaded configuration: sections, directives met and problems found."""

    categories: list[Category] = field(default_factory=list)
    includes: list[Include] = field(default_factory=list)
    execs: list[Include] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def sections(self, name: str) -> list[Category]:
        """Every section called ``name`` (case-insensitive), templates excluded."""
        n = name.lower()
        return [c for c in self.categories if c.name.lower() == n and not c.template]

    def section(self, name: str) -> Category | None:
        """The first section called ``name``, or None."""
        found = self.sections(name)
        return found[0] if found else None

    def find(self, name: str, *, templates: bool = True) -> Category | None:
        """The last section or template called ``name`` (what inheritance looks up)."""
        n = name.lower()
        for c in reversed(self.categories):
            if c.name.lower() == n and (templates or not c.template):
                return c
        return None


#: Reads an include target: returns its text, or None when it may not or cannot be read
#: (the opener records why). ``expand`` turns a glob into the paths it may read.
Opener = Callable[[PurePosixPath], "str | None"]
Expander = Callable[[str], list[PurePosixPath]]


def load(
    text: str, name: str, *, base_dir: PurePosixPath, opener: Opener, expand: Expander | None = None
) -> Config:
    """Build sections from ``text``, following includes through ``opener``.

    Relative include paths are taken from ``base_dir`` (Asterisk's config
    directory). Loops and depth beyond :data:`MAX_INCLUDE_DEPTH` are reported
    as problems. ``#exec`` is recorded, never run.
    """
    cfg = Config()
    state: dict[str, Category | None] = {"cat": None}
    _load_into(cfg, text, name, base_dir, opener, expand, state, (name,))
    return cfg


def _load_into(
    cfg: Config,
    text: str,
    name: str,
    base_dir: PurePosixPath,
    opener: Opener,
    expand: Expander | None,
    state: dict[str, Category | None],
    stack: tuple[str, ...],
) -> None:
    cfg.files.append(name)
    for line in lex(text):
        if line.kind is Kind.SECTION:
            state["cat"] = _start_section(cfg, line, name)
        elif line.kind is Kind.ASSIGN:
            cat = state["cat"]
            if cat is None:
                cfg.problems.append(
                    Problem(name, line.number, f"key {line.key!r} before any [section]")
                )
                continue
            if line.op == "+=":
                for v in reversed(cat.variables):
                    if v.name.lower() == line.key.lower():
                        v.value += line.value
                        break
                else:
                    cat.variables.append(Variable(line.key, line.value, "=", name, line.number))
            else:
                cat.variables.append(Variable(line.key, line.value, line.op, name, line.number))
        elif line.kind is Kind.DIRECTIVE:
            inc = Include(line.directive, line.argument, name, line.number)
            if line.directive == "exec":
                cfg.execs.append(inc)
            elif line.directive in ("include", "tryinclude"):
                cfg.includes.append(inc)
                _follow(cfg, inc, base_dir, opener, expand, state, stack)
            else:
                cfg.problems.append(
                    Problem(name, line.number, f"unknown directive #{line.directive}")
                )
        elif line.kind is Kind.UNKNOWN:
            cfg.problems.append(Problem(name, line.number, "no '=' (equal sign) on the line"))


def _start_section(cfg: Config, line: Line, name: str) -> Category:
    opts = line.options
    if "+" in opts:
        existing = cfg.find(line.section)
        if existing is not None:
            return existing
        cfg.problems.append(
            Problem(name, line.number, f"[{line.section}](+) adds to a section that does not exist")
        )
    cat = Category(line.section, name, line.number, template="!" in opts)
    inherits = tuple(o for o in opts if o not in ("!", "+"))
    cat.inherits = inherits
    for base_name in inherits:
        base = cfg.find(base_name)
        if base is None:
            cfg.problems.append(
                Problem(
                    name,
                    line.number,
                    f"[{line.section}] inherits from {base_name!r}, which does not exist",
                )
            )
            continue
        for v in base.variables:
            cat.variables.append(Variable(v.name, v.value, v.op, v.file, v.line, inherited=True))
    cfg.categories.append(cat)
    return cat


def include_targets(
    argument: str, base_dir: PurePosixPath, expand: Expander | None
) -> list[PurePosixPath]:
    """The paths an include argument names: absolute or from ``base_dir``, globs expanded."""
    path = PurePosixPath(argument)
    if not path.is_absolute():
        path = base_dir / path
    if any(ch in argument for ch in "*?["):
        return expand(str(path)) if expand is not None else []
    return [path]


def _follow(
    cfg: Config,
    inc: Include,
    base_dir: PurePosixPath,
    opener: Opener,
    expand: Expander | None,
    state: dict[str, Category | None],
    stack: tuple[str, ...],
) -> None:
    if not inc.argument:
        cfg.problems.append(Problem(inc.file, inc.line, f"#{inc.directive} without a file"))
        return
    targets = include_targets(inc.argument, base_dir, expand)
    if not targets and inc.directive == "include":
        cfg.problems.append(
            Problem(inc.file, inc.line, f"#include {inc.argument!r} matches no readable file")
        )
    for target in targets:
        key = str(target)
        if key in stack:
            cfg.problems.append(Problem(inc.file, inc.line, f"include loop through {key}"))
            continue
        if len(stack) > MAX_INCLUDE_DEPTH:
            cfg.problems.append(Problem(inc.file, inc.line, "includes nested too deeply"))
            continue
        text = opener(target)
        if text is None:
            if inc.directive == "include":
                cfg.problems.append(Problem(inc.file, inc.line, f"#include {key} cannot be read"))
            continue
        _load_into(cfg, text, key, base_dir, opener, expand, state, (*stack, key))


def iter_assignments(lines: list[Line]) -> Iterator[tuple[str, Line]]:
    """Each assignment line with the section it is in (for tests and tools)."""
    section = ""
    for line in lines:
        if line.kind is Kind.SECTION:
            section = line.section
        elif line.kind is Kind.ASSIGN:
            yield section, line


def directives(text: str) -> list[Line]:
    """The ``#include``/``#tryinclude``/``#exec`` lines of a file, comments honoured.

    Fast when the file has no block comments: only lines starting with ``#``
    are looked at.
    """
    if ";--" in text:
        return [ln for ln in lex(text) if ln.kind is Kind.DIRECTIVE]
    found: list[Line] = []
    pos = text.find("#")
    while pos >= 0:
        start = text.rfind("\n", 0, pos) + 1
        end = text.find("\n", pos)
        end = len(text) if end < 0 else end
        raw = text[start:end].rstrip("\r")
        if not text[start:pos].strip():
            segs, _ = split_comments(raw, 0)
            line = Line(number=text.count("\n", 0, start) + 1, raw=raw, segments=segs)
            classify(line)
            if line.kind is Kind.DIRECTIVE:
                found.append(line)
        pos = text.find("#", end)
    return found
