"""Parse and format byte sizes for memory budgets ("8GiB", "7.5GB", "75%")."""

from __future__ import annotations

import math
import re
from fractions import Fraction

# Decimal units are powers of 1000 and binary units powers of 1024, as in the SI/IEC standards; mixing
# them up silently would be off by 7% at GiB scale, so bare "K"/"M"/"G" are rejected as ambiguous.
_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_SIZE_RE = re.compile(rf"^\s*({_NUMBER})\s*([A-Za-z%]*)\s*$")

_ACCEPTED = (
    "an int/float number of bytes, or a string such as '8GiB', '8 GiB', '7.5GB', '512MiB', '100MB', "
    "'1.5TiB', '1024' (bytes) or '75%' (of a total); units B, KB, MB, GB, TB (powers of 1000) and "
    "KiB, MiB, GiB, TiB (powers of 1024), case-insensitive"
)


def parse_bytes(value: int | float | str, *, total: int | None = None) -> int:
    """Return ``value`` as a whole number of bytes (fractions of a byte are rounded down).

    ``parse_bytes("7.5GB") == 7_500_000_000``, ``parse_bytes("8 GiB") == 8 * 2**30``,
    ``parse_bytes("75%", total=16 * 2**30) == 12 * 2**30``. Percentages must lie in [0, 100] and need
    ``total``. Raises ValueError naming the input and the accepted forms on anything else.
    """
    # bool is an int subclass, but True/False as a size is always a mistake.
    if isinstance(value, bool):
        raise ValueError(f"invalid byte size {value!r}: expected {_ACCEPTED}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid byte size {value!r}: sizes cannot be negative")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"invalid byte size {value!r}: expected a finite, non-negative number")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"invalid byte size {value!r} of type {type(value).__name__}: expected {_ACCEPTED}")

    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(f"invalid byte size {value!r}: expected {_ACCEPTED}")
    # Fraction keeps "4.1GB" exact; float arithmetic would give 4099999999 after rounding down.
    number = Fraction(match.group(1))
    unit = match.group(2).lower()
    if number < 0:
        raise ValueError(f"invalid byte size {value!r}: sizes cannot be negative")

    if unit == "%":
        if total is None:
            raise ValueError(
                f"invalid byte size {value!r}: a percentage needs a total to take it of "
                "(pass total=..., e.g. the device's memory in bytes)"
            )
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise ValueError(f"invalid total {total!r} for {value!r}: expected a non-negative int of bytes")
        if number > 100:
            raise ValueError(f"invalid byte size {value!r}: a percentage must be between 0% and 100%")
        return math.floor(number * total / 100)

    if unit not in _UNITS:
        raise ValueError(
            f"invalid byte size {value!r}: unknown unit {match.group(2)!r}; expected {_ACCEPTED}"
        )
    return math.floor(number * _UNITS[unit])


_FORMAT_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: int | float, *, round_up: bool = False) -> str:
    """Format a byte count in the binary unit that fits, with two decimals: B, KiB, MiB, GiB, TiB, PiB.

    ``format_bytes(3.25 * 2**30) == "3.25 GiB"``, ``format_bytes(1536) == "1.50 KiB"``; counts below
    1 KiB are whole bytes ("512 B"). ``round_up=True`` rounds the last decimal up instead of to nearest,
    for minimums ("needs at least ..."): a budget of the printed size is then really enough.
    """
    sign = "-" if n < 0 else ""
    size = abs(n)
    if size < 1024:
        return f"{sign}{math.ceil(size) if round_up else int(size)} B"
    exponent = 0
    scaled = Fraction(size) if isinstance(size, int) else Fraction(float(size))

    def shown(value: Fraction) -> Fraction:
        hundredths = value * 100
        return Fraction(math.ceil(hundredths) if round_up else round(hundredths), 100)

    # Move to the next unit when the two decimals would print "1024.00 MiB".
    while exponent < len(_FORMAT_UNITS) - 1 and shown(scaled) >= 1024:
        scaled /= 1024
        exponent += 1
    return f"{sign}{float(shown(scaled)):.2f} {_FORMAT_UNITS[exponent]}"
