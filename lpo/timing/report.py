"""The report of a step-cost measurement: our Table 5 rows beside the paper's, written as <stem>.md, .csv and .tex,
and the LRM step under noise ensembling, a section of <stem>.md and <stem>_ensembling.csv."""
from __future__ import annotations

import datetime
import platform
from pathlib import Path

import torch
import yaml

from lpo.io import atomic_path
from lpo.latex import write_latex
from lpo.tables import PAPER_NUMBERS, markdown, write_csv
from lpo.timing.models import StepModels
from lpo.timing.step import PART_DOCS, StepCost, StepCostMeasurement, TimingConfig, spm_over_lrm

ENSEMBLING_SUMMARY = "LRM step with noise ensembling"   # starts the section's one-line summary (gpu_check.sh greps it)

CAVEAT = ("The paper names neither the model nor the precision behind its Table 5: only the ratio compares across "
          "devices and model sizes.")
TABLE5_COLUMNS = ("reward model", "denoising step (x_{t+1}→x_t)", "x̂_{0,t} prediction", "VAE decoding",
                  "reward prediction")   # then "total with K=<K>"
TEX_COLUMNS = ("Reward model", "Denoising step", "x0 prediction", "VAE decoding", "Reward prediction")


def paper_table5() -> tuple[list[StepCost], dict]:
    """The paper's Table 5 rows and its entry in reports/paper_numbers.yaml (source, device, K)."""
    entry = yaml.safe_load(PAPER_NUMBERS.read_text())["table5_step_cost"]
    rows = [StepCost(r["reward_model"], r["denoise"], r["x0_prediction"], r["vae_decoding"], r["reward_prediction"],
                     entry["samples_per_step"]) for r in entry["rows"]]
    return rows, entry


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"CPU ({cpu}, {torch.get_num_threads()} torch threads)"


def _seconds(s: float) -> str:
    return "0" if s == 0 else f"{s * 1e3:.3g} ms" if s < 1e-3 else f"{s:.3g} s"


def table5_rows(rows: list[StepCost], label: str) -> list[dict]:
    """Rows in Table 5's columns (TABLE5_COLUMNS + "total with K=<K>")."""
    out = []
    for r in rows:
        per = [_seconds(v) if v == 0 else f"K × {_seconds(v)}" for v in (r.x0_prediction, r.vae_decoding,
                                                                         r.reward_prediction)]
        out.append(dict(zip((*TABLE5_COLUMNS, f"total with K={r.samples_per_step}"),
                            (f"{r.reward_model} ({label})", _seconds(r.denoise), *per, _seconds(r.total)))))
    return out


def _times(ratio: float) -> str:
    return f"{ratio:.2g}×"


def ensembling_lines(measurement: StepCostMeasurement, device: str, dtype: str) -> tuple[list[str], list[dict]]:
    """The report's noise-ensembling section (Markdown lines) and its CSV rows, one per M."""
    k = measurement.samples_per_step
    rows = measurement.ensembling_table()
    csv_rows, table = [], []
    for r in rows:
        timing = measurement.ensembling[r.draws]
        csv_rows.append({"device": device, "dtype": dtype, "samples_per_step": k, "draws": r.draws,
                         "network_rows": timing.rows, "denoise_s": r.step.denoise,
                         "reward_prediction_s": r.step.reward_prediction, "total_s": r.step.total,
                         "total_over_m1": r.over_single, "total_over_spm": r.over_spm})
        table.append({"M": r.draws, "LRM batch rows": timing.rows,
                      "M-fold reward (K candidates)": _seconds(timing.median),
                      "IQR": f"{_seconds(timing.iqr[0])} – {_seconds(timing.iqr[1])}",
                      f"LRM step total with K={k}": _seconds(r.step.total), "vs M = 1": _times(r.over_single),
                      "vs SPM step": _times(r.over_spm)})
    summary = "; ".join(f"M = {r.draws}: **{_times(r.over_single)}**, {_times(r.over_spm)}" for r in rows)
    lines = ["## LRM noise ensembling", "",
             "The LRM step when each candidate's reward is the mean over M independent re-noisings (noise "
             "ensembling, lpo.reward.study): M LRM passes over the K candidates, timed as one batch of M·K rows "
             "with the same warm-up and repeats. M = 1 is the LRM row of the table above.", "",
             markdown(table), "", f"{ENSEMBLING_SUMMARY} (× the M = 1 step, × the SPM step): {summary}.", "",
             f"- M-fold reward: {PART_DOCS['lrm_ensembling']}",
             "- LRM step total: denoise + the M-fold reward; vs M = 1 and vs SPM step: its total over the LRM's and "
             "the SPM's totals in the table above. Not counted: where the clean latents come from (the reward study "
             "holds them; a sampler holding only the noisy candidates would first pay the x̂_0 prediction).", ""]
    return lines, csv_rows


