"""The `lpo optimize ...` and `lpo evaluate ...` sub-commands: LPO, SPO, Diffusion-DPO, per-image scoring of
samples, and reports/<world>/optimize.md. `register` adds them to lpo.cli's parser."""
from __future__ import annotations

from pathlib import Path


def _named(pairs: list[str], flag: str) -> dict[str, str]:
    """`name=path` arguments as a dict."""
    out = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} takes name=path arguments, got {pair!r}")
        out[name] = path
    return out


def cmd_optimize_lpo(args, stage):
    from lpo.optimize.methods import LPOConfig, train_lpo
    train_lpo(args.model, args.prompts, args.lrm, stage.section("lpo", LPOConfig), stage.seed_for("lpo"),
              args.out, args.metrics, args.lrm_metrics)


def cmd_optimize_spo(args, stage):
    from lpo.optimize.methods import SPOConfig, train_spo
    train_spo(args.model, args.prompts, args.spm, stage.section("spo", SPOConfig), stage.seed_for("spo"),
              args.out, args.metrics, args.spm_metrics)


def cmd_optimize_dpo(args, stage):
    from lpo.optimize.diffusion_dpo import DiffusionDPOConfig
    from lpo.optimize.methods import train_dpo
    train_dpo(args.model, args.preferences, stage.section("diffusion_dpo", DiffusionDPOConfig),
              stage.seed_for("diffusion_dpo"), args.out, args.metrics)


def cmd_evaluate_score(args, stage):
    """Every image of a sample set scored by the judge and the pixel reward model, one CSV row per image."""
    from lpo.evaluate.scores import score_rows
    from lpo.reward.pixel import PixelReward
    from lpo.samples import SampleSet
    from lpo.tables import write_csv
    from lpo.world.judge import judge_images, load_judge
    samples = SampleSet.load(args.samples)
    if not len(samples.images):
        raise ValueError(f"the sample set '{args.samples}' holds no images: sample some prompts first")
    grammar = stage.grammar()
    judge, judge_config = load_judge(args.judge)
    verdict = judge_images(judge, samples.images, [grammar.parse(str(p)) for p in samples.prompts], judge_config)
    pixel = PixelReward.load(args.pixel).score(samples.images, [str(p) for p in samples.prompts])
    write_csv(args.out, score_rows(samples, verdict, pixel))


