"""`lpo`: one sub-command per pipeline stage. The Snakemake rules call these, so every stage also runs alone.

Each stage takes its settings as `--params`, a JSON object holding the config sections it reads (or @file.yaml),
plus explicit input and output paths.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Before torch loads: with the default active wait, torch's threads spin against any other busy process on
# a 2-core machine, and a training step ran ~20x slower (measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lpo.claims.cli import register as register_claims
from lpo.config import DEFAULT_CONFIG, parse_params, read_config
from lpo.evaluate.cli import register as register_evaluate
from lpo.optimize.cli import register as register_optimize
from lpo.reward.cli import register as register_reward
from lpo.sd.cli import register as register_sd
from lpo.stage import Stage, positive_int
from lpo.timing.cli import register as register_timing
from lpo.world.cli import register as register_world


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lpo", description=__doc__)
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads, >= 1 (default: torch's choice)")
    stages = parser.add_subparsers(dest="group", required=True)
    # In the DAG's order; each stage adds its own commands.
    for register in (register_world, register_reward, register_optimize, register_evaluate, register_timing,
                     register_claims, register_sd):
        register(stages)
    check = stages.add_parser(
        "check-config", help="check config files as the DAG does before any job: the YAML (naming file, line and "
                             "column), the schema (naming each key) and each stage's settings. Snakemake reads "
                             "--configfile itself first and names neither line nor key when a file is not valid")
    check.add_argument("configfiles", nargs="*", metavar="CONFIGFILE",
                       help="read over config/config.yaml in order, as `snakemake --configfile` reads them")
    check.set_defaults(func=check_config_files, params="{}")
    plan = stages.add_parser(
        "plan", help="a memory and time plan per training stage (parameters, optimizer state, activations, "
                     "per-GPU batch, accumulation, fit, measured hours), as markdown on stdout")
    plan.add_argument("--configfile", default=None, help="the world's config over config/config.yaml, e.g. "
                                                         "config/sd15.yaml (default: the embedded world, on the CPU)")
    plan.add_argument("--gpus", type=int, default=1, help="GPUs a stage runs on, one process each (default: 1)")
    plan.add_argument("--gpu-mem", type=float, default=None,
                      help="GiB per GPU to fit in (default: none checked; the embedded world: this machine's RAM)")
    plan.add_argument("--write", default=None, metavar="PATH",
                      help="write the plans of SD1.5 and SDXL (8 x 80 GiB and 1 x 24 GiB) and the embedded world to "
                           "PATH (reports/plan.md) instead")
    plan.set_defaults(func=plan_stages, params="{}")
    return parser


def plan_stages(args, stage) -> None:
    from lpo.timing.plan import plan_world, render, write_plan
    if args.write:
        write_plan(args.write)
        print(f"lpo: wrote {args.write}")
        return
    words = ["python -m lpo plan", *(["--configfile", args.configfile] if args.configfile else []),
             "--gpus", str(args.gpus), *(["--gpu-mem", f"{args.gpu_mem:g}"] if args.gpu_mem is not None else [])]
    print(render([plan_world(args.configfile, [(args.gpus, args.gpu_mem)])], " ".join(words)), end="")


def check_config_files(args, stage) -> None:
    from lpo.checks import check_config, check_sd_world
    files = [str(DEFAULT_CONFIG), *args.configfiles]
    config = read_config(files)
    if "sd_world" in config:
        check_sd_world(config)
    else:
        check_config(config)
    print(f"lpo: {' + '.join(files)}: every check passed")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        stage = Stage(parse_params(args.params))
        args.func(args, stage)
    except (ValueError, FileNotFoundError, KeyError, FloatingPointError) as e:
        print(f"lpo: error: {e}", file=sys.stderr)
        return 2
    name = " ".join(filter(None, [args.group, getattr(args, "stage", None)]))
    print(json.dumps({"stage": name, "seconds": round(time.perf_counter() - start, 2)}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
