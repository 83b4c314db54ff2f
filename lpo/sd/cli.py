"""The `lpo sd ...` sub-commands: the paper's Stable Diffusion worlds (sd15, sd21, sdxl) on Pick-a-Pic v1.

Each command reads `sd_world` (lpo.sd.config.SDWorldConfig: models, data and scorers as hub references or local
paths) and, where it samples or reports, `sd_pipeline` (lpo.sd.config.SDPipelineConfig). Hub references resolve in
the local Hugging Face cache only. Training reuses the Shapes world's trainers (lpo.optimize.methods) on the linked base
pipeline; scoring runs in the scorers' own environment (`python -m lpo.evaluate.scorers score`)."""
from __future__ import annotations

from pathlib import Path

from lpo.stage import add_stage as add
from lpo.stage import named

# Sample runs: a method trained here, or an official checkpoint ("official_<method>"), or the base model.
ORIGINAL, OFFICIAL = "original", "official_"


def _world(stage):
    from lpo.sd.config import sd_world_config
    return sd_world_config(stage.params.get("sd_world"))


def _pipeline_config(stage):
    from lpo.sd.config import SDPipelineConfig
    return stage.section("sd_pipeline", SDPipelineConfig)


def run_method(run: str) -> str:
    """The method (its CFG scale and paper name) of a sample run."""
    return run.removeprefix(OFFICIAL)


def cmd_link(args, stage):
    """The base pipeline, or the base with an official UNet, as a folder of links (nothing copied)."""
    from lpo.sd.pipelines import link_pipeline
    link_pipeline(_world(stage), args.out, args.method)


def cmd_prompts(args, stage):
    """{"train": the LPO training prompts, "validation_unique": the evaluation prompts}."""
    from lpo.io import write_json
    from lpo.sd.pickapic import prompt_sets
    write_json(args.out, prompt_sets(_world(stage), stage.seed_for("sd_prompts")))


def cmd_preferences(args, stage):
    """Pick-a-Pic as a preference directory (lpo.preference_data), with the MPCF scores when configured."""
    from lpo.sd.pickapic import write_preferences
    from lpo.sd.hub import resolve
    world = _world(stage)
    scores = None if world.mpcf_scores is None else resolve(world.mpcf_scores, "sd_world.mpcf_scores",
                                                            "MPCF score file")
    write_preferences(world.dataset, args.out, scores)


def cmd_reward_lrm(args, stage):
    """The LRM trained on MPCF-kept train pairs, images at the world's resolution (lpo.reward.lrm_training): LRM-1.5's
    text projection from the configured CLIP ViT-L/14; on an SDXL base model, LRM-XL with both text encoders."""
    import dataclasses

    from lpo.reward.mpcf import mpcf_table
    from lpo.io import write_json
    from lpo.reward.lrm_training import LRMTrainConfig, train_lrm
    from lpo.reward.mpcf import MPCFConfig, mpcf_counts, mpcf_keep
    from lpo.preference_data import load_pairs
    from lpo.sd.hub import resolve
    world = _world(stage)
    config = stage.section("lrm", LRMTrainConfig)
    if world.clip_text_projection is not None:
        clip = resolve(world.clip_text_projection, "sd_world.clip_text_projection", "CLIP ViT-L/14")
        config = dataclasses.replace(config, clip_text_projection=str(clip))
    mpcf = stage.section("mpcf", MPCFConfig)
    train = load_pairs(args.preferences, "train", image_size=world.resolution)
    table = {k: v[train.rows] for k, v in mpcf_table(args.preferences, "train", train.split_rows).items()}
    validation = load_pairs(args.preferences, "validation_unique", image_size=world.resolution)
    metrics = train_lrm(args.model, train.take(mpcf_keep(table, mpcf)["keep"]), validation, config,
                        stage.seed_for("lrm"), args.out)
    write_json(args.metrics, metrics | {"mpcf": mpcf_counts(table, mpcf)})


