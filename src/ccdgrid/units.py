"""Lengths typed by people: ``"5mm"``, ``"5000 µm"``, ``"0.5cm"``, ``"5e-3"``.

Used by the command line for the hole pitch of the grid plate. A bare number
is in metres, the unit pyFAI and ccdgrid's files use for every length.
"""

import math
import re

from .errors import CcdgridError

__all__ = ["LENGTH_UNITS", "PITCH_RANGE", "parse_length"]

#: Accepted unit suffixes and their value in metres. Both the micro sign
#: (U+00B5, what keyboards type) and the Greek mu (U+03BC) are accepted.
LENGTH_UNITS = {
    "m": 1.0,
    "cm": 1e-2,
    "mm": 1e-3,
    "um": 1e-6,
    "µm": 1e-6,
    "μm": 1e-6,
    "micron": 1e-6,
    "microns": 1e-6,
    "nm": 1e-9,
}

#: Hole pitches a grid plate can have, m: plates have holes 0.1-20 mm apart.
#: A pitch outside is almost certainly a length in the wrong unit (5 for 5 mm).
PITCH_RANGE = (1e-6, 0.1)

_LENGTH = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([^\d\s.+-][^\s]*)?\s*$")


def parse_length(text, *, name=None):
    """Parse a positive length with an optional unit and return it in metres.

    Parameters
    ----------
    text : str or float
        A number followed by an optional unit from :data:`LENGTH_UNITS`
        (case-insensitive, space allowed): ``"5mm"``, ``"5 mm"``,
        ``"5000um"``, ``"5000µm"``, ``"0.5cm"``. A bare number (or a float)
        is in metres: ``"5e-3"`` is 5 mm.
    name : str or None
        What the value is; prefixes the error message (e.g. ``"pitch"``).

    Returns
    -------
    float
        The length in metres, finite and > 0.

    Raises
    ------
    CcdgridError
        If ``text`` is not a number with a known unit, or the length is not
        finite and positive. The message quotes ``text``.

    Examples
    --------
    >>> parse_length("5mm")
    0.005
    >>> parse_length("5000 µm") == parse_length("5e-3")
    True
    """
    prefix = f"{name}: " if name else ""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = _LENGTH.match(str(text))
        if match is None:
            raise CcdgridError(
                f"{prefix}expected a length such as 5mm, 5000um or 5e-3 (metres), got {text!r}"
            )
        number, unit = match.groups()
        unit = (unit or "m").lower()
        if unit not in LENGTH_UNITS:
            known = ", ".join(sorted(set(LENGTH_UNITS) - {"μm"}))
            raise CcdgridError(f"{prefix}unknown unit {unit!r} in {text!r} (known: {known})")
        value = float(number) * LENGTH_UNITS[unit]
    if not math.isfinite(value) or value <= 0:
        raise CcdgridError(f"{prefix}expected a positive, finite length, got {text!r}")
    return value
