"""reports/<world>/optimize.md and its CSVs, LaTeX and plots: the methods against the base model in the form of
[FT] Table 2, the training cost in the form of Table 6, the LPO ablations of Tables 9, 10, 22 and 23, training
curves and sample grids, each table beside the paper's numbers (reports/paper_numbers.yaml)."""
from __future__ import annotations

import datetime
import platform
from pathlib import Path

import numpy as np
import yaml

from lpo.optimize.ablations import PROMPT_SET as ABLATION_PROMPT_SET, REFERENCE, TABLES
from lpo.io import atomic_path
from lpo.latex import latex
from lpo.tables import PAPER_NUMBERS, markdown, write_csv

METHODS = {"base": "Base model", "diffusion_dpo": "Diffusion-DPO", "spo": "SPO", "lpo": "LPO"}
DATA = {"base": "-", "diffusion_dpo": "train pairs (offline)", "spo": "train prompts + SPM",
        "lpo": "train prompts + LRM"}
GRPO = "grpo"  # step-wise GRPO's runs: grpo (LPO's cost), grpo_<m>x (m times as many rounds)
MAIN_COLUMNS = {"overall_preference": "overall preference", "alignment": "alignment", "aesthetic": "aesthetic",
                "defect_rate": "defect rate", "pixel_reward": "pixel reward", "win_rate": "win rate vs base"}
ABLATION_COLUMNS = {"overall_preference": "overall preference", "alignment": "alignment", "aesthetic": "aesthetic",
                    "pixel_reward": "pixel reward", "win_rate": "win rate vs base"}
PAPER_KEYS = {"threshold": ("table10_thresholds", "threshold"), "beta": ("table23_beta", "beta"),
              "lrm_timestep": ("table22_lrm_timestep", "lrm_timestep"),
              "timestep_range": ("table9_timestep_ranges", "range")}
LRM_TIMESTEP_ORDER = ("parent", "candidate", "zero")


def _grpo_multiple(method: str) -> int:
    return int(method.removeprefix(GRPO).strip("_").removesuffix("x") or 1)


def method_title(method: str) -> str:
    if method.startswith(GRPO):
        multiple = _grpo_multiple(method)
        return "Step-wise GRPO" + ("" if multiple == 1 else f" ({multiple}x rounds)")
    return METHODS.get(method, method)


def main_methods(names) -> list[str]:
    """The methods of the main and cost tables among `names`, in the report's order: the paper's, then GRPO's runs
    by budget."""
    names = set(names)
    return [m for m in METHODS if m in names] + sorted((m for m in names if m.startswith(GRPO)), key=_grpo_multiple)


def paper_table(name: str) -> list[dict]:
    return yaml.safe_load(PAPER_NUMBERS.read_text())[name]["rows"]


def ablation_name(run: str) -> str:
    """The method name an ablation run's samples and scores are filed under."""
    return f"ablation_{run}"


def _interval(row: dict) -> str:
    return f"{row['mean']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"


def _lookup(summaries: list[dict]) -> dict[tuple, dict]:
    return {(r["method"], r["prompt_set"], r["metric"]): r for r in summaries}


def prompt_sets(summaries: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["prompt_set"] for r in summaries))


# ---------------------------------------------------------------------------------------------------- tables

def main_rows(summaries: list[dict], prompt_set: str) -> list[dict]:
    """[FT] Table 2's form with the world's metrics: one row per method present, mean [95% interval]."""
    found = _lookup(summaries)
    rows = []
    for method in main_methods(r["method"] for r in summaries):
        if (method, prompt_set, "overall_preference") not in found:
            continue
        row = {"method": method_title(method),
               "data": "train prompts + LRM" if method.startswith(GRPO) else DATA.get(method, "-")}
        for metric, title in MAIN_COLUMNS.items():
            cell = found.get((method, prompt_set, metric))
            row[title] = _interval(cell) if cell else "-"
        rows.append(row)
    return rows


def attribute_rows(summaries: list[dict], prompt_set: str) -> list[dict]:
    """Alignment per attribute (share of images whose attribute the judge recognises as prompted)."""
    found = _lookup(summaries)
    metrics = [r["metric"] for r in summaries if r["metric"].startswith("accuracy_")]
    rows = []
    for method in main_methods(r["method"] for r in summaries):
        cells = {m.removeprefix("accuracy_"): found.get((method, prompt_set, m)) for m in dict.fromkeys(metrics)}
        if any(cells.values()):
            rows.append({"method": method_title(method),
                         **{a: (f"{c['mean']:.3f}" if c else "-") for a, c in cells.items()}})
    return rows


