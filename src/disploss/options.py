"""Typed options: the one configuration style of the library.

Everything configurable (training, sampling, the benchmark, the experiments) is a frozen dataclass whose fields
are declared with `option(...)`. The field's metadata holds what makes a value valid (its `choices` and a
`check`) and what a command line needs to show it (help text, flag name). `check_options(self)`, called from
`__post_init__`, applies the choices and checks and raises a ConfigError that names the flag, so a library caller
gets the same message as a command-line user. `disploss.commands.flags` builds argparse flags from the same
metadata: each list of choices and each bound is written once, here in the config that owns it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from disploss.errors import ConfigError

# A check returns None for a valid value, else the reason ("must be >= 1, got 0").
Check = Callable[[Any], "str | None"]

__all__ = [
    "Check",
    "at_least",
    "check_options",
    "finite",
    "flag_name",
    "in_interval",
    "option",
    "positive",
]


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    choices: tuple | None = None,
    check: Check | None = None,
    flag: str | None = None,
    none_literal: bool = False,
    metavar: str | None = None,
    cli: bool = True,
    parse: Callable[[str], Any] | None = None,
    exclusive: str | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with the metadata of an option.

    Args:
        default, default_factory: as dataclasses.field.
        help: one line for --help (the default is appended by the command line unless the text explains it).
        choices: the valid values (checked when the config is built, and by argparse).
        check: a function value -> None | reason, e.g. at_least(1).
        flag: the command-line flag (default: --field-name).
        none_literal: the text 'None' parses to None (the reference's --loss-weight None).
        metavar: argparse metavar.
        cli: False keeps the field out of the command line (the command sets it, e.g. the sampler of a MODE).
        parse: how the command line reads the text, for values that are not a plain int / float / str (raises
            ValueError with the reason).
        exclusive: fields with the same key are alternatives on the command line (at most one may be given).
    """
    metadata = {
        "help": help, "choices": choices, "check": check, "flag": flag, "none_literal": none_literal,
        "metavar": metavar, "cli": cli, "parse": parse, "exclusive": exclusive,
    }  # fmt: skip
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def flag_name(field: dataclasses.Field) -> str:
    """The command-line name of a field: its `flag`, else --field-name."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def check_options(config: Any) -> None:
    """Check every option field of a dataclass instance against its choices and check.

    Raises:
        ConfigError: naming the flag, the value and the valid values.
    """
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        choices = field.metadata.get("choices")
        if choices is not None and value not in choices:
            shown = ", ".join("None" if c is None else str(c) for c in choices)
            raise ConfigError(f"{flag_name(field)} {value!r} is not a valid choice; valid choices: {shown}")
        check = field.metadata.get("check")
        if check is not None and value is not None:
            reason = check(value)
            if reason:
                raise ConfigError(f"{flag_name(field)} {reason}")


# -- checks -------------------------------------------------------------------------------------------------------
def at_least(minimum: float) -> Check:
    """value >= minimum."""

    def check(value):
        return None if value >= minimum else f"must be at least {minimum}, got {value}"

    return check


def positive(value) -> str | None:
    """value > 0 (NaN is not)."""
    return None if value > 0 else f"must be positive, got {value}"


def finite(value) -> str | None:
    """A finite number (no NaN, no infinity)."""
    return None if math.isfinite(value) else f"must be a finite number, got {value}"


def in_interval(low: float, high: float, *, closed_high: bool = False) -> Check:
    """low <= value < high (or <= high)."""
    bracket = "]" if closed_high else ")"

    def check(value):
        ok = low <= value <= high if closed_high else low <= value < high
        return None if ok else f"must lie in [{low}, {high}{bracket}, got {value}"

    return check


def all_of(*checks: Check) -> Check:
    """Every check in turn; the first reason wins."""

    def check(value):
        for one in checks:
            reason = one(value)
            if reason:
                return reason
        return None

    return check
