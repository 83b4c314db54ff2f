"""The pixel reward model on tiny renders: fine-tuned from a world-CLIP (here an untrained one, so that nothing but
the pairs teaches it), it must learn a clean-over-blurred rule and a caption-colour rule from preference pairs, keep
its best validated weights, save, load and train reproducibly, and resume after a kill."""
import dataclasses
import logging
import math

import numpy as np
import pytest
import torch
from kills import killed_at_call
from test_preference_data import write_preferences

from lpo.reward import pixel as pixel_module
from lpo.reward.pixel import PixelReward, PixelRewardConfig, pixel_pair_accuracy, step_aware_copy, train_pixel_reward
from lpo.preference_data import PreferencePairs, load_pairs
from lpo.world.clip import LOGIT_SCALE_INIT, CLIPArchitecture, WorldCLIP, load_tokenizer
from lpo.world.grammar import Scene
from lpo.images import to_tensor
from lpo.world.render import render
from lpo.world.tokenizer import MAX_LENGTH, build_clip_tokenizer

SIZE = 16
TINY = PixelRewardConfig(steps=120, batch_size=32, learning_rate=3e-3, warmup_steps=10, validate_every=20)
ARCH = CLIPArchitecture(width=8, embed_dim=16, text_width=16, text_layers=1, text_heads=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixel")
    build_clip_tokenizer(root / "tokenizer")
    prefs = write_preferences(root / "prefs", image_size=SIZE,
                              sizes={"train": 128, "validation_unique": 32, "test_unique": 48})
    torch.manual_seed(0)
    return {"root": root, "tokenizer": root / "tokenizer", "clip": WorldCLIP(ARCH, load_tokenizer(root / "tokenizer")),
            **{split: load_pairs(prefs, split) for split in ("train", "validation_unique", "test_unique")}}


@pytest.fixture(scope="module")
def trained(world):
    return train_pixel_reward(world["train"], world["validation_unique"], world["clip"], TINY, seed=0)


def test_learns_that_clean_beats_blurred_on_held_out_pairs(world, trained):
    model, metrics = trained
    assert pixel_pair_accuracy(model, world["test_unique"]) >= 0.75  # chance is 0.5; float order varies by thread count
    assert metrics["best_validation_accuracy"] > metrics["validation_curve"][0]["accuracy"]
    assert metrics["loss_curve"][-1][1] < metrics["loss_curve"][0][1]


def test_keeps_the_best_validated_weights(world, trained):
    model, metrics = trained
    curve = {c["step"]: c["accuracy"] for c in metrics["validation_curve"]}
    assert list(curve) == [0, *range(TINY.validate_every, TINY.steps + 1, TINY.validate_every)]
    assert metrics["best_validation_accuracy"] == max(curve.values()) == curve[metrics["best_step"]]
    assert pixel_pair_accuracy(model, world["validation_unique"]) == pytest.approx(metrics["best_validation_accuracy"])


def colour_pairs(n: int, rng: np.random.Generator, split: str) -> PreferencePairs:
    """The render of the caption's colour beats the same scene in another colour: only a model that reads the
    caption can do better than chance."""
    captions, first, second, labels = [], [], [], []
    for _ in range(n):
        right, wrong = rng.choice(["red", "blue", "green", "yellow"], 2, replace=False)
        scene = Scene("large", str(right), str(rng.choice(["circle", "square"])), "gray", "center")
        good, bad = render(scene, rng, SIZE), render(scene.replace("color", str(wrong)), rng, SIZE)
        swap = bool(rng.random() < 0.5)
        first.append(bad if swap else good)
        second.append(good if swap else bad)
        captions.append(scene.prompt)
        labels.append(0.0 if swap else 1.0)
    return PreferencePairs(np.stack(first), np.stack(second), captions, np.array(labels), np.ones(n, np.int64),
                           np.arange(n), split, n)


def test_learns_a_rule_that_depends_on_the_caption(world):
    rng = np.random.default_rng(1)
    train, validation, test = (colour_pairs(n, rng, s) for n, s in ((96, "train"), (24, "val"), (48, "test")))
    config = dataclasses.replace(TINY, steps=40)
    model, _ = train_pixel_reward(train, validation, world["clip"], config, seed=0)
    assert pixel_pair_accuracy(model, test) >= 0.85


def test_score_is_scaled_cosine_and_padding_free(world):
    torch.manual_seed(0)
    model = PixelReward(TINY, ARCH, load_tokenizer(world["tokenizer"])).eval()
    assert model.logit_scale.item() == pytest.approx(LOGIT_SCALE_INIT)
    pairs = world["test_unique"]
    x = to_tensor(pairs.images_0[:8])
    with torch.no_grad():
        scores = model(x, pairs.captions[:8])
        # The end-of-text state is pooled by a causal transformer: padding to the full context changes nothing.
        padded = model.tokenizer(pairs.captions[:8], padding="max_length", max_length=MAX_LENGTH,
                                 return_tensors="pt").input_ids
        assert torch.allclose(model(x, padded), scores, atol=1e-5)
        assert scores.abs().max() <= math.exp(LOGIT_SCALE_INIT) + 1e-4
    assert np.allclose(model.score(pairs.images_0[:8], pairs.captions[:8]), scores.numpy())


def test_save_then_load_gives_identical_scores(world, trained, tmp_path):
    model, _ = trained
    model.save(tmp_path / "pixel")
    loaded = PixelReward.load(tmp_path / "pixel")
    pairs = world["test_unique"]
    assert np.array_equal(loaded.score(pairs.images_0, pairs.captions), model.score(pairs.images_0, pairs.captions))
    assert loaded.config == model.config and not loaded.step_aware
    assert loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()


def test_same_seed_same_weights(world):
    config = dataclasses.replace(TINY, steps=6, validate_every=3)
    runs = [train_pixel_reward(world["train"], world["validation_unique"], world["clip"], config, seed=s)[0]
            for s in (5, 5, 6)]
    a, b, c = (r.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


RESUMABLE = dataclasses.replace(TINY, steps=6, validate_every=3, checkpoint_every=2)


def killed_run(world, out, config=RESUMABLE, seed=5):
    """A run killed at step 4 of 6: after the checkpoint of step 2, before the one of step 4."""
    with killed_at_call(pixel_module, "pair_loss", 4):
        train_pixel_reward(world["train"], world["validation_unique"], world["clip"], config, seed, out=out)
    assert (out.parent / (out.name + ".ckpt") / "state.pt").exists() and not out.exists()


def test_kill_then_rerun_resumes_and_ends_with_the_same_weights(world, tmp_path):
    whole, whole_metrics = train_pixel_reward(world["train"], world["validation_unique"], world["clip"],
                                              RESUMABLE, seed=5)
    killed_run(world, tmp_path / "killed")
    resumed, metrics = train_pixel_reward(world["train"], world["validation_unique"], world["clip"], RESUMABLE,
                                          seed=5, out=tmp_path / "killed")
    assert metrics["resumed_from_step"] == 2 and whole_metrics["resumed_from_step"] == 0
    a = whole.state_dict()
    for b in (resumed.state_dict(), PixelReward.load(tmp_path / "killed").state_dict()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for key in ("loss_curve", "validation_curve", "best_step"):
        assert metrics[key] == whole_metrics[key]
    assert not (tmp_path / "killed.ckpt").exists()


def test_a_checkpoint_of_other_settings_is_ignored(world, tmp_path, caplog):
    killed_run(world, tmp_path / "model")
    other = dataclasses.replace(RESUMABLE, learning_rate=1e-3)
    fresh, _ = train_pixel_reward(world["train"], world["validation_unique"], world["clip"], other, seed=5)
    with caplog.at_level(logging.WARNING, logger="lpo.checkpoint"):
        model, metrics = train_pixel_reward(world["train"], world["validation_unique"], world["clip"], other,
                                            seed=5, out=tmp_path / "model")
    assert metrics["resumed_from_step"] == 0 and "ignoring checkpoint" in caplog.text
    a, b = fresh.state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "model" / "model.safetensors").exists() and not (tmp_path / "model.ckpt").exists()


def test_starts_as_the_world_clip_which_is_copied_not_trained_in_place(world):
    clip = world["clip"]
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    pairs = world["test_unique"]
    start = PixelReward.from_clip(clip, TINY)
    assert np.array_equal(start.score(pairs.images_0, pairs.captions), clip.score(pairs.images_0, pairs.captions))
    model, _ = train_pixel_reward(world["train"], world["validation_unique"], clip, dataclasses.replace(TINY, steps=2),
                                  seed=0)
    assert model.text_encoder is not clip.text_encoder
    assert all(torch.equal(before[k], v) for k, v in clip.state_dict().items())


def test_step_aware_copy_starts_as_the_pixel_model(world, trained):
    model, _ = trained
    step_aware = step_aware_copy(model).eval()
    pairs = world["test_unique"]
    x = to_tensor(pairs.images_0[:8])
    with torch.no_grad():
        plain = model(x, pairs.captions[:8])
        for t in (0, 251, 751):
            assert torch.allclose(step_aware(x, pairs.captions[:8], torch.full((8,), t)), plain, atol=1e-5)
        # Once its AdaLN weights move, the timestep changes the score.
        for m in step_aware.image_tower.modulations:
            m.weight.normal_(0, 0.5)
        assert not torch.allclose(step_aware(x, pairs.captions[:8], torch.full((8,), 1)),
                                  step_aware(x, pairs.captions[:8], torch.full((8,), 751)))
    with pytest.raises(ValueError, match="needs timesteps"):
        step_aware(x, pairs.captions[:8])


def test_bad_paths_and_settings_get_clear_errors(world, trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="reward pixel"):
        PixelReward.load(tmp_path / "missing")
    trained[0].save(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read the pixel reward model"):
        PixelReward.load(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        PixelReward.load(tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="world clip"):
        WorldCLIP.load(tmp_path / "no-clip")
    with pytest.raises(ValueError, match="text_width"):
        CLIPArchitecture(text_width=10, text_heads=4)
    ties = world["validation_unique"].take(world["validation_unique"].label_0 == 0.5)
    with pytest.raises(ValueError, match="no decided pair"):
        train_pixel_reward(world["train"], ties, world["clip"], TINY, seed=0)
