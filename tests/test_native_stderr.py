"""Native stderr held back during a call and replayed: nothing lost, only the lines a caller's error replaces."""

from __future__ import annotations

import os

import pytest

from custom_components.native_stderr import native_stderr


def test_what_native_code_writes_is_held_then_replayed_less_the_dropped_lines(capfd):
    with native_stderr() as held:
        os.write(2, b"Uncompress failed\nanother native warning\n")  # the file descriptor, as C++ writes it
        assert capfd.readouterr().err == ""  # held, not yet on stderr
    held.replay(drop=("Uncompress failed",))
    assert capfd.readouterr().err == "another native warning\n"


def test_everything_is_replayed_when_the_block_raises(capfd):
    with pytest.raises(RuntimeError, match="boom"):
        with native_stderr():
            os.write(2, b"Uncompress failed\n")
            raise RuntimeError("boom")
    assert capfd.readouterr().err == "Uncompress failed\n"
    os.write(2, b"after\n")  # the descriptor is the real stderr again
    assert capfd.readouterr().err == "after\n"
