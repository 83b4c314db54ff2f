"""The world's inter-rater agreement: judges trained as the world's on other seeds, scored against the labels and
against the world judge's order, on pairs with known answers."""
import numpy as np
import pytest
import torch
from test_judge import QUICK, SIZE, VOCAB, renders

from lpo.preference_data import PreferencePairs
from lpo.world.grammar import Grammar
from lpo.world.judge import train_judge
from lpo.world.judge_agreement import (WORLD_JUDGE, JudgeAgreementConfig, JudgedPairs, agreement_rows,
                                       agreement_study, write_agreement_report)


def judged(gap, n_attributes=5):
    gap = np.asarray(gap, float)
    return JudgedPairs(gap, np.ones((len(gap), n_attributes), bool), np.zeros((len(gap), n_attributes), bool))


def pairs_of(labels):
    n = len(labels)
    images = np.zeros((n, 4, 4, 3), np.uint8)
    return PreferencePairs(images, images, [f"prompt {i}" for i in range(n)], np.asarray(labels, float),
                           np.ones(n, int), np.arange(n), "test_unique", n)


def test_a_judge_that_is_the_world_judge_agrees_fully_and_one_that_inverts_it_never():
    labels = [1.0, 0.0, 1.0, 1.0, 0.5, 0.0]
    world = judged([0.3, -0.2, 0.1, -0.4, 0.2, -0.1])  # right on the decided pairs 0, 1, 2, 5; wrong on 3
    same, inverted = judged(world.gap), judged(-world.gap)
    rows = agreement_rows("test_unique", pairs_of(labels), world, {"same": same, "inverted": inverted},
                          np.array([True, True, False, False, True, False]), 200, 0)
    by = {(r["judge"], r["pair_type"]): r for r in rows}
    assert by[WORLD_JUDGE, "all"]["accuracy_label"] == pytest.approx(4 / 5)
    assert by[WORLD_JUDGE, "all"]["pairs"] == 5 and by[WORLD_JUDGE, "same_source"]["pairs"] == 2
    assert by["same", "all"]["accuracy_label"] == by[WORLD_JUDGE, "all"]["accuracy_label"]
    assert by["same", "all"]["order_agreement"] == 1.0 and by["inverted", "all"]["order_agreement"] == 0.0
    assert by["inverted", "all"]["accuracy_label"] == pytest.approx(1 / 5)
    assert by[WORLD_JUDGE, "cross_source"]["accuracy_label"] == pytest.approx(2 / 3)  # pairs 2, 3, 5
    assert all(r["label_low"] <= r["accuracy_label"] <= r["label_high"] for r in rows)


def test_pairs_a_judge_calls_a_tie_are_left_out_and_no_sources_give_one_pair_type():
    rows = agreement_rows("v", pairs_of([1.0, 0.0, 1.0]), judged([0.5, -0.5, 0.0]), {}, None, 100, 0)
    assert [(r["pair_type"], r["pairs"], r["accuracy_label"]) for r in rows] == [("all", 2, 1.0)]


@pytest.fixture(scope="module")
def trained_judges():
    torch.set_num_threads(1)
    grammar = Grammar(VOCAB, heldout_pairs=1, seed=0)
    return grammar, train_judge(grammar, SIZE, QUICK, seed=0)[0], train_judge(grammar, SIZE, QUICK, seed=1)[0]


def test_the_study_scores_every_split_and_both_together(trained_judges, tmp_path):
    grammar, world, other = trained_judges
    splits = {}
    for k, split in enumerate(("validation_unique", "test_unique")):
        images, scenes = renders(grammar, 24, seed=10 + k)
        # Image 0 is the prompted scene, image 1 the render of another row's scene: label 1.
        splits[split] = PreferencePairs(images, np.roll(images, 1, axis=0), [s.prompt for s in scenes],
                                        np.ones(24), np.ones(24, int), np.arange(24), split, 24)
    rows, attributes = agreement_study(world, {"judge 1": world, "judge 2": other}, QUICK, splits,
                                       {s: None for s in splits}, grammar, 100, 0)
    assert {r["split"] for r in rows} == {"validation_unique", "test_unique", "validation_unique+test_unique"}
    joined = {r["judge"]: r for r in rows if r["split"] == "validation_unique+test_unique"}
    assert joined["judge 1"]["order_agreement"] == 1.0
    assert joined["judge 1"]["accuracy_label"] == joined[WORLD_JUDGE]["accuracy_label"] > 0.8
    assert 0.5 < joined["judge 2"]["order_agreement"] <= 1.0
    assert [a["judge"] for a in attributes] == [f"{WORLD_JUDGE}: share correct", "judge 1", "judge 2"]
    assert all(v == 1.0 for k, v in attributes[1].items() if k != "judge")
    write_agreement_report(tmp_path, "tiny", rows, attributes, JudgeAgreementConfig(judges=2))
    text = (tmp_path / "judge_agreement.md").read_text()
    assert "world_judge_agreement" in text and "validation_unique+test_unique" in text
    assert len((tmp_path / "judge_agreement.csv").read_text().splitlines()) == 1 + len(rows)


@pytest.mark.parametrize("settings, key", [({"judges": 0}, "judges"), ({"splits": ()}, "splits"),
                                           ({"splits": ("dev",)}, "splits")])
def test_bad_settings_name_the_key(settings, key):
    with pytest.raises(ValueError, match=f"judge_agreement.{key}"):
        JudgeAgreementConfig(**settings)
