"""`lpo world ...` and `lpo sample`: the stages that build the embedded Shapes world and sample a pipeline
(workflow/rules/world.smk)."""
from __future__ import annotations

from pathlib import Path

from lpo.stage import add_stage as add
from lpo.stage import non_negative_float, positive_int, stage_costs, writes_outputs
from lpo.world.settings import stage_grammar, stage_world

PROMPTS_FIX = "run the `world prompts` stage (`snakemake ... --forcerun world_prompts`)"


def cmd_prompts(args, stage):
    from lpo.io import write_json
    from lpo.world.settings import PromptsConfig, make_prompt_sets
    sets = make_prompt_sets(stage_grammar(stage), stage.section("prompts", PromptsConfig), stage.seed_for("prompts"))
    write_json(args.out, sets | {"heldout_pairs": sorted(" ".join(p) for p in stage_grammar(stage).heldout_pairs)})


def cmd_corpus(args, stage):
    from lpo.world.corpus import CorpusConfig, build_corpus
    world = stage_world(stage)
    corpus = build_corpus(stage_grammar(stage), stage.section("corpus", CorpusConfig), world.image_size,
                          stage.seed_for("corpus"))
    corpus.save(args.out)


def cmd_tokenizer(args, stage):
    from lpo.world.tokenizer import build_clip_tokenizer
    build_clip_tokenizer(args.out)


def cmd_judge(args, stage):
    from lpo.io import write_json
    from lpo.world.judge import JudgeConfig, evaluate_judge, save_judge, train_judge
    config, world = stage.section("judge", JudgeConfig), stage_world(stage)
    judge, metrics = train_judge(stage_grammar(stage), world.image_size, config, stage.seed_for("judge"))
    metrics |= evaluate_judge(judge, stage_grammar(stage), world.image_size, stage.seed_for("judge-eval"),
                              config=config)
    save_judge(judge, config, args.out)
    write_json(args.metrics, metrics)


def cmd_judge_agreement(args, stage):
    """Judges trained as the world's is, on other seeds, scoring the preference pairs:
    reports/<world>/judge_agreement.md (how far the labels are a property of the images)."""
    from lpo.preference_data import load_pairs, same_source
    from lpo.world.judge import load_judge, train_judge
    from lpo.world.judge_agreement import JudgeAgreementConfig, agreement_study, write_agreement_report
    config, world, grammar = stage.section("judge_agreement", JudgeAgreementConfig), stage_world(stage), \
        stage_grammar(stage)
    judge, judge_config = load_judge(args.judge)
    others = {f"judge {k + 1} (another seed)":
              train_judge(grammar, world.image_size, judge_config, stage.seed_for(f"judge-agreement-{k}"))[0]
              for k in range(config.judges)}
    splits = {split: load_pairs(args.preferences, split) for split in config.splits}
    rows, attributes = agreement_study(judge, others, judge_config, splits,
                                       {split: same_source(args.preferences, p) for split, p in splits.items()},
                                       grammar, config.bootstrap, stage.seed_for("judge-agreement-bootstrap"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_agreement_report(out, world.name, rows, attributes, config)


def cmd_vae(args, stage):
    from lpo.io import write_json
    from lpo.world.base_model import VAEConfig, check_image_size, train_vae
    from lpo.world.corpus import Corpus
    world, config = stage_world(stage), stage.section("vae", VAEConfig)
    check_image_size(world.image_size, config)
    metrics = train_vae(Corpus.load(args.corpus).images, world.image_size, config, stage.seed_for("vae"), args.out)
    write_json(args.metrics, metrics)


def cmd_base_model(args, stage):
    from lpo.io import write_json
    from lpo.world.base_model import BaseModelConfig, train_base_model
    from lpo.world.corpus import Corpus
    corpus = Corpus.load(args.corpus)
    metrics = train_base_model(corpus.images, corpus.captions, args.vae, args.tokenizer,
                               stage.section("base_model", BaseModelConfig), stage.seed_for("base_model"), args.out,
                               args.snapshots)
    if writes_outputs():
        write_json(args.metrics, metrics)


def cmd_clip(args, stage):
    from lpo.io import write_json
    from lpo.world.clip import WorldCLIPConfig, train_world_clip
    from lpo.world.corpus import Corpus
    corpus = Corpus.load(args.corpus)
    _, metrics = train_world_clip(corpus.images, corpus.captions, args.tokenizer,
                                  stage.section("world_clip", WorldCLIPConfig), stage.seed_for("world_clip"), args.out)
    write_json(args.metrics, metrics)


def cmd_side_scorers(args, stage):
    from lpo.io import write_json
    from lpo.world.corpus import Corpus
    from lpo.world.side_scorers import SideScorerConfig, train_side_scorers
    scorers, metrics = train_side_scorers(Corpus.load(args.corpus), stage_grammar(stage),
                                          stage.section("side_scorers", SideScorerConfig),
                                          stage.seed_for("side_scorers"))
    scorers.save(args.out)
    write_json(args.metrics, metrics)


def cmd_preferences(args, stage):
    import datasets

    from lpo.io import atomic_path, read_json, write_json
    from lpo.tables import write_csv
    from lpo.world.judge import judge_images, load_judge
    from lpo.world.pipeline import sample
    from lpo.world.preferences import PreferencesConfig, build_preference_data, source_pipeline
    from lpo.world.side_scorers import SideScorers

    config = stage.section("preferences", PreferencesConfig)
    grammar = stage_grammar(stage)
    pipes = {source.checkpoint: source_pipeline(source, args.model, args.snapshots) for source in config.sources}
    judge, judge_config = load_judge(args.judge)
    scorers = SideScorers.load(args.side_scorers)
    prompt_sets = read_json(args.prompts, "the prompt file", PROMPTS_FIX)

    def sample_source(index, prompts, seeds):
        source = config.sources[index]
        return sample(pipes[source.checkpoint], prompts, seeds, steps=config.sampling_steps,
                      guidance_scale=source.guidance_scale, batch_size=config.batch_size)

    records, judged, side, stats = build_preference_data(
        prompt_sets, sample=sample_source,
        judge=lambda images, prompts: judge_images(judge, images, [grammar.parse(p) for p in prompts], judge_config),
        side_scores=scorers.score, config=config, seed=stage.seed_for("preferences"))
    if not writes_outputs():
        return
    with atomic_path(args.out) as tmp:
        datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in records.items()}).save_to_disk(
            str(tmp / "dataset"))
        write_csv(tmp / "mpcf_scores.csv", side)
        write_csv(tmp / "judge_scores.csv", judged)
        write_json(tmp / "stats.json", stats)


