"""LRM training: the timestep grid, MPCF's row selection, validation and kill-then-resume; LRM-XL from an SDXL-type
pipeline, saved and reloaded in the released layout."""
import dataclasses
import json
import math
import shutil
from unittest import mock

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from kills import killed_at_call
from test_preference_data import write_preferences
from tiny_sd import HUB_IMAGE_SIZE, IMAGE_SIZE, build_tiny_pipeline, build_tiny_sdxl_pipeline
from transformers import CLIPTextModelWithProjection
from two_processes import launch_two_processes

import lpo.reward.lrm_training as training
from lpo.reward.lrm import LatentRewardModel, LRMConfig
from lpo.reward.lrm_training import LatentEncoder, LRMTrainConfig, build_lrm, evaluate_pairs, timestep_grid, train_lrm
from lpo.reward.mpcf import MPCFConfig, mpcf_counts, mpcf_keep
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
    return unet, load_file(path / "head.safetensors")


def test_training_validates_and_keeps_the_best(world, tmp_path):
    model, train, validation = world
    metrics = train_lrm(model, train, validation, CONFIG, seed=3, out_dir=tmp_path / "lrm")
    assert [s for s, _ in metrics["validation_accuracy"]] == [3, 6]
    best = max(a for _, a in metrics["validation_accuracy"])
    assert metrics["best_validation_accuracy"] == best and metrics["validation_timestep"] == 1
    assert (tmp_path / "lrm" / "head.safetensors").exists() and not (tmp_path / "lrm.ckpt").exists()


def test_kill_then_rerun_resumes_and_ends_with_the_same_weights(world, tmp_path):
    model, train, validation = world
    train_lrm(model, train, validation, CONFIG, seed=3, out_dir=tmp_path / "whole")

    with killed_at_call(training, "pair_loss", 4):  # step 4 of 6: after the checkpoint of step 2, before step 4's
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


# ------------------------------------------------------------------------------------------------ LRM-XL

# One process in two micro-batches of 2 pairs (the two-process run below: one micro-batch of 2 pairs each).
XL_CONFIG = dataclasses.replace(CONFIG, steps=3, validate_every=3, per_device_batch_size=2)


@pytest.fixture(scope="module")
def xl_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lrm-xl-world")
    model = build_tiny_sdxl_pipeline(root / "base")
    prefs = write_preferences(root / "prefs", image_size=HUB_IMAGE_SIZE,
                              sizes={"train": 8, "validation_unique": 6, "test_unique": 2})
    return model, prefs, load_pairs(prefs, "train"), load_pairs(prefs, "validation_unique")


@pytest.fixture(scope="module")
def xl_trained(xl_world, tmp_path_factory):
    """(the LRM-XL a single-process run ends with, in memory; the run's metrics; the folder it saved)."""
    model, _, train, validation = xl_world
    built = []

    def recording_build(*args, **kwargs):
        built.append(build_lrm(*args, **kwargs))
        return built[-1]
    out = tmp_path_factory.mktemp("lrm-xl") / "lrm"
    with mock.patch.object(training, "build_lrm", recording_build):
        metrics = train_lrm(model, train, validation, XL_CONFIG, seed=3, out_dir=out)
    return built[0], metrics, out


