"""Sizes in bytes (slimtune/units.py): parse_size reads decimal (10^3n) and binary (2^10n) units exactly, with
decimal arithmetic rather than floats, and rejects what is no size with a one-line ConfigError; format_size writes
a size for people and parse_size reads it back to its two decimals; and fuzzed input either gives a positive size
or says why."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimtune.errors import ConfigError, SlimtuneError
from slimtune.units import format_size, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1", 1),
        ("1B", 1),
        ("2kB", 2 * 1000),
        ("2KiB", 2 * 1024),
        ("1.5GiB", 3 * 2**29),  # 1.5 * 2^30
        ("1.5GB", 1_500_000_000),
        ("0.5 MiB", 2**19),
        ("3T", 3 * 10**12),
        ("1TiB", 2**40),
        ("2.5e3", 2500),
        ("1E2kb", 100_000),
        ("  7 gb  ", 7 * 10**9),
        (".5k", 500),
        (123456789, 123456789),
    ],
)
def test_parse_size_reads_each_unit(text, expected):
    size = parse_size(text)
    assert size == expected and type(size) is int


def test_parse_size_is_exact_where_a_float_is_not():
    # 4611686019 * 10^9 is above 2^62: as a float product it would be rounded to a multiple of 1024.
    assert parse_size("4611686019GB") == 4611686019 * 10**9
    assert float("4611686019") * 1e9 != 4611686019 * 10**9
    assert parse_size("1.000000001GB") == 10**9 + 1
    assert parse_size("1.0000000015GB") == 10**9 + 1  # a fraction of a byte is dropped, not rounded up


@pytest.mark.parametrize(
    "bad",
    ["", " ", "GB", "-1GB", "-5", "0", "0GB", "0.4", "1e-3", "2 XB", "2GiBs", "1..2GB", "1,5GB", "nan", "inf", "1e31",
     "2 G B", True, False, 0, -3],
)  # fmt: skip
def test_parse_size_refuses_what_is_no_size(bad):
    with pytest.raises(ConfigError) as info:
        parse_size(bad)
    message = str(info.value)
    assert "size" in message and "\n" not in message and repr(bad) in message


def test_format_size_writes_the_largest_decimal_unit_with_two_decimals():
    assert format_size(0) == "0 B"
    assert format_size(999) == "999 B"
    assert format_size(1000) == "1.00 kB"
    assert format_size(1536) == "1.54 kB"
    assert format_size(999_999) == "1000.00 kB"
    assert format_size(2_500_000) == "2.50 MB"
    assert format_size(1.5e9) == "1.50 GB"
    assert format_size(3 * 10**12) == "3000.00 GB"


@given(st.integers(1, 10**13))
@settings(max_examples=300, deadline=None)
def test_format_then_parse_round_trips_to_two_decimals(n):
    written = format_size(n)
    back = parse_size(written)
    if n < 1000:
        assert back == n
    else:  # two decimals of a value of at least 1 in its unit: within half a unit of the last digit
        scale = 10 ** (3 * min(3, (len(str(n)) - 1) // 3))
        assert abs(back - n) <= 0.005 * scale + 1, (n, written, back)


# ---------------------------------------------------------------- fuzzing (moved from test_reliability.py)


@given(st.text(max_size=30))
@settings(max_examples=300, deadline=None)
def test_size_parser_returns_a_positive_size_or_says_why(text):
    try:
        value = parse_size(text)
    except SlimtuneError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert isinstance(value, int) and value >= 1


@given(st.integers(1, 10**12), st.sampled_from(["", "B", "KB", "MB", "GB", "KiB", "MiB", "GiB"]))
@settings(max_examples=200, deadline=None)
def test_size_parser_reads_every_written_size(number, unit):
    scale = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]
    assert parse_size(f"{number}{unit}") == number * scale
