"""`lpo claims report`: the verdict on each of the paper's claims from the earlier stages' outputs,
reports/<world>/claims.md and claims.csv (workflow/rules/claims.smk)."""
from __future__ import annotations

from pathlib import Path

from lpo.stage import add_stage as add
from lpo.stage import named
from lpo.world.settings import stage_world


def cmd_report(args, stage):
    import dataclasses

    from lpo.claims.report import write_claims_report
    from lpo.claims.table import BEYOND, CLAIMS, ClaimInputs, claim_rows
    from lpo.evaluate.scores import EvaluateConfig
    from lpo.optimize.ablations import LPOAblationConfig, ablation_variants
    from lpo.optimize.methods import LPOConfig

    config = stage.section("evaluate", EvaluateConfig)
    # Without the lpo_ablations section no ablation run exists, and the claims that need one are not measured.
    variants = ablation_variants(dataclasses.asdict(stage.section("lpo", LPOConfig)),
                                 dataclasses.asdict(stage.section("lpo_ablations", LPOAblationConfig))
                                 ) if "lpo_ablations" in stage.params else {}
    inputs = ClaimInputs(Path(args.reward_accuracy), Path(args.lrm_ablations), Path(args.cost),
                         {name: Path(p) for name, p in named(args.scores, "--scores").items()}, variants,
                         Path(args.high_noise) if args.high_noise else None)
    rows = claim_rows(inputs, config.bootstrap, stage.seed_for("claims"), CLAIMS + BEYOND)
    write_claims_report(args.out, stage_world(stage).name, rows, config.bootstrap)


def register(stages) -> None:
    """Add `claims` to the top-level sub-parsers `stages`."""
    claims = stages.add_parser("claims", help="the verdict on each of the paper's claims")
    claims = claims.add_subparsers(dest="stage", required=True)
    p = add(claims, "report", cmd_report, "judge the paper's claims on the earlier stages' outputs; writes "
            "<out>/claims.md and claims.csv", "reward-accuracy", "lrm-ablations", "cost", "out")
    p.add_argument("--scores", nargs="+", required=True,
                   help="method=scores.csv of lpo, spo, diffusion_dpo, the grpo runs and every ablation_<run>")
    p.add_argument("--high-noise", default=None,
                   help="the reward study's reward_high_noise.csv, for the calibrated LRM's and ensembling's rows")
