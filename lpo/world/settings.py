"""The `world` and `prompts` sections of the config: which scenes exist and how prompts split into sets."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lpo.world.grammar import Grammar, Vocabulary

PROMPT_SETS = ("train", "validation_unique", "test_unique", "eval_seen", "eval_heldout")


@dataclass(frozen=True)
class WorldConfig:
    name: str = "shapes"
    image_size: int = 32
    heldout_pairs: int = 5
    vocabulary: Vocabulary = field(default_factory=Vocabulary)

    def grammar(self, seed: int) -> Grammar:
        return Grammar(self.vocabulary, self.heldout_pairs, seed)


@dataclass(frozen=True)
class PromptsConfig:
    train: int | None = None        # None: every seen scene not in validation_unique / test_unique
    validation_unique: int = 100
    test_unique: int = 100
    eval_seen: int | None = None    # the first validation_unique prompts; None: all of them
    eval_heldout: int = 100


def make_prompt_sets(grammar: Grammar, config: PromptsConfig, seed: int) -> dict[str, list[str]]:
    """Split the seen scenes into train / validation_unique / test_unique prompts (disjoint, like Pick-a-Pic's
    splits); evaluation uses the validation_unique prompts (as the paper does) plus held-out combinations."""
    rng = np.random.default_rng(seed)
    seen = grammar.seen_scenes()
    seen = [seen[i] for i in rng.permutation(len(seen))]
    heldout = grammar.heldout_scenes()
    check_prompt_counts(config, len(seen), len(heldout))
    heldout = [heldout[i] for i in rng.permutation(len(heldout))[:config.eval_heldout]]
    n_val, n_test = config.validation_unique, config.test_unique
    val, test, train = seen[:n_val], seen[n_val:n_val + n_test], seen[n_val + n_test:]
    sets = {"train": train[:config.train], "validation_unique": val, "test_unique": test,
            "eval_seen": val[:config.eval_seen], "eval_heldout": heldout}
    return {name: [s.prompt for s in scenes] for name, scenes in sets.items()}


def check_prompt_counts(config: PromptsConfig, seen: int, heldout: int) -> None:
    """ValueError naming the first prompt set that asks for more prompts than the world has (`seen` and `heldout`
    scenes): the sets are slices of those scenes, so a larger size would otherwise be cut silently."""
    n_val, n_test = config.validation_unique, config.test_unique
    if n_val < 1 or n_test < 1 or n_val + n_test >= seen:
        raise ValueError(f"prompts.validation_unique={n_val} and prompts.test_unique={n_test} must be >= 1 and "
                         f"leave training prompts among the {seen} seen scenes (together at most {seen - 1}): "
                         f"lower them or widen world.vocabulary")
    left = seen - n_val - n_test
    if config.train is not None and not 1 <= config.train <= left:
        raise ValueError(f"prompts.train={config.train} must be in [1, {left}], the seen scenes left after "
                         f"validation_unique and test_unique: lower it, or null for all of them")
    if config.eval_seen is not None and not 1 <= config.eval_seen <= n_val:
        raise ValueError(f"prompts.eval_seen={config.eval_seen} must be in [1, prompts.validation_unique={n_val}]: "
                         f"lower it, or null for all of them")
    if not 1 <= config.eval_heldout <= heldout:
        raise ValueError(f"prompts.eval_heldout={config.eval_heldout} must be in [1, {heldout}], the world's held-out "
                         f"prompts: lower it, or raise world.heldout_pairs (each held-out (colour, shape) pair adds "
                         f"one prompt per size, background and position)")


def stage_world(stage) -> WorldConfig:
    """The `world` section of a stage's --params (lpo.stage.Stage)."""
    return stage.section("world", WorldConfig)


def stage_grammar(stage):
    """The world's grammar, seeded as every stage seeds it."""
    return stage_world(stage).grammar(stage.seed_for("grammar"))
