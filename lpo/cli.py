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
    from lpo.world.base_model import BaseModelConfig, VAEConfig, check_image_size, train_vae
    from lpo.world.corpus import Corpus
    world, config = stage.world(), stage.section("vae", VAEConfig)
    check_image_size(world.image_size, config, stage.section("base_model", BaseModelConfig).unet)
    metrics = train_vae(Corpus.load(args.corpus).images, world.image_size, config, stage.seed_for("vae"), args.out)
    write_json(args.metrics, metrics)


def cmd_base_model(args, stage: Stage):
    from lpo.io import write_json
    from lpo.world.base_model import BaseModelConfig, train_base_model
    from lpo.world.corpus import Corpus
    corpus = Corpus.load(args.corpus)
    metrics = train_base_model(corpus.images, corpus.captions, args.vae, args.tokenizer,
                               stage.section("base_model", BaseModelConfig), stage.seed_for("base_model"), args.out)
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
    SampleSet(images, np.array(prompts), np.array(sets), np.array(index), np.array(seeds)).save(args.out)


def cmd_report(args, stage: Stage):
    from lpo.io import read_json
    from lpo.samples import SampleSet
    from lpo.world.judge import judge_images, load_judge
    from lpo.world.report import ReportConfig, base_model_rows, sample_grid, write_world_report
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

    p = add(stages, "sample", cmd_sample, "generate images for prompt sets with fixed seeds",
            "model", "prompts", "out")
    p.add_argument("--sets", default="eval_seen,eval_heldout")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=7.5)
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
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"lpo: error: {e}", file=sys.stderr)
        return 2
    name = " ".join(filter(None, [args.group, getattr(args, "stage", None)]))
    print(json.dumps({"stage": name, "seconds": round(time.perf_counter() - start, 2)}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
