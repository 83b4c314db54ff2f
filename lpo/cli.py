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
from pathlib import Path

# Before torch loads: with the default active wait, torch's threads spin against any other busy process on
# a 2-core machine, and a training step ran ~20x slower (measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lpo.optimize.cli import register as register_optimize
from lpo.sd.cli import register as register_sd
from lpo.timing.cli import register as register_timing
from lpo.config import from_dict, parse_params
from lpo.seeding import stage_seed


class Stage:
    """Config sections of one stage's --params, each checked against its dataclass."""

    def __init__(self, params: dict):
        self.params = params
        self.seed = int(params.get("seed", 0))

    def section(self, name: str, cls):
        return from_dict(cls, self.params.get(name), name)

    def world(self):
        from lpo.world.settings import WorldConfig
        return self.section("world", WorldConfig)

    def grammar(self):
        return self.world().grammar(stage_seed(self.seed, "grammar"))

    def seed_for(self, stage: str) -> int:
        return stage_seed(self.seed, stage)


def _writes_outputs() -> bool:
    """Under torchrun every process of a stage ends holding the same results: the first one writes them."""
    from accelerate import PartialState
    return PartialState(cpu=True).is_main_process


def cmd_prompts(args, stage: Stage):
    from lpo.io import write_json
    from lpo.world.settings import PromptsConfig, make_prompt_sets
    sets = make_prompt_sets(stage.grammar(), stage.section("prompts", PromptsConfig), stage.seed_for("prompts"))
    write_json(args.out, sets | {"heldout_pairs": sorted(" ".join(p) for p in stage.grammar().heldout_pairs)})


def cmd_corpus(args, stage: Stage):
    from lpo.world.corpus import CorpusConfig, build_corpus
    world = stage.world()
    corpus = build_corpus(stage.grammar(), stage.section("corpus", CorpusConfig), world.image_size,
                          stage.seed_for("corpus"))
    corpus.save(args.out)


def cmd_tokenizer(args, stage: Stage):
    from lpo.world.tokenizer import build_clip_tokenizer
    build_clip_tokenizer(args.out)


def cmd_judge(args, stage: Stage):
    from lpo.io import write_json
    from lpo.world.judge import JudgeConfig, evaluate_judge, save_judge, train_judge
    config, world = stage.section("judge", JudgeConfig), stage.world()
    judge, metrics = train_judge(stage.grammar(), world.image_size, config, stage.seed_for("judge"))
    metrics |= evaluate_judge(judge, stage.grammar(), world.image_size, stage.seed_for("judge-eval"),
                              config=config)
    save_judge(judge, config, args.out)
    write_json(args.metrics, metrics)


def cmd_vae(args, stage: Stage):
    from lpo.io import write_json
    from lpo.world.base_model import VAEConfig, check_image_size, train_vae
    from lpo.world.corpus import Corpus
    world, config = stage.world(), stage.section("vae", VAEConfig)
    check_image_size(world.image_size, config)
    metrics = train_vae(Corpus.load(args.corpus).images, world.image_size, config, stage.seed_for("vae"), args.out)
    write_json(args.metrics, metrics)


def cmd_base_model(args, stage: Stage):
    from lpo.io import write_json
    from lpo.world.base_model import BaseModelConfig, train_base_model
    from lpo.world.corpus import Corpus
    corpus = Corpus.load(args.corpus)
    metrics = train_base_model(corpus.images, corpus.captions, args.vae, args.tokenizer,
                               stage.section("base_model", BaseModelConfig), stage.seed_for("base_model"), args.out)
    if _writes_outputs():
        write_json(args.metrics, metrics)


def cmd_side_scorers(args, stage: Stage):
    from lpo.io import write_json
    from lpo.world.corpus import Corpus
    from lpo.world.side_scorers import SideScorerConfig, train_side_scorers
    scorers, metrics = train_side_scorers(Corpus.load(args.corpus), stage.grammar(),
                                          stage.section("side_scorers", SideScorerConfig),
                                          stage.seed_for("side_scorers"))
    scorers.save(args.out)
    write_json(args.metrics, metrics)