def paper_main_rows(model: str = "SD1.5") -> list[dict]:
    return [{"method": r["method"], "dataset": r["dataset"], "PickScore": r["pickscore"],
             "ImageReward": r["imagereward"], "HPSv2": r["hpsv2"], "HPSv2.1": r["hpsv21"],
             "Aesthetic": r["aesthetic"], "GenEval (20 steps)": r["geneval_20"]}
            for r in paper_table("table2_main_results") if r["model"] == model]


def cost_rows(training: dict[str, dict], wall_seconds: dict[str, float], samples_per_step: dict[str, int]
              ) -> list[dict]:
    """[FT] Table 6's form in device-seconds, with the ratio of each method's total to LPO's, the breakdown of
    the step-level methods' optimisation, and the paper's SD1.5 A100-hours beside: Table 6's, and for the GRPO run
    of Table 12's budget (8x LPO's) Table 12's 64 h of preference optimisation with LPO's LRM (15 h)."""
    paper = {r["method"]: r for r in paper_table("table6_training_cost") if r["model"] == "SD1.5"}
    table12 = {r["method"]: r for r in paper_table("table12_grpo")}
    lpo_total = _total(training["lpo"]) if "lpo" in training else None
    paper_lpo = paper["LPO"]["total_h"]
    rows = []
    for method in main_methods(training):
        metrics, name = training[method], method_title(method)
        cost, seconds = metrics["cost"], metrics["device_seconds"]
        total = _total(metrics)
        scored = sum(metrics.get("per_timestep", {}).get("pairs_scored", [])) * samples_per_step.get(method, 0)
        p = paper.get(name, {})
        if method == f"{GRPO}_8x":
            p = {"reward_modelling_h": paper["LPO"]["reward_modelling_h"],
                 "preference_optimisation_h": table12["Step-wise GRPO"]["training_h"]}
            p["total_h"] = p["reward_modelling_h"] + p["preference_optimisation_h"]
        budget = (f"{metrics['rounds']} rounds, {metrics['optimizer_steps']} optimizer steps" if "rounds" in metrics
                  else f"{metrics.get('steps', '?')} optimizer steps")
        rows.append({
            "method": name, "budget": budget,
            "reward modelling (s)": round(cost["reward_modelling_seconds"], 1),
            "preference optimisation (s)": round(cost["preference_optimisation_seconds"], 1),
            "total (s)": round(total, 1),
            "total / LPO": round(total / lpo_total, 2) if lpo_total else "-",
            "step reward (s)": round(seconds["reward"], 1) if "reward" in seconds else "-",
            "reward ms / candidate": round(1000 * seconds["reward"] / scored, 3) if scored else "-",
            "rule wall (s)": round(wall_seconds[method], 1) if method in wall_seconds else "-",
            "paper reward modelling (h)": p.get("reward_modelling_h", "-"),
            "paper preference optimisation (h)": p.get("preference_optimisation_h", "-"),
            "paper total (h)": p.get("total_h", "-"),
            "paper total / LPO": round(p["total_h"] / paper_lpo, 2) if p else "-"})
    return rows


def _total(metrics: dict) -> float:
    return metrics["cost"]["reward_modelling_seconds"] + metrics["cost"]["preference_optimisation_seconds"]


def _value_label(table: str, value) -> str:
    if table == "threshold":
        return f"{value[0]:g} (constant)" if value[0] == value[1] else f"[{value[0]:g}, {value[1]:g}] (dynamic)"
    if table == "timestep_range":
        return f"[{value[0]}, {value[1]}]"
    if table == "lrm_timestep":
        return {"parent": "parent t_cur (official)", "candidate": "candidate t_cur - T/N",
                "zero": "always 0"}.get(value, value)
    return f"{value:g}"


def _sort_key(table: str, value):
    if table == "threshold":
        return (value[0] != value[1], value[0], value[1])
    if table == "timestep_range":
        return (value[1] - value[0], value[0])
    if table == "lrm_timestep":
        return LRM_TIMESTEP_ORDER.index(value) if value in LRM_TIMESTEP_ORDER else len(LRM_TIMESTEP_ORDER)
    return value


def _paper_value(table: str, value) -> dict:
    name, key = PAPER_KEYS[table]
    for row in paper_table(name):
        stored = row[key]
        if (tuple(stored) == tuple(value)) if isinstance(stored, list) else stored == value:
            return row
    return {}


