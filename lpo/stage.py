"""What every stage's CLI shares: the `--params` sections a stage reads (`Stage`), the parser helper each stage's
`register` adds its commands with, and the small helpers of several stages. The top-level CLI (lpo.cli) only
collects the stages' commands."""
from __future__ import annotations

import argparse
import csv
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


def writes_outputs() -> bool:
    """Under torchrun every process of a stage ends holding the same results: the first one writes them."""
    from accelerate import PartialState
    return PartialState(cpu=True).is_main_process


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
