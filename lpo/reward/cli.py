"""`lpo reward ...`: MPCF, the LRM, the pixel reward model, the SPM, the reward study and scaling
(workflow/rules/reward.smk)."""
from __future__ import annotations

from pathlib import Path

from lpo.reward.mpcf import mpcf_table
from lpo.stage import add_stage as add
from lpo.stage import positive_float
from lpo.world.settings import stage_world


def cmd_reward_mpcf(args, stage):
    """How many win-lose and tie pairs of the train split each MPCF strategy keeps (paper Table 1)."""
    import dataclasses

    from lpo.io import write_json
    from lpo.reward.mpcf import MPCFConfig, mpcf_counts
    from lpo.preference_data import load_split
    config = stage.section("mpcf", MPCFConfig)
    table = mpcf_table(args.preferences, "train", len(load_split(args.preferences, "train")))
    rows = [mpcf_counts(table, dataclasses.replace(config, strategy=s)) for s in (0, 1, 2, 3)]
    write_json(args.out, {"used_strategy": config.strategy, "strategies": rows})


def cmd_reward_lrm(args, stage):
    import dataclasses

    from lpo.io import write_json
    from lpo.reward.lrm_training import LRMTrainConfig, train_lrm
    from lpo.reward.mpcf import MPCFConfig, mpcf_counts, mpcf_keep
    from lpo.preference_data import load_pairs
    config = stage.section("lrm", LRMTrainConfig)
    if args.calibrated:
        from lpo.reward.lrm import CalibratedLRMConfig
        calibrated = stage.section("lrm_calibrated", CalibratedLRMConfig)
        config = dataclasses.replace(config, model=calibrated.over(config.model))
    if args.guidance_scale is not None:
        model = dataclasses.replace(config.model, guidance_scale=args.guidance_scale)
        config = dataclasses.replace(config, model=model)
    mpcf = stage.section("mpcf", MPCFConfig)
    if args.mpcf_strategy is not None:
        mpcf = dataclasses.replace(mpcf, strategy=args.mpcf_strategy)
    train = load_pairs(args.preferences, "train")
    table = mpcf_table(args.preferences, "train", train.split_rows)
    keep = mpcf_keep({k: v[train.rows] for k, v in table.items()}, mpcf)["keep"]
    validation = load_pairs(args.preferences, "validation_unique")
    metrics = train_lrm(args.model, train.take(keep), validation, config, stage.seed_for("lrm"), args.out)
    metrics |= {"mpcf": mpcf_counts({k: v[train.rows] for k, v in table.items()}, mpcf),
                "guidance_scale": config.model.guidance_scale}
    write_json(args.metrics, metrics)


def cmd_reward_pixel(args, stage):
    """The world's "PickScore": the world-CLIP fine-tuned on every train pair (no MPCF), as PickScore is CLIP-H
    fine-tuned on Pick-a-Pic."""
    from lpo.io import write_json
    from lpo.reward.pixel import PixelRewardConfig, train_pixel_reward
    from lpo.preference_data import load_pairs
    from lpo.world.clip import WorldCLIP
    _, metrics = train_pixel_reward(load_pairs(args.preferences, "train"),
                                    load_pairs(args.preferences, "validation_unique"), WorldCLIP.load(args.clip),
                                    stage.section("pixel_reward", PixelRewardConfig), stage.seed_for("pixel_reward"),
                                    out=args.out)
    write_json(args.metrics, metrics)


def cmd_reward_spm(args, stage):
    """SPO's step-aware preference model, fine-tuned from the pixel reward model on every train pair."""
    from lpo.io import write_json
    from lpo.reward.pixel import PixelReward
    from lpo.preference_data import load_pairs
    from lpo.reward.spm import SPMConfig, train_spm
    from lpo.world.pipeline import load_pipeline
    _, metrics = train_spm(PixelReward.load(args.pixel), load_pipeline(args.model),
                           load_pairs(args.preferences, "train"), load_pairs(args.preferences, "validation_unique"),
                           stage.section("spm", SPMConfig), stage.seed_for("spm"), out=args.out)
    write_json(args.metrics, metrics)


