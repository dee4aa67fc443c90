"""Bad input ends ``python -m monai.bundle run ...`` with one ``error:`` line and exit status 2, as ``python -m
bundle`` does.

MONAI's config machinery wraps every exception of a component (``RuntimeError: Failed to evaluate ...``, Compose's
``applying transform ...``), and ``monai.bundle run`` lets it reach the interpreter, which prints the whole chain.
Importing this module (every config's ``imports`` does) installs a ``sys.excepthook`` that finds an
:class:`~custom_components.errors.InputError` anywhere in an uncaught exception's chain and prints only its message;
any other exception (a bug, not bad input) keeps its full traceback. The exit status is set by an ``atexit`` function
registered at import, so it runs after every other one (``atexit`` runs last-registered first) and the run's other
clean-up (process groups, log files) still happens.
"""

from __future__ import annotations

import atexit
import os
import sys
from types import TracebackType

from custom_components.errors import input_error_in

_INPUT_ERROR_STATUS = 2
_failed = False


def _excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    global _failed
    error = input_error_in(exc)
    if error is None:
        _previous_hook(kind, exc, tb)
        return
    _failed = True
    print(f"error: {error}", file=sys.stderr, flush=True)


def _exit_status() -> None:
    if _failed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_INPUT_ERROR_STATUS)


if sys.excepthook is not _excepthook:
    _previous_hook = sys.excepthook
    sys.excepthook = _excepthook
    atexit.register(_exit_status)
