"""ccdgrid's own warnings, collected by the calling context instead of issued.

A series worker keeps each frame's warnings as text in the frame's row.
``warnings.catch_warnings`` would record them by swapping the process's
warning filters and ``showwarning`` for the time of a frame: two threads
calibrating at once (``calibrate_series(executor="thread")``) then restore
each other's swapped state, and the process is left recording every later
warning into a list nobody reads. So ccdgrid issues its own warnings through
:func:`warn`, which hands them to the collector of the current context (a
:class:`contextvars.ContextVar`: each thread has its own) when one is set
by :func:`collected`, and issues them as usual otherwise. Warnings of other
libraries are never touched.
"""

import contextlib
import contextvars
import warnings
from typing import NamedTuple

__all__ = ["Note", "collected", "warn"]

_COLLECTOR = contextvars.ContextVar("ccdgrid_notes", default=None)


class Note(NamedTuple):
    """A warning collected instead of issued."""

    message: str
    category: type


def warn(message, category=UserWarning, stacklevel=1):
    """Issue a warning, or hand it to the collector of this context.

    ``stacklevel`` counts as for :func:`warnings.warn` called where this
    function is.
    """
    notes = _COLLECTOR.get()
    if notes is not None:
        notes.append(Note(str(message), category))
        return
    warnings.warn(message, category, stacklevel=stacklevel + 1)


@contextlib.contextmanager
def collected():
    """Collect the warnings :func:`warn` is given in this context (this thread).

    Yields the list of :class:`Note` they are appended to, in order.
    """
    notes = []
    token = _COLLECTOR.set(notes)
    try:
        yield notes
    finally:
        _COLLECTOR.reset(token)
