"""Linear probes of frozen features: do a reward model's features hold what the judge sees?

The Shapes world's reward models score ~0.5-0.55 pair accuracy. A probe tells the two reasons apart: when a linear
map of the frozen features recovers what the judge sees, the information is there and the reward model's training
fails to use it; when no probe recovers it, the features lack it. Probed features, each a function of uint8 images
(and their captions) to one vector per image:
- the trained LRM's pooled multi-scale vector (the input of its visual projection, VFE included) of the noised VAE
  latent at several timesteps;
- the base UNet's mean-pooled mid block (the LRM's untrained starting point), caption-conditioned, at the same
  timesteps and with the same noise;
- the world-CLIP's image features, when a world-CLIP is given.
Targets, from the judge (lpo.world.judge.predict): its recognised value of every attribute, its severity of every
defect, and, from the recognised value and the caption's scene, whether each attribute is correct. Correctness is
not probed apart: the value probe's prediction is compared with the caption's, as the judge's own value is, so
features that only echo the caption (the diffusion features are conditioned on it) score the judge's share of
correct attributes and no more.

Probes are fitted on the train split's images and scored on validation_unique + test_unique (prompts no probe saw),
images de-duplicated by their uid columns: features standardised with the fitting images' statistics, multinomial
logistic regression by full-batch L-BFGS with an L2 penalty (attributes), closed-form ridge (severities), float64,
deterministic. Baselines are the fitting images' majority class and mean severity. Intervals are 95% bootstrap
intervals resampling held-out prompts (lpo.stats), the same draws for a probe and its baseline, so the gain over
the baseline has its own paired interval.
"""
from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lpo.images import to_tensor
from lpo.preference_data import ImageColumn, dataset_path, load_pairs, load_split, require_columns
from lpo.reward.lrm import LatentRewardModel, down_and_mid
from lpo.reward.lrm_training import LatentEncoder
from lpo.seeding import keyed_generator
from lpo.stats import Estimate, bootstrap
from lpo.world.grammar import ATTRIBUTES, Grammar, Vocabulary
from lpo.world.judge import Judge, predict, scene_labels
from lpo.world.render import DEFECTS
from lpo_kernels.reference import pool_features

FIT_SPLITS, SCORED_SPLITS = ("train",), ("validation_unique", "test_unique")
UID_COLUMNS = ("image_0_uid", "image_1_uid")
KINDS = ("attribute", "correctness", "defect")
_LBFGS_ITERATIONS = 500
_FLAT = 1e-8  # a feature whose fitting-set spread is below this carries nothing: it is centred, not scaled

# (noisy latents (N, C, h, w), timesteps (N,), captions) -> pooled features (N, D)
LatentPooling = Callable[[torch.Tensor, torch.Tensor, list[str]], torch.Tensor]


@dataclass(frozen=True)
class ProbeConfig:
    timesteps: tuple[int, ...] = (1, 251, 501, 751, 951)
    max_images: int = 3000    # each of the fitting and the scored images, a seeded choice among the distinct ones
    l2: float = 1e-3          # penalty on the squared weights, beside the mean loss of both probes
    bootstrap: int = 1000
    batch_size: int = 256

    def __post_init__(self):
        if not self.timesteps or min(self.timesteps) < 0:
            raise ValueError(f"probes.timesteps={list(self.timesteps)} must list timesteps >= 0")
        for key in ("max_images", "bootstrap", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"probes.{key}={getattr(self, key)} must be >= 1")
        if not self.l2 >= 0:
            raise ValueError(f"probes.l2={self.l2} must be >= 0")


@dataclass(frozen=True)
class FeatureSet:
    name: str                 # e.g. "LRM t=251"
    family: str               # "LRM", "base UNet mid", "world-CLIP"
    timestep: int | None      # None: features of the clean image
    extract: Callable[[np.ndarray, list[str]], np.ndarray]   # uint8 (N, H, W, 3), captions -> (N, D)