def cmd_preferences(args, stage: Stage):
    import datasets

    from lpo.io import atomic_path, read_json, require_exists, write_json
    from lpo.tables import write_csv
    from lpo.world.judge import judge_images, load_judge
    from lpo.world.pipeline import load_pipeline, sample
    from lpo.world.preferences import PreferencesConfig, build_preference_data
    from lpo.world.side_scorers import SideScorers

    config = stage.section("preferences", PreferencesConfig)
    grammar = stage.grammar()
    pipe = load_pipeline(args.model)
    judge, judge_config = load_judge(args.judge)
    scorers = SideScorers.load(args.side_scorers)
    prompt_sets = read_json(require_exists(args.prompts, "prompt file", "run the `world prompts` stage"))
    records, judged, side, stats = build_preference_data(
        prompt_sets,
        sample=lambda prompts, seeds: sample(pipe, prompts, seeds, steps=config.sampling_steps,
                                            guidance_scale=config.guidance_scale, batch_size=config.batch_size),
        judge=lambda images, prompts: judge_images(judge, images, [grammar.parse(p) for p in prompts], judge_config),
        side_scores=scorers.score, config=config, seed=stage.seed_for("preferences"))
    if not _writes_outputs():
        return
    with atomic_path(args.out) as tmp:
        datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in records.items()}).save_to_disk(
            str(tmp / "dataset"))
        write_csv(tmp / "mpcf_scores.csv", side)
        write_csv(tmp / "judge_scores.csv", judged)
        write_json(tmp / "stats.json", stats)


def cmd_sample(args, stage: Stage):
    import numpy as np

    from lpo.io import read_json, require_exists
    from lpo.samples import SampleSet, expand_prompt_sets
    from lpo.world.pipeline import load_pipeline, sample
    prompt_sets = read_json(require_exists(args.prompts, "prompt file", "run the `world prompts` stage"))
    prompts, sets, index, seeds = expand_prompt_sets(prompt_sets, args.sets.split(","), args.images_per_prompt,
                                                     stage.seed_for("sample"))
    images = sample(load_pipeline(args.model), prompts, seeds, steps=args.steps, guidance_scale=args.guidance_scale)
    if _writes_outputs():
        SampleSet(images, np.array(prompts), np.array(sets), np.array(index), np.array(seeds)).save(args.out)


def cmd_report(args, stage: Stage):
    from lpo.io import read_json
    from lpo.samples import SampleSet
    from lpo.world.judge import judge_images, load_judge
    from lpo.world.report import (
        ReportConfig,
        base_model_rows,
        sample_grid,
        write_world_report,
    )
    grammar, world = stage.grammar(), stage.world()
    report = stage.section("report", ReportConfig)
    samples = SampleSet.load(args.samples)
    judge, judge_config = load_judge(args.judge)
    verdict = judge_images(judge, samples.images, [grammar.parse(p) for p in samples.prompts], judge_config)
    rows = base_model_rows(samples, verdict, judge_config.defect_threshold, report.bootstrap,
                           stage.seed_for("report"))
    out = Path(args.out)
    sample_grid(samples, out / "base_samples.png", report.grid_prompts)
    summary = {"name": world.name, "image_size": world.image_size, "scenes": len(grammar.scenes()),
               "heldout_scenes": len(grammar.heldout_scenes()),
               "heldout_pairs": sorted(" ".join(p) for p in grammar.heldout_pairs)}
    write_world_report(out, summary, read_json(args.vae_metrics), read_json(args.judge_metrics), rows,
                       read_json(Path(args.preferences) / "stats.json"), stage_costs(args.benchmarks))


def _mpcf_table(preferences: str, split: str, n_rows: int) -> dict:
    from lpo.reward.mpcf import GAP_COLUMNS
    from lpo.preference_data import MPCF_SCORES, load_side_table
    return load_side_table(preferences, MPCF_SCORES, split, n_rows, GAP_COLUMNS)


