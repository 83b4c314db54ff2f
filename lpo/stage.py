"""What every stage's CLI shares: the `--params` sections a stage reads (`Stage`), the parser helper each stage's
`register` adds its commands with, the argparse types that range-check numeric options, and the small helpers of
several stages. The top-level CLI (lpo.cli) only collects the stages' commands."""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from lpo.config import from_dict
from lpo.seeding import stage_seed


class Stage:
    """Config sections of one stage's --params, each checked against its dataclass."""

    def __init__(self, params: dict):
        self.params = params
        self.seed = int(params.get("seed", 0))

    def section(self, name: str, cls):
        return from_dict(cls, self.params.get(name), name)

    def seed_for(self, stage: str) -> int:
        return stage_seed(self.seed, stage)


def add_stage(sub, name: str, func, help: str, *io: str) -> argparse.ArgumentParser:
    """A sub-command `name` running func(args, stage), with --params and the required path flags `io`."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--params", default="{}", help="JSON object of config sections, or @config.yaml")
    for flag in io:
        p.add_argument(f"--{flag}", required=True)
    p.set_defaults(func=func)
    return p


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number: give one >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range: give a whole number >= 1")
    return value


def _float_at_least(text: str, low: float, inclusive: bool) -> float:
    rule = f"{'>=' if inclusive else '>'} {low:g}"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number: give a number {rule}") from None
    if not math.isfinite(value) or value < low or (value == low and not inclusive):
        raise argparse.ArgumentTypeError(f"{text} is out of range: give a finite number {rule}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _float_at_least(text, 0.0, inclusive=False)


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _float_at_least(text, 0.0, inclusive=True)


def writes_outputs() -> bool:
    """Under torchrun every process of a stage ends holding the same results: the first one writes them."""
    from lpo.launch import process_state
    return process_state().is_main_process


def named(pairs: list[str], flag: str) -> dict[str, str]:
    """`name=path` arguments as a dict."""
    out = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} takes name=path arguments, got {pair!r}")
        out[name] = path
    return out


def stage_costs(paths: list[str]) -> list[dict]:
    """Wall-clock seconds and peak memory of each stage, from Snakemake's benchmark files."""
    rows = []
    for path in sorted(p for p in paths or [] if Path(p).exists()):
        with open(path, newline="") as f:
            for record in csv.DictReader(f, delimiter="\t"):
                rows.append({"stage": Path(path).stem, "seconds": round(float(record["s"]), 1),
                             "max_rss_mb": record.get("max_rss", "")})
    return rows
