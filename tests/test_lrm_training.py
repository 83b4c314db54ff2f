"""LRM training: the timestep grid, MPCF's row selection, validation and kill-then-resume."""
from unittest import mock

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from test_preference_data import write_preferences
from tiny_sd import IMAGE_SIZE, build_tiny_pipeline

import lpo.lrm_training as training
from lpo.lrm import LRMConfig
from lpo.lrm_training import LRMTrainConfig, timestep_grid, train_lrm
from lpo.mpcf import MPCFConfig, mpcf_counts, mpcf_keep
from lpo.preference_data import load_pairs
from lpo.world.base_model import SD15_SCHEDULE

CONFIG = LRMTrainConfig(model=LRMConfig(head_backend="reference"), steps=6, batch_size=4, learning_rate=1e-3,
                        warmup_steps=1, validate_every=3, checkpoint_every=2)


def test_timestep_grid_is_the_ddim_sampling_grid():
    assert timestep_grid(SD15_SCHEDULE, 20).tolist() == list(range(1, 952, 50))
    assert timestep_grid(SD15_SCHEDULE, 10).tolist() == list(range(1, 902, 100))


def test_mpcf_keeps_exactly_the_rows_the_rules_select():
    #            aes    clip   vqa   decided
    rows = [(0.10, 0.01, 0.02, 1),   # 0: every strategy
            (-0.30, 0.01, 0.02, 1),  # 1: aesthetic worse by 0.3: strategies 2 and 3
            (-0.80, 0.01, 0.02, 1),  # 2: strategy 3 only
            (-1.20, 0.01, 0.02, 1),  # 3: none
            (0.50, -0.01, 0.02, 1),  # 4: CLIP disagrees: none
            (0.50, 0.01, 0.00, 1),   # 5: VQA gap 0 is not > 0: none (strict, as the official code)
            (0.00, 0.01, 0.02, 1),   # 6: aesthetic gap 0: not strategy 1 (strict), strategies 2 and 3
            (0.10, 0.02, 0.05, 0),   # 7: tie the scorers agree with: kept
            (0.10, 0.05, 0.05, 0),   # 8: tie with a CLIP gap too large: dropped
            (0.20, 0.02, 0.05, 0)]   # 9: tie at the aesthetic bound (strict): dropped
    table = dict(zip(("aesthetic_gap", "clipscore_gap", "vqascore_gap", "different_flag"),
                     map(np.array, zip(*rows))))
    kept = {s: np.flatnonzero(mpcf_keep(table, MPCFConfig(strategy=s))["keep"]).tolist() for s in (0, 1, 2, 3)}
    assert kept == {0: list(range(10)), 1: [0, 7], 2: [0, 1, 6, 7], 3: [0, 1, 2, 6, 7]}
    assert mpcf_counts(table, MPCFConfig(strategy=2)) == {"strategy": 2, "pairs": 10, "win_lose_kept": 3,
                                                          "tie_kept": 1, "kept": 4}
    with pytest.raises(ValueError, match="vqascore_gap"):
        mpcf_keep({k: v for k, v in table.items() if k != "vqascore_gap"}, MPCFConfig())
    with pytest.raises(ValueError, match="mpcf.strategy"):
        MPCFConfig(strategy=4)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lrm-world")
    model = build_tiny_pipeline(root / "base")
    prefs = write_preferences(root / "prefs", image_size=IMAGE_SIZE,
                              sizes={"train": 16, "validation_unique": 8, "test_unique": 4})
    return model, load_pairs(prefs, "train"), load_pairs(prefs, "validation_unique")


def lrm_weights(path):
    unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True).state_dict()
    return unet, torch.load(path / "state_dict.pt", weights_only=True)


def test_training_validates_and_keeps_the_best(world, tmp_path):
    model, train, validation = world
    metrics = train_lrm(model, train, validation, CONFIG, seed=3, out_dir=tmp_path / "lrm")
    assert [s for s, _ in metrics["validation_accuracy"]] == [3, 6]
    best = max(a for _, a in metrics["validation_accuracy"])
    assert metrics["best_validation_accuracy"] == best and metrics["validation_timestep"] == 1
    assert (tmp_path / "lrm" / "state_dict.pt").exists() and not (tmp_path / "lrm.ckpt").exists()


def test_kill_then_rerun_resumes_and_ends_with_the_same_weights(world, tmp_path):
    model, train, validation = world
    train_lrm(model, train, validation, CONFIG, seed=3, out_dir=tmp_path / "whole")

    calls = {"n": 0}
    real_loss = training.pair_loss

    def dying_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # step 4 of 6: after the checkpoint of step 2, before the one of step 4
            raise KeyboardInterrupt("killed")
        return real_loss(*args, **kwargs)
    with mock.patch.object(training, "pair_loss", dying_loss), pytest.raises(KeyboardInterrupt):
        train_lrm(model, train, validation, CONFIG, seed=3, out_dir=tmp_path / "killed")
    assert (tmp_path / "killed.ckpt" / "state.pt").exists() and not (tmp_path / "killed").exists()
    metrics = train_lrm(model, train, validation, CONFIG, seed=3, out_dir=tmp_path / "killed")
    assert metrics["resumed_from_step"] == 2
    (unet_a, head_a), (unet_b, head_b) = lrm_weights(tmp_path / "whole"), lrm_weights(tmp_path / "killed")
    assert all(torch.equal(unet_a[k], unet_b[k]) for k in unet_a)
    assert all(torch.equal(head_a[k], head_b[k]) for k in head_a)


def test_no_pairs_left_after_filtering_is_a_clear_error(world, tmp_path):
    model, train, validation = world
    with pytest.raises(ValueError, match="no preference pairs.*mpcf"):
        train_lrm(model, train.take(np.zeros(len(train), bool)), validation, CONFIG, seed=0, out_dir=tmp_path / "x")