# --------------------------------------------------------------------------------------------------------- data

@dataclass
class ProbeImages:
    """Distinct images of some splits, each with the caption of its pair."""
    images: np.ndarray    # uint8 (N, H, W, 3)
    captions: list[str]
    uids: list[str]

    def __len__(self) -> int:
        return len(self.uids)


def probe_images(dataset_dir: str | os.PathLike, splits: Sequence[str], image_size: int, max_images: int,
                 seed: int) -> ProbeImages:
    """The distinct images (by image_0_uid / image_1_uid) of the labelled pairs of `splits`, at image_size, at most
    `max_images` of them (a seeded choice, kept in dataset order)."""
    columns, captions, uids = [], [], []
    for split in splits:
        pairs = load_pairs(dataset_dir, split, image_size=image_size)
        data = load_split(dataset_dir, split)
        require_columns(data.column_names, UID_COLUMNS, f"split '{split}' of '{dataset_path(dataset_dir)}'")
        ids = data.select_columns(list(UID_COLUMNS))[pairs.rows.tolist()]
        for column, uid in zip((pairs.images_0, pairs.images_1), UID_COLUMNS):
            columns.append(column)
            captions += pairs.captions
            uids += [str(u) for u in ids[uid]]
    first: dict[str, int] = {}
    for i, uid in enumerate(uids):
        first.setdefault(uid, i)
    keep = np.fromiter(first.values(), dtype=np.int64, count=len(first))
    if not len(keep):
        raise ValueError(f"no labelled pairs in split(s) {', '.join(splits)} of '{dataset_path(dataset_dir)}': "
                         f"nothing to probe")
    if len(keep) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(keep, max_images, replace=False))
    return ProbeImages(ImageColumn.concatenate(columns)[keep], [captions[i] for i in keep], [uids[i] for i in keep])


@dataclass
class JudgeView:
    """What the judge sees in each image, and what its caption asks for (class indices, ATTRIBUTES order)."""
    values: np.ndarray     # (N, A) the judge's recognised class of every attribute
    prompted: np.ndarray   # (N, A) the caption's class
    defects: np.ndarray    # (N, len(DEFECTS)) the judge's severities
    classes: tuple[int, ...]

    @property
    def correct(self) -> np.ndarray:
        return self.values == self.prompted


def prompted_classes(captions: list[str], grammar: Grammar, vocabulary: Vocabulary) -> np.ndarray:
    """(N, A) the class index, in `vocabulary`, of every attribute the caption's scene asks for."""
    return scene_labels([grammar.parse(c) for c in captions], vocabulary)


def judge_view(judge: Judge, grammar: Grammar, images: ProbeImages) -> JudgeView:
    out = predict(judge, images.images)
    return JudgeView(values=np.stack([out[a].argmax(1) for a in ATTRIBUTES], 1),
                     prompted=prompted_classes(images.captions, grammar, judge.vocabulary), defects=out["defects"],
                     classes=tuple(len(judge.vocabulary.values(a)) for a in ATTRIBUTES))


# ----------------------------------------------------------------------------------------------------- features

@torch.no_grad()
def lrm_pooled(lrm: LatentRewardModel, latents: torch.Tensor, timesteps: torch.Tensor,
               captions: list[str]) -> torch.Tensor:
    """The LRM's pooled feature vector (N, feature_dim), its visual projection's input, VFE included."""
    features, null_mid, _ = lrm.stage_features(latents, timesteps, **lrm.tokenize(captions))
    return pool_features(features, null_mid, lrm.config.guidance_scale)


def unet_mid_pooled(unet, text_encoder, tokenizer) -> LatentPooling:
    """A text-to-image UNet's mean-pooled mid block, conditioned on the caption by the pipeline's text encoder."""
    @torch.no_grad()
    def pooled(latents: torch.Tensor, timesteps: torch.Tensor, captions: list[str]) -> torch.Tensor:
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(latents.device)
        _, mid = down_and_mid(unet, latents, timesteps, text_encoder(ids).last_hidden_state)
        return mid.mean(dim=(2, 3), dtype=torch.float32)
    return pooled


