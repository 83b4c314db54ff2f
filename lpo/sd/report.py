"""Report tables of the SD worlds in the paper's forms, each of our rows beside the paper's: [FT] Table 2 (PickScore,
ImageReward, HPSv2, HPSv2.1, Aesthetic on Pick-a-Pic v1 validation_unique; Table 4's rows for LRM-1.5 used on
SD2.1 / SDXL) and Table 18 (reward models' correlations and accuracy), as Markdown, CSV and LaTeX. Every metric
header names its scale; images the scorers could not decode are left out of the means and counted.
"""
from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from lpo.io import atomic_path
from lpo.latex import latex
from lpo.evaluate.scorers import SCORERS, Scores
from lpo.stats import Estimate, bootstrap
from lpo.tables import PAPER_NUMBERS, markdown, write_csv

# Searched in order for a (model, method) row; Table 4 holds LRM-1.5 on SD2.1 and SDXL, Table 12 step-wise GRPO.
TABLE2_SOURCES = (("table2_main_results", "[FT] Table 2"), ("table4_heterogeneous", "[FT] Table 4"),
                  ("table12_grpo", "[FT] Table 12"))
PAPER_MODELS = {"sd15": "SD1.5", "sd21": "SD2.1", "sdxl": "SDXL"}
PAPER_METHODS = {"original": "Original", "lpo": "LPO", "spo": "SPO", "diffusion_dpo": "Diffusion-DPO",
                 "grpo": "Step-wise GRPO"}


@dataclass(frozen=True)
class Metric:
    scorer: str       # lpo.evaluate.scorers name
    paper_key: str    # its column in reports/paper_numbers.yaml
    header: str       # the column header, with the scale
    factor: float     # on the scorer's values, to the paper's printed scale
    digits: int       # as the paper prints it


TABLE2_METRICS = (
    Metric("pickscore", "pickscore", "PickScore (~100*cos)", 1.0, 2),
    Metric("imagereward", "imagereward", "ImageReward (standardised)", 1.0, 4),
    Metric("hpsv2", "hpsv2", "HPSv2 (cos x100)", 100.0, 2),
    Metric("hpsv2.1", "hpsv21", "HPSv2.1 (cos x100)", 100.0, 2),
    Metric("aesthetic", "aesthetic", "Aesthetic (1-10)", 1.0, 3),
)
# (our reward-study key, paper key, header)
TABLE18_COLUMNS = (("aesthetic_corr", "aes_corr", "Aes-Corr (Pearson r of gaps)"),
                   ("clipscore_corr", "clip_corr", "CLIP-Corr (Pearson r of gaps)"),
                   ("vqascore_corr", "vqa_corr", "VQA-Corr (Pearson r of gaps)"))
ACCURACY = "Val-Test accuracy (%)"


@dataclass(frozen=True)
class SDEvaluation:
    """One model's scores on the evaluation prompts: one of our rows of Table 2."""
    model: str                      # the paper's Model column: SD1.5, SD2.1 or SDXL
    method: str                     # the paper's Method: Original, Diffusion-DPO, SPO, LPO, LPO with LRM-1.5
    scores: Mapping[str, Scores]    # lpo.evaluate.scorers name -> one score per image (NaN where the image was skipped)
    prompt_index: np.ndarray        # per image, its prompt (intervals resample prompts)
    source: str = "ours"            # e.g. "ours (official checkpoint)" or "ours (trained here)"


def paper_names(preset: str, method: str) -> tuple[str, str]:
    """(Model, Method) as the paper's tables name an lpo.sd.config preset and method."""
    if preset not in PAPER_MODELS or method not in PAPER_METHODS:
        raise ValueError(f"no paper name for preset '{preset}' / method '{method}'")
    if preset == "sd21" and method == "lpo":
        return "SD2.1", "LPO with LRM-1.5"
    return PAPER_MODELS[preset], PAPER_METHODS[method]


def paper_rows(name: str, paper_numbers: Path = PAPER_NUMBERS) -> list[dict]:
    """The rows of one table of reports/paper_numbers.yaml; none when it is not transcribed there."""
    table = (yaml.safe_load(Path(paper_numbers).read_text()) or {}).get(name)
    return list(table["rows"]) if table else []


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _beside(ours: list[dict], key, paper_row) -> list[dict]:
    """Our rows grouped by the paper row they compare with, each group followed by that paper row."""
    groups: dict = {}
    for row in ours:
        groups.setdefault(key(row), []).append(row)
    out = []
    for k, rows in groups.items():
        out += rows + [paper_row(k)]
    return out


