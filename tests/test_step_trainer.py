"""The LPO / SPO trainer on a tiny random SD1.5 pipeline: output layout, resume, two processes, bad input; the
prompt conditioning of SD1.5-type and SDXL-type pipelines."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from tiny_sd import IMAGE_SIZE, PROMPTS, build_tiny_pipeline, build_tiny_sdxl_pipeline, unet_weights
from two_processes import launch_two_processes

import lpo.optimize.step_trainer
from lpo.config import from_dict
from lpo.optimize.step_trainer import StepPOConfig, encode_prompts, load_pipeline, null_conditioning, train_step_po
from lpo.world.pipeline import sample

# Every pair distinct enough to be kept: 2 prompts x 3 steps = 6 tuples, 3 optimizer steps per round.
CONFIG = StepPOConfig(samples_per_step=2, num_inference_steps=3, guidance_scale=2.0, threshold="constant",
                      threshold_min=0.01, threshold_max=0.01, lora_rank=2, learning_rate=1e-3, sample_batch_size=2,
                      train_batch_size=2, rounds=3, checkpoint_every=1)


def keep_all(candidates, t_cur, context):
    return 1e4 * candidates.flatten(1).mean(1)


def latent_reward(candidates, t_cur, context):
    return 60.0 * candidates.flatten(1).mean(1)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("step_po") / "base")


@pytest.fixture(scope="module")
def trained(base):
    out = base.parent / "lpo"
    config = dataclasses.replace(CONFIG, threshold="sigma", threshold_min=0.35, threshold_max=0.5, rounds=4)
    metrics = train_step_po(base, PROMPTS, latent_reward, config, 0, out, base.parent / "lpo.json")
    return out, metrics


def same_weights(a, b) -> bool:
    a, b = unet_weights(a), unet_weights(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_saves_a_loadable_merged_pipeline_and_metrics(base, trained):
    out, metrics = trained
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    images = sample(load_pipeline(out), PROMPTS[:2], seeds=[0, 1], steps=2)
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    base_pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    assert all(torch.equal(a, b) for a, b in zip(pipe.text_encoder.state_dict().values(),
                                                  base_pipe.text_encoder.state_dict().values()))
    assert not same_weights(out, base), "the merged LoRA should have changed the UNet"
    assert not any("lora" in k for k in unet_weights(out))
    assert not out.with_name("lpo.ckpt").exists()

    assert json.loads(out.with_name("lpo.json").read_text()) == json.loads(json.dumps(metrics))
    per_t = metrics["per_timestep"]
    assert per_t["timestep"] == [667, 334, 1] and per_t["optimised"] == [True] * 3
    assert per_t["pairs_scored"] == [2 * 4] * 3  # 2 prompts x 4 rounds at every step
    assert sum(per_t["pairs_kept"]) == metrics["pairs_kept"] > 0
    assert len(metrics["loss_curve"]) == metrics["optimizer_steps"] > 0
    assert metrics["loss_curve"][0][1] == pytest.approx(math.log(2), abs=1e-6)  # policy starts as the reference
    assert all(math.isfinite(loss) for _, loss in metrics["loss_curve"])
    assert set(metrics["device_seconds"]) == {"reward", "sampling", "optimisation"}
    assert metrics["device_seconds"]["optimisation"] > 0 and metrics["processes"] == 1


class Interrupted(Exception):
    pass


def interrupt_after(calls: int):
    """keep_all, until the reward has been called `calls` times (3 calls a round): then the run dies."""
    seen = []

    def reward(candidates, t_cur, context):
        seen.append(t_cur)
        if len(seen) > calls:
            raise Interrupted
        return keep_all(candidates, t_cur, context)

    return reward


def test_resume_after_an_interruption_gives_the_uninterrupted_weights(base, tmp_path):
    with pytest.raises(Interrupted):
        train_step_po(base, PROMPTS, interrupt_after(2 * 3), CONFIG, 0, tmp_path / "resumed")
    assert (tmp_path / "resumed.ckpt" / "state.pt").exists() and not (tmp_path / "resumed").exists()

    resumed = train_step_po(base, PROMPTS, keep_all, CONFIG, 0, tmp_path / "resumed")
    uninterrupted = train_step_po(base, PROMPTS, keep_all, dataclasses.replace(CONFIG, checkpoint_every=100), 0,
                                  tmp_path / "uninterrupted")
    assert resumed["resumed_from_round"] == 2 and uninterrupted["resumed_from_round"] == 0
    assert resumed["loss_curve"] == uninterrupted["loss_curve"]
    assert resumed["per_timestep"]["pairs_kept"] == uninterrupted["per_timestep"]["pairs_kept"]
    assert same_weights(tmp_path / "resumed", tmp_path / "uninterrupted")
    assert not (tmp_path / "resumed.ckpt").exists()


def test_a_checkpoint_of_another_run_is_not_resumed(base, tmp_path):
    with pytest.raises(Interrupted):
        train_step_po(base, PROMPTS, interrupt_after(3), CONFIG, 0, tmp_path / "run")
    other_seed = train_step_po(base, PROMPTS, keep_all, CONFIG, 1, tmp_path / "run")
    assert other_seed["resumed_from_round"] == 0


TWO_PROCESSES = """
import json, sys
from lpo.config import from_dict
from lpo.optimize.step_trainer import StepPOConfig, train_step_po
args = json.loads(sys.argv[1])
train_step_po(args["base"], args["prompts"], lambda c, t, ctx: 1e4 * c.flatten(1).mean(1),
              from_dict(StepPOConfig, args["config"], "step_po"), 0, args["out"], args["metrics"])