def latent_features(encoder: LatentEncoder, pooling: LatentPooling, timestep: int, batch_size: int,
                    seed: int) -> Callable[[np.ndarray, list[str]], np.ndarray]:
    """uint8 images, captions -> pooled features of their noised VAE latents at `timestep`. Image i's noise is drawn
    from (seed, i): the same at every timestep and for every model, so feature sets differ only in what they
    read."""
    limit = encoder.noise.config.num_train_timesteps
    if not 0 <= timestep < limit:
        raise ValueError(f"probes.timesteps: {timestep} is outside the noise schedule's [0, {limit})")

    @torch.no_grad()
    def extract(images: np.ndarray, captions: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            stop = min(start + batch_size, len(images))
            latents = encoder.latents(images[start:stop])
            noise = torch.stack([torch.randn(latents.shape[1:], generator=keyed_generator(seed, i))
                                 for i in range(start, stop)])
            t = torch.full((stop - start,), timestep, device=latents.device)
            out.append(pooling(encoder.noisy(latents, t, noise), t, captions[start:stop]).double().cpu())
        return torch.cat(out).numpy()
    return extract


def diffusion_feature_sets(encoder: LatentEncoder, lrm: LatentRewardModel, base_unet, text_encoder, tokenizer,
                           config: ProbeConfig, seed: int) -> list[FeatureSet]:
    """The LRM's pooled vector and the base UNet's pooled mid block at every probed timestep."""
    base = unet_mid_pooled(base_unet.eval(), text_encoder.eval(), tokenizer)
    sets = []
    for family, pooling in (("LRM", partial(lrm_pooled, lrm.eval())), ("base UNet mid", base)):
        sets += [FeatureSet(f"{family} t={t}", family, t, latent_features(encoder, pooling, t, config.batch_size, seed))
                 for t in config.timesteps]
    return sets


def clip_feature_set(clip: torch.nn.Module, batch_size: int) -> FeatureSet:
    """The world-CLIP's image features before its projection (lpo.world.clip.WorldCLIP.image_features, or any module
    of that interface: [-1, 1] NCHW float images -> (N, F))."""
    clip.eval()  # its image tower batch-normalises: in training mode a feature would depend on its batch

    @torch.no_grad()
    def extract(images: np.ndarray, captions: list[str]) -> np.ndarray:
        return torch.cat([clip.image_features(to_tensor(images[i:i + batch_size])).double().cpu()
                          for i in range(0, len(images), batch_size)]).numpy()
    return FeatureSet("world-CLIP", "world-CLIP", None, extract)


# ------------------------------------------------------------------------------------------------------- probes

class Standardiser:
    """Centre and scale by the fitting features' statistics (float64)."""

    def __init__(self, x: np.ndarray):
        x = torch.as_tensor(x, dtype=torch.float64)
        self.mean, std = x.mean(0), x.std(0, correction=0)
        self.scale = torch.where(std > _FLAT, std, torch.ones_like(std))

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        return (torch.as_tensor(x, dtype=torch.float64) - self.mean) / self.scale


def attribute_probe(x_fit: np.ndarray, y_fit: np.ndarray, x_scored: np.ndarray, classes: int,
                    l2: float) -> np.ndarray:
    """Predicted classes of the scored features by multinomial logistic regression on the fitting ones: mean
    cross-entropy + l2 * |W|^2 (bias unpenalised), minimised by full-batch L-BFGS."""
    scale = Standardiser(x_fit)
    x, y = scale(x_fit), torch.as_tensor(y_fit, dtype=torch.long)
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=_LBFGS_ITERATIONS, tolerance_grad=1e-6,
                                  tolerance_change=1e-9, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (scale(x_scored) @ weight + bias).argmax(1).numpy()


def defect_probe(x_fit: np.ndarray, y_fit: np.ndarray, x_scored: np.ndarray, l2: float) -> np.ndarray:
    """Predicted targets (N, K) of the scored features by ridge regression on the fitting ones: mean squared error
    + l2 * |W|^2, intercept unpenalised, in closed form."""
    scale = Standardiser(x_fit)
    x, y = scale(x_fit), torch.as_tensor(y_fit, dtype=torch.float64)
    mean = y.mean(0)
    gram = x.T @ x / len(x) + l2 * torch.eye(x.shape[1], dtype=torch.float64)
    weight = torch.linalg.lstsq(gram, x.T @ (y - mean) / len(x)).solution  # lstsq: l2 = 0 with flat features
    return (scale(x_scored) @ weight + mean).numpy()


class Resampling:
    """The bootstrap draws of whole groups that lpo.stats.bootstrap makes for these groups and seed, shared by every
    estimate of the held-out images, so a probe and its baseline are compared on the same resamples."""

    def __init__(self, groups: Sequence, n: int, seed: int, level: float = 0.95):
        _, self.inverse = np.unique(np.asarray(groups), return_inverse=True)
        self.groups, self.n, self.seed, self.level = groups, n, seed, level
        size = int(self.inverse.max()) + 1
        self.draws = np.random.default_rng(seed).integers(0, size, size=(n, size))

    def mean(self, values: np.ndarray) -> Estimate:
        return bootstrap(values, self.groups, self.n, self.seed, self.level)

    def r2_draws(self, y: np.ndarray, predicted: np.ndarray) -> tuple[float, np.ndarray]:
        """R^2 of `predicted` on all held-out images, and on each resample (each about its own mean)."""
        def sums(values):
            per_group = np.bincount(self.inverse, weights=values, minlength=self.draws.shape[1])
            return per_group.sum(), per_group[self.draws].sum(1)

        (sse, sse_d), (s1, s1_d), (s2, s2_d), (n, n_d) = (sums(v) for v in (
            (y - predicted) ** 2, y, y * y, np.ones_like(y)))
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(1 - sse / (s2 - s1 * s1 / n)), 1 - sse_d / (s2_d - s1_d * s1_d / n_d)

    def interval(self, point: float, draws: np.ndarray) -> Estimate:
        alpha = (1 - self.level) / 2
        finite = draws[np.isfinite(draws)]
        if not finite.size:
            return Estimate(point, float("nan"), float("nan"))
        return Estimate(point, float(np.quantile(finite, alpha)), float(np.quantile(finite, 1 - alpha)))


def _row(features: FeatureSet, dim: int, target: str, kind: str, metric: str, value: Estimate,
         baseline: Estimate, gain: Estimate, **extra) -> dict:
    return {"features": features.name, "family": features.family,
            "timestep": "" if features.timestep is None else features.timestep, "dim": dim, "target": target,
            "kind": kind, "metric": metric, "value": value.mean, "low": value.low, "high": value.high,
            "baseline": baseline.mean, "baseline_low": baseline.low, "baseline_high": baseline.high,
            "gain": gain.mean, "gain_low": gain.low, "gain_high": gain.high, **extra}


def probe_rows(features: FeatureSet, x_fit: np.ndarray, x_scored: np.ndarray, fit: JudgeView, scored: JudgeView,
               resampling: Resampling, l2: float) -> list[dict]:
    """Per attribute: value accuracy and correctness accuracy against the majority baseline; per defect: R^2
    against the fitting mean's."""
    rows, dim = [], x_fit.shape[1]
    for j, attribute in enumerate(ATTRIBUTES):
        truth = scored.values[:, j]
        predicted = attribute_probe(x_fit, fit.values[:, j], x_scored, fit.classes[j], l2)
        right, majority = predicted == truth, truth == np.bincount(fit.values[:, j]).argmax()
        rows.append(_row(features, dim, attribute, "attribute", "accuracy", resampling.mean(right),
                         resampling.mean(majority), resampling.mean(right.astype(float) - majority),
                         classes=fit.classes[j]))
        correct = scored.correct[:, j]
        agrees = (predicted == scored.prompted[:, j]) == correct
        usual = correct == (fit.correct[:, j].mean() >= 0.5)
        rows.append(_row(features, dim, attribute, "correctness", "accuracy", resampling.mean(agrees),
                         resampling.mean(usual), resampling.mean(agrees.astype(float) - usual),
                         judge_correct=float(correct.mean())))
    predicted = defect_probe(x_fit, fit.defects, x_scored, l2)
    for k, defect in enumerate(DEFECTS):
        y = scored.defects[:, k].astype(np.float64)
        value, value_d = resampling.r2_draws(y, predicted[:, k])
        base, base_d = resampling.r2_draws(y, np.full_like(y, fit.defects[:, k].mean()))
        rows.append(_row(features, dim, defect, "defect", "R2", resampling.interval(value, value_d),
                         resampling.interval(base, base_d), resampling.interval(value - base, value_d - base_d),
                         target_std=float(y.std())))
    return rows


def run_probes(feature_sets: list[FeatureSet], judge: Judge, grammar: Grammar, fit: ProbeImages,
               scored: ProbeImages, config: ProbeConfig, seed: int) -> list[dict]:
    """Every feature set's probes of every target, fitted on `fit` and scored on `scored`."""
    views = judge_view(judge, grammar, fit), judge_view(judge, grammar, scored)
    resampling = Resampling(scored.captions, config.bootstrap, seed)
    rows = []
    for features in tqdm(feature_sets, desc="probes", mininterval=2):
        x_fit, x_scored = features.extract(fit.images, fit.captions), features.extract(scored.images, scored.captions)
        rows += [{**r, "fit_images": len(fit), "scored_images": len(scored)}
                 for r in probe_rows(features, x_fit, x_scored, *views, resampling, config.l2)]
    return rows


# ------------------------------------------------------------------------------------------------------- report

_TITLES = {"attribute": "the judge's recognised value: probe accuracy", "correctness":
           "attribute correct (probe's value vs the caption's): accuracy", "defect": "the judge's severity: R$^2$"}


def plot_probes(rows: list[dict], path: str | Path) -> None:
    """One panel per kind of target: a bar per feature set for every target, 95% intervals, the baseline as a black
    tick over each group."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lpo.io import atomic_path
    names = list(dict.fromkeys(r["features"] for r in rows))
    families = list(dict.fromkeys(r["family"] for r in rows))
    maps = [plt.get_cmap(m) for m in ("Blues", "Oranges", "Greens", "Purples", "Greys")]
    colours = {}
    for family, cmap in zip(families, maps):
        members = [n for n in names if any(r["features"] == n and r["family"] == family for r in rows)]
        colours |= {n: cmap(0.45 + 0.5 * i / max(1, len(members) - 1)) for i, n in enumerate(members)}
    fig, axes = plt.subplots(1, len(KINDS), figsize=(6 * len(KINDS), 4.2))
    width = 0.8 / len(names)
    for ax, kind in zip(axes, KINDS):
        targets = list(dict.fromkeys(r["target"] for r in rows if r["kind"] == kind))
        for i, name in enumerate(names):
            rs = {r["target"]: r for r in rows if r["kind"] == kind and r["features"] == name}
            x = np.arange(len(targets)) - 0.4 + (i + 0.5) * width
            value = np.array([rs[t]["value"] for t in targets])
            error = np.abs(np.array([[rs[t]["low"], rs[t]["high"]] for t in targets]).T - value)
            ax.bar(x, value, width, yerr=np.nan_to_num(error), color=colours[name], label=name,
                   error_kw={"lw": 0.6})
        first = {r["target"]: r["baseline"] for r in rows if r["kind"] == kind and r["features"] == names[0]}
        ax.hlines([first[t] for t in targets], np.arange(len(targets)) - 0.42, np.arange(len(targets)) + 0.42,
                  color="black", lw=1.4, label="baseline")
        ax.set_xticks(np.arange(len(targets)), targets, fontsize=8)
        ax.set_title(_TITLES[kind], fontsize=10)
        if kind == "defect":
            ax.axhline(0, color="gray", lw=0.8)
            ax.set_ylim(max(-0.5, min(-0.05, ax.get_ylim()[0])), 1)
        else:
            ax.set_ylim(0, 1.02)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _fmt(value: float, low: float, high: float) -> str:
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _table(rows: list[dict], kind: str) -> str:
    """A row per feature set (and one for the baseline), a column per target."""
    from lpo.tables import markdown
    rs = [r for r in rows if r["kind"] == kind]
    targets = list(dict.fromkeys(r["target"] for r in rs))
    names = list(dict.fromkeys(r["features"] for r in rs))
    cell = {(r["features"], r["target"]): r for r in rs}
    table = [{"features": n, "dim": cell[n, targets[0]]["dim"],
              **{t: _fmt(cell[n, t]["value"], cell[n, t]["low"], cell[n, t]["high"]) for t in targets}}
             for n in names]
    first = {t: cell[names[0], t] for t in targets}
    table.append({"features": "baseline" if kind != "defect" else "baseline (fitting mean)", "dim": "",
                  **{t: _fmt(first[t]["baseline"], first[t]["baseline_low"], first[t]["baseline_high"])
                     for t in targets}})
    extra = {"attribute": ("classes", "classes", "{}"), "correctness": ("judge_correct", "judge: share correct",
             "{:.3f}"), "defect": ("target_std", "judge: severity std", "{:.3f}")}[kind]
    table.append({"features": extra[1], "dim": "", **{t: extra[2].format(first[t][extra[0]]) for t in targets}})
    return markdown(table)


def above_baseline(rows: list[dict], kind: str, features: str) -> list[str]:
    """Targets of `kind` whose probe on `features` beats the baseline: the paired gain's interval above 0."""
    return [r["target"] for r in rows if r["kind"] == kind and r["features"] == features and r["gain_low"] > 0]


def conclusions(rows: list[dict]) -> list[str]:
    """The reading rules, fixed before any number: a feature set holds a target when its probe's paired gain over
    the baseline has a 95% interval above 0. The LRM's features hold enough for its task when, at its lowest probed
    timestep, they hold at least half of the correctness targets and at least half of the defects (the two halves
    of the judge's overall preference: alignment and aesthetic)."""
    def count(features: str, kind: str) -> tuple[list[str], int]:
        return above_baseline(rows, kind, features), len({r["target"] for r in rows if r["kind"] == kind})

    def held(features: str) -> str:
        parts = []
        for kind, what in (("attribute", "values"), ("correctness", "correctness"), ("defect", "defects")):
            targets, total = count(features, kind)
            parts.append(f"{what} {len(targets)}/{total} ({', '.join(targets) or 'none'})")
        return "; ".join(parts)

    def timesteps(family: str) -> list[int]:
        return sorted({r["timestep"] for r in rows if r["family"] == family and r["timestep"] != ""})

    lines = []
    for family in dict.fromkeys(r["family"] for r in rows):
        ts = timesteps(family)
        names = [f"{family} t={t}" for t in dict.fromkeys([ts[0], ts[-1]])] if ts else [family]
        lines += [f"- **{name}** beats the baseline on {held(name)}." for name in names]
    if timesteps("LRM"):
        lowest = f"LRM t={timesteps('LRM')[0]}"
        enough = all(2 * len(count(lowest, kind)[0]) >= count(lowest, kind)[1] for kind in ("correctness", "defect"))
        lines.append("- **Verdict:** " + (
            f"the information is in the LRM's features at {lowest}: a reward model of them that stays near chance "
            f"fails in training, not for want of information." if enough else
            f"the LRM's features at {lowest} lack much of what the judge sees: a reward model of them is short of "
            f"information whatever its training; the other feature sets say whether the base model's features or "
            f"the world-CLIP's hold it."))
    shared = sorted(set(timesteps("LRM")) & set(timesteps("base UNet mid")))
    if shared:
        def mean_gain(family, t):
            return np.mean([r["gain"] for r in rows if r["features"] == f"{family} t={t}" and r["kind"] == "attribute"])
        diffs = ", ".join(f"t={t}: {mean_gain('LRM', t) - mean_gain('base UNet mid', t):+.3f}" for t in shared)
        lines.append(f"- **What LRM training changed** (mean gain over the baseline across attribute values, LRM "
                     f"minus base UNet mid; the LRM's vector is multi-scale and wider): {diffs}.")
    return lines


def describe_device(device: torch.device | str) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"


def write_probe_report(out_dir: str | Path, world: str, rows: list[dict], device: str) -> None:
    """probes.md and probes.csv (the plot, probes.png, is written beside them by plot_probes)."""
    from datetime import date

    from lpo.io import atomic_path
    from lpo.tables import write_csv
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "probes.csv", rows)
    fit, scored = rows[0]["fit_images"], rows[0]["scored_images"]
    text = "\n".join([
        f"# Feature probes of the {world} world", "",
        f"Generated by `snakemake` (rule `reward_probes`) on {date.today().isoformat()}, device: "
        f"{device}. Linear probes on frozen features predict what the judge sees in an image; they are fitted on "
        f"{fit} distinct images of the train split and scored on {scored} distinct images of validation_unique + "
        f"test_unique (prompts no probe saw). Features: the trained LRM's pooled multi-scale vector (its visual "
        f"projection's input, VFE included) and the base UNet's mean-pooled mid block, both of the VAE latent noised "
        f"to timestep t with the same seeded noise and conditioned on the caption, and the world-CLIP's image "
        f"features when given. Attribute values: multinomial logistic regression (L-BFGS, L2); defect severities: "
        f"ridge; features standardised with the fitting images' statistics. Intervals are 95% bootstrap intervals "
        f"resampling held-out prompts.", "",
        "![probe accuracy and R^2](probes.png)", "",
        "## What to conclude", "",
        "A target a linear probe recovers from frozen features is information those features hold; if a reward "
        "model built on them still ranks pairs near chance, its training fails to use it. A target no probe "
        "recovers is missing from the features, and no training of the head alone would find it. The diffusion "
        "features are conditioned on the caption, so a value probe may echo the caption instead of reading the "
        "image: the correctness rows catch that (a probe that echoes the caption says every attribute is correct, "
        "and scores the judge's share of correct attributes, the baseline). Where the judge finds nearly every "
        "attribute as prompted, that baseline is hard to beat: each error of the value probe flips a correctness "
        "call, so correctness below the baseline with value accuracy well above its own says the information is "
        "there but not sharp enough to find the rare wrong attribute.", "",
        *conclusions(rows), "",
        "## The judge's recognised attribute values (probe accuracy)", "",
        "Baseline: the fitting images' majority class.", "", _table(rows, "attribute"), "",
        "## Attribute correctness (the probe's value against the caption's, accuracy)", "",
        "Whether the judge finds each attribute as the caption asks, predicted by comparing the value probe's "
        "prediction with the caption. Baseline: the fitting images' majority (correct or not).", "",
        _table(rows, "correctness"), "",
        "## Defect severities (R^2 of ridge probes)", "",
        "Baseline: the fitting images' mean severity (R^2 about the held-out mean, so at or below 0). A defect whose "
        "severity barely varies (small std) has an R^2 that says little.", "", _table(rows, "defect"), ""])
    with atomic_path(out / "probes.md") as tmp:
        tmp.write_text(text)