def cmd_reward_table18(args, stage):
    """The LRMs' pair accuracy on validation_unique + test_unique at each of sd_pipeline.reward_timesteps, as
    Table 18 rows (lpo.sd.report.table18). Pick-a-Pic's MPCF scores cover the train split only, so the
    correlation columns stay empty."""
    import numpy as np

    from lpo.io import write_json
    from lpo.reward.lrm import LatentRewardModel
    from lpo.reward.lrm_training import LatentEncoder, evaluate_pairs
    from lpo.preference_data import load_pairs
    from lpo.sd.report import reward_model_row

    world, config = _world(stage), _pipeline_config(stage)
    pairs = [load_pairs(args.preferences, s, image_size=world.resolution) for s in ("validation_unique",
                                                                                     "test_unique")]
    encoder = LatentEncoder(args.model, "cuda" if _cuda() else "cpu")
    family = "LRM-XL" if world.xl else "LRM-1.5"
    rows = []
    for name, path in named(args.lrm, "--lrm").items():
        lrm = LatentRewardModel.load(path, tokenizer_dir=args.model).to(encoder.device).eval()
        for t in config.reward_timesteps:
            scores = [evaluate_pairs(lrm, encoder, p, t, stage.seed_for("table18")) for p in pairs]
            s0, s1 = (np.concatenate([s[i] for s in scores]) for i in (0, 1))
            label = np.concatenate([p.label_0 for p in pairs])
            rows.append(reward_model_row(f"{family} {name} (t = {t})", f"{family} (t = {t})", s0, s1, label,
                                         config.bootstrap, stage.seed_for("table18"), source=f"ours ({name})"))
    write_json(args.out, rows)


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def cmd_sample(args, stage):
    """The evaluation prompts (validation_unique) sampled with DDIM at the method's CFG scale, image j of every
    prompt from seed + j (j = 0 is the official script's seed-42 image), into a sample folder."""
    import numpy as np
    import torch

    from lpo.io import atomic_path, read_json
    from lpo.sd.pickapic import EVAL_SPLIT
    from lpo.evaluate.scorers.sample_folder import save_image, write_index
    from lpo.pipelines import load_pipeline_dir

    world, config = _world(stage), _pipeline_config(stage)
    prompts = read_json(args.prompts, "the prompt file", "run the sd_prompts rule")[EVAL_SPLIT]
    device = "cuda" if _cuda() else "cpu"
    dtype = {"auto": torch.float16 if device == "cuda" else torch.float32, "float32": torch.float32,
             "float16": torch.float16, "bfloat16": torch.bfloat16}[config.dtype]
    pipe = load_pipeline_dir(args.model, dtype).to(device)
    cfg = world.guidance_scale(run_method(args.run))
    jobs = [{"prompt": p, "prompt_index": i, "image_index": j, "seed": config.seed + j}
            for i, p in enumerate(prompts) for j in range(config.images_per_prompt)]
    per_call = config.batch_size * config.images_per_prompt
    with atomic_path(args.out) as tmp:
        tmp.mkdir()
        for start in range(0, len(jobs), per_call):
            batch = jobs[start:start + per_call]
            # One CPU generator per image: its noise depends on its seed only, on any device and batching.
            generators = [torch.Generator("cpu").manual_seed(j["seed"]) for j in batch]
            images = pipe([j["prompt"] for j in batch], height=world.resolution, width=world.resolution,
                          num_inference_steps=config.steps, guidance_scale=cfg, generator=generators,
                          output_type="np").images
            for k, image in enumerate(images):
                save_image(tmp, start + k, (np.clip(image, 0, 1) * 255).round().astype(np.uint8))
        write_index(tmp, jobs)


def evaluation(run: str, preset: str, scores_csv: str):
    """Our Table 2 row of one sample run from its scores CSV (`python -m lpo.evaluate.scorers score`)."""
    import numpy as np

    from lpo.evaluate.scorers import Scores
    from lpo.sd.report import TABLE2_METRICS, SDEvaluation, paper_names
    from lpo.tables import read_csv

    rows = read_csv(scores_csv)
    if not rows:
        raise ValueError(f"'{scores_csv}' holds no scores")
    skipped = tuple(i for i, r in enumerate(rows) if r.get("decoded") == "0")
    scores = {m.scorer: Scores(np.array([float(r[m.scorer]) if r[m.scorer] != "" else np.nan for r in rows]),
                               skipped) for m in TABLE2_METRICS if m.scorer in rows[0]}
    model, method = paper_names(preset, run_method(run))
    source = ("ours" if run == ORIGINAL else "ours (official checkpoint)" if run.startswith(OFFICIAL)
              else "ours (trained here)")
    return SDEvaluation(model, method, scores, np.array([int(r["prompt_index"]) for r in rows]), source)