def cmd_sample(args, stage):
    import numpy as np

    from lpo.io import read_json
    from lpo.samples import SampleSet, expand_prompt_sets
    from lpo.world.pipeline import load_pipeline, sample
    prompt_sets = read_json(args.prompts, "the prompt file", PROMPTS_FIX)
    prompts, sets, index, seeds = expand_prompt_sets(prompt_sets, args.sets.split(","), args.images_per_prompt,
                                                     stage.seed_for("sample"))
    blank = list(dict.fromkeys(f"{name}[{i}]" for prompt, name, i in zip(prompts, sets, index)
                               if not (isinstance(prompt, str) and prompt.strip())))
    if blank:
        raise ValueError(f"--prompts {args.prompts}: blank or non-text prompt(s) {', '.join(blank)}: give every "
                         f"prompt some text (or regenerate the file with `lpo world prompts`)")
    images = sample(load_pipeline(args.model), prompts, seeds, steps=args.steps, guidance_scale=args.guidance_scale)
    if writes_outputs():
        SampleSet(images, np.array(prompts), np.array(sets), np.array(index), np.array(seeds)).save(args.out)


def cmd_report(args, stage):
    from lpo.io import read_json
    from lpo.samples import SampleSet
    from lpo.world.judge import judge_images, load_judge
    from lpo.world.report import ReportConfig, base_model_rows, sample_grid, write_world_report
    grammar, world = stage_grammar(stage), stage_world(stage)
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


def register(stages) -> None:
    """Add `world` and `sample` to the top-level sub-parsers `stages`."""
    world = stages.add_parser("world", help="stages that build the embedded Shapes world").add_subparsers(
        dest="stage", required=True)
    add(world, "prompts", cmd_prompts, "split the grammar into prompt sets", "out")
    add(world, "corpus", cmd_corpus, "render the imperfect base-model corpus", "out")
    add(world, "tokenizer", cmd_tokenizer, "rebuild the CLIP tokenizer from open_clip's BPE file", "out")
    add(world, "judge", cmd_judge, "train the judge (the hidden human)", "out", "metrics")
    add(world, "judge-agreement", cmd_judge_agreement, "judges trained as the world's on other seeds, scoring the "
        "preference pairs: how far the labels are a property of the images", "judge", "preferences", "out")
    add(world, "vae", cmd_vae, "train the tiny AutoencoderKL", "corpus", "out", "metrics")
    add(world, "base-model", cmd_base_model, "train the text encoder + UNet, save the pipeline and its snapshots",
        "corpus", "vae", "tokenizer", "out", "snapshots", "metrics")
    add(world, "clip", cmd_clip, "pretrain the world-CLIP on the captioned corpus", "corpus", "tokenizer", "out",
        "metrics")
    add(world, "side-scorers", cmd_side_scorers, "train MPCF's aesthetic / CLIP-like / VQA-like scorers",
        "corpus", "out", "metrics")
    add(world, "preferences", cmd_preferences, "sample, judge and label the Pick-a-Pic-layout dataset",
        "model", "snapshots", "judge", "side-scorers", "prompts", "out")
    report = add(world, "report", cmd_report, "write reports/<world>/world.md, world.csv and the sample grid",
                 "samples", "judge", "vae-metrics", "judge-metrics", "preferences", "out")
    report.add_argument("--benchmarks", nargs="*", default=[])

    p = add(stages, "sample", cmd_sample, "generate images for prompt sets with fixed seeds",
            "model", "prompts", "out")
    p.add_argument("--sets", default="eval_seen,eval_heldout")
    p.add_argument("--images-per-prompt", type=positive_int, default=4)
    p.add_argument("--steps", type=positive_int, default=20, help="DDIM steps")
    p.add_argument("--guidance-scale", type=non_negative_float, default=7.5, help="CFG scale; <= 1 turns CFG off")
