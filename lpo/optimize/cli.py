"""`lpo optimize ...`: LPO, SPO, step-wise GRPO, Diffusion-DPO and the step-level reward fidelity
(workflow/rules/optimize.smk)."""
from __future__ import annotations

from lpo.stage import add_stage as add


def cmd_optimize_lpo(args, stage):
    from lpo.optimize.methods import LPOConfig, train_lpo
    train_lpo(args.model, args.prompts, args.lrm, stage.section("lpo", LPOConfig), stage.seed_for("lpo"),
              args.out, args.metrics, args.lrm_metrics)


def cmd_optimize_spo(args, stage):
    from lpo.optimize.methods import SPOConfig, train_spo
    train_spo(args.model, args.prompts, args.spm, stage.section("spo", SPOConfig), stage.seed_for("spo"),
              args.out, args.metrics, args.spm_metrics)


def cmd_optimize_grpo(args, stage):
    from lpo.optimize.methods import GRPOConfig, train_grpo
    train_grpo(args.model, args.prompts, args.lrm, stage.section("grpo", GRPOConfig), stage.seed_for("grpo"),
               args.out, args.metrics, args.lrm_metrics)


def cmd_optimize_dpo(args, stage):
    from lpo.optimize.diffusion_dpo import DiffusionDPOConfig
    from lpo.optimize.methods import train_dpo
    train_dpo(args.model, args.preferences, stage.section("diffusion_dpo", DiffusionDPOConfig),
              stage.seed_for("diffusion_dpo"), args.out, args.metrics)


def cmd_optimize_fidelity(args, stage):
    from lpo.optimize.fidelity import StepFidelityConfig, run_step_fidelity
    from lpo.optimize.methods import LPOConfig, SPOConfig
    from lpo.world.settings import stage_grammar, stage_world
    run_step_fidelity(args.model, args.prompts, args.lrm, args.calibrated_lrm, args.spm, args.judge, args.accuracy,
                      stage_grammar(stage), stage_world(stage).name, stage.section("lpo", LPOConfig),
                      stage.section("spo", SPOConfig), stage.section("step_fidelity", StepFidelityConfig),
                      stage.seed_for("step_fidelity"), args.out)


def register(stages) -> None:
    """Add `optimize` to the top-level sub-parsers `stages`."""
    optimize = stages.add_parser("optimize", help="preference optimisation: LPO, SPO, Diffusion-DPO")
    optimize = optimize.add_subparsers(dest="stage", required=True)
    p = add(optimize, "lpo", cmd_optimize_lpo, "LPO: step-level DPO against the LRM",
            "model", "prompts", "lrm", "out", "metrics")
    p.add_argument("--lrm-metrics", default=None, help="the LRM's training metrics, for the cost table")
    p = add(optimize, "spo", cmd_optimize_spo, "SPO: step-level DPO against the SPM, t in [0, 750]",
            "model", "prompts", "spm", "out", "metrics")
    p.add_argument("--spm-metrics", default=None, help="the SPM's training metrics, for the cost table")
    p = add(optimize, "grpo", cmd_optimize_grpo, "step-wise GRPO: LPO's sampler and LRM, groups of K candidates",
            "model", "prompts", "lrm", "out", "metrics")
    p.add_argument("--lrm-metrics", default=None, help="the LRM's training metrics, for the cost table")
    add(optimize, "diffusion-dpo", cmd_optimize_dpo, "Diffusion-DPO on the preference data's train pairs",
        "model", "preferences", "out", "metrics")
    add(optimize, "fidelity", cmd_optimize_fidelity, "step-level reward fidelity of the LRM, the SPM, the calibrated "
        "LRM (--calibrated-lrm) and the re-noised LRM against the judge's rollouts; --accuracy: the reward study's "
        "reward_accuracy.csv, --out: the report folder",
        "model", "prompts", "lrm", "calibrated-lrm", "spm", "judge", "accuracy", "out")
