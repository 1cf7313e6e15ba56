"""Command-line flags generated from the engine's config dataclasses (workers/config.py).

Data flow: `add_engine_flags(parser)` adds one `--field-name` flag per EngineConfig field, with the
field's description as help and its Literal choices; every flag defaults to None, meaning the
engine's own default. `engine_config_from_flags(args)` passes the flags that were given to
`LLM`'s override rule (workers/llm.py), so a bad value is refused by the engine's own check with
its message. A command whose own flag has a field's name (generate's sampling `--seed`) gets the
field under a renamed flag.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import fields
from typing import Any, Literal

from shardserve.workers.config import SECTIONS, EngineConfig

DEST_PREFIX = "engine__"


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _argument(hint: Any) -> dict[str, Any]:
    """argparse keywords for a field type: bool, int, float, str, a Literal, a tuple of ints (or None)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    base = [a for a in typing.get_args(hint) if a is not type(None)][0] if union else hint
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        return {"type": type(choices[0]), "choices": choices}
    if typing.get_origin(base) is tuple:
        return {"type": _int_tuple, "metavar": "N,N,..."}
    return {"type": {bool: _bool, int: int, float: float, str: str}[base]}


def add_engine_flags(parser: argparse.ArgumentParser, renames: dict[str, str] | None = None,
                     sections: tuple[str, ...] | None = None) -> None:
    """One flag per field of every engine section (or of `sections` only)."""
    renames = renames or {}
    group = parser.add_argument_group("engine", "every engine setting (workers/config.py); unset = its default")
    for name, cls in SECTIONS.items():
        if sections is not None and name not in sections:
            continue
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            flag = "--" + renames.get(f.name, f.name).replace("_", "-")
            keywords = {"metavar": f.name.upper(), **_argument(hints[f.name])}
            if "choices" in keywords:
                del keywords["metavar"]
            group.add_argument(flag, dest=DEST_PREFIX + f.name, default=None,
                               help=f.metadata.get("description", "").replace("%", "%%"), **keywords)


def given_engine_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The engine fields whose flags were given, by field name."""
    return {name[len(DEST_PREFIX):]: value for name, value in vars(args).items()
            if name.startswith(DEST_PREFIX) and value is not None}


def engine_config_from_flags(args: argparse.Namespace, base: EngineConfig | None = None) -> EngineConfig:
    """`base` (default: EngineConfig()) with every given engine flag applied; ValueError names the field."""
    from shardserve.workers.llm import _apply_overrides

    return _apply_overrides(base or EngineConfig(), given_engine_flags(args))
