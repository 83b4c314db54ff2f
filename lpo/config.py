"""Typed stage settings: every stage reads its section of the config into a dataclass, so a mistyped key
stops the stage with a message naming it. The config files (through the Snakefile) and the CLI's --params pass the
same schema first (`validate_config`), and both read YAML with `load_yaml`."""
from __future__ import annotations

import dataclasses
import json
import re
import typing
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG = SCHEMA.parents[2] / "config" / "config.yaml"


class ConfigLoader(yaml.SafeLoader):
    """YAML as a config file means it: YAML 1.1 (PyYAML's) reads a number with an exponent but no dot (`1e-5`, the
    way json.dumps writes it) or with an unsigned exponent (`1.0e5`) as a string; here it is a float, as in YAML 1.2."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(path: str | Path, what: str = "config file") -> Any:
    """The YAML (or JSON) file at `path`; a missing file or a YAML error names `what`, the file and the line."""
    try:
        with open(path) as f:
            return yaml.load(f, ConfigLoader)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist: check the path") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ValueError(f"{what} {where}: not valid YAML ({problem}): indent with spaces (no tabs), keep a key's "
                         f"nested keys aligned and quote values holding ': ' or ' #'") from None


def read_config(files: list[str], overrides: dict | None = None) -> dict:
    """The config the DAG runs on: `files` read by `load_yaml` and merged in order (nested sections key by key, as
    Snakemake merges --configfile), then `overrides` (Snakemake's --config); checked against the schema."""
    config: dict = {}
    for part in [*(load_yaml(path) or {} for path in files), overrides or {}]:
        if not isinstance(part, dict):
            raise ValueError(f"config files must hold a mapping of sections at the top level, got "
                             f"{type(part).__name__} (from {' + '.join(map(str, files))})")
        _merge(config, part)
    validate_config(config, f"config ({' + '.join(map(str, files))})")
    return config


def _merge(into: dict, part: dict) -> None:
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


@cache
def _schema() -> dict:
    return load_yaml(SCHEMA, "config schema")


def validate_config(config: Any, where: str, partial: bool = False) -> None:
    """Check `config` against workflow/schemas/config.schema.yaml; a ValueError names every offending key by its
    dotted path and says how to fix it, each on a line starting with `where`. `partial` (--params): sections and
    keys may be left out, the stage dataclasses' defaults stand in for them."""
    import jsonschema
    schema = _schema()
    errors = [e for e in jsonschema.validators.validator_for(schema)(schema).iter_errors(config)
              if not (partial and e.validator == "required")]
    if errors:
        errors.sort(key=lambda e: [str(p) for p in e.absolute_path])
        raise ValueError("\n".join(f"{where}: {_explain(e)}" for e in errors))


def _dotted(path) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".")


_TYPES = {"integer": "a whole number", "number": "a number", "string": "a string", "boolean": "true or false",
          "array": "a list", "object": "a mapping of keys", "null": "null"}
_BOUNDS = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}


def _explain(error) -> str:
    key, value, rule = _dotted(error.absolute_path), error.instance, error.validator
    if rule == "additionalProperties":
        known = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(value) - set(known))
        inside = f" in {key}" if key else ""
        return f"unknown key(s){inside}: {', '.join(unknown)}: check the spelling (known: {', '.join(known)})"
    if rule == "required":
        return f"{key or 'the config'} lacks {error.message.split(' is a required')[0]}: add it"
    if rule == "type":
        wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        wanted = " or ".join(_TYPES[t] for t in wanted)
        if isinstance(value, str) and _is_number(value) and wanted.startswith(("a number", "a whole number")):
            return f"{key} = {value!r} is a string, not {wanted}: write the number without quotes"
        return f"{key} = {value!r} is not {wanted}: give {wanted}"
    if rule in _BOUNDS:
        return f"{key} = {value!r} is out of range: use a value {_BOUNDS[rule]} {error.validator_value}"
    if rule == "enum":
        return f"{key} = {value!r}: use one of {', '.join(map(repr, error.validator_value))}"
    hint = error.schema.get("description")
    return f"{key} = {value!r}: {error.message}" + (f" ({hint})" if hint else "")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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
    """The CLI's --params: a JSON object (what the Snakemake rules pass) or @path to a JSON/YAML file; either passes
    the config schema, the sections it holds as far as they go."""
    if text.startswith("@"):
        value = load_yaml(text[1:], "--params file") or {}
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--params is not valid JSON ({e}): pass a JSON object of config sections, e.g. "
                             f"'{{\"lrm\": {{\"steps\": 20}}}}', or @config.yaml") from None
    if not isinstance(value, dict):
        raise ValueError(f"--params must be a JSON object of config sections, got {type(value).__name__}")
    validate_config(value, "--params", partial=True)
    return value
