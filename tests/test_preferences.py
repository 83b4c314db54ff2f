from types import SimpleNamespace

import datasets
import numpy as np
import pytest

from lpo.images import decode_image
from lpo.world.preferences import (COLUMNS, PreferencesConfig, bradley_terry_labels, build_preference_data, draw_pairs,
                                   label_statistics, make_split_pairs, side_score_rows)


def test_ties_are_exactly_the_tie_band():
    gap = np.linspace(-1, 1, 2001)
    labels = bradley_terry_labels(gap, PreferencesConfig(tie_band=0.1), np.random.default_rng(0))
    assert np.array_equal(labels == 0.5, np.abs(gap) < 0.1)
    assert set(np.unique(labels)) == {0.0, 0.5, 1.0}


@pytest.mark.parametrize("temperature, low, high", [(1e-4, 0.999, 1.0), (1e4, 0.45, 0.55), (0.1, 0.7, 0.95)])
def test_temperature_sets_label_noise(temperature, low, high):
    rng = np.random.default_rng(0)
    overall = rng.random(4000)
    pairs = make_split_pairs(overall, 1000, PreferencesConfig(temperature=temperature, tie_band=0.0),
                             unique=False, rng=rng)
    agreement = label_statistics(pairs, overall)["label_agreement"]
    assert low <= agreement <= high


def test_pairs_stay_within_their_prompt():
    config = PreferencesConfig(images_per_prompt=4, max_pairs_per_prompt=3)
    prompt, first, second, per_prompt = draw_pairs(200, config, unique=False, rng=np.random.default_rng(1))
    assert np.array_equal(first // 4, prompt) and np.array_equal(second // 4, prompt)
    assert np.all(first != second)
    counts = np.bincount(prompt, minlength=200)
    assert np.array_equal(per_prompt, counts[prompt])
    assert counts.min() >= 1 and counts.max() == 3
    assert len({(p, min(a, b), max(a, b)) for p, a, b in zip(prompt, first, second)}) == prompt.size


def test_unique_splits_have_one_pair_per_prompt():
    prompt, *_ , per_prompt = draw_pairs(50, PreferencesConfig(), unique=True, rng=np.random.default_rng(2))
    assert np.array_equal(prompt, np.arange(50)) and np.all(per_prompt == 1)


def test_mpcf_gaps_are_winner_minus_loser_and_absolute_for_ties():
    pairs = SimpleNamespace(image_0=np.array([0, 2, 4]), image_1=np.array([1, 3, 5]),
                            label_0=np.array([1.0, 0.0, 0.5]))
    scores = {"aesthetic": np.array([5.0, 3.0, 5.0, 3.0, 1.0, 4.0])}
    rows = side_score_rows("train", pairs, scores)
    assert [r["aesthetic_gap"] for r in rows] == [2.0, -2.0, 3.0]
    assert [r["different_flag"] for r in rows] == [1, 1, 0]


def fake_world(prompts_per_split=6):
    prompt_sets = {s: [f"{s} prompt {i}" for i in range(prompts_per_split)]
                   for s in ("train", "validation_unique", "test_unique")}

    def sample(prompts, seeds):
        rng = np.random.default_rng(seeds[0])
        return rng.integers(0, 256, size=(len(prompts), 8, 8, 3), dtype=np.uint8)

    def judge(images, prompts):
        overall = images.mean(axis=(1, 2, 3)) / 255.0
        return SimpleNamespace(overall=overall, alignment=overall, aesthetic=1 - overall)

    def side(images, prompts):
        return {"aesthetic": images[:, 0, 0, 0].astype(float), "clipscore": np.zeros(len(images))}

    return prompt_sets, sample, judge, side


def test_records_have_the_pick_a_pic_layout(tmp_path):
    prompt_sets, sample, judge, side = fake_world()
    records, judged, side_rows, stats = build_preference_data(prompt_sets, sample, judge, side,
                                                              PreferencesConfig(), seed=0)
    dataset = datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in records.items()})
    dataset.save_to_disk(str(tmp_path / "d"))
    loaded = datasets.load_from_disk(str(tmp_path / "d"))
    assert set(loaded) == {"train", "validation_unique", "test_unique"}
    for split, d in loaded.items():
        assert tuple(d.column_names) == COLUMNS
        assert np.allclose(np.array(d["label_0"]) + np.array(d["label_1"]), 1.0)
        assert set(d["caption"]) <= set(prompt_sets[split])
        for row in d.select(range(2)):
            assert decode_image(row["jpg_0"], split).shape == (8, 8, 3)
            assert row["image_0_uid"] != row["image_1_uid"]
        assert len([r for r in judged if r["split"] == split]) == len(d)
        assert len([r for r in side_rows if r["split"] == split]) == len(d)
    assert stats["validation_unique"]["pairs_per_prompt"] == 1.0
    assert stats["train"]["pairs"] == len(loaded["train"])


def test_same_seed_same_records_different_seed_different_labels():
    world = fake_world(40)
    a = build_preference_data(*world, PreferencesConfig(), seed=0)[0]
    b = build_preference_data(*world, PreferencesConfig(), seed=0)[0]
    c = build_preference_data(*world, PreferencesConfig(), seed=1)[0]
    assert a == b
    assert a["train"]["label_0"] != c["train"]["label_0"]


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="preferences.images_per_prompt"):
        PreferencesConfig(images_per_prompt=1)
