"""parse_bytes / format_bytes: accepted forms, exact arithmetic, and errors that say what went wrong."""

from __future__ import annotations

import math
import re

import pytest

from diffusers_offload.planning.budget import format_bytes, parse_bytes

GIB = 2**30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GiB", 8 * GIB),
        ("8 GiB", 8 * GIB),
        ("8gib", 8 * GIB),
        ("8GIB", 8 * GIB),
        ("  8 GiB  ", 8 * GIB),
        ("7.5GB", 7_500_000_000),
        ("7.5gb", 7_500_000_000),
        ("512MiB", 512 * 2**20),
        ("100MB", 100_000_000),
        ("1.5TiB", 3 * 2**39),
        ("2TB", 2 * 10**12),
        ("1KiB", 1024),
        ("1kb", 1000),
        ("10B", 10),
        ("10 b", 10),
        ("1024", 1024),
        (".5GiB", GIB // 2),
        ("1e3MB", 10**9),
        # Float arithmetic would give 4099999999 here after rounding down.
        ("4.1GB", 4_100_000_000),
        ("4.1MB", 4_100_000),
        ("4.35GB", 4_350_000_000),
        ("0.1GB", 100_000_000),
        # Fractions of a byte are rounded down.
        ("1.5", 1),
        ("0.001KB", 1),
    ],
)
def test_parse_bytes_string_forms(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_parse_bytes_numbers_are_bytes() -> None:
    assert parse_bytes(0) == 0
    assert parse_bytes(123_456_789) == 123_456_789
    assert parse_bytes(1.5e9) == 1_500_000_000
    assert parse_bytes(100.9) == 100


def test_parse_bytes_percentages_of_total() -> None:
    assert parse_bytes("75%", total=16 * GIB) == 12 * GIB
    assert parse_bytes("12.5 %", total=8 * GIB) == GIB
    assert parse_bytes("0%", total=8 * GIB) == 0
    assert parse_bytes("100%", total=12345) == 12345
    assert parse_bytes("33%", total=100) == 33
    # A total does not change non-percentage forms.
    assert parse_bytes("1GiB", total=5) == GIB


def test_percentage_without_total_names_input_and_fix() -> None:
    with pytest.raises(ValueError, match=r"'75%'.*total"):
        parse_bytes("75%")


@pytest.mark.parametrize(
    "bad",
    ["", "   ", "abc", "GiB", "8 G", "8g", "8 gigabytes", "8 GiB/s", "1,5GB", "8 8GB", "nan", "1.2.3GB"],
)
def test_parse_bytes_rejects_malformed_strings_with_accepted_forms(bad: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_bytes(bad)
    message = str(err.value)
    assert repr(bad) in message
    # The message teaches the accepted forms, not just "invalid".
    assert "GiB" in message and "GB" in message


@pytest.mark.parametrize("bad", [-1, -0.5, "-1GB", "-5", float("nan"), float("inf"), True, None, [8], b"8GB"])
def test_parse_bytes_rejects_negative_non_finite_and_wrong_types(bad: object) -> None:
    with pytest.raises(ValueError, match="invalid byte size"):
        parse_bytes(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["150%", "100.5%", "-5%"])
def test_parse_bytes_rejects_out_of_range_percentages(bad: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        parse_bytes(bad, total=GIB)


def test_parse_bytes_rejects_bad_total() -> None:
    with pytest.raises(ValueError, match="total"):
        parse_bytes("50%", total=-1)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (int(3.25 * GIB), "3.25 GiB"),
        (3 * 2**39, "1.50 TiB"),
        (512 * 2**20, "512.00 MiB"),
        # Rounds to 1024.00 MiB, so it is printed in the next unit.
        (2**30 - 1, "1.00 GiB"),
        (-(2 * GIB), "-2.00 GiB"),
    ],
)
def test_format_bytes(n: int, expected: str) -> None:
    assert format_bytes(n) == expected


@pytest.mark.parametrize("n", [1, 1000, 123_456, 7_500_000_000, 20 * 10**9, 3 * 2**40 + 17])
def test_format_then_parse_round_trips_within_rounding(n: int) -> None:
    back = parse_bytes(format_bytes(n).replace(" ", ""))
    assert math.isclose(back, n, rel_tol=0.005)


def test_format_bytes_rounds_minimums_up() -> None:
    assert format_bytes(650_000) == "634.77 KiB"  # 634.765625
    assert format_bytes(1025, round_up=True) == "1.01 KiB"
    assert format_bytes(1025) == "1.00 KiB"
    assert format_bytes(2**30 - 1, round_up=True) == "1.00 GiB"
