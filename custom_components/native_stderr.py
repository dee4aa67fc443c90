"""What native code (ITK's C++) writes to the process's stderr, held back while a call runs, then replayed.

ITK's MetaIO prints ``Uncompress failed`` straight to file descriptor 2 when a ``.zraw`` stream is damaged, and
returns garbage voxels instead of raising. The reader then refuses the file with one ``InputError`` line that names
the file, the damage and where it is; ITK's bare line above it would be a second, unexplained message. Python's
``contextlib.redirect_stderr`` cannot help: it swaps ``sys.stderr``, which C++ never writes to. So the descriptor
itself is pointed at a temporary file while the call runs, and everything written there is written to the real
stderr afterwards, less the lines the caller says its own error replaces: nothing is lost, only delayed.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

__all__ = ["HeldStderr", "native_stderr"]


class HeldStderr:
    """The bytes written to file descriptor 2 during a :func:`native_stderr` block."""

    def __init__(self) -> None:
        self.text = ""

    def replay(self, drop: Sequence[str] = ()) -> None:
        """Write the held text to stderr, without the lines that contain one of ``drop``."""
        kept = [line for line in self.text.splitlines(keepends=True) if not any(d in line for d in drop)]
        if kept:
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


@contextmanager
def native_stderr() -> Iterator[HeldStderr]:
    """Hold what is written to file descriptor 2 (by any code, native included) until the block ends.

    The caller replays it (:meth:`HeldStderr.replay`) once it knows which lines its own error message replaces; when
    the block itself raises, all of it is replayed here.
    """
    held = HeldStderr()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        raised = True
        try:
            yield held
            raised = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            held.text = sink.read().decode("utf-8", errors="replace")
            if raised:
                held.replay()