def cmd_report(args, stage):
    """reports/<world>/table2.{md,csv,tex} (+ table18.*), the Table 2 plot and one sample grid per run."""
    from lpo.io import read_json
    from lpo.sd.report import plot_table2, sample_folder_grid, write_sd_report

    world, config = _world(stage), _pipeline_config(stage)
    name = (stage.params.get("world") or {}).get("name", world.preset)
    scores = named(args.scores, "--scores")
    evaluations = [evaluation(run, world.preset, path) for run, path in scores.items()]
    reward_models = read_json(args.table18) if args.table18 else []
    out = Path(args.out)
    setup = [f"Prompts: the {world.eval_prompt_count} unique captions of Pick-a-Pic v1 validation_unique "
             f"({world.eval_dataset}); {config.images_per_prompt} image(s) per prompt, image j from seed "
             f"{config.seed} + j; DDIM {config.steps} steps (eta 0) at {world.resolution} px; CFG per method "
             + ", ".join(f"{m} {world.guidance_scale(m)}" for m in world.eval_guidance_scale) + " (the official "
             "evaluation script's scales); every image scored (the official script scores one per prompt).",
             ("SPO: the official UNet evaluated, not retrained (as the paper did); " if "official_spo" in scores
              else "") + "methods marked 'trained here' were trained by this pipeline "
             f"({', '.join(config.trained) or 'none'}; LPO's reward: the {config.lpo_lrm} LRM)."]
    write_sd_report(out, name, evaluations, reward_models, config.bootstrap, stage.seed_for("sd_report"),
                    setup=setup)
    plot_table2(out / "table2.png", evaluations, list(scores), config.bootstrap, stage.seed_for("sd_report"))
    for run, folder in named(args.samples, "--samples").items():
        sample_folder_grid(folder, out / f"samples_{run}.png", config.grid_prompts)


def register(stages) -> None:
    """Add `sd` to the top-level sub-parsers `stages`."""
    sd = stages.add_parser("sd", help="the paper's Stable Diffusion worlds on Pick-a-Pic v1").add_subparsers(
        dest="stage", required=True)
    p = add(sd, "link", cmd_link, "link the base pipeline (or it with an official UNet) into a folder", "out")
    p.add_argument("--method", default=ORIGINAL, help="original, or lpo / spo / diffusion_dpo (official UNet)")
    add(sd, "prompts", cmd_prompts, "the LPO training prompts and the evaluation prompts", "out")
    add(sd, "preferences", cmd_preferences, "Pick-a-Pic (+ MPCF scores) as a preference directory", "out")
    add(sd, "reward-lrm", cmd_reward_lrm, "train the LRM on Pick-a-Pic's MPCF-kept pairs",
        "model", "preferences", "out", "metrics")
    p = add(sd, "reward-table18", cmd_reward_table18, "LRM pair accuracy on validation + test (Table 18 rows)",
            "model", "preferences", "out")
    p.add_argument("--lrm", nargs="+", required=True, help="name=LRM folder (e.g. trained=..., released=...)")
    p = add(sd, "sample", cmd_sample, "sample the evaluation prompts into a sample folder", "model", "prompts", "out")
    p.add_argument("--run", required=True, help="original, lpo, diffusion_dpo or official_<method>: sets the CFG")
    p = add(sd, "report", cmd_report, "Table 2 (+ Table 18) beside the paper's numbers, plots, sample grids", "out")
    p.add_argument("--scores", nargs="+", required=True, help="run=scores.csv")
    p.add_argument("--samples", nargs="*", default=[], help="run=sample folder, for the grids")
    p.add_argument("--table18", default=None, help="Table 18 rows (lpo sd reward-table18)")
