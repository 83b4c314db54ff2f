import math

import numpy as np
import pytest

from lpo.world.corpus import Corpus, CorpusConfig, build_corpus
from lpo.world.grammar import ATTRIBUTES, Grammar, Vocabulary
from lpo.world.render import DEFECTS

# 3 of 9 (colour, shape) pairs held out, so an unguarded wrong caption would often name a held-out scene.
VOCABULARY = Vocabulary(colors=("red", "blue", "green"), shapes=("circle", "square", "cross"))
GRAMMAR = Grammar(VOCABULARY, heldout_pairs=3, seed=0)


def build(images=200, seed=0, size=16, **rates):
    return build_corpus(GRAMMAR, CorpusConfig(images=images, **rates), image_size=size, seed=seed)


def within_binomial(share, rate, n):
    return abs(share - rate) <= 4 * math.sqrt(rate * (1 - rate) / n) + 1e-9


def test_sizes_and_dtypes():
    corpus = build(images=50, size=32)
    assert corpus.images.shape == (50, 32, 32, 3) and corpus.images.dtype == np.uint8
    assert corpus.defects.shape == (50, len(DEFECTS)) and corpus.defects.dtype == np.float32
    assert len(corpus.captions) == len(corpus.scenes) == len(corpus) == 50


def test_no_heldout_scene_in_scenes_or_captions():
    corpus = build(images=400, caption_error_rate=1.0)
    assert not any(GRAMMAR.is_heldout(s) for s in corpus.scenes)
    assert not any(GRAMMAR.is_heldout(GRAMMAR.parse(c)) for c in corpus.captions)


def test_wrong_captions_change_exactly_one_attribute_at_the_configured_rate():
    n, rate = 1500, 0.15
    corpus = build(images=n, caption_error_rate=rate)
    said = [GRAMMAR.parse(c) for c in corpus.captions]
    changed = [sum(getattr(a, k) != getattr(b, k) for k in ATTRIBUTES) for a, b in zip(said, corpus.scenes)]
    assert set(changed) == {0, 1}
    assert within_binomial(np.mean(changed), rate, n)
    wrong = {k for a, b in zip(said, corpus.scenes) for k in ATTRIBUTES if getattr(a, k) != getattr(b, k)}
    assert wrong == set(ATTRIBUTES)


def test_defects_at_the_configured_rate():
    n, rate = 1500, 0.3
    corpus = build(images=n, defect_rate=rate, max_defects=2)
    count = (corpus.defects > 0).sum(axis=1)
    assert within_binomial((count > 0).mean(), rate, n)
    assert count.max() == 2
    present = corpus.defects[corpus.defects > 0]
    assert present.min() >= 0.4 and present.max() <= 1.0
    assert (corpus.defects > 0).any(axis=0).all()  # every defect type occurs


def test_defect_free_corpus_is_clean():
    corpus = build(images=100, defect_rate=0.0, caption_error_rate=0.0)
    assert not corpus.defects.any()
    assert corpus.captions == [s.prompt for s in corpus.scenes]


def test_scenes_cover_the_seen_set():
    corpus = build(images=1500)
    assert set(corpus.scenes) == set(GRAMMAR.seen_scenes())


def test_save_load_round_trip(tmp_path):
    corpus = build(images=60)
    corpus.save(tmp_path / "corpus")
    loaded = Corpus.load(tmp_path / "corpus")
    np.testing.assert_array_equal(loaded.images, corpus.images)
    np.testing.assert_array_equal(loaded.defects, corpus.defects)
    assert loaded.defects.dtype == np.float32
    assert loaded.captions == corpus.captions and loaded.scenes == corpus.scenes
    corpus.save(tmp_path / "corpus")  # overwriting an existing corpus works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_same_seed_gives_identical_files(tmp_path):
    for name in ("a", "b"):
        build(images=80, seed=4).save(tmp_path / name)
    build(images=80, seed=5).save(tmp_path / "c")
    for file in ("images.npy", "meta.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    assert (tmp_path / "a" / "images.npy").read_bytes() != (tmp_path / "c" / "images.npy").read_bytes()


def test_missing_corpus_names_path_and_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*world corpus"):
        Corpus.load(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="images.npy"):
        Corpus.load(tmp_path / "half")


@pytest.mark.parametrize("overrides, key", [
    ({"images": 0}, "corpus.images"), ({"images": 2.5}, "corpus.images"), ({"defect_rate": 1.5}, "corpus.defect_rate"),
    ({"caption_error_rate": -0.1}, "corpus.caption_error_rate"), ({"max_defects": 0}, "corpus.max_defects")])
def test_config_validation_names_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        CorpusConfig(**overrides)


def test_single_scene_world_cannot_have_wrong_captions():
    tiny = Vocabulary(sizes=("small",), colors=("red",), shapes=("circle",), backgrounds=("gray",),
                      positions=("left",))
    grammar = Grammar(tiny, heldout_pairs=0, seed=0)
    assert len(build_corpus(grammar, CorpusConfig(images=5, caption_error_rate=0.0), 16, 0)) == 5
    with pytest.raises(ValueError, match="caption_error_rate"):
        build_corpus(grammar, CorpusConfig(images=5, caption_error_rate=1.0), 16, 0)