def test_an_sdxl_pipeline_trains_lrm_xl_and_reloads_it_with_the_same_scores(xl_world, xl_trained, tmp_path):
    model, _, _, validation = xl_world
    trained, metrics, saved = xl_trained
    assert trained.text_encoder_2 is not None and trained.text_projection is None
    assert metrics["loss_curve"] and all(math.isfinite(loss) for _, loss in metrics["loss_curve"])
    assert metrics["feature_dim"] == sum(trained.unet.config.block_out_channels) + \
        trained.unet.config.block_out_channels[-1]
    # LRM-XL's layout: both text encoders (both fine-tuned), no text projection in the state dict.
    assert set(load_file(saved / "head.safetensors")) == {"visual_projection.weight", "logit_scale"}
    before = CLIPTextModelWithProjection.from_pretrained(model / "text_encoder_2").state_dict()
    after = CLIPTextModelWithProjection.from_pretrained(saved / "text_encoder_2").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)

    encoder = LatentEncoder(model, "cpu")
    for t in (metrics["validation_timestep"], 501):
        expected = evaluate_pairs(trained, encoder, validation, t, seed=3)
        reloaded = evaluate_pairs(LatentRewardModel.load(saved, tokenizer_dir=model), encoder, validation, t, seed=3)
        assert all(np.array_equal(a, b) for a, b in zip(expected, reloaded))
    # A released LRM-XL has no tokenizers or lrm_config.json: the base model's tokenizers give the same scores.
    out = shutil.copytree(saved, tmp_path / "released")
    for extra in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(out / extra)
    (out / "lrm_config.json").unlink()
    released = LatentRewardModel.load(out, tokenizer_dir=model, config=XL_CONFIG.model)
    assert all(np.array_equal(a, b) for a, b in zip(expected, evaluate_pairs(released, encoder, validation, 501, 3)))


TWO_PROCESSES = """
import json, sys
from accelerate import PartialState
from lpo.config import from_dict
from lpo.reward.lrm_training import LRMTrainConfig, train_lrm
from lpo.preference_data import load_pairs
args = json.loads(sys.argv[1])
metrics = train_lrm(args["base"], load_pairs(args["prefs"], "train"), load_pairs(args["prefs"], "validation_unique"),
                    from_dict(LRMTrainConfig, args["config"], "lrm"), 3, args["out"])
if PartialState().is_main_process:
    with open(args["metrics"], "w") as f:
        json.dump(metrics, f)
"""


def test_two_processes_train_lrm_xl_as_one_process_accumulating_two_micro_batches(xl_world, xl_trained, tmp_path):
    model, prefs, _, _ = xl_world
    _, one, one_dir = xl_trained
    whole_shares = dataclasses.replace(XL_CONFIG, per_device_batch_size=None)
    args = {"base": str(model), "prefs": str(prefs), "config": dataclasses.asdict(whole_shares),
            "out": str(tmp_path / "two"), "metrics": str(tmp_path / "two.json")}
    run = launch_two_processes(TWO_PROCESSES, args, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]  # DDP finds a gradient for every parameter it syncs
    two = json.loads((tmp_path / "two.json").read_text())
    assert (two["processes"], two["accumulation_steps"]) == (2, 1) and (one["processes"],
                                                                        one["accumulation_steps"]) == (1, 2)
    assert np.allclose([v for _, v in two["loss_curve"]], [v for _, v in one["loss_curve"]], rtol=1e-5)
    assert two["validation_accuracy"] == one["validation_accuracy"]
    # Adam's first steps move every weight by about the learning rate whatever its gradient's size, so the last
    # bits of near-zero gradients (other batch sizes, another reduction order) move the two runs apart a little.
    (unet_two, head_two), (unet_one, head_one) = lrm_weights(tmp_path / "two"), lrm_weights(one_dir)
    unet_base = UNet2DConditionModel.from_pretrained(model / "unet").state_dict()
    moved = max((unet_one[k] - unet_base[k]).abs().max().item() for k in unet_one)
    gap = max((unet_one[k] - unet_two[k]).abs().max().item() for k in unet_one)
    assert moved > 1e-3 and gap < 0.01 * moved, (moved, gap)
    assert all(torch.allclose(head_one[k], head_two[k], atol=1e-5) for k in head_one)


def test_lrm_xl_refuses_a_clip_text_projection(xl_world, tmp_path):
    with pytest.raises(ValueError, match="lrm.clip_text_projection.*SDXL-type.*null"):
        build_lrm(xl_world[0], dataclasses.replace(CONFIG, clip_text_projection=str(tmp_path)))