def cmd_reward_study(args, stage):
    """Reward accuracy against noise for the LRM, the pixel model on x0_hat and the SPM, the LRM ablations,
    and reports/<world>/reward.md."""
    import torch

    from lpo.io import read_json
    from lpo.reward.lrm import LatentRewardModel
    from lpo.reward.lrm_training import LatentEncoder, LRMTrainConfig, timestep_grid
    from lpo.reward.mpcf import GAP_COLUMNS, MPCFConfig
    from lpo.reward.pixel import PixelReward
    from lpo.preference_data import MPCF_SCORES, judge_gap, load_pairs, load_side_table, same_source
    from lpo.reward.pixel import pixel_pair_scores
    from lpo.reward.report import lrm_ablation_rows, training_summary, write_reward_report
    from lpo.reward.study import (CALIBRATED, RewardStudyConfig, SharedCleanImages, SplitData, plot_accuracy,
                                  run_study)
    from lpo.world.clip import WorldCLIP
    from lpo.reward.spm import SPM
    from lpo.world.pipeline import load_pipeline

    config = stage.section("reward_study", RewardStudyConfig)
    pipe = load_pipeline(args.model)
    encoder = LatentEncoder(args.model, pipe.device)
    grid = timestep_grid(encoder.noise.config, stage.section("lrm", LRMTrainConfig).inference_steps).tolist()
    splits = {}
    for split in ("validation_unique", "test_unique"):
        pairs = load_pairs(args.preferences, split)
        side = load_side_table(args.preferences, MPCF_SCORES, split, pairs.split_rows, GAP_COLUMNS)
        splits[split] = SplitData(pairs, judge_gap(args.preferences, pairs),
                                  {name: side[f"{name}_gap"][pairs.rows]
                                   for name in ("aesthetic", "clipscore", "vqascore")},
                                  same_source(args.preferences, pairs))

    pixel = PixelReward.load(args.pixel).eval()
    spm = SPM.load(args.spm, pipe)
    # The pixel model reads the x0_hat the SPM reads (the SPM's own guidance), decoded once per batch.
    x0_hat = SharedCleanImages(spm.predictor)
    lrms = {"LRM": args.lrm, CALIBRATED: args.calibrated_lrm} | {
        f"LRM ablation {v}": path for v, path in (a.split("=", 1) for a in args.ablations)}
    scorers, probabilities = {}, {}
    for name, path in lrms.items():
        lrm = LatentRewardModel.load(path, tokenizer_dir=args.model).eval()
        scorers[name] = lambda lat, t, caps, lrm=lrm: lrm.score(lat, t, caps)
        probabilities[name] = lambda s0, s1, t, lrm=lrm: lrm.pair_probability(
            torch.from_numpy(s0), torch.from_numpy(s1), torch.full((len(s0),), t)).numpy()
    scorers["pixel (x0_hat)"] = lambda lat, t, caps: pixel(x0_hat(lat, t, caps), caps)
    scorers["SPM"] = lambda lat, t, caps: spm.score_images(x0_hat(lat, t, caps), t, caps)
    clip = WorldCLIP.load(args.clip)
    clean = {"world-CLIP zero-shot (clean image)": lambda pairs: pixel_pair_scores(clip, pairs)}
    ablations = frozenset(name for name in lrms if name.startswith("LRM ablation"))
    with torch.no_grad():
        study = run_study(scorers, encoder, splits, grid, config, stage.seed_for("reward_study"), clean,
                          lowest_only=ablations, ensembled="LRM",
                          probabilities={name: probabilities[name] for name in ("LRM", CALIBRATED)},
                          compared=((CALIBRATED, "LRM"),))
    plot_accuracy([r for r in study.rows if r["model"] not in ablations], Path(args.out) / "reward_accuracy.png")

    mpcf, main = stage.section("mpcf", MPCFConfig), stage.section("lrm", LRMTrainConfig).model
    metrics = {name: read_json(str(path) + "_metrics.json") for name, path in lrms.items()}
    ablation_rows = lrm_ablation_rows(study.table18, {n: m for n, m in metrics.items() if n != CALIBRATED},
                                      mpcf.strategy, main.guidance_scale)
    trainings = training_summary(metrics, read_json(str(args.pixel) + "_metrics.json"),
                                 read_json(str(args.spm) + "_metrics.json"))
    write_reward_report(Path(args.out), stage_world(stage).name, read_json(args.mpcf), study, ablation_rows,
                        trainings)


