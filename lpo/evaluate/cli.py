"""`lpo evaluate ...`: every method's samples scored per image, and reports/<world>/optimize.md
(workflow/rules/evaluate.smk)."""
from __future__ import annotations

from pathlib import Path

from lpo.stage import add_stage as add
from lpo.stage import named, stage_costs
from lpo.world.settings import stage_grammar, stage_world


def cmd_score(args, stage):
    """Every image of a sample set scored by the judge and the pixel reward model, one CSV row per image."""
    from lpo.evaluate.scores import score_rows
    from lpo.reward.pixel import PixelReward
    from lpo.samples import SampleSet
    from lpo.tables import write_csv
    from lpo.world.judge import judge_images, load_judge
    samples = SampleSet.load(args.samples)
    if not len(samples.images):
        raise ValueError(f"the sample set '{args.samples}' holds no images: sample some prompts first")
    grammar = stage_grammar(stage)
    judge, judge_config = load_judge(args.judge)
    verdict = judge_images(judge, samples.images, [grammar.parse(str(p)) for p in samples.prompts], judge_config)
    pixel = PixelReward.load(args.pixel).score(samples.images, [str(p) for p in samples.prompts])
    write_csv(args.out, score_rows(samples, verdict, pixel))


def cmd_report(args, stage):
    import dataclasses

    from lpo.optimize.ablations import LPOAblationConfig, ablation_variants
    from lpo.optimize.diffusion_dpo import DiffusionDPOConfig
    from lpo.evaluate.scores import EvaluateConfig, summarise
    from lpo.io import read_json
    from lpo.optimize.methods import GRPOConfig, LPOConfig, SPOConfig, grpo_runs
    from lpo.evaluate.report import write_optimize_report
    from lpo.samples import SampleSet
    from lpo.tables import read_csv
    from lpo.world.report import ReportConfig

    config = stage.section("evaluate", EvaluateConfig)
    scores = {name: read_csv(path) for name, path in named(args.scores, "--scores").items()}
    if "base" not in scores:
        raise ValueError("--scores needs base=<the base model's scores CSV>: win rates are against it")
    summaries = []
    for name, rows in scores.items():
        summaries += summarise(rows, None if name == "base" else scores["base"], config,
                               stage.seed_for("evaluate"), name)
    training = {name: read_json(path) for name, path in named(args.training, "--training").items()}
    wall = {row["stage"].removeprefix("optimize_"): row["seconds"] for row in stage_costs(args.benchmarks)}
    params = stage.params
    lpo, spo, dpo = (dataclasses.asdict(stage.section(name, cls)) for name, cls in
                     (("lpo", LPOConfig), ("spo", SPOConfig), ("diffusion_dpo", DiffusionDPOConfig)))
    ablations = dataclasses.asdict(stage.section("lpo_ablations", LPOAblationConfig))
    variants = ablation_variants(lpo, ablations) if "lpo_ablations" in params else {}
    report = stage.section("report", ReportConfig)
    grpo = stage.section("grpo", GRPOConfig) if "grpo" in params else None
    setup = [
        (f"Training prompts: the world's `train` set; LPO and SPO run {lpo['rounds']} / {spo['rounds']} rounds of "
        f"{lpo['sample_batch_size']} / {spo['sample_batch_size']} prompts, K = {lpo['samples_per_step']}, "
        f"{lpo['num_inference_steps']} DDIM steps (eta = 1), CFG {lpo['guidance_scale']}, beta {lpo['beta']}, "
        f"threshold {lpo['threshold']} [{lpo['threshold_min']}, {lpo['threshold_max']}] on rewards x "
        f"{lpo['reward_scale']} (SPO x {spo['reward_scale']}), "
        f"LoRA rank {lpo['lora_rank']}, lr {lpo['learning_rate']}; LPO optimises t in {list(lpo['timestep_range'])} "
        f"with the LRM told the {lpo['lrm_timestep']} timestep, SPO t in {list(spo['timestep_range'])}."),
        *([(f"Step-wise GRPO: LPO's sampler, LRM and settings with groups of K = {grpo.samples_per_step}, "
             f"beta {grpo.beta} (KL to the base model), eps {grpo.eps} (PPO clip), {grpo.train_batch_size} groups "
             f"per optimizer step; runs of {', '.join(f'{grpo.rounds * m} rounds' for m in grpo.budgets)} "
             f"({', '.join(f'{m}x' for m in grpo.budgets)} grpo.rounds, set to LPO's preference-optimisation "
             f"cost on this world).")] if grpo else []),
        (f"Diffusion-DPO: {dpo['steps']} steps of {dpo['batch_size']} train pairs, beta_dpo {dpo['beta_dpo']}, "
        f"LoRA rank {dpo['lora_rank']}, lr {dpo['learning_rate']}."),
        (f"Evaluation: {report.images_per_prompt} images per prompt with the base samples' seeds, "
        f"{report.sampling_steps} DDIM steps, CFG {report.guidance_scale} "
        f"for every method (the official script samples LPO and SPO at 5.0; one CFG keeps the win rate about "
        f"training alone); {config.bootstrap} bootstrap resamples; ties: |difference| <= {config.tie_band}.")]
    grids = {name: SampleSet.load(path) for name, path in named(args.samples, "--samples").items()}
    write_optimize_report(Path(args.out), stage_world(stage).name, summaries, training, variants, wall,
                          {"lpo": lpo["samples_per_step"], "spo": spo["samples_per_step"],
                           **({run: grpo.samples_per_step for run in grpo_runs(grpo.budgets)} if grpo else {})},
                          setup, grids, config.grid_prompts)


def register(stages) -> None:
    """Add `evaluate` to the top-level sub-parsers `stages`."""
    evaluate = stages.add_parser("evaluate", help="score generated samples").add_subparsers(dest="stage",
                                                                                          required=True)
    add(evaluate, "score", cmd_score, "judge + pixel reward of every image of a sample set, as CSV",
        "samples", "judge", "pixel", "out")
    p = add(evaluate, "report", cmd_report, "write reports/<world>/optimize.md, CSVs, LaTeX, plots",
            "out")
    p.add_argument("--scores", nargs="+", required=True, help="method=scores.csv (base included)")
    p.add_argument("--training", nargs="*", default=[], help="method=metrics.json of each training")
    p.add_argument("--samples", nargs="*", default=[], help="method=samples.npz for the sample grids")
    p.add_argument("--benchmarks", nargs="*", default=[], help="Snakemake benchmark files of the trainings")
