"""The base model's training corpus: (image, caption) pairs with realistic imperfection.

Some images carry defects and some captions get one attribute wrong, so the base model trained on it is good but
clearly imperfect. Only seen scenes are drawn, and a wrong caption is a seen scene too: held-out (colour, shape)
pairs appear nowhere in the corpus.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from lpo.io import atomic_path, load_or_explain, read_json, require_exists
from lpo.world.grammar import ATTRIBUTES, Grammar, Scene
from lpo.world.render import DEFECTS, random_defects, render

_IMAGES = "images.npy"
_META = "meta.json"


@dataclass(frozen=True)
class CorpusConfig:
    images: int = 20000
    defect_rate: float = 0.3  # share of images carrying 1..max_defects defects
    max_defects: int = 2
    caption_error_rate: float = 0.15  # share of captions with one attribute replaced by another value of it

    def __post_init__(self):
        if isinstance(self.images, bool) or not isinstance(self.images, int) or self.images < 1:
            raise ValueError(f"corpus.images={self.images!r} must be an integer >= 1")
        for key in ("defect_rate", "caption_error_rate"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"corpus.{key}={getattr(self, key)!r} must be in [0, 1]")
        if not 1 <= self.max_defects <= len(DEFECTS):
            raise ValueError(f"corpus.max_defects={self.max_defects!r} must be in [1, {len(DEFECTS)}]")


@dataclass
class Corpus:
    images: np.ndarray  # uint8 (N, H, W, 3)
    captions: list[str]  # what the caption says (sometimes wrong)
    scenes: list[Scene]  # what was drawn
    defects: np.ndarray  # float32 (N, len(DEFECTS)) severities, 0 = absent

    def save(self, path) -> None:
        meta = {"captions": self.captions, "scenes": [s.as_dict() for s in self.scenes],
                "defect_names": list(DEFECTS), "defects": self.defects.tolist()}
        with atomic_path(path) as tmp:
            tmp.mkdir()
            np.save(tmp / _IMAGES, self.images)
            (tmp / _META).write_text(json.dumps(meta, sort_keys=True))

    @classmethod
    def load(cls, path) -> "Corpus":
        path = require_exists(path, "base-model corpus", "run the `world corpus` stage to build it")
        for name in (_IMAGES, _META):
            require_exists(path / name, f"corpus file {name}",
                           "the corpus is incomplete; run the `world corpus` stage again")
        again = "run the `world corpus` stage again (`snakemake ... --forcerun world_corpus`)"
        meta = read_json(path / _META, "the corpus's captions and defects", again)
        if meta["defect_names"] != list(DEFECTS):
            raise ValueError(f"corpus at '{path}' lists defects {meta['defect_names']}, this code knows "
                             f"{list(DEFECTS)}: run the `world corpus` stage again")
        return cls(images=load_or_explain(path / _IMAGES, "the corpus's images", again, np.load),
                   captions=meta["captions"], scenes=[Scene(**s) for s in meta["scenes"]],
                   defects=np.array(meta["defects"], dtype=np.float32).reshape(-1, len(DEFECTS)))

    def __len__(self) -> int:
        return len(self.captions)


def build_corpus(grammar: Grammar, config: CorpusConfig, image_size: int, seed: int) -> Corpus:
    rng = np.random.default_rng(seed)
    seen = grammar.seen_scenes()
    n = config.images
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    defects = np.zeros((n, len(DEFECTS)), dtype=np.float32)
    scenes, captions = [], []
    for i in tqdm(range(n), desc="rendering corpus", unit="img"):
        scene = seen[rng.integers(len(seen))]
        drawn = random_defects(rng, config.max_defects) if rng.random() < config.defect_rate else {}
        caption = _wrong_caption(grammar, scene, rng) if rng.random() < config.caption_error_rate else scene
        images[i] = render(scene, rng, image_size, drawn)
        defects[i] = [drawn.get(name, 0.0) for name in DEFECTS]
        scenes.append(scene)
        captions.append(caption.prompt)
    return Corpus(images=images, captions=captions, scenes=scenes, defects=defects)


def _wrong_caption(grammar: Grammar, scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene with one attribute replaced by another value, chosen among replacements that stay seen."""
    options = {}
    for attribute in ATTRIBUTES:
        swaps = [scene.replace(attribute, v) for v in grammar.vocabulary.values(attribute)
                 if v != getattr(scene, attribute)]
        swaps = [s for s in swaps if not grammar.is_heldout(s)]
        if swaps:
            options[attribute] = swaps
    if not options:
        raise ValueError(f"corpus.caption_error_rate > 0 but no attribute of {scene.prompt!r} can be changed "
                         f"to give another seen scene: widen world.vocabulary or set it to 0")
    swaps = options[list(options)[rng.integers(len(options))]]
    return swaps[rng.integers(len(swaps))]