def cmd_reward_scaling(args, stage):
    """Pixel-model accuracy against the number of train pairs, on noisy and on noiseless labels:
    reports/<world>/reward_scaling.md (is the world's reward data-bound?)."""
    from lpo.io import read_json
    from lpo.reward.pixel import PixelRewardConfig, train_pixel_reward
    from lpo.preference_data import judge_gap, load_pairs
    from lpo.reward.scaling import RewardScalingConfig, plot_scaling, scaling_rows, write_scaling_report
    from lpo.reward.study import SplitData
    from lpo.world.clip import WorldCLIP
    from lpo.world.preferences import PreferencesConfig

    clip = WorldCLIP.load(args.clip)
    train, test = load_pairs(args.preferences, "train"), load_pairs(args.preferences, "test_unique")
    validation = load_pairs(args.preferences, "validation_unique")
    pixel_config, seed = stage.section("pixel_reward", PixelRewardConfig), stage.seed_for("reward_scaling")
    config = stage.section("reward_scaling", RewardScalingConfig)
    rows = scaling_rows(train, judge_gap(args.preferences, train),
                        SplitData(test, judge_gap(args.preferences, test), side_gaps={}),
                        lambda pairs: train_pixel_reward(pairs, validation, clip, pixel_config, seed),
                        config, stage.section("preferences", PreferencesConfig).tie_band, seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_scaling(rows, out / "reward_scaling.png")
    stats = read_json(Path(args.preferences) / "stats.json")
    write_scaling_report(out, stage_world(stage).name, rows, stats["test_unique"]["label_agreement"])


def cmd_reward_probes(args, stage):
    """Linear probes of frozen features (the LRM's, the base UNet's, the world-CLIP's) predicting what the judge
    sees: reports/<world>/probes.md (does a reward model fail for want of information or of training?)."""
    from lpo.reward.lrm import LatentRewardModel
    from lpo.reward.lrm_training import LatentEncoder
    from lpo.reward.probes import (FIT_SPLITS, SCORED_SPLITS, ProbeConfig, clip_feature_set, describe_device,
                                   diffusion_feature_sets, plot_probes, probe_images, run_probes, write_probe_report)
    from lpo.world.clip import WorldCLIP
    from lpo.world.judge import load_judge
    from lpo.world.pipeline import load_pipeline
    from lpo.world.settings import stage_grammar

    config, seed = stage.section("probes", ProbeConfig), stage.seed_for("probes")
    # Every input is read before any feature is computed, so a missing one fails in seconds.
    judge, _ = load_judge(args.judge)
    fit = probe_images(args.preferences, FIT_SPLITS, judge.image_size, config.max_images, seed)
    scored = probe_images(args.preferences, SCORED_SPLITS, judge.image_size, config.max_images, seed)
    pipe = load_pipeline(args.model)
    lrm = LatentRewardModel.load(args.lrm, tokenizer_dir=args.model)
    clip = WorldCLIP.load(args.clip) if args.clip else None
    encoder = LatentEncoder(args.model, pipe.device)
    sets = diffusion_feature_sets(encoder, lrm, pipe.unet, pipe.text_encoder, pipe.tokenizer, config, seed)
    if clip is not None:
        sets.append(clip_feature_set(clip, config.batch_size))
    rows = run_probes(sets, judge, stage_grammar(stage), fit, scored, config, seed)
    out = Path(args.out)
    plot_probes(rows, out / "probes.png")
    write_probe_report(out, stage_world(stage).name, rows, describe_device(pipe.device))


def register(stages) -> None:
    """Add `reward` to the top-level sub-parsers `stages`."""
    reward = stages.add_parser("reward", help="reward models: MPCF, the LRM, the pixel reward model, the SPM")
    reward = reward.add_subparsers(dest="stage", required=True)
    add(reward, "mpcf", cmd_reward_mpcf, "count the pairs each MPCF strategy keeps", "preferences", "out")
    p = add(reward, "lrm", cmd_reward_lrm, "train the latent reward model on MPCF-filtered pairs",
            "model", "preferences", "out", "metrics")
    p.add_argument("--mpcf-strategy", type=int, choices=range(4), default=None,
                   help="override mpcf.strategy (ablations)")
    p.add_argument("--guidance-scale", type=positive_float, default=None,
                   help="override lrm.model.guidance_scale (VFE), > 0")
    p.add_argument("--calibrated", action="store_true",
                   help="the noise-calibrated LRM: the lrm_calibrated section's settings over lrm.model")

    add(reward, "pixel", cmd_reward_pixel, "fine-tune the world-CLIP into the pixel reward model (the world's "
        "PickScore)", "clip", "preferences", "out", "metrics")
    add(reward, "spm", cmd_reward_spm, "train SPO's step-aware preference model from the pixel model",
        "model", "pixel", "preferences", "out", "metrics")

    p = add(reward, "study", cmd_reward_study, "reward accuracy against noise, ablations, reports/<world>/reward.md",
            "model", "preferences", "mpcf", "clip", "lrm", "calibrated-lrm", "pixel", "spm", "out")
    p.add_argument("--ablations", nargs="*", default=[], help="LRM variants as name=directory")
    add(reward, "scaling", cmd_reward_scaling,
        "pixel-model accuracy against train pairs, noisy and noiseless labels: reports/<world>/reward_scaling.md",
        "clip", "preferences", "out")
    p = add(reward, "probes", cmd_reward_probes,
            "linear probes of frozen features predicting what the judge sees: reports/<world>/probes.md",
            "model", "judge", "lrm", "preferences", "out")
    p.add_argument("--clip", default=None, help="world-CLIP directory: probe its image features too")
