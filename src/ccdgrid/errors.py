"""The one exception type users see for bad input."""

__all__ = ["CcdgridError"]


class CcdgridError(ValueError):
    """Bad input or data that cannot be calibrated.

    Subclasses :class:`ValueError` so that generic callers can catch it. The
    message names the argument or the file and the offending value; the CLI
    prints it on one line (``ccdgrid: error: ...``) and exits with status 1.
    """