# ---------------------------------------------------------------------------------------------------- Table 2

def summarise(evaluation: SDEvaluation, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Our Table 2 row: per metric an Estimate at the paper's scale (None when not scored), the images scored
    and those skipped by any scorer."""
    prompts = np.asarray(evaluation.prompt_index)
    metrics, skipped = {}, set()
    for metric in TABLE2_METRICS:
        scores = evaluation.scores.get(metric.scorer)
        if scores is None:
            metrics[metric.header] = None
            continue
        values = np.asarray(scores.values, dtype=np.float64) * metric.factor
        if values.shape != prompts.shape:
            raise ValueError(f"{evaluation.model} {evaluation.method}: {values.size} {metric.scorer} scores but "
                             f"{prompts.size} prompt indices")
        skipped.update(scores.skipped)
        ok = ~np.isnan(values)
        metrics[metric.header] = bootstrap(values[ok], prompts[ok], n_bootstrap, seed) if ok.any() else None
    return {"model": evaluation.model, "method": evaluation.method, "source": evaluation.source,
            "metrics": metrics, "images": int(prompts.size - len(skipped)), "skipped": len(skipped)}


def _paper_table2(model: str, method: str, paper_numbers: Path) -> dict:
    for name, label in TABLE2_SOURCES:
        for row in paper_rows(name, paper_numbers):
            if row["model"] == model and row["method"] == method:
                return {"model": model, "method": method, "source": f"paper, {label}",
                        "metrics": {m.header: _number(row.get(m.paper_key)) for m in TABLE2_METRICS}}
    return {"model": model, "method": method, "source": "paper: no such row",
            "metrics": {m.header: None for m in TABLE2_METRICS}}


def table2(evaluations: Sequence[SDEvaluation], n_bootstrap: int = 1000, seed: int = 0,
           paper_numbers: Path = PAPER_NUMBERS) -> list[dict]:
    """Table 2 records, ours and the paper's (see `table2_cells` and `table2_csv_rows` for their formats)."""
    ours = [summarise(e, n_bootstrap, seed) for e in evaluations]
    return _beside(ours, lambda r: (r["model"], r["method"]), lambda k: _paper_table2(*k, paper_numbers))


def _cell(value: Estimate | float | None, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, Estimate):
        return f"{value.mean:.{digits}f} [{value.low:.{digits}f}, {value.high:.{digits}f}]"
    return f"{value:.{digits}f}"


def table2_cells(records: list[dict]) -> list[dict]:
    """For Markdown and LaTeX: ours as mean [95% interval], the paper's as printed."""
    return [{"Model": r["model"], "Method": r["method"], "Source": r["source"],
             **{m.header: _cell(r["metrics"][m.header], m.digits) for m in TABLE2_METRICS},
             "Images scored": r.get("images", "-"), "Skipped (undecodable)": r.get("skipped", "-")}
            for r in records]


def table2_csv_rows(records: list[dict]) -> list[dict]:
    """For programs: numbers at the paper's scale, intervals in their own columns, empty where there is none."""
    rows = []
    for r in records:
        row = {"model": r["model"], "method": r["method"], "source": r["source"]}
        for m in TABLE2_METRICS:
            value = r["metrics"][m.header]
            mean = value.mean if isinstance(value, Estimate) else value
            row[m.header] = "" if mean is None else mean
            row[f"{m.header} 95% low"] = value.low if isinstance(value, Estimate) else ""
            row[f"{m.header} 95% high"] = value.high if isinstance(value, Estimate) else ""
        row["images_scored"], row["skipped_undecodable"] = r.get("images", ""), r.get("skipped", "")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------- Table 18

def table18(reward_models: Sequence[dict], paper_numbers: Path = PAPER_NUMBERS) -> list[dict]:
    """Table 18 records: our reward-model rows (lpo.reward.study's Table 18 rows: model, accuracy_label,
    label_low, label_high, pairs_label, *_corr; `paper_model` names the paper's row where the names differ), each
    group followed by the paper's row. Accuracy in %."""
    paper = {r["model"]: r for r in paper_rows("table18_reward_models", paper_numbers)}
    ours = []
    for r in reward_models:
        accuracy, low, high = (_finite(r.get(k)) for k in ("accuracy_label", "label_low", "label_high"))
        if accuracy is not None:
            accuracy = (Estimate(100 * accuracy, 100 * low, 100 * high) if low is not None and high is not None
                        else 100 * accuracy)
        ours.append({"model": r["model"], "source": r.get("source", "ours"),
                     "paper_model": r.get("paper_model", r["model"]),
                     **{header: _finite(r.get(key)) for key, _, header in TABLE18_COLUMNS},
                     ACCURACY: accuracy, "pairs": r.get("pairs_label")})

    def paper_row(name: str) -> dict:
        p = paper.get(name, {})
        return {"model": name, "source": "paper, [FT] Table 18" if p else "paper: not transcribed",
                "paper_model": name, **{header: _number(p.get(key)) for _, key, header in TABLE18_COLUMNS},
                ACCURACY: _number(p.get("accuracy")), "pairs": None}

    return _beside(ours, lambda r: r["paper_model"], paper_row)


def table18_cells(records: list[dict]) -> list[dict]:
    return [{"Model": r["model"], "Source": r["source"],
             **{header: _cell(r[header], 3) for _, _, header in TABLE18_COLUMNS},
             ACCURACY: _cell(r[ACCURACY], 2), "Pairs": "-" if r["pairs"] is None else r["pairs"]} for r in records]


def table18_csv_rows(records: list[dict]) -> list[dict]:
    rows = []
    for r in records:
        accuracy = r[ACCURACY]
        row = {"model": r["model"], "source": r["source"],
               **{header: "" if r[header] is None else r[header] for _, _, header in TABLE18_COLUMNS}}
        row[ACCURACY] = accuracy.mean if isinstance(accuracy, Estimate) else ("" if accuracy is None else accuracy)
        row[f"{ACCURACY} 95% low"] = accuracy.low if isinstance(accuracy, Estimate) else ""
        row[f"{ACCURACY} 95% high"] = accuracy.high if isinstance(accuracy, Estimate) else ""
        row["pairs"] = "" if r["pairs"] is None else r["pairs"]
        rows.append(row)
    return rows


def _finite(value) -> float | None:
    value = _number(value)
    return None if value is None or not np.isfinite(value) else value


# ---------------------------------------------------------------------------------------------------- writing

def write_sd_report(out_dir: str | Path, world: str, evaluations: Sequence[SDEvaluation],
                    reward_models: Sequence[dict] = (), n_bootstrap: int = 1000, seed: int = 0,
                    paper_numbers: Path = PAPER_NUMBERS, setup: Sequence[str] = ()) -> None:
    """`out_dir`/table2.{md,csv,tex} and, with reward-model rows, table18.{md,csv,tex}; `setup` lines describe how
    the numbers were made (prompts, sampler, seeds) under Table 2's heading."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = table2(evaluations, n_bootstrap, seed, paper_numbers)
    cells = table2_cells(records)
    write_csv(out / "table2.csv", table2_csv_rows(records))
    with atomic_path(out / "table2.tex") as tmp:
        tmp.write_text(latex(cells, caption=f"{world}: general and aesthetic preference scores on Pick-a-Pic v1 "
                                            "validation_unique, ours (mean [95% interval over prompts]) beside "
                                            "the paper's", label=f"tab:{world}-table2"))
    conventions = "; ".join(SCORERS[m.scorer].convention for m in TABLE2_METRICS)
    skipped = [f"{r['model']} {r['method']} ({r['source']}): {r['skipped']}" for r in records if r.get("skipped")]
    lines = [f"# {world}: preference scores (paper Table 2)", "",
             f"Generated on {datetime.date.today()}. Ours: mean [95% bootstrap interval over prompts]; the "
             f"paper's: single runs as printed (reports/paper_numbers.yaml). Scales: {conventions}.", "",
             *[f"{line}\n" for line in setup],
             ("Images skipped because they failed to decode (not in the means): " + "; ".join(skipped) + ".")
             if skipped else "No image failed to decode.", "", markdown(cells), ""]
    with atomic_path(out / "table2.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    if reward_models:
        records18 = table18(reward_models, paper_numbers)
        cells18 = table18_cells(records18)
        write_csv(out / "table18.csv", table18_csv_rows(records18))
        with atomic_path(out / "table18.tex") as tmp:
            tmp.write_text(latex(cells18, caption=f"{world}: reward models' correlations with aesthetic, CLIP and "
                                                  "VQA score gaps and their preference accuracy, ours beside the "
                                                  "paper's", label=f"tab:{world}-table18"))
        lines18 = [f"# {world}: reward models (paper Table 18)", "",
                   "Correlations are Pearson's r between the model's winner-minus-loser gap and the side scorer's "
                   "gap over decided pairs (empty where no side scores exist for the evaluated splits); accuracy is "
                   "the share of decided pairs ordered as labelled, ties of the scores counted half.", "",
                   markdown(cells18), ""]
        with atomic_path(out / "table18.md") as tmp:
            tmp.write_text("\n".join(lines18) + "\n")


def reward_model_row(model: str, paper_model: str, s0: np.ndarray, s1: np.ndarray, label_0: np.ndarray,
                     n_bootstrap: int = 1000, seed: int = 0, source: str = "ours") -> dict:
    """A Table 18 row (see `table18`) from a reward model's scores of both images of each pair: accuracy on the
    decided pairs (label_0 of 0 or 1), with its 95% bootstrap interval over pairs."""
    decided = np.asarray(label_0) != 0.5
    if not decided.any():
        raise ValueError(f"{model}: no decided pair (every label_0 is 0.5): no accuracy to report")
    s0, s1 = np.asarray(s0)[decided], np.asarray(s1)[decided]
    right = np.where(s0 == s1, 0.5, ((s0 > s1) == (np.asarray(label_0)[decided] == 1.0)).astype(float))
    estimate = bootstrap(right, n=n_bootstrap, seed=seed)
    return {"model": model, "paper_model": paper_model, "source": source, "accuracy_label": estimate.mean,
            "label_low": estimate.low, "label_high": estimate.high, "pairs_label": int(decided.sum())}


# ----------------------------------------------------------------------------------------------------- figures

def plot_table2(path: str | Path, evaluations: Sequence[SDEvaluation], names: Sequence[str],
                n_bootstrap: int = 1000, seed: int = 0, paper_numbers: Path = PAPER_NUMBERS) -> None:
    """One panel per Table 2 metric: our mean per run (`names`, one per evaluation) with its 95% interval, and the
    paper's value for the same model and method as a marker."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TABLE2_METRICS), figsize=(3.2 * len(TABLE2_METRICS), 3.6), squeeze=False)
    x = np.arange(len(evaluations))
    for ax, metric in zip(axes[0], TABLE2_METRICS):
        for i, evaluation in enumerate(evaluations):
            ours = summarise(evaluation, n_bootstrap, seed)["metrics"][metric.header]
            if ours is not None:
                ax.bar(i, ours.mean, color="C0", alpha=0.7)
                ax.errorbar(i, ours.mean, yerr=[[ours.mean - ours.low], [ours.high - ours.mean]], color="k",
                            capsize=3)
            paper = _paper_table2(evaluation.model, evaluation.method, paper_numbers)["metrics"][metric.header]
            if paper is not None:
                ax.plot(i, paper, "D", color="C3", label="paper" if i == 0 else None)
        ax.set_xticks(x, list(names), rotation=45, ha="right", fontsize=8)
        ax.set_title(metric.header, fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def sample_folder_grid(folder: str | Path, path: str | Path, prompts_shown: int) -> None:
    """The grid of lpo.world.report.sample_grid for a sample folder (lpo.evaluate.scorers.sample_folder); images that do
    not decode are left out."""
    from lpo.samples import SampleSet
    from lpo.evaluate.scorers.common import decode
    from lpo.evaluate.scorers.sample_folder import read_index
    from lpo.world.report import sample_grid

    kept, images = [], []
    for row in read_index(folder):
        image = decode(row["file"])
        if image is not None:
            kept.append(row)
            images.append(np.asarray(image.convert("RGB")))
    if not kept:
        raise ValueError(f"no image of '{folder}' decodes: no sample grid to draw")
    samples = SampleSet(np.stack(images), np.array([r["prompt"] for r in kept]),
                        np.array(["validation_unique"] * len(kept)), np.array([r["prompt_index"] for r in kept]),
                        np.array([r["seed"] for r in kept]))
    sample_grid(samples, Path(path), prompts_shown)
