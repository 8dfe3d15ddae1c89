"""Value rules shared by the objects that check their own settings and by ``config_checks``.

A rule is (predicate, what is allowed); :func:`check` raises :class:`ConfigError` with one line naming
the config key, the value and what is allowed (``net.fixed_point.m=0: expected a positive integer``).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value has the wrong type or is out of range."""


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


POSITIVE_INT = (lambda v: is_int(v) and v > 0, "a positive integer")
NON_NEGATIVE_INT = (lambda v: is_int(v) and v >= 0, "an integer >= 0")
POSITIVE = (lambda v: is_number(v) and v > 0, "a number > 0")
NON_NEGATIVE = (lambda v: is_number(v) and v >= 0, "a number >= 0")
FRACTION = (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]")
UNIT_INTERVAL = (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)")
OPEN_UNIT_INTERVAL = (lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)")
BOOL = (lambda v: isinstance(v, bool), "true or false")


def one_of(*choices):
    return (lambda v: v in choices, "one of " + ", ".join(map(str, choices)))


def check(key: str, value, rule) -> None:
    """Raise ConfigError(``key=value: expected ...``) unless ``rule``'s predicate holds for ``value``."""
    ok, allowed = rule
    if not ok(value):
        raise ConfigError(f"{key}={value!r}: expected {allowed}")


def check_all(prefix: str, rules: dict, values: dict) -> None:
    """:func:`check` every ``values[name]`` that has a rule, under the config key ``prefix.name``."""
    for name, value in values.items():
        if name in rules:
            check(f"{prefix}.{name}", value, rules[name])
