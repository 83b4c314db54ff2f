"""Typed stage settings: every stage reads its section of the config into a dataclass, so a mistyped key
stops the stage with a message naming it (the Snakemake schema catches the same at start-up)."""
from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str) -> T:
    """Build dataclass `cls` from `data`; `where` is the config path used in error messages (e.g. "vae")."""
    data = dict(data or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) in {where}: {', '.join(unknown)} (known: {', '.join(known)})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value, f"{where}.{name}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def parse_params(text: str) -> dict[str, Any]:
    """The CLI's --params: a JSON object (what the Snakemake rules pass) or @path to a JSON/YAML file."""
    if text.startswith("@"):
        import yaml
        with open(text[1:]) as f:
            return yaml.safe_load(f) or {}
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"--params must be a JSON object, got {type(value).__name__}")
    return value
