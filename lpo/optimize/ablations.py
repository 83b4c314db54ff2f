"""The cheap LPO ablations of the paper, as variants of the `lpo` config section: sampling thresholds ([FT] Table
10), beta (Table 23), the LRM's input timestep (Table 22) and the optimised timestep range (Table 9).

Every variant, the default settings included ("reference"), trains for `lpo_ablations.rounds` rounds, so each
ablation table compares runs of one budget. Torch-free: the Snakefile imports it to name the runs.
"""
from __future__ import annotations

from dataclasses import dataclass

TABLES = {"threshold": "[FT] Table 10", "beta": "[FT] Table 23", "lrm_timestep": "[FT] Table 22",
          "timestep_range": "[FT] Table 9"}
REFERENCE = "reference"
# The one prompt set the ablation runs are sampled and scored on: their tables and claims C5/C6 read it, so the
# held-out set's third of the sampling would be computed for nothing.
PROMPT_SET = "eval_seen"


@dataclass(frozen=True)
class LPOAblationConfig:
    rounds: int = 40
    # [min, max]: equal values are a constant threshold, others the dynamic (sigma) schedule.
    thresholds: tuple = ((0.3, 0.3), (0.4, 0.4), (0.5, 0.5), (0.6, 0.6), (0.3, 0.45), (0.35, 0.5), (0.4, 0.55))
    betas: tuple = (20.0, 100.0, 500.0, 1000.0, 5000.0)
    lrm_timesteps: tuple = ("parent", "zero")
    timestep_ranges: tuple = ((0, 200), (250, 450), (500, 700), (750, 950), (0, 450), (0, 700), (0, 950))

    def __post_init__(self):
        from lpo.optimize.methods import LRM_TIMESTEPS
        from lpo.optimize.threshold import check_threshold
        if self.rounds < 1:
            raise ValueError(f"lpo_ablations.rounds={self.rounds} must be >= 1")
        for pair in self.thresholds:
            if len(pair) != 2:
                raise ValueError(f"lpo_ablations.thresholds: {list(pair)} must be [min, max]")
            check_threshold("constant" if pair[0] == pair[1] else "sigma", *pair)
        if any(b <= 0 for b in self.betas):
            raise ValueError(f"lpo_ablations.betas={list(self.betas)} must all be > 0")
        unknown = set(self.lrm_timesteps) - set(LRM_TIMESTEPS)
        if unknown:
            raise ValueError(f"lpo_ablations.lrm_timesteps: {sorted(unknown)} not in {', '.join(LRM_TIMESTEPS)}")
        for pair in self.timestep_ranges:
            if len(pair) != 2 or pair[0] > pair[1]:
                raise ValueError(f"lpo_ablations.timestep_ranges: {list(pair)} must be [low, high], low <= high")


def _threshold_override(pair, lpo: dict) -> dict:
    low, high = pair
    if low == high:
        return {"threshold": "constant", "threshold_min": low, "threshold_max": high}
    strategy = lpo["threshold"] if lpo["threshold"] != "constant" else "sigma"
    return {"threshold": strategy, "threshold_min": low, "threshold_max": high}


def _label(table: str, value) -> str:
    if table == "threshold":
        return f"th{value[0]:g}" if value[0] == value[1] else f"th{value[0]:g}-{value[1]:g}"
    if table == "beta":
        return f"beta{value:g}"
    if table == "lrm_timestep":
        return f"lrmt-{value}"
    return f"t{value[0]}-{value[1]}"


def ablation_variants(lpo: dict, ablations: dict) -> dict[str, dict]:
    """{run name: {"settings": the full lpo section of the run, "rows": [(table, value), ...]}}.

    A value that reproduces the default settings is the shared "reference" run; other runs are named after their
    value (e.g. beta100, th0.3, th0.3-0.45, lrmt-zero, t0-200)."""
    values = {"threshold": [tuple(p) for p in ablations["thresholds"]],
              "beta": [float(b) for b in ablations["betas"]],
              "lrm_timestep": list(ablations["lrm_timesteps"]),
              "timestep_range": [tuple(r) for r in ablations["timestep_ranges"]]}
    base = {**lpo, "rounds": ablations["rounds"], "timestep_range": list(lpo["timestep_range"])}
    runs: dict[str, dict] = {}
    for table, options in values.items():
        for value in options:
            override = {"threshold": lambda v: _threshold_override(v, lpo), "beta": lambda v: {"beta": v},
                        "lrm_timestep": lambda v: {"lrm_timestep": v},
                        "timestep_range": lambda v: {"timestep_range": list(v)}}[table](value)
            settings = {**base, **override}
            same = all(_same(settings[k], base[k]) for k in override)
            name = REFERENCE if same else _label(table, value)
            run = runs.setdefault(name, {"settings": base if same else settings, "rows": []})
            run["rows"].append((table, value))
    # Every ablation table gets the default settings' row, trained at the same budget, to compare against.
    defaults = {"threshold": (lpo["threshold_min"], lpo["threshold_max"]), "beta": float(lpo["beta"]),
                "lrm_timestep": lpo["lrm_timestep"], "timestep_range": tuple(lpo["timestep_range"])}
    tables = {table for run in runs.values() for table, _ in run["rows"]}
    if tables:
        reference = runs.setdefault(REFERENCE, {"settings": base, "rows": []})
        reference["rows"] += [(t, defaults[t]) for t in TABLES if t in tables
                              and (t, defaults[t]) not in reference["rows"]]
    return runs


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)):
        return list(a) == list(b)
    return a == b
