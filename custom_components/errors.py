"""The one exception type for bad input: a message a user can act on, naming the file and the problem."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class InputError(ValueError):
    """Bad input given to the bundle (missing or unreadable file, wrong content, wrong coordinates, ...).

    The message must name the file (and row, for tables) and say what is wrong, e.g.
    ``"/data/scan.mhd: header is unreadable (no ElementDataFile)"``.
    """


def run_chain(chain: Callable[[Any], Any], data: Any) -> Any:
    """``chain(data)``, re-raising an :class:`InputError` from inside as itself.

    MONAI's ``Compose`` wraps every exception of a transform in ``RuntimeError("applying transform ...")``; a CLI
    command calling a chain through this gets the :class:`InputError` back and ends with one ``error:`` line.
    """
    try:
        return chain(data)
    except RuntimeError as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, InputError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise InputError(str(cause)) from err


def input_error_in(exc: BaseException | None) -> InputError | None:
    """The first :class:`InputError` in ``exc``'s chain of causes and contexts, or ``None``."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def exit_status(command: Callable[[], Any]) -> int:
    """Run a command-line tool's ``command()``: 0 when it returns, 2 with one ``error:`` line on stderr when it raises
    :class:`InputError` (bad input), never a traceback for bad input. Other exceptions (bugs) propagate."""
    import sys

    try:
        command()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
