"""argparse flags generated from typed configs (disploss.options), and configs built back from parsed flags.

Flag names are the field names with '_' -> '-' unless the field says otherwise (so the reference's flags keep
their names and defaults). A field holding a nested config contributes that config's flags. Commands with modes
(sample ODE | SDE | MeanFlow) get one sub-parser per mode, holding that mode's own config's flags beside the
command's.

Values are checked once, by the config's own checks: either when argparse reads them (`check_at_parse=True`:
`argument --cfg-scale: must be >= 1.0 ...`, as the reference's sample scripts report it) or when the command
builds the config (`disploss train: error: --cfg-scale must be >= 1.0, got 0.5`).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from disploss.options import flag_name

_KIND_NAMES = {int: "an integer", float: "a number"}


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help unless the help already explains its default or it has none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "default" in text or not text:
            return text
        if action.option_strings:
            return f"{text} (default: %(default)s)"
        return text


def _base_type(annotation: Any) -> Any:
    # `float | None` -> float; `str` -> str; `tuple[int, ...] | None` -> tuple
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    return origin or annotation


def _value_parser(field: dataclasses.Field, kind: Any, check_at_parse: bool):
    """argparse `type`: text -> value, with the field's check when checking at parse time."""
    meta = field.metadata
    custom = meta.get("parse")

    def parse(text: str):
        if meta.get("none_literal") and text == "None":
            return None
        try:
            value = custom(text) if custom is not None else kind(text)
        except ValueError as err:
            if custom is not None:
                raise argparse.ArgumentTypeError(str(err)) from None
            raise argparse.ArgumentTypeError(f"{text!r} is not {_KIND_NAMES.get(kind, kind.__name__)}") from None
        check = meta.get("check")
        if check_at_parse and check is not None and value is not None:
            reason = check(value)
            if reason:
                raise argparse.ArgumentTypeError(reason)
        return value

    parse.__name__ = _KIND_NAMES.get(kind, getattr(kind, "__name__", "value"))
    return parse


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    check_at_parse: bool = False,
    defaults: Any = None,
    none_defaults: bool = False,
    given_only: bool = False,
) -> None:
    """Add one flag per option field of the dataclass `cls` (recursing into nested configs).

    Args:
        parser: the parser (or a mode's sub-parser).
        cls: a config dataclass whose fields were declared with disploss.options.option.
        check_at_parse: apply the fields' checks while parsing (argparse's message) instead of when the config
            is built.
        defaults: an instance whose values are the flags' defaults (a nested config's default_factory).
        none_defaults: every flag defaults to None (its help still shows the config's default), so that the
            command can tell the flags given from the ones left out (to lay them over presets such as --quick).
        given_only: the namespace holds only the flags given (argparse.SUPPRESS defaults; the help still shows the
            config's default), for `given_values` (a flag given as None, --loss-weight None, is then told apart).
    """
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for field in dataclasses.fields(cls):
        meta = field.metadata
        if meta.get("cli") is False:
            continue
        kind = _base_type(hints[field.name])
        default = getattr(defaults, field.name) if defaults is not None else _field_default(field)
        if dataclasses.is_dataclass(kind):
            add_config_arguments(
                parser, kind, check_at_parse=check_at_parse, defaults=default, none_defaults=none_defaults,
                given_only=given_only,
            )  # fmt: skip
            continue
        kwargs: dict[str, Any] = {"help": meta.get("help", ""), "default": default}
        if none_defaults or given_only:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            if shown is not None and shown is not False and "default" not in kwargs["help"]:
                kwargs["help"] += f" (default: {shown})"
            kwargs["default"] = argparse.SUPPRESS if given_only else None
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            element = kind if kind is not tuple else int
            kwargs["type"] = _value_parser(field, element, check_at_parse)
            if meta.get("choices") is not None:
                # None is a default ("from the checkpoint", "cuda when available"), not a value to type, unless the
                # text 'None' is accepted (the reference's --loss-weight None).
                keep_none = meta.get("none_literal")
                kwargs["choices"] = [c for c in meta["choices"] if keep_none or c is not None]
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
        if meta.get("exclusive"):
            if meta["exclusive"] not in groups:
                groups[meta["exclusive"]] = parser.add_mutually_exclusive_group()
            groups[meta["exclusive"]].add_argument(flag_name(field), dest=_dest(field), **kwargs)
        else:
            parser.add_argument(flag_name(field), dest=_dest(field), **kwargs)


def _dest(field: dataclasses.Field) -> str:
    # The flag's own name (--meanflow-c is `meanflow_c`): nested configs may reuse a field name of another.
    return flag_name(field).lstrip("-").replace("-", "_")


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def add_mode_subparsers(
    parser: argparse.ArgumentParser, cls: type, modes: dict[str, type], helps: dict, mode_defaults: dict | None = None,
    **kwargs,
) -> dict[str, argparse.ArgumentParser]:  # fmt: skip
    """A positional MODE with one sub-parser per mode, each holding the flags of that mode's config and of `cls`;
    returns {mode: its sub-parser}.

    Args:
        modes: {mode: its config class} (the mode's own options, e.g. ODEConfig).
        helps: {mode: one line}.
        mode_defaults: {mode: an instance of cls} whose values are that mode's flag defaults (e.g. MeanFlow's
            --cfg-scale 1); the other modes take cls's defaults.
    """
    sub = parser.add_subparsers(dest="mode", metavar="MODE", required=True, help=" or ".join(helps.values()))
    parser.epilog = "the flags of each mode: " + ", ".join(f"{parser.prog} {m} --help" for m in modes)
    parsers = {}
    for mode, mode_cls in modes.items():
        mode_parser = sub.add_parser(
            mode, help=helps[mode], description=parser.description, formatter_class=HelpFormatter
        )
        add_config_arguments(mode_parser, mode_cls, **kwargs)
        add_config_arguments(mode_parser, cls, defaults=(mode_defaults or {}).get(mode), **kwargs)
        parsers[mode] = mode_parser
    return parsers


def given_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """{field: value} of the flags given, from a namespace parsed with `given_only=True`; a nested config whose flags
    were given is built whole (its other fields at their defaults)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.metadata.get("cli") is False:
            continue
        kind = _base_type(hints[field.name])
        if dataclasses.is_dataclass(kind):
            if given_values(kind, args):
                out[field.name] = config_from_namespace(kind, args, _field_default(field))
        elif hasattr(args, _dest(field)):
            out[field.name] = getattr(args, _dest(field))
    return out


def config_from_namespace(cls: type, args: argparse.Namespace, defaults: Any = None, **given):
    """Build the config `cls` from parsed flags (nested configs included); fields without a flag keep their
    defaults, fields in `given` take those values (e.g. the mode's sampler config). Raises the config's ConfigError
    for an invalid value."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = dict(given)
    for field in dataclasses.fields(cls):
        if field.name in given:
            continue
        kind = _base_type(hints[field.name])
        default = getattr(defaults, field.name) if defaults is not None else _field_default(field)
        if field.metadata.get("cli") is False:
            values[field.name] = default
        elif dataclasses.is_dataclass(kind):
            values[field.name] = config_from_namespace(kind, args, default)
        elif hasattr(args, _dest(field)):
            values[field.name] = getattr(args, _dest(field))
        elif defaults is not None:
            values[field.name] = default
    return cls(**values)