def cmd_reward_mpcf(args, stage: Stage):
    """How many win-lose and tie pairs of the train split each MPCF strategy keeps (paper Table 1)."""
    import dataclasses

    from lpo.io import write_json
    from lpo.reward.mpcf import MPCFConfig, mpcf_counts
    from lpo.preference_data import load_split
    config = stage.section("mpcf", MPCFConfig)
    table = _mpcf_table(args.preferences, "train", len(load_split(args.preferences, "train")))
    rows = [mpcf_counts(table, dataclasses.replace(config, strategy=s)) for s in (0, 1, 2, 3)]
    write_json(args.out, {"used_strategy": config.strategy, "strategies": rows})


def cmd_reward_lrm(args, stage: Stage):
    import dataclasses

    from lpo.io import write_json
    from lpo.reward.lrm_training import LRMTrainConfig, train_lrm
    from lpo.reward.mpcf import MPCFConfig, mpcf_counts, mpcf_keep
    from lpo.preference_data import load_pairs
    config = stage.section("lrm", LRMTrainConfig)
    if args.guidance_scale is not None:
        model = dataclasses.replace(config.model, guidance_scale=args.guidance_scale)
        config = dataclasses.replace(config, model=model)
    mpcf = stage.section("mpcf", MPCFConfig)
    if args.mpcf_strategy is not None:
        mpcf = dataclasses.replace(mpcf, strategy=args.mpcf_strategy)
    train = load_pairs(args.preferences, "train")
    table = _mpcf_table(args.preferences, "train", train.split_rows)
    keep = mpcf_keep({k: v[train.rows] for k, v in table.items()}, mpcf)["keep"]
    validation = load_pairs(args.preferences, "validation_unique")
    metrics = train_lrm(args.model, train.take(keep), validation, config, stage.seed_for("lrm"), args.out)
    metrics |= {"mpcf": mpcf_counts({k: v[train.rows] for k, v in table.items()}, mpcf),
                "guidance_scale": config.model.guidance_scale}
    write_json(args.metrics, metrics)


def cmd_reward_pixel(args, stage: Stage):
    """The world's "PickScore", trained like it on every train pair (no MPCF), its text tower started from the
    base model's text encoder as PickScore starts from a pretrained CLIP."""
    from lpo.io import write_json
    from lpo.reward.pixel import PixelRewardConfig, train_pixel_reward
    from lpo.preference_data import load_pairs
    from lpo.world.pipeline import load_pipeline
    pipe = load_pipeline(args.model)
    model, metrics = train_pixel_reward(load_pairs(args.preferences, "train"),
                                        load_pairs(args.preferences, "validation_unique"), pipe.tokenizer,
                                        stage.section("pixel_reward", PixelRewardConfig),
                                        stage.seed_for("pixel_reward"), text_encoder=pipe.text_encoder)
    model.save(args.out)
    write_json(args.metrics, metrics)


def cmd_reward_spm(args, stage: Stage):
    """SPO's step-aware preference model, fine-tuned from the pixel reward model on every train pair."""
    from lpo.io import write_json
    from lpo.reward.pixel import PixelReward
    from lpo.preference_data import load_pairs
    from lpo.reward.spm import SPMConfig, train_spm
    from lpo.world.pipeline import load_pipeline
    spm, metrics = train_spm(PixelReward.load(args.pixel), load_pipeline(args.model),
                             load_pairs(args.preferences, "train"), load_pairs(args.preferences, "validation_unique"),
                             stage.section("spm", SPMConfig), stage.seed_for("spm"))
    spm.save(args.out)
    write_json(args.metrics, metrics)


