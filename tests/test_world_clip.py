"""The world-CLIP on a tiny corpus: its contrastive loss falls, it learns to tell a render's caption from a caption
with one attribute changed, it saves and loads exactly, trains reproducibly and resumes after a kill."""
import dataclasses

import numpy as np
import pytest
import torch
from kills import killed_at_call

from lpo.world import clip as clip_module
from lpo.world.clip import WorldCLIP, WorldCLIPConfig, train_world_clip
from lpo.world.corpus import CorpusConfig, build_corpus
from lpo.world.grammar import Grammar, Vocabulary
from lpo.world.tokenizer import build_clip_tokenizer

SIZE = 16
GRAMMAR = Grammar(Vocabulary(colors=("red", "blue", "green"), shapes=("circle", "square", "cross")), heldout_pairs=0,
                  seed=0)
TINY = WorldCLIPConfig(steps=150, batch_size=64, learning_rate=3e-3, warmup_steps=10, checkpoint_every=2, width=8,
                       embed_dim=16, text_width=16, text_layers=1, text_heads=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    build_clip_tokenizer(root / "tokenizer")
    corpus = build_corpus(GRAMMAR, CorpusConfig(images=600, defect_rate=0.0, caption_error_rate=0.0), SIZE, seed=0)
    return root / "tokenizer", corpus


@pytest.fixture(scope="module")
def trained(data):
    tokenizer, corpus = data
    return train_world_clip(corpus.images, corpus.captions, tokenizer, TINY, seed=0)


def test_loss_falls_and_it_tells_the_right_caption_from_a_changed_one(data, trained):
    _, corpus = data
    model, metrics = trained
    curve = [loss for _, loss in metrics["loss_curve"]]
    assert curve[-1] < 0.7 * curve[0]
    assert metrics["heldout_loss"] < curve[0]
    rng = np.random.default_rng(1)
    right, wrong = [], []
    for scene in corpus.scenes[:200]:
        attribute = str(rng.choice(["color", "shape"]))
        other = [v for v in GRAMMAR.vocabulary.values(attribute) if v != getattr(scene, attribute)]
        right.append(scene.prompt)
        wrong.append(scene.replace(attribute, str(rng.choice(other))).prompt)
    images = corpus.images[:200]
    # Chance is 0.5: the tower must have learnt colour and shape from the captions alone.
    assert np.mean(model.score(images, right) > model.score(images, wrong)) > 0.7


def test_save_then_load_gives_identical_scores(data, trained, tmp_path):
    _, corpus = data
    model, _ = trained
    model.save(tmp_path / "clip")
    loaded = WorldCLIP.load(tmp_path / "clip")
    captions = corpus.captions[:16]
    assert np.array_equal(loaded.score(corpus.images[:16], captions), model.score(corpus.images[:16], captions))
    assert loaded.architecture == model.architecture


def test_kill_then_rerun_resumes_and_ends_with_the_same_weights(data, tmp_path):
    tokenizer, corpus = data
    config = dataclasses.replace(TINY, steps=6)
    whole, _ = train_world_clip(corpus.images, corpus.captions, tokenizer, config, seed=3)
    with killed_at_call(clip_module, "contrastive_loss", 4):  # after the checkpoint of step 2
        train_world_clip(corpus.images, corpus.captions, tokenizer, config, seed=3, out=tmp_path / "clip")
    assert (tmp_path / "clip.ckpt").exists() and not (tmp_path / "clip").exists()
    resumed, metrics = train_world_clip(corpus.images, corpus.captions, tokenizer, config, seed=3,
                                        out=tmp_path / "clip")
    assert metrics["resumed_from_step"] == 2 and not (tmp_path / "clip.ckpt").exists()
    a = whole.state_dict()
    for b in (resumed.state_dict(), WorldCLIP.load(tmp_path / "clip").state_dict()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    other, _ = train_world_clip(corpus.images, corpus.captions, tokenizer, config, seed=4)
    assert not all(torch.equal(a[k], v) for k, v in other.state_dict().items())


def test_bad_input_gets_clear_errors(data, tmp_path):
    tokenizer, corpus = data
    with pytest.raises(FileNotFoundError, match="world clip"):
        WorldCLIP.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        train_world_clip(corpus.images[:2], corpus.captions[:1], tokenizer, TINY, seed=0)
    with pytest.raises(FileNotFoundError, match="world tokenizer"):
        train_world_clip(corpus.images, corpus.captions, tmp_path / "no-tokenizer", TINY, seed=0)
    with pytest.raises(ValueError, match="world_clip.text_width"):
        WorldCLIPConfig(text_width=10, text_heads=4)
