from types import SimpleNamespace

import datasets
import numpy as np
import pytest

from lpo.images import decode_image
from lpo.world.preferences import (COLUMNS, FINAL, PreferencesConfig, Source, bradley_terry_labels,
                                   build_preference_data, draw_pairs, label_statistics, side_score_rows, source_mix,
                                   source_pipeline)


def test_ties_are_exactly_the_tie_band():
    gap = np.linspace(-1, 1, 2001)
    labels = bradley_terry_labels(gap, PreferencesConfig(tie_band=0.1), np.random.default_rng(0))
    assert np.array_equal(labels == 0.5, np.abs(gap) < 0.1)
    assert set(np.unique(labels)) == {0.0, 0.5, 1.0}


SOURCES = ({"checkpoint": "final", "guidance_scale": 5.0}, {"checkpoint": "final", "guidance_scale": 1.5},
           {"checkpoint": 40, "guidance_scale": 5.0})
MIXED = PreferencesConfig(sources=SOURCES, same_source_share=0.4, primary_images=4, source_images=2,
                          max_pairs_per_prompt=6)


@pytest.mark.parametrize("temperature, low, high", [(1e-4, 0.999, 1.0), (1e4, 0.45, 0.55), (0.1, 0.7, 0.95)])
def test_temperature_sets_label_noise(temperature, low, high):
    rng = np.random.default_rng(0)
    config = PreferencesConfig(temperature=temperature, tie_band=0.0, max_pairs_per_prompt=4)
    pairs = draw_pairs(1000, config, unique=False, rng=rng)
    overall = rng.random(len(pairs.image_prompt))
    pairs.label_0 = bradley_terry_labels(overall[pairs.image_0] - overall[pairs.image_1], config, rng)
    agreement = label_statistics(pairs, overall)["label_agreement"]
    assert low <= agreement <= high


def test_pairs_stay_within_their_prompt_and_never_repeat():
    pairs = draw_pairs(200, MIXED, unique=False, rng=np.random.default_rng(1))
    assert np.array_equal(pairs.image_prompt[pairs.image_0], pairs.prompt)
    assert np.array_equal(pairs.image_prompt[pairs.image_1], pairs.prompt)
    assert np.all(pairs.image_0 != pairs.image_1)
    counts = np.bincount(pairs.prompt, minlength=200)
    assert np.array_equal(pairs.per_prompt, counts[pairs.prompt])
    assert counts.min() >= 1 and counts.max() == 6
    assert len({(min(a, b), max(a, b)) for a, b in zip(pairs.image_0, pairs.image_1)}) == pairs.prompt.size
    # Every image row is one (prompt, source, slot), and some pair uses it.
    assert len(set(zip(pairs.image_prompt, pairs.source, pairs.slot))) == len(pairs.image_prompt)
    assert set(pairs.image_0) | set(pairs.image_1) == set(range(len(pairs.image_prompt)))
    assert pairs.slot[pairs.source == 0].max() == 3 and pairs.slot[pairs.source > 0].max() == 1


@pytest.mark.parametrize("unique", [True, False])
def test_the_source_mix(unique):
    pairs = draw_pairs(3000, MIXED, unique=unique, rng=np.random.default_rng(3))
    same = pairs.same_source()
    # Same-source pairs come only from the first source, at the configured share.
    assert np.all(pairs.source[pairs.image_0[same]] == 0)
    assert abs(same.mean() - 0.4) < 0.03
    mix = {(r["source_a"], r["source_b"]): r["pairs"] for r in source_mix(pairs, MIXED.sources)}
    assert sum(mix.values()) == pairs.prompt.size
    assert set(mix) == {("base-step40@cfg5", "base@cfg1.5"), ("base-step40@cfg5", "base@cfg5"),
                        ("base@cfg1.5", "base@cfg5"), ("base@cfg5", "base@cfg5")}
    if unique:  # every pair of distinct sources equally likely
        cross = [n for (a, b), n in mix.items() if a != b]
        assert max(cross) - min(cross) < 0.15 * np.mean(cross)


def test_unique_splits_have_one_pair_per_prompt():
    pairs = draw_pairs(50, MIXED, unique=True, rng=np.random.default_rng(2))
    assert np.array_equal(pairs.prompt, np.arange(50)) and np.all(pairs.per_prompt == 1)
    assert len(pairs.image_prompt) == 100


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

    def sample(source, prompts, seeds):
        rng = np.random.default_rng([source, seeds[0]])
        return rng.integers(0, 256, size=(len(prompts), 8, 8, 3), dtype=np.uint8)

    def judge(images, prompts):
        overall = images.mean(axis=(1, 2, 3)) / 255.0
        return SimpleNamespace(overall=overall, alignment=overall, aesthetic=1 - overall)

    def side(images, prompts):
        return {"aesthetic": images[:, 0, 0, 0].astype(float), "clipscore": np.zeros(len(images))}

    return prompt_sets, sample, judge, side


def test_records_have_the_pick_a_pic_layout(tmp_path):
    prompt_sets, sample, judge, side = fake_world()
    records, judged, side_rows, stats = build_preference_data(prompt_sets, sample, judge, side, MIXED, seed=0)
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
        sources = {(s.model, s.guidance_scale) for s in MIXED.sources}
        assert set(zip(d["model_0"], d["guidance_scale_0"])) | set(zip(d["model_1"], d["guidance_scale_1"])) <= sources
        assert len([r for r in judged if r["split"] == split]) == len(d)
        assert len([r for r in side_rows if r["split"] == split]) == len(d)
    assert stats["validation_unique"]["pairs_per_prompt"] == 1.0
    assert stats["train"]["pairs"] == len(loaded["train"])
    train = stats["train"]
    assert train["same_source"]["pairs"] + train["cross_source"]["pairs"] == train["pairs"]
    assert sum(r["pairs"] for r in train["sources"]) == train["pairs"]


def test_same_seed_same_records_different_seed_different_labels():
    world = fake_world(40)
    a = build_preference_data(*world, MIXED, seed=0)[0]
    b = build_preference_data(*world, MIXED, seed=0)[0]
    c = build_preference_data(*world, MIXED, seed=1)[0]
    assert a == b
    assert a["train"]["label_0"] != c["train"]["label_0"]


@pytest.mark.parametrize("settings, key", [
    ({"sources": []}, "preferences.sources is empty"),
    ({"sources": [{"checkpoint": FINAL, "guidance_scale": 0.0}]}, r"preferences.sources\[0\].guidance_scale"),
    ({"sources": [SOURCES[0], {"checkpoint": "late", "guidance_scale": 3.0}]}, r"preferences.sources\[1\].checkpoint"),
    ({"sources": [SOURCES[0], {"checkpoint": 4, "cfg": 3.0}]}, r"preferences.sources\[1\]"),
    ({"sources": [SOURCES[0], SOURCES[0]]}, "more than once"),
    ({"same_source_share": 0.5}, "preferences.same_source_share"),
    ({"primary_images": 1}, "preferences.primary_images"),
])
def test_bad_settings_name_the_key(settings, key):
    with pytest.raises(ValueError, match=key):
        PreferencesConfig(**settings)


def test_a_checkpoint_the_base_model_did_not_save_names_the_key(tmp_path):
    (tmp_path / "step40").mkdir()
    with pytest.raises(FileNotFoundError, match=r"checkpoint 70.*saved: step40.*base_model.snapshots"):
        source_pipeline(Source(70, 5.0), tmp_path / "model", tmp_path)
