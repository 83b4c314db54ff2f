import numpy as np
import pytest
import torch

from lpo.world.corpus import Corpus
from lpo.world.grammar import ATTRIBUTES, Grammar, Scene, Vocabulary
from lpo.world.render import DEFECTS, render_batch
from lpo.world.side_scorers import SideScorerConfig, SideScorers, aesthetic_score, train_side_scorers

SIZE = 16
VOCAB = Vocabulary(sizes=("small", "large"), colors=("red", "blue", "yellow"), shapes=("circle", "square"),
                   backgrounds=("gray", "black"), positions=("left", "right", "center"))
QUICK = SideScorerConfig(clip_steps=150, vqa_steps=150, batch_size=64, learning_rate=5e-3, embed_dim=16)


@pytest.fixture(scope="module")
def grammar():
    return Grammar(VOCAB, heldout_pairs=0, seed=0)


def make_corpus(grammar, n, seed, wrong_rate=0.1) -> Corpus:
    """A tiny corpus like the real one: clean renders, a share of captions with one attribute wrong."""
    rng = np.random.default_rng(seed)
    scenes = [grammar.scenes()[i] for i in rng.integers(len(grammar.scenes()), size=n)]
    captions = [wrong(s, rng).prompt if rng.random() < wrong_rate else s.prompt for s in scenes]
    return Corpus(images=render_batch(scenes, rng, SIZE), captions=captions, scenes=scenes,
                  defects=np.zeros((n, len(DEFECTS)), np.float32))


def wrong(scene: Scene, rng: np.random.Generator) -> Scene:
    attribute = ATTRIBUTES[rng.integers(len(ATTRIBUTES))]
    others = [v for v in VOCAB.values(attribute) if v != getattr(scene, attribute)]
    return scene.replace(attribute, others[rng.integers(len(others))]) if others else wrong(scene, rng)


@pytest.fixture(scope="module")
def trained(grammar):
    torch.set_num_threads(1)
    return train_side_scorers(make_corpus(grammar, 1200, seed=0), grammar, QUICK, seed=0)


@pytest.mark.parametrize("defect", ["blur", "noise", "low_contrast"])
def test_aesthetic_is_lower_for_a_damaged_version_of_the_same_render(grammar, defect):
    scenes = grammar.scenes()
    clean = aesthetic_score(render_batch(scenes, np.random.default_rng(1), 32))
    # Same generator state: the renderer draws the clean geometry first, so only the defect differs.
    damaged = aesthetic_score(render_batch(scenes, np.random.default_rng(1), 32, [{defect: 0.6}] * len(scenes)))
    assert clean.shape == damaged.shape == (len(scenes),)
    assert ((clean >= 0) & (clean <= 10)).all()
    assert np.mean(damaged < clean) >= 0.95
    assert clean.mean() - damaged.mean() > 0.5


def test_clip_and_vqa_like_scores_prefer_matching_captions(grammar, trained):
    scorers, metrics = trained
    held = make_corpus(grammar, 300, seed=1, wrong_rate=0.0)
    rng = np.random.default_rng(2)
    right = scorers.score(held.images, held.captions)
    altered = scorers.score(held.images, [wrong(s, rng).prompt for s in held.scenes])
    for name in ("clipscore", "vqascore"):
        assert right[name].shape == (300,)
        assert right[name].mean() > altered[name].mean() + 0.1, name
        assert np.mean(right[name] > altered[name]) >= 0.75, name
    np.testing.assert_array_equal(right["aesthetic"], altered["aesthetic"])  # the prompt plays no part
    assert ((right["clipscore"] >= -1 - 1e-5) & (right["clipscore"] <= 1 + 1e-5)).all()
    assert ((right["vqascore"] >= 0) & (right["vqascore"] <= 1)).all()
    assert metrics["clipscore_pair_accuracy"] > 0.75 and metrics["vqascore_pair_accuracy"] > 0.75
    assert set(metrics["vqa_accuracy_truth"]) == set(ATTRIBUTES)


def test_unknown_words_are_ignored_by_the_text_tower(trained):
    scorers, _ = trained
    known = "a small red circle"
    texts = scorers.clip.encode_texts([known, f"{known} zebra", "zebra quokka"])
    torch.testing.assert_close(texts[0], texts[1])
    assert torch.equal(texts[2], torch.zeros_like(texts[2]))


def test_prompt_outside_the_grammar_is_rejected(trained):
    scorers, _ = trained
    with pytest.raises(ValueError, match="a purple cow"):
        scorers.score(np.zeros((1, SIZE, SIZE, 3), np.uint8), ["a purple cow"])


def test_save_and_load_round_trip(tmp_path, grammar, trained):
    scorers, _ = trained
    path = tmp_path / "out" / "side_scorers"
    scorers.save(path)
    loaded = SideScorers.load(path)
    held = make_corpus(grammar, 50, seed=3)
    a, b = scorers.score(held.images, held.captions), loaded.score(held.images, held.captions)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_load_of_a_missing_path_names_it(tmp_path):
    missing = tmp_path / "absent"
    with pytest.raises(FileNotFoundError, match="side-scorers") as err:
        SideScorers.load(missing)
    assert str(missing) in str(err.value)


def test_training_is_deterministic_for_a_seed(grammar):
    corpus = make_corpus(grammar, 64, seed=4)
    config = SideScorerConfig(clip_steps=3, vqa_steps=3, batch_size=16, embed_dim=8)
    scores = [train_side_scorers(corpus, grammar, config, seed=s)[0].score(corpus.images, corpus.captions)
              for s in (5, 5, 6)]
    for name in ("clipscore", "vqascore"):
        np.testing.assert_array_equal(scores[0][name], scores[1][name])
        assert not np.array_equal(scores[0][name], scores[2][name])