def cmd_optimize_report(args, stage):
    import dataclasses

    from lpo.optimize.ablations import LPOAblationConfig, ablation_variants
    from lpo.cli import stage_costs
    from lpo.optimize.diffusion_dpo import DiffusionDPOConfig
    from lpo.evaluate.scores import EvaluateConfig, summarise
    from lpo.io import read_json
    from lpo.optimize.methods import LPOConfig, SPOConfig
    from lpo.evaluate.report import write_optimize_report
    from lpo.samples import SampleSet
    from lpo.tables import read_csv
    from lpo.world.preferences import PreferencesConfig
    from lpo.world.report import ReportConfig

    config = stage.section("evaluate", EvaluateConfig)
    scores = {name: read_csv(path) for name, path in _named(args.scores, "--scores").items()}
    if "base" not in scores:
        raise ValueError("--scores needs base=<the base model's scores CSV>: win rates are against it")
    summaries = []
    for name, rows in scores.items():
        summaries += summarise(rows, None if name == "base" else scores["base"], config,
                               stage.seed_for("evaluate"), name)
    training = {name: read_json(path) for name, path in _named(args.training, "--training").items()}
    wall = {row["stage"].removeprefix("optimize_"): row["seconds"] for row in stage_costs(args.benchmarks)}
    params = stage.params
    lpo, spo, dpo = (dataclasses.asdict(stage.section(name, cls)) for name, cls in
                     (("lpo", LPOConfig), ("spo", SPOConfig), ("diffusion_dpo", DiffusionDPOConfig)))
    ablations = dataclasses.asdict(stage.section("lpo_ablations", LPOAblationConfig))
    variants = ablation_variants(lpo, ablations) if "lpo_ablations" in params else {}
    report, preferences = stage.section("report", ReportConfig), stage.section("preferences", PreferencesConfig)
    setup = [
        (f"Training prompts: the world's `train` set; LPO and SPO run {lpo['rounds']} / {spo['rounds']} rounds of "
        f"{lpo['sample_batch_size']} / {spo['sample_batch_size']} prompts, K = {lpo['samples_per_step']}, "
        f"{lpo['num_inference_steps']} DDIM steps (eta = 1), CFG {lpo['guidance_scale']}, beta {lpo['beta']}, "
        f"threshold {lpo['threshold']} [{lpo['threshold_min']}, {lpo['threshold_max']}] on rewards x "
        f"{lpo['reward_scale']} (SPO x {spo['reward_scale']}), "
        f"LoRA rank {lpo['lora_rank']}, lr {lpo['learning_rate']}; LPO optimises t in {list(lpo['timestep_range'])} "
        f"with the LRM told the {lpo['lrm_timestep']} timestep, SPO t in {list(spo['timestep_range'])}."),
        (f"Diffusion-DPO: {dpo['steps']} steps of {dpo['batch_size']} train pairs, beta_dpo {dpo['beta_dpo']}, "
        f"LoRA rank {dpo['lora_rank']}, lr {dpo['learning_rate']}."),
        (f"Evaluation: {report.images_per_prompt} images per prompt with the base samples' seeds, "
        f"{preferences.sampling_steps} DDIM steps, CFG {preferences.guidance_scale} "
        f"for every method (the official script samples LPO and SPO at 5.0; one CFG keeps the win rate about "
        f"training alone); {config.bootstrap} bootstrap resamples; ties: |difference| <= {config.tie_band}.")]
    grids = {name: SampleSet.load(path) for name, path in _named(args.samples, "--samples").items()}
    write_optimize_report(Path(args.out), stage.world().name, summaries, training, variants, wall,
                          {"lpo": lpo["samples_per_step"], "spo": spo["samples_per_step"]}, setup, grids,
                          config.grid_prompts)


def register(stages, add) -> None:
    """Add `optimize` and `evaluate` to the top-level sub-parsers `stages`, with lpo.cli's `add` helper."""
    optimize = stages.add_parser("optimize", help="preference optimisation: LPO, SPO, Diffusion-DPO, the report")
    optimize = optimize.add_subparsers(dest="stage", required=True)
    p = add(optimize, "lpo", cmd_optimize_lpo, "LPO: step-level DPO against the LRM",
            "model", "prompts", "lrm", "out", "metrics")
    p.add_argument("--lrm-metrics", default=None, help="the LRM's training metrics, for the cost table")
    p = add(optimize, "spo", cmd_optimize_spo, "SPO: step-level DPO against the SPM, t in [0, 750]",
            "model", "prompts", "spm", "out", "metrics")
    p.add_argument("--spm-metrics", default=None, help="the SPM's training metrics, for the cost table")
    add(optimize, "diffusion-dpo", cmd_optimize_dpo, "Diffusion-DPO on the preference data's train pairs",
        "model", "preferences", "out", "metrics")
    p = add(optimize, "report", cmd_optimize_report, "write reports/<world>/optimize.md, CSVs, LaTeX, plots",
            "out")
    p.add_argument("--scores", nargs="+", required=True, help="method=scores.csv (base included)")
    p.add_argument("--training", nargs="*", default=[], help="method=metrics.json of each training")
    p.add_argument("--samples", nargs="*", default=[], help="method=samples.npz for the sample grids")
    p.add_argument("--benchmarks", nargs="*", default=[], help="Snakemake benchmark files of the trainings")

    evaluate = stages.add_parser("evaluate", help="score generated samples").add_subparsers(dest="stage",
                                                                                          required=True)
    add(evaluate, "score", cmd_evaluate_score, "judge + pixel reward of every image of a sample set, as CSV",
        "samples", "judge", "pixel", "out")
