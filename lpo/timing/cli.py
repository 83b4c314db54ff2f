"""`lpo timing`: the cost of one sampling step with K candidates, LRM against SPM (paper Table 5).

- `step-cost` times the world's trained base model, LRM and SPM (the rule `timing_step_cost`), on a GPU when one is
  visible, else on the CPU; beside Table 5 it times the LRM step under noise ensembling, M LRM passes for each M of
  `timing.ensemble_draws`.
- `step-cost-arch` times random-weight models at the published SD1.5 or SDXL configs (with a CLIP ViT-H/14 as the
  SPM's pixel model). It needs a CUDA GPU and refuses on a CPU, where one step of those models takes minutes;
  `--tiny` runs the same code with tiny widths instead, a set-up check whose times say nothing about the paper's models.
- `train-step-arch` times one optimizer step of each trainer (LRM, LPO, Diffusion-DPO) on random-weight SD1.5 or
  SDXL models at their published sizes and its peak GPU memory (lpo.timing.train_step), whence `lpo plan`'s
  estimated hours. It needs a CUDA GPU too, and takes `--tiny` too.
"""
from __future__ import annotations

import shlex

from lpo.stage import add_stage as add, positive_int
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


def cmd_train_step_arch(args, stage) -> None:
    from lpo.timing.train_step import (arch_config, measure_train_steps, per_device_batches, train_device,
                                       write_train_step_report)
    config = arch_config(args.arch)
    batches = per_device_batches(args.per_device_batch, config, args.stages)
    device = train_device(args.arch, args.tiny)
    threads = ["--threads", str(args.threads)] if args.threads else []
    batch = ["--per-device-batch", *args.per_device_batch] if args.per_device_batch else []
    command = shlex.join(["lpo", *threads, "timing", "train-step-arch", "--arch", args.arch,
                          *(["--tiny"] if args.tiny else []), "--stages", *args.stages, *batch,
                          "--steps", str(args.steps), "--out", args.out])
    timings = []
    for timing in measure_train_steps(args.arch, config, batches, device, args.tiny, args.steps,
                                      stage.seed_for("timing")):
        timings.append(timing)
        # Rewritten as results come: a run stopped by its time limit keeps the settings it measured.
        report = write_train_step_report(args.out, args.arch, args.tiny, device, timings, args.steps, command)
    print(f"lpo: wrote {report} and its .csv")


def register(stages) -> None:
    """Add `timing` to the top-level sub-parsers `stages`."""
    timing = stages.add_parser("timing", help="the cost of one sampling step, LRM against SPM (paper Table 5), and "
                                              "of one training step")
    timing = timing.add_subparsers(dest="stage", required=True)
    p = add(timing, "step-cost", cmd_step_cost, "time one sampling step of the world's trained models; writes "
            "<out>/step_cost.md, .csv and .tex beside the paper's Table 5, and <out>/step_cost_ensembling.csv (the "
            "LRM under noise ensembling)", "model", "lrm", "spm", "out")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when visible, else cpu)")
    p = add(timing, "step-cost-arch", cmd_step_cost_arch, "time one sampling step of random-weight SD1.5 or SDXL "
            "models at their published sizes (needs a CUDA GPU); writes <out>/step_cost_<arch>.md, .csv, .tex and "
            "_ensembling.csv", "out")
    p.add_argument("--arch", required=True, choices=["sd15", "sdxl"])
    p.add_argument("--tiny", action="store_true", help="the same topology with tiny widths: checks the set-up on a "
                                                       "CPU; its times say nothing about the real models")
    p.add_argument("--device", default=None, help="cuda or cuda:N (default: cuda when visible)")
    p = add(timing, "train-step-arch", cmd_train_step_arch, "time one optimizer step of each trainer (LRM, LPO, "
            "Diffusion-DPO) on random-weight SD1.5 or SDXL models at their published sizes, gradient checkpointing "
            "off and on, with peak GPU memory (needs a CUDA GPU); writes <out>/train_step_<arch>.md and .csv, which "
            "`lpo plan` reads from reports/gpu/<device>/", "out")
    p.add_argument("--arch", required=True, choices=["sd15", "sdxl"],
                   help="the architecture; the stages' settings come from config/<arch>.yaml")
    p.add_argument("--tiny", action="store_true", help="the same topology with tiny widths: checks the set-up on a "
                                                       "CPU; its times say nothing about the real models")
    p.add_argument("--stages", nargs="+", choices=["lrm", "lpo", "diffusion_dpo"],
                   default=["lrm", "lpo", "diffusion_dpo"], help="the trainers to time (default: all three)")
    p.add_argument("--per-device-batch", nargs="+", default=[], metavar="[STAGE=]B",
                   help="per-device batches to time: B for every stage, STAGE=B for one, e.g. lrm=4 lrm=16 (default: "
                        "each stage's per_device_batch_size in config/<arch>.yaml)")
    p.add_argument("--steps", type=positive_int, default=5,
                   help="timed steps per setting, after 2 untimed warm-up steps (default: 5)")
