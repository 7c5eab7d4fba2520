"""Man pages and shell completion, generated so that they cannot drift.

``python -m agent.cli.docs`` writes, at the repository root:

- ``man/agentctl.8`` from agentctl's argparse parser (every subcommand, its
  options and choices) and the exit statuses of its epilog;
- ``man/agent.yaml.5`` from the configuration reference table of README.md;
- ``completion/agentctl.bash`` and ``completion/_agentctl`` (zsh) from the parser.

``--check`` writes nothing and exits 1 when a committed file differs from what
would be generated (``tests/test_docs.py`` runs the same comparison). The
packaging installs these files as they are.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATE = "2026"  # fixed, so that regenerating gives the same bytes
ENVIRONMENT = {
    "PBX_AGENT_CONFIG": "the configuration file when -c is not given "
    "(default /etc/pbx-agent/agent.yaml)",
    "PBX_AGENT_LOG_FORMAT": "auto (default), journal, json or console: how the daemon logs",
    "PBX_AGENT_JOURNAL_SOCKET": "another journal socket than /run/systemd/journal/socket",
}


@dataclass
class Command:
    """One (sub)command of the parser, as the generators need it."""

    path: list[str]
    help: str
    parser: argparse.ArgumentParser
    children: list[Command] = field(default_factory=list)

    def options(self) -> Iterator[argparse.Action]:
        """Its optional arguments, -h/--help aside."""
        for a in self.parser._actions:
            if a.option_strings and not isinstance(a, argparse._HelpAction):
                yield a

    def positionals(self) -> Iterator[argparse.Action]:
        """Its positional arguments (not the subcommand slot)."""
        for a in self.parser._actions:
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction):
                yield a


def tree(parser: argparse.ArgumentParser, path: list[str] | None = None) -> Command:
    """The parser as a tree of commands."""
    root = Command(path or [], parser.description or "", parser)
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help or "" for c in a._choices_actions}
            for name, child in a.choices.items():
                root.children.append(tree(child, [*root.path, name]))
                root.children[-1].help = helps.get(name, "")
    return root


def walk(cmd: Command) -> Iterator[Command]:
    """Every command below ``cmd``, depth first."""
    for c in cmd.children:
        yield c
        yield from walk(c)


# -- roff --------------------------------------------------------------------------------


def roff(text: str) -> str:
    """Markdown-ish text as roff: `code` in bold, escapes, no leading dots."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = re.sub(r"`([^`]*)`", r"\\fB\1\\fR", text)
    text = re.sub(r"\*\*([^*]*)\*\*", r"\\fB\1\\fR", text)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links: their text
    return "\n".join(("\\&" + ln if ln.startswith((".", "'")) else ln) for ln in text.split("\n"))


def _metavar(a: argparse.Action) -> str:
    if a.nargs == 0:
        return ""
    if a.choices:
        return "{" + ",".join(str(c) for c in a.choices) + "}"
    return str(a.metavar or a.dest.upper())


def _usage(cmd: Command) -> str:
    parts = ["agentctl", *cmd.path]
    for a in cmd.options():
        if a.dest == "config":
            continue
        mv = _metavar(a)
        word = f"{a.option_strings[-1]}{' ' + mv if mv else ''}"
        parts.append(word if a.required else f"[{word}]")
    for a in cmd.positionals():
        mv = _metavar(a) if a.choices else str(a.metavar or a.dest)
        parts.append(f"[{mv}]" if a.nargs in ("?", "*") else mv)
    if cmd.children:
        parts.append("{" + ",".join(c.path[-1] for c in cmd.children) + "}")
    return " ".join(parts)


def man_agentctl(parser: argparse.ArgumentParser) -> str:
    """agentctl(8) from the parser."""
    from agent import __version__

    root = tree(parser)
    out = [
        f'.TH AGENTCTL 8 "{DATE}" "pbx-agent {__version__}" "System Administration"',
        ".SH NAME",
        "agentctl \\- control the pbx\\-agent telemetry daemon on this PBX",
        ".SH SYNOPSIS",
        "\\fBagentctl\\fR [\\fB\\-c\\fR \\fIFILE\\fR] [\\fB\\-\\-version\\fR] "
        "\\fICOMMAND\\fR [\\fIARGS\\fR] [\\fB\\-c\\fR \\fIFILE\\fR]",
        ".SH DESCRIPTION",
        roff(root.help),
        "The configuration file is given with \\fB\\-c\\fR or \\fB\\-\\-config\\fR, "
        "before or after the command; see \\fBagent.yaml\\fR(5).",
        ".SH COMMANDS",
    ]
    for cmd in walk(root):
        if cmd.children:
            continue
        out += [".SS " + roff(" ".join(cmd.path)), roff(cmd.help or "")]
        if cmd.parser.description:
            out += [".PP", roff(cmd.parser.description)]
        out += [".PP", roff(_usage(cmd))]
        for a in [*cmd.positionals(), *cmd.options()]:
            if a.dest == "config":
                continue
            name = ", ".join(a.option_strings) or str(a.metavar or a.dest)
            mv = _metavar(a)
            out += [".TP", f"\\fB{roff(name)}\\fR" + (f" \\fI{roff(mv)}\\fR" if mv else "")]
            out.append(roff((a.help or "").replace("%%", "%")))
    epilog = parser.epilog or ""
    out += [".SH EXIT STATUS", roff(epilog)]
    out.append(".SH ENVIRONMENT")
    for name, text in ENVIRONMENT.items():
        out += [".TP", f"\\fB{roff(name)}\\fR", roff(text)]
    out += [
        ".SH FILES",
        ".TP",
        "\\fI/etc/pbx\\-agent/agent.yaml\\fR",
        "the configuration, see \\fBagent.yaml\\fR(5)",
        ".TP",
        "\\fI/var/lib/pbx\\-agent\\fR",
        "the state: switch, outbox and ledger, anchor, collectors' state",
        ".TP",
        "\\fI/run/pbx\\-agent/control.sock\\fR",
        "the control socket",
        ".SH SEE ALSO",
        "\\fBagent.yaml\\fR(5), \\fBjournalctl\\fR(1), \\fBsystemctl\\fR(1), \\fBsysexits\\fR(3)",
    ]
    return "\n".join(out) + "\n"


def reference_rows(readme: str) -> list[tuple[str, str, str]]:
    """(key, default, meaning) of the README's configuration reference table."""
    section = readme.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        key, default, meaning = (c.replace("\\|", "|") for c in cells)
        rows.append((key, default, meaning))
    return rows


def man_agent_yaml(readme: str) -> str:
    """agent.yaml(5) from the README's configuration reference."""
    from agent import __version__

    section = readme.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    intro = section.split("\n| key |", 1)[0].strip()
    out = [
        f'.TH AGENT.YAML 5 "{DATE}" "pbx-agent {__version__}" "File Formats"',
        ".SH NAME",
        "agent.yaml \\- configuration of the pbx\\-agent telemetry daemon",
        ".SH DESCRIPTION",
        roff(intro.replace("\n\n", "\n.PP\n")),
        ".SH KEYS",
    ]
    for key, default, meaning in reference_rows(readme):
        out += [".TP", roff(key) + f" (default: {roff(default)})", roff(meaning)]
    out += [
        ".SH EXAMPLE",
        "\\fI/usr/share/doc/pbx\\-agent/agent.yaml\\fR, or the commented default installed as "
        "\\fI/etc/pbx\\-agent/agent.yaml\\fR. \\fBagentctl config check\\fR prints the "
        "effective configuration in this same form.",
        ".SH SEE ALSO",
        "\\fBagentctl\\fR(8)",
    ]
    return "\n".join(out) + "\n"


# -- completion --------------------------------------------------------------------------


def _words(cmd: Command) -> list[str]:
    words = [c.path[-1] for c in cmd.children]
    for a in cmd.options():
        words += a.option_strings
    for a in cmd.positionals():
        words += [str(c) for c in a.choices or ()]
    return sorted(set(words) | {"--help"})


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion function: subcommands, their options and choices, files for -c."""
    root = tree(parser)
    cases = []
    for cmd in [root, *walk(root)]:
        key = " ".join(cmd.path)
        cases.append(f'        "{key}") words="{" ".join(_words(cmd))}" ;;')
    paths = "\n".join(
        f'            "{" ".join(c.path)}") path="{" ".join(c.path)}" ;;' for c in walk(root)
    )
    return f"""# bash completion for agentctl (pbx-agent). Generated by python -m agent.cli.docs.
_agentctl() {{
    local cur prev path="" w i
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    if [[ $prev == -c || $prev == --config ]]; then
        COMPREPLY=($(compgen -f -- "$cur"))
        return
    fi
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        [[ $w == -* || ${{COMP_WORDS[i-1]}} == -c || ${{COMP_WORDS[i-1]}} == --config ]] && continue
        case "${{path:+$path }}$w" in
{paths}
        esac
    done
    local words
    case "$path" in
{chr(10).join(cases)}
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -F _agentctl agentctl
"""


def zsh_completion(parser: argparse.ArgumentParser) -> str:
    """A zsh completion function (``#compdef agentctl``) with the same words as bash's."""
    root = tree(parser)
    cases = []
    for cmd in [root, *walk(root)]:
        key = " ".join(cmd.path)
        described = [f"{c.path[-1]}:{_zsh(c.help)}" for c in cmd.children]
        plain = [w for w in _words(cmd) if w not in {c.path[-1] for c in cmd.children}]
        cases.append(
            f'    "{key}")\n'
            f"      subs=({' '.join(_q(d) for d in described)})\n"
            f"      plain=({' '.join(_q(w) for w in plain)}) ;;"
        )
    paths = "\n".join(
        f'      "{" ".join(c.path)}") path="{" ".join(c.path)}" ;;' for c in walk(root)
    )
    return f"""#compdef agentctl
# zsh completion for agentctl (pbx-agent). Generated by python -m agent.cli.docs.
_agentctl() {{
  local path="" w i
  local -a subs plain  # not `words`: zsh's own array of the command line
  if [[ ${{words[CURRENT-1]}} == (-c|--config) ]]; then
    _files
    return
  fi
  for ((i = 2; i < CURRENT; i++)); do
    w=${{words[i]}}
    [[ $w == -* || ${{words[i-1]}} == (-c|--config) ]] && continue
    case "${{path:+$path }}$w" in
{paths}
    esac
  done
  case "$path" in
{chr(10).join(cases)}
  esac
  (( ${{#subs}} )) && _describe -t commands 'agentctl command' subs
  compadd -a plain
}}
_agentctl "$@"
"""


def _zsh(text: str) -> str:
    return text.replace(":", "\\:").replace("'", "")


def _q(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"


def generated() -> dict[Path, str]:
    """Every generated file, by its path relative to the repository root."""
    from agent.cli import build_parser

    parser = build_parser()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    return {
        Path("man/agentctl.8"): man_agentctl(parser),
        Path("man/agent.yaml.5"): man_agent_yaml(readme),
        Path("completion/agentctl.bash"): bash_completion(parser),
        Path("completion/_agentctl"): zsh_completion(parser),
    }


def main(argv: list[str] | None = None) -> int:
    """Write the files (or, with ``--check``, compare them); 1 when one is stale."""
    ap = argparse.ArgumentParser(prog="python -m agent.cli.docs", description=__doc__)
    ap.add_argument("--check", action="store_true", help="compare, write nothing")
    ap.add_argument("--root", type=Path, default=REPO, help="where man/ and completion/ go")
    args = ap.parse_args(argv)
    stale = []
    for rel, text in generated().items():
        path = args.root / rel
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(rel))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    if stale:
        print(
            f"stale: {', '.join(stale)}; run python -m agent.cli.docs and commit", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