def ablation_rows(summaries: list[dict], training: dict[str, dict], variants: dict[str, dict], prompt_set: str
                  ) -> dict[str, list[dict]]:
    """{table: rows}: each ablation value's run (the shared reference run for the default), its metrics on
    `prompt_set`, the share of scored pairs it kept, and the paper's PickScore and GenEval for that value."""
    found = _lookup(summaries)
    out: dict[str, list] = {}
    for run, variant in variants.items():
        method = ablation_name(run)
        metrics = training.get(method, {})
        per_t = metrics.get("per_timestep", {})
        scored, kept = sum(per_t.get("pairs_scored", [])), sum(per_t.get("pairs_kept", []))
        for table, value in variant["rows"]:
            row = {"value": _value_label(table, value) + (" *" if run == REFERENCE else ""), "run": run}
            for metric, title in ABLATION_COLUMNS.items():
                cell = found.get((method, prompt_set, metric))
                row[title] = _interval(cell) if cell else "-"
            row["pairs kept"] = f"{kept} ({kept / scored:.2f})" if scored else "-"
            paper = _paper_value(table, value)
            row["paper PickScore"] = paper.get("pickscore", "-")
            row["paper GenEval"] = paper.get("geneval", "-")
            out.setdefault(table, []).append((_sort_key(table, value), row))
    return {t: [row for _, row in sorted(out[t], key=lambda kr: kr[0])] for t in TABLES if t in out}


# ---------------------------------------------------------------------------------------------------- plots

