"""Typed run configuration: one frozen dataclass per command, and argparse flags generated from it.

Flag names are the dataclass field names with '_' -> '-' (so the reference's flags keep their names and
defaults); the resolved configuration is a plain dict (dataclasses.asdict) written to the run folder and
into every checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def _base_type(annotation: Any) -> Any:
    # `float | None` -> float; `str` -> str
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0]
    return annotation


def none_or(kind):
    """argparse type that also accepts the literal 'None' (the reference's --loss-weight None)."""

    def parse(text: str):
        return None if text == "None" else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of `cls`. Field metadata: help, choices, flag (override), positional."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        meta = dict(field.metadata)
        if meta.get("cli") is False:
            continue
        flag = meta.get("flag", "--" + field.name.replace("_", "-"))
        kind = _base_type(hints[field.name])
        kwargs: dict[str, Any] = {"help": meta.get("help", "")}
        if field.default is not dataclasses.MISSING:
            kwargs["default"] = field.default
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if meta.get("negatable") else "store_true"
        else:
            kwargs["type"] = none_or(kind) if meta.get("allow_none_literal") else kind
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
            kwargs["metavar"] = meta.get("metavar")
        if meta.get("positional"):
            kwargs.pop("default", None)
            parser.add_argument(field.name, **{k: v for k, v in kwargs.items() if k != "metavar"})
        else:
            parser.add_argument(flag, dest=field.name, **kwargs)
        if kwargs.get("help") and "default" in kwargs and kind is not bool:
            parser._actions[-1].help += " (default: %(default)s)"


def from_namespace(cls: type, args: argparse.Namespace):
    """Build the dataclass from parsed args (extra attributes such as the subcommand are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})
