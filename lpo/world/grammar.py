"""The Shapes world's prompt grammar: scenes, their prompts, and the held-out combinations.

A scene fixes one value of every attribute. Held-out scenes are those whose (colour, shape) pair is in
a seeded held-out set; they appear in no training data, so evaluating on them measures composition.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

import numpy as np

ATTRIBUTES = ("size", "color", "shape", "background", "position")

# The renderer knows how to draw exactly these values; a vocabulary may use any subset.
COLORS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 60),
    "cyan": (40, 200, 210), "blue": (40, 80, 220), "purple": (140, 50, 190), "pink": (240, 120, 190),
}
BACKGROUNDS = {"gray": (128, 128, 128), "white": (235, 235, 235), "black": (20, 20, 20), "brown": (110, 70, 40)}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
POSITIONS = ("left", "right", "top", "bottom", "center")
SIZES = ("small", "large")
KNOWN = {"color": tuple(COLORS), "background": tuple(BACKGROUNDS), "shape": SHAPES, "position": POSITIONS,
         "size": SIZES}

_POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "center": "in the center"}


@dataclass(frozen=True, order=True)
class Scene:
    size: str
    color: str
    shape: str
    background: str
    position: str

    @property
    def prompt(self) -> str:
        return f"a {self.size} {self.color} {self.shape} on a {self.background} background, " \
               f"{_POSITION_PHRASE[self.position]}"

    def replace(self, attribute: str, value: str) -> "Scene":
        return Scene(**{**self.as_dict(), attribute: value})

    def as_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Vocabulary:
    sizes: tuple[str, ...] = SIZES
    colors: tuple[str, ...] = tuple(COLORS)
    shapes: tuple[str, ...] = SHAPES
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    positions: tuple[str, ...] = POSITIONS

    def __post_init__(self):
        for attribute in ATTRIBUTES:
            values = self.values(attribute)
            key = f"world.vocabulary.{attribute_plural(attribute)}"
            if not values:
                raise ValueError(f"{key} is empty: list at least one of {', '.join(KNOWN[attribute])}")
            unknown = [v for v in values if v not in KNOWN[attribute]]
            if unknown:
                raise ValueError(f"{key} has unknown value(s) {unknown}: the renderer draws only "
                                 f"{', '.join(KNOWN[attribute])}")
            if len(set(values)) != len(values):
                raise ValueError(f"{key} lists a value twice: {list(values)}")

    @classmethod
    def from_dict(cls, d: dict) -> "Vocabulary":
        unknown = set(d) - {attribute_plural(a) for a in ATTRIBUTES}
        if unknown:
            raise ValueError(f"unknown key(s) in world.vocabulary: {sorted(unknown)}")
        return cls(**{k: tuple(v) for k, v in d.items()})

    def values(self, attribute: str) -> tuple[str, ...]:
        return getattr(self, attribute_plural(attribute))


def attribute_plural(attribute: str) -> str:
    return {"size": "sizes", "color": "colors", "shape": "shapes", "background": "backgrounds",
            "position": "positions"}[attribute]


class Grammar:
    """All scenes of a vocabulary, split into seen and held-out by (colour, shape) pair."""

    def __init__(self, vocabulary: Vocabulary, heldout_pairs: int, seed: int):
        self.vocabulary = vocabulary
        pairs = list(itertools.product(vocabulary.colors, vocabulary.shapes))
        if not 0 <= heldout_pairs < len(pairs):
            raise ValueError(f"world.heldout_pairs={heldout_pairs} must be in [0, {len(pairs) - 1}] "
                             f"for {len(vocabulary.colors)} colours x {len(vocabulary.shapes)} shapes")
        self.heldout_pairs = self._draw_heldout(pairs, heldout_pairs, np.random.default_rng(seed))
        self._by_prompt = {scene.prompt: scene for scene in self.scenes()}

    @staticmethod
    def _draw_heldout(pairs, n, rng) -> frozenset:
        # Hold pairs out only while every colour and every shape stays seen in some other pair, so a held-out
        # prompt composes known words rather than asking for a word never trained on.
        held: set = set()
        for i in rng.permutation(len(pairs)):
            if len(held) == n:
                break
            candidate = held | {pairs[i]}
            seen = [p for p in pairs if p not in candidate]
            if {c for c, _ in seen} == {c for c, _ in pairs} and {s for _, s in seen} == {s for _, s in pairs}:
                held = candidate
        if len(held) < n:
            raise ValueError(f"world.heldout_pairs={n} is too many: the seeded draw held out {len(held)} (colour, "
                             f"shape) pairs before every further pair would remove a colour or shape from the "
                             f"training data; lower it")
        return frozenset(held)

    def scenes(self) -> list[Scene]:
        v = self.vocabulary
        return [Scene(*s) for s in itertools.product(v.sizes, v.colors, v.shapes, v.backgrounds, v.positions)]

    def is_heldout(self, scene: Scene) -> bool:
        return (scene.color, scene.shape) in self.heldout_pairs

    def seen_scenes(self) -> list[Scene]:
        return [s for s in self.scenes() if not self.is_heldout(s)]

    def heldout_scenes(self) -> list[Scene]:
        return [s for s in self.scenes() if self.is_heldout(s)]

    def parse(self, prompt: str) -> Scene:
        """Invert Scene.prompt; raises ValueError naming the prompt when it is not in the grammar."""
        try:
            return self._by_prompt[prompt]
        except KeyError:
            raise ValueError(f"prompt {prompt!r} is not a sentence of this world's grammar") from None
