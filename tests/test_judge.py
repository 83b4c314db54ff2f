import dataclasses

import numpy as np
import pytest
import torch

from lpo.world.grammar import ATTRIBUTES, Grammar, Scene, Vocabulary
from lpo.world.judge import (Judge, JudgeConfig, auc, evaluate_judge, judge_images, load_judge, predict, save_judge,
                             train_judge)
from lpo.world.render import DEFECTS, render_batch

SIZE = 16
VOCAB = Vocabulary(sizes=("small", "large"), colors=("red", "blue"), shapes=("circle", "square"),
                   backgrounds=("gray",), positions=("left", "right", "center"))
QUICK = JudgeConfig(steps=200, batch_size=64, width=16, pool_size=4096, fresh_per_step=16)


@pytest.fixture(scope="module")
def grammar():
    return Grammar(VOCAB, heldout_pairs=1, seed=0)


@pytest.fixture(scope="module")
def trained(grammar):
    torch.set_num_threads(1)
    judge, metrics = train_judge(grammar, SIZE, QUICK, seed=0)
    return judge, metrics


def renders(grammar, n, seed, defects=None):
    rng = np.random.default_rng(seed)
    scenes = [grammar.scenes()[i] for i in rng.integers(len(grammar.scenes()), size=n)]
    return render_batch(scenes, np.random.default_rng(seed + 1), SIZE, defects), scenes


def wrong(scene: Scene, index: int) -> Scene:
    """The scene with one attribute (chosen by index) changed to another vocabulary value."""
    changeable = [a for a in ATTRIBUTES if len(VOCAB.values(a)) > 1]
    attribute = changeable[index % len(changeable)]
    other = next(v for v in VOCAB.values(attribute) if v != getattr(scene, attribute))
    return scene.replace(attribute, other)


def test_forward_gives_one_head_per_attribute_and_severities():
    judge = Judge(VOCAB, SIZE, width=8)
    out = judge(torch.rand(5, 3, SIZE, SIZE) * 2 - 1)
    assert set(out) == {*ATTRIBUTES, "defects"}
    for a in ATTRIBUTES:
        assert out[a].shape == (5, len(VOCAB.values(a)))
    assert out["defects"].shape == (5, len(DEFECTS))
    assert ((out["defects"] >= 0) & (out["defects"] <= 1)).all()


def test_verdict_fields_are_consistent(grammar, trained):
    judge, _ = trained
    images, scenes = renders(grammar, 40, seed=3)
    scenes = [wrong(s, i) if i % 2 else s for i, s in enumerate(scenes)]  # a mix of right and wrong prompts
    config = dataclasses.replace(QUICK, alignment_weight=0.7, aesthetic_weight=2.0, defect_threshold=0.2)
    v = judge_images(judge, images, scenes, config)
    n = len(scenes)
    assert v.probs_correct.shape == v.correct.shape == (n, len(ATTRIBUTES))
    assert v.defects.shape == (n, len(DEFECTS))
    np.testing.assert_array_equal(v.aligned, v.correct.all(1))
    np.testing.assert_allclose(v.alignment, v.probs_correct.mean(1), rtol=1e-6)
    assert ((v.alignment >= 0) & (v.alignment <= 1)).all()
    np.testing.assert_array_equal(v.defective, (v.defects > 0.2).any(1))
    np.testing.assert_allclose(v.aesthetic, 1 - np.clip(v.defects.sum(1), 0, 1), rtol=1e-6)
    np.testing.assert_allclose(v.overall, 0.7 * v.alignment + 2.0 * v.aesthetic, rtol=1e-6)
    assert 0 < v.aligned.mean() < 1  # the wrong prompts are caught, the right ones are not