def cmd_reward_study(args, stage: Stage):
    """Reward accuracy against noise for the LRM, the pixel model on x0_hat and the SPM, the LRM ablations,
    and reports/<world>/reward.md."""
    import torch

    from lpo.io import read_json
    from lpo.reward.lrm import LatentRewardModel
    from lpo.reward.lrm_training import LatentEncoder, LRMTrainConfig, timestep_grid
    from lpo.reward.mpcf import GAP_COLUMNS, MPCFConfig
    from lpo.reward.pixel import PixelReward
    from lpo.preference_data import MPCF_SCORES, judge_gap, load_pairs, load_side_table
    from lpo.reward.report import lrm_ablation_rows, training_summary, write_reward_report
    from lpo.reward.study import RewardStudyConfig, SplitData, plot_accuracy, run_study
    from lpo.reward.spm import SPM, CleanImagePredictor, SPMConfig
    from lpo.world.pipeline import load_pipeline

    config = stage.section("reward_study", RewardStudyConfig)
    spm_config = stage.section("spm", SPMConfig)
    pipe = load_pipeline(args.model)
    encoder = LatentEncoder(args.model, pipe.device)
    grid = timestep_grid(encoder.noise.config, stage.section("lrm", LRMTrainConfig).inference_steps).tolist()
    splits = {}
    for split in ("validation_unique", "test_unique"):
        pairs = load_pairs(args.preferences, split)
        side = load_side_table(args.preferences, MPCF_SCORES, split, pairs.split_rows, GAP_COLUMNS)
        splits[split] = SplitData(pairs, judge_gap(args.preferences, pairs),
                                  {name: side[f"{name}_gap"][pairs.rows]
                                   for name in ("aesthetic", "clipscore", "vqascore")})

    predictor = CleanImagePredictor(pipe, spm_config.guidance_scale)
    pixel = PixelReward.load(args.pixel).eval()
    spm = SPM.load(args.spm, pipe)
    lrms = {"LRM": args.lrm} | {f"LRM ablation {v}": path for v, path in (a.split("=", 1) for a in args.ablations)}
    scorers = {}
    for name, path in lrms.items():
        lrm = LatentRewardModel.load(path, tokenizer_dir=args.model).eval()
        scorers[name] = lambda lat, t, caps, lrm=lrm: lrm.score(lat, t, caps)
    scorers["pixel (x0_hat)"] = lambda lat, t, caps: pixel(predictor.from_latents(lat, t, caps), caps)
    scorers["SPM"] = lambda lat, t, caps: spm.score_latents(lat, t, caps)
    with torch.no_grad():
        rows, table18 = run_study(scorers, encoder, splits, grid, config, stage.seed_for("reward_study"))
    plot_accuracy([r for r in rows if not r["model"].startswith("LRM ablation")],
                  Path(args.out) / "reward_accuracy.png")

    mpcf, main = stage.section("mpcf", MPCFConfig), stage.section("lrm", LRMTrainConfig).model
    metrics = {name: read_json(str(path) + "_metrics.json") for name, path in lrms.items()}
    ablations = lrm_ablation_rows(table18, metrics, mpcf.strategy, main.guidance_scale)
    trainings = training_summary(metrics, read_json(str(args.pixel) + "_metrics.json"),
                                 read_json(str(args.spm) + "_metrics.json"))
    write_reward_report(Path(args.out), stage.world().name, read_json(args.mpcf), table18, rows, ablations,
                        trainings)


