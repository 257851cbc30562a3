"""Sizes in bytes, read from and written for people: `2GB` (10^9), `1.5GiB` (2^30), `512MB`, `900000000`."""

from __future__ import annotations

import re
from decimal import Decimal

from .errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int, what: str = "size") -> int:
    """'2GB' -> 2e9, '1.5GiB' -> 1.5 * 2^30, '512MB', '900000000'. Decimal units are powers of 10, binary of 2.
    `what`: the parameter the size came from, named in errors."""
    params = () if what == "size" else (what,)
    label = "size" if what == "size" else f"`{what}`"
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = Decimal(text), ""
    else:
        match = _SIZE.match(str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(
                f"cannot read {label} {text!r}: write it like 2GB, 1.5GiB, 512MB or 900000000", params=params
            )
        value, unit = Decimal(match.group(1)), match.group(2).lower()
    if value.adjusted() > 30:  # more than 10^30 of anything: no machine has it
        raise ConfigError(
            f"{label} {text!r} is larger than any device: write it like 2GB, 1.5GiB or 512MB", params=params
        )
    size = value * _UNITS[unit]  # exact decimal arithmetic: 4611686019GB is 4611686019 * 10^9 bytes, not a float
    if size < 1:
        raise ConfigError(f"{label} {text!r} must be at least 1 byte", params=params)
    return int(size)


def parse_budget(budget: str | int) -> tuple[int | None, float | None]:
    """A memory budget, read before anything else is done: (bytes, None) for a size ('2GB', 900000000), or
    (None, share) for a percentage of the available memory ('80%' -> 0.8)."""
    if isinstance(budget, str) and budget.strip().endswith("%"):
        try:
            share = float(budget.strip()[:-1])
        except ValueError:
            raise ConfigError(
                f"cannot read `mem_budget` {budget!r}: write a size (2GB) or a percentage (80%)", params=("mem_budget",)
            ) from None
        if not 0 < share <= 100:
            raise ConfigError(f"`mem_budget` {budget!r} must be a percentage in (0, 100]", params=("mem_budget",))
        return None, share / 100
    return parse_size(budget, "mem_budget"), None


def format_size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
