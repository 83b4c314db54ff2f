"""The world report: how good the embedded world's parts are, so later results can be read against them."""
from __future__ import annotations

import platform
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np

from lpo.io import atomic_path
from lpo.samples import SampleSet
from lpo.stats import bootstrap
from lpo.tables import markdown, write_csv
from lpo.world.grammar import ATTRIBUTES
from lpo.world.render import DEFECTS


@dataclass(frozen=True)
class ReportConfig:
    images_per_prompt: int = 4    # base-model samples per evaluation prompt
    sampling_steps: int = 20      # DDIM steps and CFG of the base samples and of every method's evaluation samples
    guidance_scale: float = 3.0
    bootstrap: int = 1000         # bootstrap resamples for the 95% intervals
    grid_prompts: int = 12        # prompts shown in the sample grid

    def __post_init__(self):
        if min(self.images_per_prompt, self.sampling_steps, self.bootstrap, self.grid_prompts) < 1:
            raise ValueError("report: images_per_prompt, sampling_steps, bootstrap and grid_prompts must be >= 1")
        if not self.guidance_scale > 0:
            raise ValueError(f"report.guidance_scale={self.guidance_scale!r} must be > 0")


def base_model_rows(samples: SampleSet, verdict, defect_threshold: float, n_boot: int, seed: int) -> list[dict]:
    """Per prompt set: accuracy per attribute, overall alignment, defect rate (any and per type), with 95%
    intervals from a bootstrap over prompts."""
    rows = []
    for prompt_set in dict.fromkeys(samples.prompt_set.tolist()):
        mask = samples.prompt_set == prompt_set
        groups = samples.prompt_index[mask]
        metrics = {f"accuracy_{a}": verdict.correct[mask, i] for i, a in enumerate(ATTRIBUTES)}
        metrics["overall_alignment"] = verdict.aligned[mask]
        metrics["defect_rate"] = verdict.defective[mask]
        metrics |= {f"defect_rate_{d}": verdict.defects[mask, i] > defect_threshold
                    for i, d in enumerate(DEFECTS)}
        metrics["aesthetic"] = verdict.aesthetic[mask]
        metrics["overall_preference"] = verdict.overall[mask]
        for name, values in metrics.items():
            e = bootstrap(values.astype(np.float64), groups, n=n_boot, seed=seed)
            rows.append({"prompt_set": prompt_set, "metric": name, "mean": e.mean, "ci_low": e.low,
                         "ci_high": e.high, "images": int(mask.sum()), "prompts": int(np.unique(groups).size)})
    return rows


def sample_grid(samples: SampleSet, path: Path, prompts_shown: int, scale: int = 3) -> None:
    """A PNG grid: one row per prompt (seen, then held-out), its images side by side, the prompt beside them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(zip(samples.prompt_set.tolist(), samples.prompt_index.tolist())))
    per_set = {s: [k for k in keys if k[0] == s] for s in dict.fromkeys(samples.prompt_set.tolist())}
    shown = [k for ks in per_set.values() for k in ks[:max(1, prompts_shown // len(per_set))]]
    n_cols = int(max(np.sum((samples.prompt_set == s) & (samples.prompt_index == i)) for s, i in shown))
    fig, axes = plt.subplots(len(shown), n_cols, figsize=(n_cols * 0.35 * scale + 4.5, len(shown) * 0.35 * scale),
                             squeeze=False)
    for r, (s, i) in enumerate(shown):
        rows = np.flatnonzero((samples.prompt_set == s) & (samples.prompt_index == i))
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < rows.size:
                ax.imshow(samples.images[rows[c]], interpolation="nearest")
        axes[r, -1].text(1.08, 0.5, f"[{s}] {samples.prompts[rows[0]]}", transform=axes[r, -1].transAxes,
                         va="center", fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99 - 4.5 / fig.get_figwidth(), wspace=0.05, hspace=0.05)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def preference_rows(stats: dict) -> list[dict]:
    """Label statistics per split and pair type (all, same_source, cross_source) from the stage's stats.json."""
    rows = []
    for split, s in stats.items():
        for pairs in ("all", "same_source", "cross_source"):
            values = s if pairs == "all" else s.get(pairs)
            if values:
                rows.append({"split": split, "pair_type": pairs,
                             **{k: v for k, v in values.items() if not isinstance(v, (dict, list))}})
    return rows