def cmd_reward_scaling(args, stage: Stage):
    """Pixel-model accuracy against the number of train pairs, on noisy and on noiseless labels:
    reports/<world>/reward_scaling.md (is the world's reward data-bound?)."""
    from lpo.io import read_json
    from lpo.reward.pixel import PixelRewardConfig, train_pixel_reward
    from lpo.preference_data import judge_gap, load_pairs
    from lpo.reward.scaling import RewardScalingConfig, plot_scaling, scaling_rows, write_scaling_report
    from lpo.reward.study import SplitData
    from lpo.world.pipeline import load_pipeline
    from lpo.world.preferences import PreferencesConfig

    pipe = load_pipeline(args.model)
    train, test = load_pairs(args.preferences, "train"), load_pairs(args.preferences, "test_unique")
    validation = load_pairs(args.preferences, "validation_unique")
    pixel_config, seed = stage.section("pixel_reward", PixelRewardConfig), stage.seed_for("reward_scaling")
    config = stage.section("reward_scaling", RewardScalingConfig)
    rows = scaling_rows(train, judge_gap(args.preferences, train),
                        SplitData(test, judge_gap(args.preferences, test), side_gaps={}),
                        lambda pairs: train_pixel_reward(pairs, validation, pipe.tokenizer, pixel_config, seed,
                                                         text_encoder=pipe.text_encoder),
                        config, stage.section("preferences", PreferencesConfig).tie_band, seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_scaling(rows, out / "reward_scaling.png")
    stats = read_json(Path(args.preferences) / "stats.json")
    write_scaling_report(out, stage.world().name, rows, stats["test_unique"]["label_agreement"])


def stage_costs(paths: list[str]) -> list[dict]:
    """Wall-clock seconds and peak memory of each stage, from Snakemake's benchmark files."""
    import csv
    rows = []
    for path in sorted(p for p in paths or [] if Path(p).exists()):
        with open(path, newline="") as f:
            for record in csv.DictReader(f, delimiter="\t"):
                rows.append({"stage": Path(path).stem, "seconds": round(float(record["s"]), 1),
                             "max_rss_mb": record.get("max_rss", "")})
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lpo", description=__doc__)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    stages = parser.add_subparsers(dest="group", required=True)

    def add(sub, name, func, help, *io):
        p = sub.add_parser(name, help=help)
        p.add_argument("--params", default="{}", help="JSON object of config sections, or @config.yaml")
        for flag in io:
            p.add_argument(f"--{flag}", required=True)
        p.set_defaults(func=func)
        return p

    world = stages.add_parser("world", help="stages that build the embedded Shapes world").add_subparsers(
        dest="stage", required=True)
    add(world, "prompts", cmd_prompts, "split the grammar into prompt sets", "out")
    add(world, "corpus", cmd_corpus, "render the imperfect base-model corpus", "out")
    add(world, "tokenizer", cmd_tokenizer, "rebuild the CLIP tokenizer from open_clip's BPE file", "out")
    add(world, "judge", cmd_judge, "train the judge (the hidden human)", "out", "metrics")
    add(world, "vae", cmd_vae, "train the tiny AutoencoderKL", "corpus", "out", "metrics")
    add(world, "base-model", cmd_base_model, "train the text encoder + UNet, save the pipeline",
        "corpus", "vae", "tokenizer", "out", "metrics")
    add(world, "side-scorers", cmd_side_scorers, "train MPCF's aesthetic / CLIP-like / VQA-like scorers",
        "corpus", "out", "metrics")
    add(world, "preferences", cmd_preferences, "sample, judge and label the Pick-a-Pic-layout dataset",
        "model", "judge", "side-scorers", "prompts", "out")
    report = add(world, "report", cmd_report, "write reports/<world>/world.md, world.csv and the sample grid",
                 "samples", "judge", "vae-metrics", "judge-metrics", "preferences", "out")
    report.add_argument("--benchmarks", nargs="*", default=[])

    reward = stages.add_parser("reward", help="reward models: MPCF, the LRM, the pixel reward model, the SPM")
    reward = reward.add_subparsers(dest="stage", required=True)
    add(reward, "mpcf", cmd_reward_mpcf, "count the pairs each MPCF strategy keeps", "preferences", "out")
    p = add(reward, "lrm", cmd_reward_lrm, "train the latent reward model on MPCF-filtered pairs",
            "model", "preferences", "out", "metrics")
    p.add_argument("--mpcf-strategy", type=int, default=None, help="override mpcf.strategy (ablations)")
    p.add_argument("--guidance-scale", type=float, default=None, help="override lrm.model.guidance_scale (VFE)")

    add(reward, "pixel", cmd_reward_pixel, "train the pixel reward model (the world's PickScore)",
        "model", "preferences", "out", "metrics")
    add(reward, "spm", cmd_reward_spm, "train SPO's step-aware preference model from the pixel model",
        "model", "pixel", "preferences", "out", "metrics")

    p = add(reward, "study", cmd_reward_study, "reward accuracy against noise, ablations, reports/<world>/reward.md",
            "model", "preferences", "mpcf", "lrm", "pixel", "spm", "out")
    p.add_argument("--ablations", nargs="*", default=[], help="LRM variants as name=directory")
    add(reward, "scaling", cmd_reward_scaling,
        "pixel-model accuracy against train pairs, noisy and noiseless labels: reports/<world>/reward_scaling.md",
        "model", "preferences", "out")

    p = add(stages, "sample", cmd_sample, "generate images for prompt sets with fixed seeds",
            "model", "prompts", "out")
    p.add_argument("--sets", default="eval_seen,eval_heldout")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=7.5)

    register_optimize(stages, add)
    register_timing(stages, add)
    register_sd(stages, add)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
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