def test_briefly_trained_judge_recognises_fresh_clean_renders(grammar, trained):
    judge, metrics = trained
    assert metrics["steps"] == QUICK.steps and metrics["train_seconds"] > 0
    result = evaluate_judge(judge, grammar, SIZE, seed=11, n=300, config=QUICK)
    for attribute, accuracy in result["attribute_accuracy"].items():
        assert accuracy >= 0.95, (attribute, result["attribute_accuracy"])
    assert result["clean_defective_rate"] <= 0.1
    assert set(result["defects"]) == set(DEFECTS)


def test_right_prompt_aligns_better_than_a_wrong_one(grammar, trained):
    judge, _ = trained
    images, scenes = renders(grammar, 100, seed=5)
    right = judge_images(judge, images, scenes, QUICK)
    altered = judge_images(judge, images, [wrong(s, i) for i, s in enumerate(scenes)], QUICK)
    assert np.mean(right.alignment > altered.alignment) >= 0.95
    assert right.aligned.mean() >= 0.9 and altered.aligned.mean() <= 0.1


def test_clean_render_is_more_aesthetic_than_the_same_scene_with_strong_defects(grammar, trained):
    judge, _ = trained
    clean, scenes = renders(grammar, 60, seed=7)
    for defect in ("blur", "noise", "low_contrast"):
        # Same seeds: the renderer draws the clean geometry first, so both renders show the same shape.
        damaged, _ = renders(grammar, 60, seed=7, defects=[{defect: 1.0}] * 60)
        good, bad = judge_images(judge, clean, scenes, QUICK), judge_images(judge, damaged, scenes, QUICK)
        assert np.mean(good.aesthetic > bad.aesthetic) >= 0.9, defect
        k = DEFECTS.index(defect)
        assert np.mean(bad.defects[:, k] > good.defects[:, k] + 0.1) >= 0.9, defect


def test_save_and_load_round_trip(tmp_path, grammar, trained):
    judge, _ = trained
    path = tmp_path / "out" / "judge"
    save_judge(judge, QUICK, path)
    save_judge(judge, QUICK, path)  # overwriting a finished output is fine
    loaded, config = load_judge(path)
    assert config == QUICK and loaded.vocabulary == VOCAB and loaded.image_size == SIZE
    images, _ = renders(grammar, 20, seed=9)
    a, b = predict(judge, images), predict(loaded, images)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_load_of_missing_or_corrupt_judge_names_the_path_and_the_stage(tmp_path):
    missing = tmp_path / "nowhere" / "judge"
    with pytest.raises(FileNotFoundError, match="world judge") as err:
        load_judge(missing)
    assert str(missing) in str(err.value)
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    with pytest.raises(FileNotFoundError, match="world judge") as err:
        load_judge(incomplete)
    assert str(incomplete) in str(err.value)
    (incomplete / "config.json").write_text("{}")
    (incomplete / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="world judge") as err:
        load_judge(incomplete)
    assert str(incomplete) in str(err.value)


def test_training_is_deterministic_for_a_seed(grammar):
    config = JudgeConfig(steps=3, batch_size=16, width=4, pool_size=64, fresh_per_step=4)
    first, _ = train_judge(grammar, SIZE, config, seed=3)
    again, _ = train_judge(grammar, SIZE, config, seed=3)
    other, _ = train_judge(grammar, SIZE, config, seed=4)
    a, b, c = first.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_scene_outside_the_vocabulary_is_rejected(grammar, trained):
    judge, _ = trained
    images, scenes = renders(grammar, 2, seed=1)
    with pytest.raises(ValueError, match="purple"):
        judge_images(judge, images, [scenes[0], scenes[1].replace("color", "purple")], QUICK)
    with pytest.raises(ValueError, match="32"):
        judge_images(judge, np.zeros((2, 32, 32, 3), np.uint8), scenes, QUICK)


def test_auc():
    scores = np.array([0.1, 0.2, 0.3, 0.4])
    assert auc(scores, np.array([False, False, True, True])) == 1.0
    assert auc(scores, np.array([True, True, False, False])) == 0.0
    assert auc(np.zeros(4), np.array([True, False, True, False])) == 0.5
    assert np.isnan(auc(scores, np.zeros(4, bool)))