"""


def test_two_processes_give_the_update_of_one_process_accumulating_two_micro_batches(base, tmp_path):
    two_processes = dataclasses.replace(CONFIG, rounds=2)  # a tuple per process and optimizer step
    args = {"base": str(base), "prompts": PROMPTS, "config": dataclasses.asdict(two_processes),
            "out": str(tmp_path / "two"), "metrics": str(tmp_path / "two.json")}
    run = launch_two_processes(TWO_PROCESSES, args, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())

    one = train_step_po(base, PROMPTS, keep_all, dataclasses.replace(two_processes, per_device_batch_size=1), 0,
                        tmp_path / "one")
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["per_timestep"]["pairs_kept"] == one["per_timestep"]["pairs_kept"] == [4, 4, 4]
    w_two, w_one, w_base = unet_weights(tmp_path / "two"), unet_weights(tmp_path / "one"), unet_weights(base)
    moved = max((w_one[k] - w_base[k]).abs().max().item() for k in w_one)
    gap = max((w_one[k] - w_two[k]).abs().max().item() for k in w_one)
    assert moved > 1e-3 and gap < 1e-5, (moved, gap)
    # beta = 500 times log-probabilities divided by sigma_t^2 ~ 4e-4 magnifies last-bit differences of the two
    # runs' kernels (other batch sizes and thread counts) in the loss, though not in the weights.
    assert np.allclose([loss for _, loss in two["loss_curve"]], [loss for _, loss in one["loss_curve"]], rtol=1e-3)


def test_the_timestep_range_limits_what_is_optimised(base, tmp_path):
    config = dataclasses.replace(CONFIG, timestep_range=(0, 500), rounds=1)  # grid t_cur - 1: 666, 333, 0
    metrics = train_step_po(base, PROMPTS, keep_all, config, 0, tmp_path / "spo")
    per_t = metrics["per_timestep"]
    assert per_t["optimised"] == [False, True, True]
    assert per_t["pairs_scored"] == [0, 2, 2] and per_t["pairs_kept"] == [0, 2, 2]
    assert per_t["mean_probability_gap"][0] is None


@pytest.mark.parametrize("change, message", [
    ({"lora_rank": 0}, "lora_rank=0: LoRA needs rank >= 1"),
    ({"samples_per_step": 1}, "samples_per_step=1: K must be >= 2"),
    ({"threshold_min": 0.0}, r"threshold_min=0.0 must lie in \(0, 1\)"),
    ({"threshold_max": 1.5}, r"threshold_max=1.5 must lie in \(0, 1\)"),
    ({"threshold": "cosine"}, "threshold='cosine'"),
    ({"timestep_range": [800, 200]}, "timestep_range"),
    ({"eps": 1.0}, "eps=1.0"),
    ({"train_batch_size": 0}, "train_batch_size=0")])
def test_bad_settings_name_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        from_dict(StepPOConfig, {**dataclasses.asdict(CONFIG), **change}, "lpo")


def test_empty_prompts_and_empty_ranges_fail_before_writing(base, tmp_path):
    with pytest.raises(ValueError, match="no training prompts"):
        train_step_po(base, [], keep_all, CONFIG, 0, tmp_path / "out")
    with pytest.raises(ValueError, match=r"timestep_range=\[700, 900\] holds none"):
        train_step_po(base, PROMPTS, keep_all, dataclasses.replace(CONFIG, timestep_range=(700, 900)), 0,
                      tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        train_step_po(tmp_path / "nowhere", PROMPTS, keep_all, CONFIG, 0, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_nan_loss_stops_naming_the_step_and_the_checkpoint(base, tmp_path, monkeypatch):
    real_loss, calls = lpo.optimize.step_trainer.step_dpo_loss, []

    def nan_in_round_two(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * math.nan if len(calls) > 3 else loss  # round 1 takes 3 optimizer steps

    monkeypatch.setattr(lpo.optimize.step_trainer, "step_dpo_loss", nan_in_round_two)
    with pytest.raises(FloatingPointError) as error:
        train_step_po(base, PROMPTS, keep_all, CONFIG, 0, tmp_path / "out", tmp_path / "metrics.json")
    message = str(error.value)
    assert "round 2, optimizer step 4" in message and "nan" in message
    assert str(tmp_path / "out.ckpt") in message and "after 1 rounds" in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------------- conditioning

@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "base")


def token_ids(tokenizer, texts):
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def test_sd15_type_conditioning_is_the_text_encoders_states_and_the_empty_prompts(base):
    pipe, cpu = load_pipeline(base), torch.device("cpu")
    cond, null = encode_prompts(pipe, PROMPTS[:2], cpu), null_conditioning(pipe, cpu)
    with torch.no_grad():
        expected = pipe.text_encoder(token_ids(pipe.tokenizer, PROMPTS[:2] + [""]))[0]
    assert cond.added_cond_kwargs is None and null.added_cond_kwargs is None
    assert torch.allclose(cond.encoder_hidden_states, expected[:2], atol=1e-6)
    assert torch.allclose(null.encoder_hidden_states, expected[2:], atol=1e-6)


def test_sdxl_type_conditioning_follows_the_pipeline_config(sdxl):
    pipe, cpu = load_pipeline(sdxl), torch.device("cpu")
    assert isinstance(pipe, StableDiffusionXLPipeline) and pipe.config.force_zeros_for_empty_prompt
    cond = encode_prompts(pipe, PROMPTS[:2], cpu)
    with torch.no_grad():
        first = pipe.text_encoder(token_ids(pipe.tokenizer, PROMPTS[:2]), output_hidden_states=True)
        second = pipe.text_encoder_2(token_ids(pipe.tokenizer_2, PROMPTS[:2]), output_hidden_states=True)
    # Both encoders' penultimate states side by side, text_encoder_2's pooled projection, an uncropped 64x64 image.
    assert torch.allclose(cond.encoder_hidden_states,
                          torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), atol=1e-6)
    assert torch.allclose(cond.added_cond_kwargs["text_embeds"], second.text_embeds, atol=1e-6)
    assert cond.added_cond_kwargs["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    assert encode_prompts(pipe, PROMPTS[:1], cpu, (48, 32)).added_cond_kwargs["time_ids"].tolist() == \
        [[48, 32, 0, 0, 48, 32]]

    zeros = null_conditioning(pipe, cpu)
    assert len(zeros) == 1 and not zeros.encoder_hidden_states.any()
    assert not zeros.added_cond_kwargs["text_embeds"].any()
    assert zeros.added_cond_kwargs["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]]
    unforced = StableDiffusionXLPipeline(**pipe.components, force_zeros_for_empty_prompt=False)
    empty, null = encode_prompts(unforced, [""], cpu), null_conditioning(unforced, cpu)
    assert empty.encoder_hidden_states.any()
    assert torch.equal(null.encoder_hidden_states, empty.encoder_hidden_states)
    assert torch.equal(null.added_cond_kwargs["text_embeds"], empty.added_cond_kwargs["text_embeds"])

