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


# constructor arguments nets/build.py fills from the operator and the net (never written in a config node)
BUILDER_FILLED = ("x_shape", "y_shape", "n_iter", "aux_channels", "element_mesh")


def check_target(prefix: str, node) -> None:
    """Check a ``_target_`` config node before it is built: every key must be an argument of the class (a
    key appended with ``+`` that nothing reads is an error), and the class's ``RULES`` ({argument: rule})
    must hold. The class's constructor applies the same RULES, so direct construction is checked alike."""
    import inspect

    from hydra.utils import get_object

    if node is None or "_target_" not in node:
        return
    target = get_object(node["_target_"])
    params = inspect.signature(target).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(k for k in node if k != "_target_" and k not in params)
        if unknown:
            names = [p for p in params if p != "self" and p not in BUILDER_FILLED]
            takes = f"its arguments are {', '.join(names)}" if names else "it takes no arguments"
            raise ConfigError(f"{prefix}.{unknown[0]}: not an argument of {node['_target_']}; {takes}")
    check_all(prefix, getattr(target, "RULES", {}), {k: v for k, v in node.items() if k != "_target_"})
