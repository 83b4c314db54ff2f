"""lpo.launch: how a global batch is laid out over processes and micro-batches, the command a trainer rule
starts, and what mixed precision and gradient checkpointing do to a training run (the layout equality itself: the
two-process tests of test_lrm_training, test_step_trainer and test_diffusion_dpo)."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_preference_data import write_preferences
from tiny_sd import IMAGE_SIZE, build_tiny_pipeline

from lpo.launch import check_batches, command, layout, micro_batches
from lpo.preference_data import load_pairs
from lpo.reward.lrm import LatentRewardModel, LRMConfig
from lpo.reward.lrm_training import LRMTrainConfig, train_lrm


@pytest.mark.parametrize("global_batch, processes, per_device, share, accumulation", [
    (128, 8, 16, 16, 1), (128, 1, 16, 128, 8), (128, 2, None, 64, 1), (40, 4, 5, 10, 2)])
def test_a_global_batch_splits_into_shares_and_micro_batches(global_batch, processes, per_device, share,
                                                             accumulation):
    plan = layout(global_batch, processes, per_device, "lrm.batch_size", "lrm.per_device_batch_size")
    assert (plan.share, plan.accumulation) == (share, accumulation)
    assert plan.processes * plan.accumulation * plan.per_device == global_batch


@pytest.mark.parametrize("global_batch, processes, per_device, needles", [
    (10, 4, None, ["lpo.train_batch_size = 10 does not split evenly over 4 processes", "multiple of 4"]),
    (40, 8, 10, ["is 5 per process", "lpo.per_device_batch_size = 10 does not divide", "divisor of 5"]),
    (16, 1, 3, ["lpo.per_device_batch_size = 3", "divisor of 16"])])
def test_a_batch_that_does_not_split_names_both_keys(global_batch, processes, per_device, needles):
    with pytest.raises(ValueError) as error:
        layout(global_batch, processes, per_device, "lpo.train_batch_size", "lpo.per_device_batch_size")
    assert all(n in str(error.value) for n in needles), str(error.value)


def test_the_dag_checks_every_batch_of_a_trainer_section():
    config = {"lpo": {"sample_batch_size": 6, "train_batch_size": 8, "per_device_batch_size": 2}}
    check_batches(config, "lpo", 2)
    with pytest.raises(ValueError, match="lpo.sample_batch_size = 6 does not split evenly over 4"):
        check_batches(config, "lpo", 4)


def test_micro_batch_weights_make_the_mean_of_a_step():
    rows = np.arange(7)
    parts = list(micro_batches(rows, 3))
    assert [list(p) for p, _, _ in parts] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [last for _, _, last in parts] == [False, False, True]
    losses = np.random.default_rng(0).normal(size=7)
    assert sum(w * losses[p].mean() for p, w, _ in parts) == pytest.approx(losses.mean())


def test_one_process_runs_lpo_directly_and_several_under_torchrun_without_the_gpus_they_were_not_given():
    line, env = command(0, 1, 2, ["reward", "lrm"])
    assert line == [sys.executable, "-m", "lpo", "--threads", "2", "reward", "lrm"]
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["OMP_NUM_THREADS"] == "2"
    line, env = command(0, 2, 1, ["sd", "reward-lrm"])
    assert line[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert line[6:] == ["-m", "lpo", "--threads", "1", "sd", "reward-lrm"]
    line, env = command(4, 2, 1, ["sd", "reward-lrm"])  # one process per GPU, whatever --processes says
    assert line[5] == "4" and env.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")


# ------------------------------------------------------------------------------------- precision and memory

CONFIG = LRMTrainConfig(model=LRMConfig(head_backend="reference"), steps=2, batch_size=4, learning_rate=1e-3,
                        warmup_steps=0, validate_every=2, checkpoint_every=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    prefs = write_preferences(root / "prefs", image_size=IMAGE_SIZE, sizes={"train": 8, "validation_unique": 4})
    return (build_tiny_pipeline(root / "base"), load_pairs(prefs, "train"), load_pairs(prefs, "validation_unique"),
            prefs)


def trained_unet(world, out, **settings) -> tuple[dict, dict]:
    base, train, validation, _ = world
    metrics = train_lrm(base, train, validation, dataclasses.replace(CONFIG, **settings), 0, out)
    return LatentRewardModel.load(out, tokenizer_dir=base).unet.state_dict(), metrics


def test_gradient_checkpointing_recomputes_the_same_training(world, tmp_path):
    plain, _ = trained_unet(world, tmp_path / "plain")
    recomputed, _ = trained_unet(world, tmp_path / "checkpointed", gradient_checkpointing=True)
    assert all(torch.allclose(plain[k], recomputed[k], atol=1e-6) for k in plain)


BF16_RUN = """
import json, sys
from lpo.config import from_dict
from lpo.preference_data import load_pairs
from lpo.reward.lrm_training import LRMTrainConfig, train_lrm
args = json.loads(sys.argv[1])
metrics = train_lrm(args["base"], load_pairs(args["prefs"], "train"), load_pairs(args["prefs"], "validation_unique"),
                    from_dict(LRMTrainConfig, args["config"], "lrm"), 0, args["out"])
print(json.dumps(metrics))
"""


def test_bf16_trains_on_the_cpu_near_the_fp32_run(world, tmp_path):
    # A process's accelerate state keeps its first precision: the bf16 run gets a process of its own.
    base = world[0]
    config = {**dataclasses.asdict(CONFIG), "mixed_precision": "bf16"}
    args = {"base": str(base), "prefs": str(world[3]), "config": config, "out": str(tmp_path / "bf16")}
    run = subprocess.run([sys.executable, "-c", BF16_RUN, json.dumps(args)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    bf16 = json.loads(run.stdout.splitlines()[-1])
    plain = train_lrm(base, *world[1:3], CONFIG, 0, tmp_path / "fp32")
    assert bf16["mixed_precision"] == "bf16" and plain["mixed_precision"] == "no"
    # Not equal (bf16 keeps 8 bits of mantissa) and not unrelated: the same first loss, rounded.
    (_, loss_bf16), (_, loss_fp32) = bf16["loss_curve"][0], plain["loss_curve"][0]
    assert loss_bf16 != loss_fp32 and loss_bf16 == pytest.approx(loss_fp32, rel=0.02)
