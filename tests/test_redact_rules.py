"""Redaction's finer rules in process: exact spans and reasons of voicemail masks, shifts.

tests/test_redact.py proves each rule on whole files; these pin the spans and
the reasons `snapshot --explain` shows, so that a span one character short
(leaking a digit) or a lost reason fails (written to kill the mutants that
`make mutation` found surviving).
"""

from __future__ import annotations

from agent.policy.masks import Mask, shift
from agent.policy.redact import Redactor

KEY = b"k" * 32


def spans(value: str, masks: list[Mask]) -> list[tuple[str, str, str]]:
    return [(value[m.start : m.end], m.rule, m.why) for m in masks]


def test_mailbox_fields_are_masked_exactly() -> None:
    value = " 8152 , Alice Doe ,a@x.example,  pager@x.example ,attach=yes|imappassword=S3cr|tz=x"
    masks = Redactor(KEY).mailbox_masks(value)
    assert spans(value, masks) == [
        ("8152", "voicemail-pin", "mailbox PIN"),
        ("Alice Doe", "voicemail-personal", "mailbox owner"),
        ("a@x.example", "voicemail-personal", "mailbox owner"),
        ("pager@x.example", "voicemail-personal", "mailbox owner"),
        ("S3cr", "secret-key", "imappassword"),
    ]


def test_empty_mailbox_fields_are_skipped_not_the_end() -> None:
    value = "1234,,,x@y.example"
    assert spans(value, Redactor(KEY).mailbox_masks(value)) == [
        ("1234", "voicemail-pin", "mailbox PIN"),
        ("x@y.example", "voicemail-personal", "mailbox owner"),
    ]


def test_an_alias_entry_has_no_pin() -> None:
    assert Redactor(KEY).mailbox_masks("1000@default") == []


def test_mailbox_options_mask_only_secret_values() -> None:
    value = "1,n,e,p,=x|attach=yes|imappassword=|imapuser=bob|imappassword=Zz=9|x"
    masks = Redactor(KEY).mailbox_masks(value)
    assert spans(value, masks)[4:] == [("Zz=9", "secret-key", "imappassword")]


def test_shift_moves_spans_and_keeps_rule_and_reason() -> None:
    masks = [Mask(1, 3, "r", "why"), Mask(5, 9, "s")]
    assert shift(masks, 10) == [Mask(11, 13, "r", "why"), Mask(15, 19, "s", "")]