def plot_training_curves(training: dict[str, dict], path: Path) -> None:
    """Loss per optimizer step (raw and a running mean) of every method, and the pairs kept at each sampling
    timestep by the step-level methods."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, kept_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for method, color in zip(main_methods(training), ("tab:blue", "tab:orange", "tab:green", "tab:red",
                                                       "tab:purple", "tab:brown")):
        if training[method]["loss_curve"]:
            steps, losses = np.asarray(training[method]["loss_curve"], dtype=np.float64).T
            loss_ax.plot(steps, losses, ".", ms=3, alpha=0.3, color=color)
            window = max(1, len(losses) // 20)
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            loss_ax.plot(steps[window - 1:], smooth, color=color, label=method_title(method))
        per_t = training[method].get("per_timestep")
        # Only the methods that keep pairs (GRPO trains on every group), only the steps they optimise (SPO: t <= 750).
        if per_t and training[method].get("objective", "dpo") == "dpo":
            shown = [i for i, n in enumerate(per_t["pairs_scored"]) if n]
            kept_ax.plot([per_t["timestep"][i] for i in shown], [per_t["pairs_kept"][i] for i in shown],
                         marker="o", ms=3, color=color, label=method_title(method))
    loss_ax.set(xlabel="optimizer step", ylabel="loss", title="training loss")
    kept_ax.set(xlabel="t_cur of the sampling step", ylabel="pairs kept", title="pairs kept per timestep")
    for ax in (loss_ax, kept_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- writer

def _device(training: dict[str, dict]) -> str:
    devices = sorted({m.get("device", "?") for m in training.values()})
    return ", ".join(f"CPU ({platform.machine()})" if d == "cpu" else d for d in devices) or "-"


def write_optimize_report(out: Path, world: str, summaries: list[dict], training: dict[str, dict],
                          variants: dict[str, dict], wall_seconds: dict[str, float],
                          samples_per_step: dict[str, int], setup: list[str],
                          grids: dict[str, object] | None = None, grid_prompts: int = 8) -> None:
    """Write optimize.md, optimize_{main,attributes,cost,ablations}.csv, the .tex tables, training_curves.png
    and (given SampleSets in `grids`) samples_<method>.png.

    summaries: evaluate.summarise rows of every method and ablation run; training: metrics JSON of each
    training (keys lpo, spo, diffusion_dpo, ablation_<run>); setup: lines describing the run's settings."""
    from lpo.world.report import sample_grid
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sets = prompt_sets(summaries)
    write_csv(out / "optimize_main.csv", [r for r in summaries if not r["method"].startswith("ablation_")])
    costs = cost_rows(training, wall_seconds, samples_per_step)
    if costs:
        write_csv(out / "optimize_cost.csv", costs)
    ablation_csv = [r for r in summaries if r["method"].startswith("ablation_")]
    if ablation_csv:
        write_csv(out / "optimize_ablations.csv", ablation_csv)
    plot_training_curves(training, out / "training_curves.png")
    for method, samples in (grids or {}).items():
        sample_grid(samples, out / f"samples_{method}.png", grid_prompts)

    tex, lines = [], [f"# Preference optimisation in the {world} world", "",
                      (f"Generated by `snakemake` (rule `optimize_report`) on {datetime.date.today()}, device: "
                      f"{_device(training)}. Means over every image with 95% bootstrap intervals over prompts; "
                      "win rate: share of (prompt, seed) pairs whose image the judge prefers to the base model's, "
                      "ties counted half."), ""]
    lines += ["## Setup", ""] + [f"- {line}" for line in setup] + [""]

    lines += ["## Main results (paper Table 2 form)", "",
              ("The judge (the hidden human) gives `overall preference` (alignment + aesthetic), `alignment` (share "
              "of images with every prompted attribute right), `aesthetic` (1 - summed defect severity) and "
              "`defect rate`; `pixel reward` is the world's PickScore analogue."), ""]
    for prompt_set in sets:
        rows = main_rows(summaries, prompt_set)
        lines += [f"### {prompt_set}", "", markdown(rows), "", "Alignment per attribute:", "",
                  markdown(attribute_rows(summaries, prompt_set)), ""]
        tex.append(latex(rows, caption=f"{world} world, {prompt_set}: judge and pixel-reward scores (paper "
                                       f"Table 2 form)", label=f"tab:{world}-main-{prompt_set}"))
    paper = paper_main_rows()
    lines += ["### Paper (SD1.5, Pick-a-Pic v1 validation_unique, [FT] Table 2)", "", markdown(paper), ""]
    if any(m.startswith(GRPO) for m in training):
        grpo = [{"method": r["method"], "PickScore": r["pickscore"], "ImageReward": r["imagereward"],
                 "HPSv2": r["hpsv2"], "HPSv2.1": r["hpsv21"], "Aesthetic": r["aesthetic"],
                 "GenEval (20 steps)": r["geneval_20"], "training (A100 h)": r["training_h"] or "-"}
                for r in paper_table("table12_grpo")]
        lines += ["### Paper, step-wise GRPO (SD1.5, [FT] Table 12; training: preference optimisation only)", "",
                  markdown(grpo), ""]

    lines += ["## Training cost (paper Table 6 form)", "",
              ("Device-seconds on this machine. Reward modelling: the training of the reward model the method "
              "needs (LRM for LPO; the SPM, fine-tuned from the pixel model, for SPO; none for Diffusion-DPO); the "
              "pixel model itself stands for PickScore, which the paper does not count. Preference optimisation: "
              "all of the method's training run (for LPO and SPO: sampling, step rewards and optimizer steps). "
              "`total / LPO` is the paper's speed-up claim; `reward ms / candidate` is the per-candidate cost of "
              "the step reward (paper Table 5: LRM 0.005 s, SPM 0.056 s with x0 prediction and decoding). The "
              "budgets (rounds, steps) are this config's, not the paper's."), ""]
    lines += [markdown(costs) if costs else "(no training metrics)", ""]
    if costs:
        tex.append(latex(costs, caption=f"{world} world: training cost in device-seconds, paper A100 hours beside "
                                        f"(paper Table 6 form)", label=f"tab:{world}-cost"))

    tables = ablation_rows(summaries, training, variants, ABLATION_PROMPT_SET)
    lines += ["## LPO ablations", "",
              (f"Every run of these tables trains for the same, shorter budget; `*` marks the default settings' "
              f"run (`reference`), shared by all tables. Scores on {ABLATION_PROMPT_SET}, the one set the "
              f"ablation runs are sampled on; the paper's PickScore and GenEval (SD1.5) beside."), ""]
    titles = {"threshold": "Sampling threshold", "beta": "beta", "lrm_timestep": "LRM input timestep",
              "timestep_range": "Optimised timestep range"}
    for table, source in TABLES.items():
        rows = tables.get(table)
        lines += [f"### {titles[table]} ({source})", "", markdown(rows) if rows else "(not run in this config)", ""]
        if rows:
            tex.append(latex(rows, caption=f"{world} world: LPO ablation, {titles[table]} ({source} form)",
                             label=f"tab:{world}-ablation-{table}"))

    lines += ["## Training curves", "", "![training curves](training_curves.png)", ""]
    if grids:
        lines += ["## Samples", ""] + [f"![{method_title(m)}](samples_{m}.png)" for m in grids] + [""]
    with atomic_path(out / "optimize.tex") as tmp:
        tmp.write_text("\n".join(tex))
    with atomic_path(out / "optimize.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
