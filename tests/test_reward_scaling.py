"""Reward accuracy against preference data: nested prompt subsets, the judge's labelling, and a pixel model that
learns from the judge's order what inverted dataset labels would teach it wrong. The rule runs in test_workflow."""
import dataclasses

import numpy as np
import pytest
import torch
from test_pixel_reward import ARCH, TINY
from test_preference_data import write_preferences

from lpo.reward.pixel import train_pixel_reward
from lpo.preference_data import load_pairs
from lpo.reward.scaling import (RewardScalingConfig, judge_labels, plot_scaling, prompt_subsets, scaling_rows,
                                write_scaling_report)
from lpo.reward.study import SplitData
from lpo.world.clip import WorldCLIP, load_tokenizer
from lpo.world.tokenizer import build_clip_tokenizer


def test_prompt_subsets_are_nested_keep_prompts_whole_and_follow_the_seed():
    captions = [f"prompt {i % 10}" for i in range(40)]
    subsets = prompt_subsets(captions, (1.0, 0.25, 0.5), seed=3)
    assert list(subsets) == [0.25, 0.5, 1.0]
    prompts = {f: {c for c, keep in zip(captions, mask) if keep} for f, mask in subsets.items()}
    assert [len(p) for p in prompts.values()] == [3, 5, 10]  # ceil(0.25 * 10) = 3
    assert prompts[0.25] < prompts[0.5] < prompts[1.0]
    for f, mask in subsets.items():
        assert all(mask[i] == (captions[i] in prompts[f]) for i in range(len(captions)))
    again, other = prompt_subsets(captions, (0.5,), seed=3), prompt_subsets(captions, (0.5,), seed=4)
    assert np.array_equal(again[0.5], subsets[0.5])
    assert not np.array_equal(other[0.5], subsets[0.5])


def test_judge_labels_follow_the_gap_with_the_tie_band():
    assert judge_labels(np.array([0.3, -0.3, 0.01, -0.019, 0.02]), 0.02).tolist() == [1.0, 0.0, 0.5, 0.5, 1.0]


@pytest.mark.parametrize("fractions", [(), (0.0, 1.0), (0.5, 1.5)])
def test_fractions_must_be_shares(fractions):
    with pytest.raises(ValueError, match="reward_scaling.fractions"):
        RewardScalingConfig(fractions=fractions)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaling")
    build_clip_tokenizer(root / "tokenizer")
    prefs = write_preferences(root / "prefs", image_size=16,
                              sizes={"train": 128, "validation_unique": 32, "test_unique": 48})
    torch.manual_seed(0)
    return root, {split: load_pairs(prefs, split) for split in ("train", "validation_unique", "test_unique")}, \
        WorldCLIP(ARCH, load_tokenizer(root / "tokenizer"))


def test_the_judge_labelling_learns_the_order_that_inverted_labels_hide(data, tmp_path):
    root, pairs, clip = data
    train, test = pairs["train"], pairs["test_unique"]
    # The written judge scores are the true labels (clean beats blurred); the dataset's labels are inverted.
    order = 2 * train.label_0 - 1
    inverted = dataclasses.replace(train, label_0=1 - train.label_0)
    seen = []

    def fit(subset):
        seen.append(subset)
        return train_pixel_reward(subset, pairs["validation_unique"], clip, TINY, seed=0)

    config = RewardScalingConfig(fractions=(0.5, 1.0), bootstrap=100)
    rows = scaling_rows(inverted, order, SplitData(test, 2 * test.label_0 - 1, {}), fit, config, 0.02, seed=0)
    by = {(r["labels"], r["fraction"]): r for r in rows}
    assert list(by) == [("dataset", 0.5), ("judge", 0.5), ("dataset", 1.0), ("judge", 1.0)]
    assert np.array_equal(seen[2].label_0, inverted.label_0) and np.array_equal(seen[3].label_0, train.label_0)
    assert seen[0].captions == seen[1].captions and set(seen[0].captions) < set(seen[2].captions)
    assert by["dataset", 0.5]["train_pairs"] == len(seen[0]) < by["judge", 1.0]["train_pairs"] == len(train)
    assert by["judge", 1.0]["accuracy_judge"] >= 0.75
    assert by["judge", 1.0]["accuracy_judge"] == by["judge", 1.0]["accuracy_label"]  # test labels are the judge's
    assert by["judge", 1.0]["label_low"] <= by["judge", 1.0]["accuracy_label"] <= by["judge", 1.0]["label_high"]

    plot_scaling(rows, tmp_path / "reward_scaling.png")
    write_scaling_report(tmp_path, "tiny", rows, label_agreement=0.8)
    assert (tmp_path / "reward_scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "reward_scaling.md").read_text()
    assert "reward_scaling.png" in text and "0.800 of decided pairs" in text
    assert len((tmp_path / "reward_scaling.csv").read_text().splitlines()) == 1 + len(rows)
