"""Over-redaction measured on Asterisk's own sample configurations, not guessed.

Every value any rule masks in tests/fixtures/asterisk-samples is listed in
REVIEW.tsv as a secret, a documentation placeholder standing where a secret
goes, or a false positive with its reason: a new masking (or one that
disappeared) fails the test until a reviewer has looked at it. Benign structure
(sections, extension patterns, codecs, ports, hosts, contexts) must come out
unchanged. Run this file directly for the figures quoted in the README:
``PYTHONPATH=. .venv/bin/python tests/test_redaction_corpus.py``.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path, PurePosixPath

from agent.collectors.pbxconfig import asterisk_conf as ac
from agent.collectors.pbxconfig.filters import kind_of, redact_text

SAMPLES = Path(__file__).resolve().parent / "fixtures" / "asterisk-samples"
REVIEW = SAMPLES / "REVIEW.tsv"
KEY = b"\x07" * 32
VERDICTS = ("secret", "placeholder", "false-positive")
#: Keys whose values are structure: they must never be masked.
BENIGN_KEYS = frozenset(
    {
        "context",
        "allow",
        "disallow",
        "port",
        "bindport",
        "bindaddr",
        "tlsbindaddr",
        "host",
        "type",
        "transport",
        "include",
        "ignorepat",
        "dtmfmode",
        "dtmf_mode",
        "codec",
        "aors",
        "max_contacts",
        "qualify",
        "nat",
        "language",
        "callerid",
        "username",
        "dbname",
        "dbhost",
        "dsn",
        "table",
        "enabled",
    }
)

Row = tuple[str, int, str]


def _samples() -> list[tuple[str, str]]:
    """(name as on a box, text) of every sample."""
    out = []
    for f in sorted(SAMPLES.glob("*.sample")):
        text = f.read_bytes().decode("utf-8", "surrogateescape")
        out.append((f.name.removesuffix(".sample"), text))
    return out


def masked() -> tuple[Counter[Row], int]:
    """How often each rule fired on each line of each sample, and how many values there are."""
    found: Counter[Row] = Counter()
    values = 0
    for name, text in _samples():
        r = redact_text(text, kind_of(PurePosixPath(name), text), KEY, name=name, explain=True)
        assert r.findings is not None
        for f in r.findings:
            found[(name, f.line, f.rule)] += 1
        for line in ac.lex(text):
            values += line.kind is ac.Kind.ASSIGN and bool(line.value)
    return found, values


def reviewed() -> dict[Row, tuple[int, str, str]]:
    """REVIEW.tsv: per (file, line, rule), the count, verdict and note."""
    out: dict[Row, tuple[int, str, str]] = {}
    for raw in REVIEW.read_text().splitlines():
        if not raw.strip() or raw.startswith("#"):
            continue
        name, line, rule, count, verdict, note = (raw.split("\t") + [""] * 6)[:6]
        out[(name, int(line), rule)] = (int(count), verdict, note)
    return out


def report() -> str:
    """The figures: per rule, how many values it masked and what they were."""
    found, values = masked()
    review = reviewed()
    per: dict[str, Counter[str]] = {}
    for row, n in found.items():
        verdict = review.get(row, (0, "unreviewed", ""))[1]
        per.setdefault(row[2], Counter())[verdict] += n
    lines = [
        f"{len(_samples())} sample files, {values} assigned values; {sum(found.values())} maskings",
        f"{'rule':<20} {'masked':>6} {'secret':>6} {'placeholder':>11} {'false pos.':>10}",
    ]
    for rule in sorted(per, key=lambda r: -sum(per[r].values())):
        c = per[rule]
        lines.append(
            f"{rule:<20} {sum(c.values()):>6} {c['secret']:>6} {c['placeholder']:>11} "
            f"{c['false-positive']:>10}"
        )
    fps = [(row, note) for row, (_, v, note) in sorted(review.items()) if v == "false-positive"]
    lines.append(f"false positives ({len(fps)}):")
    lines += [f"  {name}:{line} {rule}: {note}" for (name, line, rule), note in fps]
    return "\n".join(lines)


def test_every_masked_value_is_reviewed() -> None:
    """Each masking is a reviewed secret, placeholder or false positive; none is stale."""
    found, _ = masked()
    review = reviewed()
    unreviewed = sorted(row for row in found if row not in review)
    stale = sorted(row for row in review if row not in found)
    assert unreviewed == [], f"masked but not in REVIEW.tsv: {unreviewed}"
    assert stale == [], f"in REVIEW.tsv but no longer masked: {stale}"
    wrong = sorted(row for row, n in found.items() if review[row][0] != n)
    assert wrong == [], f"counts differ from REVIEW.tsv: {wrong}"


def test_review_table_gives_reasons() -> None:
    """Every verdict is known and every false positive says why it is accepted."""
    review = reviewed()
    assert review
    for row, (_, verdict, note) in review.items():
        assert verdict in VERDICTS, row
        if verdict == "false-positive":
            assert len(note) > 20, row


def test_false_positives_stay_few() -> None:
    """Under 1 in 100 of the samples' assigned values is masked without being a secret."""
    found, values = masked()
    review = reviewed()
    fps = sum(n for row, n in found.items() if review.get(row, (0, ""))[1] == "false-positive")
    assert fps * 100 < values, (fps, values)


def test_benign_structure_stays_readable() -> None:
    """Sections, extension patterns, codecs, ports, hosts and contexts come out unchanged."""
    checked = 0
    for name, text in _samples():
        out = redact_text(text, kind_of(PurePosixPath(name), text), KEY, name=name).text
        before, after = text.split("\n"), out.split("\n")
        assert len(before) == len(after), name
        for i, line in enumerate(ac.lex(text)):
            keep = line.kind is ac.Kind.SECTION or (
                line.kind is ac.Kind.ASSIGN and line.key.lower() in BENIGN_KEYS
            )
            if keep and not line.comments:
                assert after[i] == before[i], f"{name}:{i + 1}"
                checked += 1
            if line.kind is ac.Kind.ASSIGN and line.key.lower() in ("exten", "same"):
                head = line.value.split(",", 2)[:2]  # the pattern and the priority
                assert ",".join(head) in after[i], f"{name}:{i + 1}"
                checked += 1
    assert checked > 500


if __name__ == "__main__":
    sys.stdout.write(report() + "\n")
