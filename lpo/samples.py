"""A sample set: images a model generated for named prompt sets, with the seeds that made them.
Every method (base, LPO, SPO, Diffusion-DPO) is evaluated from one of these files."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lpo.io import atomic_path, load_or_explain, require_exists


@dataclass
class SampleSet:
    images: np.ndarray        # uint8 (N, H, W, 3)
    prompts: np.ndarray       # (N,) str
    prompt_set: np.ndarray    # (N,) str, e.g. "eval_seen" / "eval_heldout"
    prompt_index: np.ndarray  # (N,) index of the prompt within its set (the bootstrap's resampling unit)
    seeds: np.ndarray         # (N,) int

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **self.__dict__)

    @classmethod
    def load(cls, path: str | Path) -> "SampleSet":
        require_exists(path, "sample set", "run the `sample` stage (lpo sample) to generate it")
        return load_or_explain(path, "the sample archive", "re-run the rule that sampled it (`snakemake ... "
                               "--forcerun sample_base`, or sample_method / sd_sample for a method's samples)",
                               cls._read)

    @classmethod
    def _read(cls, path: Path) -> "SampleSet":
        with np.load(path, allow_pickle=False) as data:
            return cls(**{k: data[k] for k in ("images", "prompts", "prompt_set", "prompt_index", "seeds")})


def expand_prompt_sets(prompt_sets: dict[str, list[str]], names: list[str], images_per_prompt: int, seed: int):
    """Prompts repeated per image, with seeds fixed per (set, prompt, image) so every method sees the same noise."""
    prompts, set_names, index, seeds = [], [], [], []
    for s, name in enumerate(names):
        if name not in prompt_sets:
            raise KeyError(f"prompt set '{name}' not in the prompt file (has: {', '.join(prompt_sets)})")
        if not prompt_sets[name]:
            raise ValueError(f"prompt set '{name}' is empty: nothing to sample")
        for p, prompt in enumerate(prompt_sets[name]):
            for i in range(images_per_prompt):
                prompts.append(prompt)
                set_names.append(name)
                index.append(p)
                seeds.append(seed * 10_000_000 + s * 1_000_000 + p * images_per_prompt + i)
    return prompts, set_names, index, seeds