def write_step_cost_report(out_dir: str | Path, stem: str, models: StepModels, measurement: StepCostMeasurement,
                           config: TimingConfig, command: str) -> None:
    """<stem>.md, <stem>.csv and <stem>.tex in out_dir: our Table 5 beside the paper's; the noise-ensembling rows in
    <stem>.md and <stem>_ensembling.csv."""
    out = Path(out_dir)
    device = device_name(models.device)
    ours = measurement.table()
    paper, entry = paper_table5()
    k = measurement.samples_per_step
    dtype = str(models.dtype).removeprefix("torch.")
    csv_rows = [{"source": source, "device": dev, "dtype": dt, "reward_model": r.reward_model,
                 "samples_per_step": r.samples_per_step, "denoise_s": r.denoise, "x0_prediction_s": r.x0_prediction,
                 "vae_decoding_s": r.vae_decoding, "reward_prediction_s": r.reward_prediction, "total_s": r.total,
                 "spm_over_lrm": spm_over_lrm(table) if r.reward_model == "SPM" else 1.0}
                for source, dev, dt, table in (("ours", device, dtype, ours),
                                               (entry["source"], entry["device"], "not stated", paper))
                for r in table]
    write_csv(out / f"{stem}.csv", csv_rows)
    ensembling, ensembling_csv = ensembling_lines(measurement, device, dtype)
    write_csv(out / f"{stem}_ensembling.csv", ensembling_csv)
    table = table5_rows(ours, "ours") + table5_rows(paper, f"paper, {entry['device']}")
    parts = [{"part": name, "batch rows": t.rows, "median": _seconds(t.median),
              "IQR": f"{_seconds(t.iqr[0])} – {_seconds(t.iqr[1])}",
              "per candidate": "-" if name == "denoise" else _seconds(t.median / k)}
             for name, t in measurement.parts.items()]
    size = models.image_size
    channels, latent, _ = models.latent_shape
    clock = "CUDA events" if models.device.type == "cuda" else "time.perf_counter"
    setup = (f"Generated on {datetime.date.today()} by `{command}`. Device: **{device}**, {dtype}. "
             f"Latents {channels}×{latent}×{latent} ({size}×{size} px images); K = {k} candidates of one prompt "
             f"timed as one batch (per-candidate times are the batch's / K); sampler CFG {config.guidance_scale:g}. "
             f"Medians of {config.repeats} timed calls per part after {config.warmup} untimed warm-up "
             f"call{'' if config.warmup == 1 else 's'} ({clock}).")
    ratio = (f"SPM step / LRM step: **{spm_over_lrm(ours):.2g}×** here; the paper's: {spm_over_lrm(paper):.2g}× "
             f"({entry['source']}, {entry['device']}; the paper calls the LRM's cost \"only 1/6 that of SPM\").")
    total = ("- Total: denoise + K × (x̂_0 + decode + reward) for the SPM, denoise + K × reward for the LRM, the "
             "paper's accounting. Not counted (Table 5 has no column for them): the policy's prompt encoding (once "
             "per trajectory), choosing the winner and loser, and the SPM-side saving of a sampler that reuses the "
             "continuing candidate's x̂_0 pass as the next step's denoising pass (lpo.optimize.sampler does).")
    lines = [f"# Cost of one sampling step (paper Table 5): {models.name}", "", setup, "",
             "## Time of each sampling step", "", markdown(table), "", ratio, "",
             "## Parts as measured", "", markdown(parts), "",
             "## What each column includes", "",
             f"- Denoising step: {PART_DOCS['denoise']}",
             f"- x̂_0 prediction (SPM only): {PART_DOCS['x0_prediction']}",
             f"- VAE decoding (SPM only): {PART_DOCS['vae_decoding']}",
             f"- Reward prediction, SPM: {PART_DOCS['spm_reward']}",
             f"- Reward prediction, LRM: {PART_DOCS['lrm_reward']}",
             total, "",
             *ensembling,
             "## Models", "", *[f"- {name}: {what}" for name, what in models.description.items()], "",
             CAVEAT, ""]
    with atomic_path(out / f"{stem}.md") as tmp:
        tmp.write_text("\n".join(lines))
    # LaTeX gets ASCII headers and cells: pdflatex has no glyph for x-hat, the arrow or the times sign by default.
    tex_columns = [*TEX_COLUMNS, f"Total (K={k})"]
    write_latex(out / f"{stem}.tex", [{c: str(v).replace("×", "x") for c, v in zip(tex_columns, r.values())}
                                      for r in table],
                caption=f"Time of each sampling step: {models.name}, ours on {device} ({dtype}), the paper's on "
                        f"{entry['device']} ({entry['source']}).", label=f"tab:{stem.replace('_', '-')}")