def source_mix_rows(stats: dict) -> list[dict]:
    """Pairs per unordered source pair, one column per split."""
    mix = {}
    for split, s in stats.items():
        for r in s.get("sources", []):
            mix.setdefault((r["source_a"], r["source_b"]), {"source_a": r["source_a"], "source_b": r["source_b"]})[
                split] = r["pairs"]
    return [{**r, **{split: r.get(split, 0) for split in stats}} for _, r in sorted(mix.items())]


def write_world_report(out_dir: Path, world: dict, vae: dict, judge: dict, base_rows: list[dict],
                       preference_stats: dict, costs: list[dict]) -> None:
    out_dir = Path(out_dir)
    rows = [{"section": "vae", "metric": k, "value": v} for k, v in sorted(vae.items()) if np.isscalar(v)]
    rows += [{"section": "judge", "metric": f"heldout_clean_accuracy_{a}", "value": judge["attribute_accuracy"][a]}
             for a in ATTRIBUTES]
    rows += [{"section": "base_model", "metric": r["metric"], "prompt_set": r["prompt_set"], "value": r["mean"],
              "ci_low": r["ci_low"], "ci_high": r["ci_high"]} for r in base_rows]
    label_rows = preference_rows(preference_stats)
    rows += [{"section": "preferences", "metric": k if r["pair_type"] == "all" else f"{k}_{r['pair_type']}",
              "prompt_set": r["split"], "value": v}
             for r in label_rows for k, v in r.items() if k not in ("split", "pair_type")]
    mix = source_mix_rows(preference_stats)
    rows += [{"section": "preference_sources", "metric": f"{r['source_a']} vs {r['source_b']}", "prompt_set": split,
              "value": r[split]} for r in mix for split in preference_stats]
    write_csv(out_dir / "world.csv", rows)

    fmt = lambda r: f"{r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"  # noqa: E731
    sets = list(dict.fromkeys(r["prompt_set"] for r in base_rows))
    base_table = [{"metric": m, **{s: fmt(r) for s in sets for r in base_rows if r["metric"] == m
                                   and r["prompt_set"] == s}}
                  for m in dict.fromkeys(r["metric"] for r in base_rows)]
    judge_table = [{"attribute": a, "accuracy": f"{judge['attribute_accuracy'][a]:.4f}"} for a in ATTRIBUTES]
    pref_table = [{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in label_rows]
    text = f"""# The {world['name']} world

Generated by `snakemake` (rule `world_report`) on {date.today().isoformat()}, device: CPU ({platform.processor() or
platform.machine()}). Intervals are 95% bootstrap intervals over prompts.

World: {world['scenes']} scenes, {world['heldout_scenes']} of them held out (colour-shape pairs
{', '.join(world['heldout_pairs'])}); image size {world['image_size']}x{world['image_size']}.

## VAE reconstruction (held-out corpus images)
{markdown([{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in vae.items() if np.isscalar(v)}])}

## Judge: attribute accuracy on held-out clean renders
{markdown(judge_table)}

Defect detection, AUC of the predicted severity (defect at severity >= 0.4 against the rest):
{', '.join(f"{d} {v['auc']:.3f}" for d, v in judge['defects'].items())}. Clean renders called defective:
{judge['clean_defective_rate']:.3f}.

## Base model on the evaluation prompts
`overall_alignment` counts images with every attribute right; `defect_rate` images with any defect the judge sees.
{markdown(base_table)}

![base-model samples](base_samples.png)

## Preference data (Pick-a-Pic layout)
`label_agreement`: share of decided pairs whose label follows the judge's noiseless order. Same-source pairs have
both images from the first source (the optimisers' own), cross-source pairs two different sources.
{markdown(pref_table)}

Pairs per source pair (`model@cfgS`; `base` is the final base model, `base-stepN` its snapshot after N steps):
{markdown(mix) if mix else "(one source)"}

## Stage costs on this machine
{markdown(costs) if costs else "(no benchmark files found)"}
"""
    with atomic_path(out_dir / "world.md") as tmp:
        tmp.write_text(text)
