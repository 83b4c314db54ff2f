"""`lpo timing`: the cost of one sampling step with K candidates, LRM against SPM (paper Table 5).

- `step-cost` times the world's trained base model, LRM and SPM (the rule `timing_step_cost`), on a GPU when one is
  visible, else on the CPU.
- `step-cost-arch` times random-weight models at the published SD1.5 or SDXL configs (with a CLIP ViT-H/14 as the
  SPM's pixel model). It needs a CUDA GPU and refuses on a CPU, where one step of those models takes minutes;
  `--tiny` runs the same code with tiny widths instead, a set-up check whose times say nothing about the paper's models.
"""
from __future__ import annotations

import shlex

from lpo.stage import add_stage as add
from lpo.world.settings import stage_world


def _device(name: str | None):
    import torch
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a torch device ({e}): use cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible; leave --device out to time on the CPU")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: timing supports cpu and cuda devices")
    return device


def _command(args, *words: str) -> str:
    threads = ["--threads", str(args.threads)] if args.threads else []
    device = ["--device", args.device] if args.device else []
    return shlex.join(["lpo", *threads, "timing", *words, *device, "--out", args.out])


def cmd_step_cost(args, stage) -> None:
    from lpo.timing.models import load_world_models
    from lpo.timing.report import write_step_cost_report
    from lpo.timing.step import TimingConfig, measure_step_cost
    config = stage.section("timing", TimingConfig)
    device = _device(args.device)
    models = load_world_models(args.model, args.lrm, args.spm, device, config.torch_dtype(device),
                               name=f"trained models of the {stage_world(stage).name} world")
    measurement = measure_step_cost(models, config, stage.seed_for("timing"))
    command = _command(args, "step-cost", "--model", args.model, "--lrm", args.lrm, "--spm", args.spm)
    write_step_cost_report(args.out, "step_cost", models, measurement, config, command)


def cmd_step_cost_arch(args, stage) -> None:
    from lpo.timing.models import arch_models
    from lpo.timing.report import write_step_cost_report
    from lpo.timing.step import TimingConfig, measure_step_cost
    config = stage.section("timing", TimingConfig)
    device = _device(args.device)
    models = arch_models(args.arch, device, config.torch_dtype(device), tiny_widths=args.tiny,
                         seed=stage.seed_for("timing"))
    measurement = measure_step_cost(models, config, stage.seed_for("timing"))
    command = _command(args, "step-cost-arch", "--arch", args.arch, *(["--tiny"] if args.tiny else []))
    stem = f"step_cost_{args.arch}" + ("_tiny" if args.tiny else "")
    write_step_cost_report(args.out, stem, models, measurement, config, command)


def register(stages) -> None:
    """Add `timing` to the top-level sub-parsers `stages`."""
    timing = stages.add_parser("timing", help="the cost of one sampling step, LRM against SPM (paper Table 5)")
    timing = timing.add_subparsers(dest="stage", required=True)
    p = add(timing, "step-cost", cmd_step_cost, "time one sampling step of the world's trained models; writes "
            "<out>/step_cost.md, .csv and .tex beside the paper's Table 5", "model", "lrm", "spm", "out")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when visible, else cpu)")
    p = add(timing, "step-cost-arch", cmd_step_cost_arch, "time one sampling step of random-weight SD1.5 or SDXL "
            "models at their published sizes (needs a CUDA GPU); writes <out>/step_cost_<arch>.md, .csv, .tex", "out")
    p.add_argument("--arch", required=True, choices=["sd15", "sdxl"])
    p.add_argument("--tiny", action="store_true", help="the same topology with tiny widths: checks the set-up on a "
                                                       "CPU; its times say nothing about the real models")
    p.add_argument("--device", default=None, help="cuda or cuda:N (default: cuda when visible)")
