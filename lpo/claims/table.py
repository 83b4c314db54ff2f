"""The paper's seven claims (design.md, "Claims"), and the questions beyond the paper (issue 16: step-wise GRPO, the
noise-calibrated LRM, noise ensembling), each as one statistic of what the earlier stages stored: its estimate and
95% interval in the world, the paper's own value of the same statistic where it has one, and the verdict of
lpo.claims.verdict. What each statistic compares is fixed here, beside the rule, before any number is read."""
from __future__ import annotations

import csv
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lpo.claims.intervals import fisher_z_draws, paired_prompt_bootstrap, pooled_difference
from lpo.claims.verdict import Side, verdict
from lpo.evaluate.report import METHODS, ablation_name, method_title, paper_table
from lpo.io import require_exists
from lpo.optimize.ablations import REFERENCE
from lpo.reward.study import CALIBRATED, ensemble_name
from lpo.stats import Estimate

# The judge's overall preference (alignment + aesthetic) is the world's human: its stand-in for the paper's
# preference metrics (PickScore, HPS, ImageReward), whose units differ, so only the signs compare.
METRIC = "overall_preference"
# The validation_unique prompts the methods are sampled on: the paper evaluates on Pick-a-Pic v1 validation_unique.
PROMPT_SET = "eval_seen"
# High noise: the timesteps SPO leaves out, its SPM being trained and used only for t <= 750 ([FT] Sec. 5.1, Fig. 4).
HIGH_NOISE_FROM = 750
# The reward study's names of the main LRM and of the pixel reward model on the decoded x0_hat.
LRM, PIXEL = "LRM", "pixel (x0_hat)"
# MPCF strategy 2 is the paper's; strategies 1 and 3 are the stricter and the looser aesthetic filter beside it.
BALANCED, NEIGHBOURS = 2, (1, 3)
NO_VFE = 1.0   # VFE at guidance scale 1 is the plain conditional features: the paper's row without VFE


@dataclass(frozen=True)
class ClaimInputs:
    reward_accuracy: Path       # reports/<world>/reward_accuracy.csv (lpo reward study)
    lrm_ablations: Path         # reports/<world>/lrm_ablations.csv (lpo reward study)
    cost: Path                  # reports/<world>/optimize_cost.csv (lpo evaluate report)
    scores: dict[str, Path]     # lpo, spo, diffusion_dpo, grpo runs, ablation_<run> -> per-image scores
    variants: dict[str, dict]   # the LPO ablation runs (lpo.optimize.ablations.ablation_variants)
    high_noise: Path | None = None  # reports/<world>/reward_high_noise.csv (lpo reward study)


@dataclass(frozen=True)
class Measurement:
    estimate: float | None
    low: float | None = None
    high: float | None = None
    compared: str = ""    # the rows, timesteps and prompts the numbers came from
    interval: str = ""    # how the interval was obtained
    detail: str = ""      # the statistic's parts
    why: str = ""         # what is missing, when the estimate or the interval is

    @classmethod
    def of(cls, e: Estimate, **text) -> Measurement:
        return cls(e.mean, e.low, e.high, **text)


@dataclass(frozen=True)
class Claim:
    key: str
    text: str
    source: str
    statistic: str        # what is compared, in words
    side: Side
    unit: str             # "x" for a ratio, "" for a difference
    measure: Callable[[ClaimInputs, int, int], Measurement]
    paper: Callable[[], tuple[float | None, str]]   # the paper's value of the statistic, and its source


# ------------------------------------------------------------------------------------------------ the inputs

HINTS = {"reward accuracy table": "written by `lpo reward study` (rule reward_study)",
         "high-noise table": "written by `lpo reward study` (rule reward_study)",
         "LRM ablation table": "written by `lpo reward study` (rule reward_study)",
         "training cost table": "written by `lpo evaluate report` (rule optimize_report)",
         "per-image scores": "written by `lpo evaluate score` (rule evaluate_scores)"}


def read_table(path: str | Path, what: str, columns: list[str]) -> list[dict]:
    """The rows of a CSV that must hold `columns`; an error names the file and what it lacks."""
    path = require_exists(path, what, HINTS[what])
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"the {what} '{path}' has no column {', '.join(map(repr, missing))} (its columns: "
                             f"{', '.join(reader.fieldnames or [])})")
        return list(reader)


