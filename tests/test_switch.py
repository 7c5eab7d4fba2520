"""The switch file on its own: how it is read when absent, unreadable or corrupt, and written.

The daemon's side of the switch (sever first, persist after) is proven in
test_storage_faults.py and test_uplink.py; here the file's rules are pinned one
by one, so that a changed default, a lost history entry or a wrong mode fails.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from agent import switch
from agent.errors import StateError
from agent.switch import HISTORY_KEPT, Flip, SwitchState, read_switch, switch_path, write_switch


def test_absent_file_means_on(tmp_path: Path) -> None:
    state = read_switch(tmp_path)
    assert state == SwitchState(on=True)
    assert state.error is None and state.history == ()
    assert state.word == "on" and state.shown == "on"


def test_path_is_in_the_state_directory(tmp_path: Path) -> None:
    assert switch_path(tmp_path) == tmp_path / "uplink-switch.json"


def test_unreadable_file_means_off_and_says_why(tmp_path: Path) -> None:
    switch_path(tmp_path).mkdir()  # reading a directory fails with an OSError
    state = read_switch(tmp_path)
    assert state.on is False
    assert state.error is not None
    assert str(switch_path(tmp_path)) in state.error
    assert "cannot read" in state.error and "treated as off" in state.error
    assert "Is a directory" in state.error


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"{}",
        b'{"state": "maybe"}',
        b'{"state": null}',
        b'{"state": "on", "history": [{"state": "on"}]}',
        b'{"state": "on", "history": [{"state": "on", "at": "x", "uid": 0, "via": "a"}]}',
        b'{"state": "on", "history": [{"state": "on", "at": 1, "uid": [], "via": "a"}]}',
        b'{"state": "on", "history": [1]}',
        b"[]",
    ],
)
def test_corrupt_file_means_off_and_says_why(tmp_path: Path, content: bytes) -> None:
    switch_path(tmp_path).write_bytes(content)
    state = read_switch(tmp_path)
    assert state.on is False
    assert state.error is not None
    assert state.error.startswith(f"{switch_path(tmp_path)}: corrupt (")
    assert state.error.endswith("); treated as off")


def test_bad_state_word_is_named(tmp_path: Path) -> None:
    switch_path(tmp_path).write_bytes(b'{"state": "maybe"}')
    error = read_switch(tmp_path).error
    assert error is not None and "state 'maybe'" in error


@pytest.mark.parametrize("word", ["on", "off"])
def test_state_and_history_read_back(tmp_path: Path, word: str) -> None:
    flips = [
        {"state": "off", "at": 10.5, "uid": 7, "via": "agentctl"},
        {"state": word, "at": 20, "uid": 0, "via": "daemon"},
    ]
    switch_path(tmp_path).write_text(json.dumps({"state": word, "history": flips}))
    state = read_switch(tmp_path)
    assert state.on is (word == "on")
    assert state.error is None
    assert state.history == (
        Flip(state="off", at=10.5, uid=7, via="agentctl"),
        Flip(state=word, at=20.0, uid=0, via="daemon"),
    )
    assert isinstance(state.history[1].at, float)


def test_history_is_optional(tmp_path: Path) -> None:
    switch_path(tmp_path).write_text('{"state": "off"}')
    assert read_switch(tmp_path) == SwitchState(on=False)


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    before = time.time()
    written = write_switch(tmp_path, False, uid=1234, via="daemon")
    after = time.time()
    assert written.on is False and written.error is None
    (flip,) = written.history
    assert flip.state == "off" and flip.uid == 1234 and flip.via == "daemon"
    assert before <= flip.at <= after
    assert read_switch(tmp_path) == written
    on = write_switch(tmp_path, True, uid=0, via="agentctl", at=99.0)
    assert on.on is True
    assert on.history == (flip, Flip(state="on", at=99.0, uid=0, via="agentctl"))
    assert read_switch(tmp_path) == on


def test_written_file_is_the_documented_json(tmp_path: Path) -> None:
    write_switch(tmp_path, False, uid=5, via="agentctl", at=1.0)
    data = json.loads(switch_path(tmp_path).read_text())
    assert data == {
        "state": "off",
        "history": [{"state": "off", "at": 1.0, "uid": 5, "via": "agentctl"}],
    }


def test_written_file_is_world_readable_and_not_writable(tmp_path: Path) -> None:
    write_switch(tmp_path, True, uid=0, via="agentctl")
    mode = stat.S_IMODE(switch_path(tmp_path).stat().st_mode)
    assert mode == 0o644


def test_write_makes_missing_state_directories(tmp_path: Path) -> None:
    nested = tmp_path / "a" / "b"
    write_switch(nested, False, uid=0, via="agentctl")
    assert read_switch(nested).on is False
    write_switch(nested, True, uid=0, via="agentctl")  # the directory exists now
    assert read_switch(nested).on is True


def test_history_keeps_the_newest_flips(tmp_path: Path) -> None:
    for i in range(HISTORY_KEPT + 3):
        write_switch(tmp_path, i % 2 == 0, uid=i, via="agentctl", at=float(i))
    history = read_switch(tmp_path).history
    assert HISTORY_KEPT == 50
    assert len(history) == HISTORY_KEPT
    assert [f.uid for f in history] == list(range(3, HISTORY_KEPT + 3))


def test_write_after_corrupt_file_starts_a_fresh_history(tmp_path: Path) -> None:
    switch_path(tmp_path).write_bytes(b"garbage")
    state = write_switch(tmp_path, True, uid=3, via="agentctl", at=2.0)
    assert state.history == (Flip(state="on", at=2.0, uid=3, via="agentctl"),)
    assert read_switch(tmp_path) == state


def test_unwritable_place_raises_state_error_naming_the_file(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be")
    with pytest.raises(StateError) as info:
        write_switch(blocker, False, uid=0, via="agentctl")
    message = str(info.value)
    assert message.startswith(f"cannot write the switch file {switch_path(blocker)}: ")
    assert "permission denied" not in message
    assert isinstance(info.value.__cause__, OSError)


def test_permission_denied_says_who_may_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Running as root, no file mode refuses us: the refusal is injected where it enters.
    def refuse(path: Path, data: bytes, mode: int) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(switch, "atomic_write", refuse)
    with pytest.raises(StateError) as info:
        write_switch(tmp_path, False, uid=0, via="agentctl")
    assert str(info.value) == (
        f"cannot write the switch file {switch_path(tmp_path)}: permission denied; "
        "run agentctl as root or as a member of the admin group"
    )
    assert isinstance(info.value.__cause__, PermissionError)


def test_words_and_status_view() -> None:
    flips = tuple(Flip(state="off", at=float(i), uid=i, via="daemon") for i in range(12))
    state = SwitchState(on=False, history=flips, unpersisted="disk full")
    assert state.word == "off"
    assert state.shown == "off (not persisted: disk full)"
    view = state.to_json()
    assert view["state"] == "off"
    assert view["changed_at"] == 11.0 and view["changed_by_uid"] == 11
    assert view["error"] is None
    assert view["persisted"] is False and view["not_persisted"] == "disk full"
    assert [h["uid"] for h in view["history"]] == list(range(2, 12))
    assert view["history"][0] == {"state": "off", "at": 2.0, "uid": 2, "via": "daemon"}


def test_status_view_without_history() -> None:
    view = SwitchState(on=True, error="why").to_json()
    assert view == {
        "state": "on",
        "changed_at": None,
        "changed_by_uid": None,
        "error": "why",
        "persisted": True,
        "not_persisted": None,
        "history": [],
    }


def test_current_uid_is_the_real_uid() -> None:
    assert switch.current_uid() == os.getuid()