def whole(rows: list[dict]) -> list[dict]:
    """The rows over all pairs: the reward tables may add rows per pair type beside them."""
    return [r for r in rows if r.get("pair_type") in (None, "", "all")]


def paired_scores(inputs: ClaimInputs, names: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every method's METRIC on PROMPT_SET, image by image in one order (matched on prompt and seed), and each
    image's prompt."""
    values, order = {}, None
    for name in names:
        if name not in inputs.scores:
            raise ValueError(f"no per-image scores of '{name}': pass --scores {name}=<its scores CSV>")
        path = inputs.scores[name]
        rows = read_table(path, "per-image scores", ["prompt_set", "prompt_index", "seed", METRIC])
        by_key = {(int(r["prompt_index"]), int(r["seed"])): float(r[METRIC]) for r in rows
                  if r["prompt_set"] == PROMPT_SET}
        if not by_key:
            raise ValueError(f"the per-image scores '{path}' hold no image of the {PROMPT_SET} prompts")
        order = order or sorted(by_key)
        if set(by_key) != set(order):
            raise ValueError(f"the per-image scores '{path}' do not hold the same {PROMPT_SET} prompts and seeds as "
                             f"'{inputs.scores[names[0]]}': sample every method with the base samples' seeds")
        values[name] = np.array([by_key[k] for k in order])
    return values, np.array([k[0] for k in order])


def _means(values: dict[str, np.ndarray], labels: dict[str, str]) -> str:
    return ", ".join(f"{labels.get(n, n)} {v.mean():.3f}" for n, v in values.items())


# ---------------------------------------------------------------------------------------------- the claims

def lrm_against_pixel(inputs: ClaimInputs, n: int, seed: int) -> Measurement:
    rows = whole(read_table(inputs.reward_accuracy, "reward accuracy table",
                            ["model", "split", "timestep", "accuracy_label", "label_low", "label_high",
                             "pairs_label"]))
    cells = {name: {(r["split"], int(r["timestep"])): {"split": r["split"], "estimate": float(r["accuracy_label"]),
                                                        "low": float(r["label_low"]), "high": float(r["label_high"]),
                                                        "pairs": int(r["pairs_label"])}
                    for r in rows if r["model"] == name and int(r["timestep"]) >= HIGH_NOISE_FROM}
             for name in (LRM, PIXEL)}
    shared = [k for k in cells[LRM] if k in cells[PIXEL]]
    if not shared:
        return Measurement(None, why=f"'{inputs.reward_accuracy}' has no timestep >= {HIGH_NOISE_FROM} scored by "
                                     f"both '{LRM}' and '{PIXEL}'")
    lrm, pixel = ([cells[name][k] for k in shared] for name in (LRM, PIXEL))
    e = pooled_difference(lrm, pixel)
    splits = " + ".join(dict.fromkeys(s for s, _ in shared))
    timesteps = ", ".join(str(t) for t in sorted({t for _, t in shared}))
    return Measurement.of(
        e, compared=f"t in {{{timesteps}}} on {splits}, pair accuracy against the labels (ties left out)",
        interval="normal, from the stored per-cell bootstrap intervals (no per-pair scores are stored): one "
                 "split's timesteps added as fully correlated, splits and models as independent",
        detail=f"LRM {_pooled_accuracy(lrm):.3f}, pixel model on x0_hat {_pooled_accuracy(pixel):.3f}")


def _pooled_accuracy(cells: list[dict]) -> float:
    return sum(c["estimate"] * c["pairs"] for c in cells) / sum(c["pairs"] for c in cells)


def paper_lrm_against_pixel() -> tuple[float | None, str]:
    rows = {r["model"]: r["accuracy"] for r in paper_table("table18_reward_models")}
    return None, (f"none at high noise (Table 18 has t = 0 and 200 only: LRM-1.5 {rows['LRM-1.5 (t = 200)']}% at "
                  f"t = 200; PickScore {rows['PickScore']}% on clean images)")


def lpo_against_baselines(inputs: ClaimInputs, n: int, seed: int) -> Measurement:
    values, prompts = paired_scores(inputs, ["lpo", "spo", "diffusion_dpo"])
    e = paired_prompt_bootstrap(values, prompts, lambda m: np.minimum(m["lpo"] - m["spo"],
                                                                      m["lpo"] - m["diffusion_dpo"]), n, seed)
    return Measurement.of(e, compared=f"the main LPO, SPO and Diffusion-DPO runs, {PROMPT_SET} "
                                      f"({np.unique(prompts).size} prompts, {prompts.size} images each)",
                          interval="paired bootstrap over prompts", detail=_means(values, METHODS))


def paper_lpo_against_baselines() -> tuple[float | None, str]:
    score = {(r["model"], r["method"]): r["pickscore"] for r in paper_table("table2_main_results")}
    gap = {m: min(score[m, "LPO"] - score[m, "SPO"], score[m, "LPO"] - score[m, "Diffusion-DPO"])
           for m in ("SD1.5", "SDXL")}
    return gap["SD1.5"], (f"{gap['SD1.5']:+.2f} PickScore (SD1.5: LPO {score['SD1.5', 'LPO']}, SPO "
                          f"{score['SD1.5', 'SPO']}, Diffusion-DPO {score['SD1.5', 'Diffusion-DPO']}); SDXL "
                          f"{gap['SDXL']:+.2f}")


def _balance(m: dict[str, np.ndarray]) -> np.ndarray:
    """min(Aes-Corr, CLIP-Corr) of strategy BALANCED minus the larger of that of its NEIGHBOURS."""
    low = {s: np.minimum(m[f"aes{s}"], m[f"clip{s}"]) for s in (BALANCED, *NEIGHBOURS)}
    return low[BALANCED] - np.maximum(*(low[s] for s in NEIGHBOURS))


def _correlation(row: dict, column: str) -> tuple[float, int]:
    """A correlation of the reward study and the decided pairs it was computed on."""
    return float(row[column]), int(row["pairs_label"])


def _lrm_ablations(inputs: ClaimInputs, varied: str) -> list[dict]:
    rows = whole(read_table(inputs.lrm_ablations, "LRM ablation table",
                            ["model", "varied", "strategy", "guidance_scale", "aesthetic_corr", "clipscore_corr",
                             "pairs_label"]))
    return [r for r in rows if r["varied"] == varied]


def _correlation_measurement(correlations: dict[str, tuple[float, int]], statistic, n: int, seed: int,
                             **text) -> Measurement:
    undefined = [k for k, (r, _) in correlations.items() if np.isnan(r)]
    if undefined:
        return Measurement(None, why=f"undefined correlation {', '.join(undefined)}", **text)
    return Measurement.of(fisher_z_draws(correlations, statistic, n, seed),
                          interval="Fisher-z draws of each correlation, models independent (no per-pair gaps are "
                                   "stored; a paired interval would be narrower)", **text)


def mpcf_balance(inputs: ClaimInputs, n: int, seed: int) -> Measurement:
    by_strategy = {int(float(r["strategy"])): r for r in _lrm_ablations(inputs, "strategy")}
    needed = (BALANCED, *NEIGHBOURS)
    missing = [str(s) for s in needed if s not in by_strategy]
    if missing:
        return Measurement(None, why=f"'{inputs.lrm_ablations}' has no LRM of MPCF strategy {', '.join(missing)} "
                                     f"(reward_study.mpcf_strategies)")
    rows = [by_strategy[s] for s in needed]
    correlations = {f"{prefix}{s}": _correlation(by_strategy[s], column) for s in needed
                    for prefix, column in (("aes", "aesthetic_corr"), ("clip", "clipscore_corr"))}
    detail = "; ".join(f"strategy {s}: Aes-Corr {correlations[f'aes{s}'][0]:.3f}, CLIP-Corr "
                       f"{correlations[f'clip{s}'][0]:.3f}" for s in needed)
    scale = float(rows[0]["guidance_scale"])
    return _correlation_measurement(
        correlations, _balance, n, seed, detail=detail,
        compared=f"the LRMs trained on MPCF strategies {', '.join(map(str, needed))} (VFE scale {scale:g}), "
                 f"at the reward study's lowest timestep on validation_unique + test_unique "
                 f"({rows[0]['pairs_label']} decided pairs)")


def paper_mpcf_balance() -> tuple[float | None, str]:
    rows = {r["strategy"]: r for r in paper_table("table7_mpcf_ablation")}
    value = float(_balance({f"{k}{s}": np.asarray(rows[s][f"{k}_corr"]) for s in (BALANCED, *NEIGHBOURS)
                            for k in ("aes", "clip")}))
    parts = ", ".join(f"{s}: {rows[s]['aes_corr']} / {rows[s]['clip_corr']}" for s in (BALANCED, *NEIGHBOURS))
    return value, f"{value:+.4f} (Table 7 Aes-Corr / CLIP-Corr, strategy {parts})"


def vfe_alignment(inputs: ClaimInputs, n: int, seed: int) -> Measurement:
    rows = _lrm_ablations(inputs, "guidance_scale")
    main = next((r for r in rows if r["model"] == LRM), None)
    off = next((r for r in rows if float(r["guidance_scale"]) == NO_VFE), None)
    if main is None or off is None or float(main["guidance_scale"]) == NO_VFE:
        return Measurement(None, why=f"'{inputs.lrm_ablations}' needs the main LRM with VFE and an LRM at "
                                     f"guidance scale {NO_VFE:g} (reward_study.vfe_scales)")
    correlations = {"vfe": _correlation(main, "clipscore_corr"), "off": _correlation(off, "clipscore_corr")}
    return _correlation_measurement(
        correlations, lambda m: m["vfe"] - m["off"], n, seed,
        detail=f"CLIP-Corr with VFE (scale {float(main['guidance_scale']):g}) {correlations['vfe'][0]:.3f}, "
               f"without {correlations['off'][0]:.3f}",
        compared=f"the main LRM against the LRM without VFE (MPCF strategy {int(float(main['strategy']))}), at the "
                 f"reward study's lowest timestep on validation_unique + test_unique ({main['pairs_label']} decided "
                 f"pairs)")


def paper_vfe_alignment() -> tuple[float | None, str]:
    rows = {r["guidance_scale"]: r["clip_corr"] for r in paper_table("table8_vfe_ablation")}
    value = rows[7.5] - rows[NO_VFE]
    return value, f"{value:+.4f} (Table 8 CLIP-Corr: scale 7.5 {rows[7.5]}, without VFE {rows[NO_VFE]})"


def _runs_of(inputs: ClaimInputs, table: str) -> dict[str, object]:
    """{run: its value} of one ablation table, the reference run's default value included."""
    return {run: value for run, variant in inputs.variants.items() for t, value in variant["rows"] if t == table}


def _ablation_gap(inputs: ClaimInputs, n: int, seed: int, others: list[str], compared: str) -> Measurement:
    """METRIC of the reference run minus the best of the `others` runs, paired over prompts."""
    names = [ablation_name(REFERENCE)] + [ablation_name(run) for run in others]
    values, prompts = paired_scores(inputs, names)
    e = paired_prompt_bootstrap(values, prompts, lambda m: np.min([m[names[0]] - m[o] for o in names[1:]], axis=0),
                                n, seed)
    return Measurement.of(e, interval="paired bootstrap over prompts",
                          detail=_means(values, {ablation_name(run): run for run in [REFERENCE, *others]}),
                          compared=f"{compared}, on {PROMPT_SET} ({np.unique(prompts).size} prompts, "
                                   f"{prompts.size} images each)")


def dynamic_threshold(inputs: ClaimInputs, n: int, seed: int) -> Measurement:
    runs = _runs_of(inputs, "threshold")
    dynamic = runs.get(REFERENCE)
    constant = {run: v for run, v in runs.items() if v[0] == v[1]}
    if dynamic is None or dynamic[0] == dynamic[1] or not constant:
        return Measurement(None, why="needs the default dynamic threshold's run and constant-threshold runs "
                                     "(lpo_ablations.thresholds)")
    listed = ", ".join(f"{v[0]:g}" for v in constant.values())
    m = _ablation_gap(inputs, n, seed, list(constant),
                      f"the LPO ablation runs (one budget): the default dynamic sigma threshold [{dynamic[0]:g}, "
                      f"{dynamic[1]:g}] against the constant thresholds {listed}")
    return dataclasses.replace(m, compared=f"{m.compared}; Table 24's variance and linear mappings are not run")


def paper_dynamic_threshold() -> tuple[float | None, str]:
    rows = {tuple(r["threshold"]): r["pickscore"] for r in paper_table("table10_thresholds")}
    best = max((v, t) for t, v in rows.items() if t[0] == t[1])
    value = rows[0.35, 0.5] - best[0]
    return value, (f"{value:+.2f} PickScore (Table 10: [0.35, 0.5] {rows[0.35, 0.5]}, best constant {best[1][0]:g} "
                   f"{best[0]})")


def real_lrm_timestep(inputs: ClaimInputs, n: int, seed: int) -> Measurement:
    runs = _runs_of(inputs, "lrm_timestep")
    zero = [run for run, v in runs.items() if v == "zero" and run != REFERENCE]
    if runs.get(REFERENCE) in (None, "zero") or not zero:
        return Measurement(None, why="needs the default run (a real timestep) and a run whose LRM is told t = 0 "
                                     "(lpo_ablations.lrm_timesteps)")
    return _ablation_gap(inputs, n, seed, zero,
                         f"the LPO ablation runs (one budget): the LRM told the {runs[REFERENCE]} timestep (the "
                         f"default) against always 0")


def paper_real_lrm_timestep() -> tuple[float | None, str]:
    rows = {r["lrm_timestep"]: r["pickscore"] for r in paper_table("table22_lrm_timestep")}
    value = rows["parent"] - rows["zero"]
    return value, f"{value:+.2f} PickScore (Table 22: real timestep {rows['parent']}, always 0 {rows['zero']})"


def training_speedup(inputs: ClaimInputs, n: int, seed: int) -> Measurement:
    rows = read_table(inputs.cost, "training cost table", ["method", "total (s)"])
    total = {r["method"]: float(r["total (s)"]) for r in rows}
    lpo, spo, dpo = (total.get(METHODS[m]) for m in ("lpo", "spo", "diffusion_dpo"))
    if lpo is None or spo is None:
        return Measurement(None, why=f"'{inputs.cost}' needs the rows {METHODS['lpo']} and {METHODS['spo']}")
    aside = f"; Diffusion-DPO / LPO {dpo / lpo:.2f}x, not judged" if dpo is not None else ""
    return Measurement(spo / lpo, why="one timing per method, no repeated runs", detail=f"SPO {spo:g} s, LPO "
                       f"{lpo:g} s{aside}",
                       compared="total device-seconds (reward modelling + preference optimisation) of the main SPO "
                                "and LPO runs, which share one budget of rounds and prompts; Diffusion-DPO's cost "
                                "is set by its own step budget, so its ratio says nothing about the method")


def paper_training_speedup() -> tuple[float | None, str]:
    hours = {(r["model"], r["method"]): r["total_h"] for r in paper_table("table6_training_cost")}
    ratio = {m: hours[m, "SPO"] / hours[m, "LPO"] for m in ("SD1.5", "SDXL")}
    dpo = {m: hours[m, "Diffusion-DPO"] / hours[m, "LPO"] for m in ("SD1.5", "SDXL")}
    return ratio["SD1.5"], (f"{ratio['SD1.5']:.2f}x (Table 6, SD1.5: {hours['SD1.5', 'SPO']} / "
                            f"{hours['SD1.5', 'LPO']} A100-h); SDXL {ratio['SDXL']:.2f}x; over Diffusion-DPO "
                            f"{dpo['SD1.5']:.1f}x / {dpo['SDXL']:.1f}x")


CLAIMS = [
    Claim("C1", "The LRM keeps pair accuracy at high noise where pixel reward models on x0_hat fail",
          "Sec. 3, Table 18", f"pair accuracy of the LRM minus that of the pixel reward model on the decoded x0_hat, "
          f"both given the same noisy latents, pooled over the timesteps t >= {HIGH_NOISE_FROM}", Side(0.0), "",
          lrm_against_pixel, paper_lrm_against_pixel),
    Claim("C2", "LPO beats SPO and Diffusion-DPO on preference metrics", "Table 2",
          f"the smaller of LPO - SPO and LPO - Diffusion-DPO in mean {METRIC}", Side(0.0), "",
          lpo_against_baselines, paper_lpo_against_baselines),
    Claim("C3", "MPCF strategy 2 balances aesthetics against alignment", "Tables 1, 7",
          f"balance = min(Aes-Corr, CLIP-Corr) of the LRM trained on strategy {BALANCED} minus the larger balance "
          f"of strategies {' and '.join(map(str, NEIGHBOURS))}", Side(0.0), "", mpcf_balance, paper_mpcf_balance),
    Claim("C4", "VFE improves alignment", "Table 8",
          f"CLIP-Corr of the LRM with VFE minus that of the LRM without (guidance scale {NO_VFE:g})", Side(0.0), "",
          vfe_alignment, paper_vfe_alignment),
    Claim("C5", "The dynamic sigma threshold beats constant thresholds", "Tables 10, 24",
          f"the smallest gap in mean {METRIC}, the default dynamic threshold's run minus each constant threshold's",
          Side(0.0), "", dynamic_threshold, paper_dynamic_threshold),
    Claim("C6", "The real timestep input to the LRM matters", "Table 22",
          f"mean {METRIC} of the run whose LRM is told the real timestep minus that of the run told t = 0",
          Side(0.0), "", real_lrm_timestep, paper_real_lrm_timestep),
    Claim("C7", "LPO trains 2.5-3.5x faster than SPO and 10-28x faster than Diffusion-DPO", "Tables 5, 6",
          "SPO's total training time over LPO's", Side(2.5, 3.5), "x", training_speedup, paper_training_speedup),
]


# ------------------------------------------------------------------------------------ beyond the paper

GRPO, GRPO_8X = "grpo", "grpo_8x"
ENSEMBLED = ensemble_name(LRM, 16)


def _grpo_against_lpo(run: str, inputs: ClaimInputs, n: int, seed: int) -> Measurement:
    if run not in inputs.scores:
        return Measurement(None, why=f"no step-wise GRPO run '{run}' (grpo.budgets)")
    values, prompts = paired_scores(inputs, [run, "lpo"])
    e = paired_prompt_bootstrap(values, prompts, lambda m: m[run] - m["lpo"], n, seed)
    rows = read_table(inputs.cost, "training cost table", ["method", "total (s)", "preference optimisation (s)"])
    cost = {r["method"]: float(r["preference optimisation (s)"]) for r in rows}
    titles = {run: method_title(run), "lpo": METHODS["lpo"]}
    ratio = (f"; preference optimisation {cost[titles[run]]:g} s against LPO's {cost[titles['lpo']]:g} s "
             f"({cost[titles[run]] / cost[titles['lpo']]:.2f}x)" if all(t in cost for t in titles.values()) else "")
    return Measurement.of(e, compared=f"the {titles[run]} run against the main LPO run, {PROMPT_SET} "
                                      f"({np.unique(prompts).size} prompts, {prompts.size} images each)",
                          interval="paired bootstrap over prompts", detail=_means(values, titles) + ratio)


def grpo_equal_cost(inputs: ClaimInputs, n: int, seed: int) -> Measurement:
    return _grpo_against_lpo(GRPO, inputs, n, seed)


def grpo_eight_times(inputs: ClaimInputs, n: int, seed: int) -> Measurement:
    return _grpo_against_lpo(GRPO_8X, inputs, n, seed)


def paper_grpo_equal_cost() -> tuple[float | None, str]:
    return None, "none: Table 12 compares GRPO at 8x LPO's training time only"


def paper_grpo_eight_times() -> tuple[float | None, str]:
    rows = {r["method"]: r for r in paper_table("table12_grpo")}
    grpo, lpo = rows["Step-wise GRPO"], rows["LPO"]
    value = round(grpo["pickscore"] - lpo["pickscore"], 2)
    return value, (f"{value:+.2f} PickScore (Table 12: GRPO {grpo['pickscore']} at {grpo['training_h']} A100-h, LPO "
                   f"{lpo['pickscore']} at {lpo['training_h']}); HPSv2.1 {grpo['hpsv21'] - lpo['hpsv21']:+.2f}")


def _high_noise(inputs: ClaimInputs, statistic: str, model: str, what: str) -> Measurement:
    if inputs.high_noise is None:
        return Measurement(None, why="no high-noise table given (--high-noise)")
    rows = read_table(inputs.high_noise, "high-noise table",
                      ["statistic", "model", "baseline", "timesteps", "estimate", "low", "high", "pairs"])
    row = next((r for r in rows if r["statistic"] == statistic and r["model"] == model and r["baseline"] == LRM),
               None)
    if row is None:
        return Measurement(None, why=f"'{inputs.high_noise}' has no {statistic} of '{model}' against '{LRM}'")
    accuracy = {r["model"]: float(r["estimate"]) for r in rows if r["statistic"] == "accuracy"}
    detail = ", ".join(f"{m} {accuracy[m]:.3f}" for m in (model, LRM) if m in accuracy)
    return Measurement(float(row["estimate"]), float(row["low"]), float(row["high"]),
                       compared=f"{what}, pooled over the reward study's timesteps t {row['timesteps']}, the same "
                                f"{row['pairs']} decided validation + test pairs and noisy latents",
                       interval="bootstrap over pairs", detail=f"accuracy against the labels: {detail}")


def calibrated_accuracy(inputs: ClaimInputs, n: int, seed: int) -> Measurement:
    return _high_noise(inputs, "accuracy difference", CALIBRATED,
                       "pair accuracy of the noise-calibrated LRM minus the LRM's")


def calibrated_ece(inputs: ClaimInputs, n: int, seed: int) -> Measurement:
    return _high_noise(inputs, "ECE ratio (baseline / model)", CALIBRATED,
                       "the LRM's expected calibration error of P(a > b) over the calibrated LRM's")


def ensembled_accuracy(inputs: ClaimInputs, n: int, seed: int) -> Measurement:
    return _high_noise(inputs, "accuracy difference", ENSEMBLED,
                       "pair accuracy of the LRM averaged over 16 noisings minus its single draw")


def paper_none() -> tuple[float | None, str]:
    return None, "none: the LPO paper has no such experiment (DiNa-LRM's numbers are on other benchmarks)"


BEYOND = [
    Claim("B1", "Step-wise GRPO beats LPO at equal training cost", "App. B (beyond the paper)",
          f"mean {METRIC} of the GRPO run at LPO's cost minus LPO's", Side(0.0), "", grpo_equal_cost,
          paper_grpo_equal_cost),
    Claim("B2", "Step-wise GRPO with 8x the training beats LPO", "App. B, Table 12",
          f"mean {METRIC} of the GRPO run of 8x the rounds minus LPO's", Side(0.0), "", grpo_eight_times,
          paper_grpo_eight_times),
    Claim("B3", "The noise-calibrated LRM is more accurate than the LRM at high noise", "DiNa-LRM (beyond the paper)",
          "pair accuracy of the Thurstone + FiLM LRM minus the LRM's at t >= the reward study's high_noise_from",
          Side(0.0), "", calibrated_accuracy, paper_none),
    Claim("B4", "Thurstone calibration halves the LRM's calibration error at high noise",
          "DiNa-LRM (beyond the paper)",
          "expected calibration error of the Bradley-Terry LRM over that of the calibrated LRM, pooled at high "
          "noise", Side(2.0), "x", calibrated_ece, paper_none),
    Claim("B5", "Noise ensembling (M = 16) raises the LRM's accuracy at high noise", "DiNa-LRM (beyond the paper)",
          "pair accuracy of the LRM over 16 noisings minus its single draw", Side(0.0), "", ensembled_accuracy,
          paper_none),
]


def claim_rows(inputs: ClaimInputs, n_bootstrap: int, seed: int, claims: list[Claim] = CLAIMS) -> list[dict]:
    """One row per claim: the statistic, the paper's value, the world's with its interval, the verdict."""
    rows = []
    for claim in claims:
        m = claim.measure(inputs, n_bootstrap, seed)
        paper_value, paper = claim.paper()
        result, reason = verdict(m.estimate, m.low, m.high, claim.side, m.why)
        rows.append({"claim": claim.key, "text": claim.text, "source": claim.source, "statistic": claim.statistic,
                     "claim_side": str(claim.side), "unit": claim.unit, "paper_value": paper_value, "paper": paper,
                     "estimate": m.estimate, "ci_low": m.low, "ci_high": m.high, "verdict": result,
                     "reason": reason, "compared": m.compared, "interval": m.interval or "none", "detail": m.detail})
    return rows
