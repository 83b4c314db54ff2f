"""The Shapes world's base model on tiny configs: 16x16 coloured squares, a few training steps."""
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from lpo.world.base_model import (BaseModelConfig, TextEncoderConfig, UNetConfig, VAEConfig, _diffusion_loss,
                                  build_text_encoder, build_unet, check_image_size, sampling_scheduler,
                                  train_base_model, train_vae, training_scheduler)
from lpo.world.pipeline import load_pipeline, sample
from lpo.world.tokenizer import MAX_LENGTH, build_clip_tokenizer

SIZE = 16
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
VAE = VAEConfig(block_out_channels=(8, 16), norm_num_groups=4, steps=3, batch_size=8, warmup_steps=1)
BASE = BaseModelConfig(text_encoder=TextEncoderConfig(hidden_size=16, layers=1, heads=2),
                       unet=UNetConfig(block_out_channels=(16, 32), attention_head_dim=2, norm_num_groups=8),
                       steps=4, batch_size=8, warmup_steps=1, checkpoint_every=2)
PROMPTS = ["a red square on the left", "a blue square on the right", "a green square on the left", ""]


def squares(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    images = np.full((n, SIZE, SIZE, 3), 128, np.uint8)
    captions = []
    for image in images:
        color, side = rng.choice(list(COLORS)), rng.choice(["left", "right"])
        x = 1 if side == "left" else SIZE // 2 + 1
        image[4:11, x:x + 6] = COLORS[color]
        captions.append(f"a {color} square on the {side}")
    return images, captions


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tokenizer, data and a trained tiny VAE, shared by the tests."""
    root = tmp_path_factory.mktemp("world")
    build_clip_tokenizer(root / "tokenizer")
    images, captions = squares(40)
    vae_metrics = train_vae(images, SIZE, VAE, seed=0, out_dir=root / "vae")
    return {"root": root, "images": images, "captions": captions, "vae_metrics": vae_metrics}


def train(world, out_dir, config=BASE, seed=0, snapshots_dir=None) -> dict:
    return train_base_model(world["images"], world["captions"], world["root"] / "vae", world["root"] / "tokenizer",
                            config, seed, out_dir, snapshots_dir)


@pytest.fixture(scope="module")
def model(world):
    out_dir = world["root"] / "model"
    return out_dir, train(world, out_dir)


def weights(model_dir) -> dict[str, torch.Tensor]:
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", local_files_only=True)
    return {**{f"unet.{k}": v for k, v in unet.state_dict().items()},
            **{f"text.{k}": v for k, v in text_encoder.state_dict().items()}}


def assert_same_weights(dir_a, dir_b):
    a, b = weights(dir_a), weights(dir_b)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("size, blames", [(30, "VAE"), (36, "UNet")])
def test_check_image_size_names_the_config_key(size, blames):
    with pytest.raises(ValueError, match="world.image_size") as error:
        check_image_size(size, VAEConfig(), UNetConfig())
    assert blames in str(error.value) and "multiple of 8" in str(error.value)


def test_check_image_size_gives_the_latent_size():
    assert check_image_size(32, VAEConfig(), UNetConfig()) == 8
    assert check_image_size(64, VAEConfig(), UNetConfig()) == 16


def test_builders_follow_stable_diffusion():
    unet = build_unet(UNetConfig(), latent_size=8, latent_channels=4, cross_attention_dim=64)
    assert len(unet.config.down_block_types) >= 2
    assert set(unet.config.down_block_types) == {"CrossAttnDownBlock2D"}
    assert unet.config.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert unet.config.cross_attention_dim == 64 and unet.config.sample_size == 8
    text = build_text_encoder(TextEncoderConfig()).config
    assert (text.vocab_size, text.max_position_embeddings, text.projection_dim) == (49408, MAX_LENGTH, text.hidden_size)
    for scheduler in (training_scheduler(), sampling_scheduler()):
        c = scheduler.config
        assert (c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule) == (1000, 0.00085, 0.012,
                                                                                      "scaled_linear")
        assert (c.steps_offset, c.clip_sample, c.prediction_type, c.timestep_spacing) == (1, False, "epsilon",
                                                                                          "leading")
    assert sampling_scheduler().config.set_alpha_to_one is False


def test_train_vae_saves_a_scaled_autoencoder(world):
    vae = AutoencoderKL.from_pretrained(world["root"] / "vae", local_files_only=True)
    assert vae.config.sample_size == SIZE and vae.config.scaling_factor != 1.0
    assert vae.config.scaling_factor == pytest.approx(world["vae_metrics"]["scaling_factor"])
    assert np.isfinite(world["vae_metrics"]["heldout_psnr_db"]) and world["vae_metrics"]["heldout_images"] == 2


def test_base_model_saves_a_loadable_pipeline(world, model):
    out_dir, metrics = model
    pipe = StableDiffusionPipeline.from_pretrained(out_dir, local_files_only=True)
    assert pipe.safety_checker is None
    assert not out_dir.with_name("model.ckpt").exists()
    assert metrics["resumed_from_step"] == 0 and np.isfinite(metrics["final_loss"])
    images = sample(load_pipeline(out_dir), PROMPTS, seeds=[0, 1, 2, 3], steps=2)
    assert images.shape == (4, SIZE, SIZE, 3) and images.dtype == np.uint8


def test_v_prediction_model_saves_its_prediction_type(world, tmp_path):
    train(world, tmp_path / "v", dataclasses.replace(BASE, prediction_type="v_prediction", steps=2))
    pipe = load_pipeline(tmp_path / "v")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert sample(pipe, PROMPTS[:1], seeds=[0], steps=2).shape == (1, SIZE, SIZE, 3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_regresses_the_scheduler_target(prediction_type):
    """An oracle UNet that outputs the true target has zero loss, with or without Min-SNR weighting."""
    scheduler = training_scheduler(prediction_type)
    latents = torch.randn(6, 4, 4, 4)

    class Oracle(torch.nn.Module):
        def forward(self, noisy, timesteps, encoder_hidden_states):
            alpha = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
            noise = (noisy - alpha.sqrt() * latents) / (1 - alpha).sqrt()
            target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
            return type("Out", (), {"sample": target})

    text_encoder = lambda ids: (torch.zeros(len(ids), 3, 8),)  # noqa: E731
    for gamma in (None, 5.0):
        g = torch.Generator().manual_seed(0)
        noise, timesteps = torch.randn(latents.shape, generator=g), torch.randint(0, 1000, (6,), generator=g)
        loss = _diffusion_loss(text_encoder, Oracle(), scheduler, latents, torch.zeros(6, 3, dtype=torch.long),
                               noise, timesteps, gamma)
        assert loss.item() < 1e-8
    with pytest.raises(ValueError, match="base_model.prediction_type"):
        BaseModelConfig(prediction_type="sample")


def test_same_seed_gives_identical_weights(world, model, tmp_path):
    train(world, tmp_path / "again")
    assert_same_weights(model[0], tmp_path / "again")


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sample_does_not_depend_on_batching(model, eta):
    pipe = load_pipeline(model[0])
    one = sample(pipe, PROMPTS, seeds=[5, 6, 7, 8], steps=3, eta=eta, batch_size=1)
    four = sample(pipe, PROMPTS, seeds=[5, 6, 7, 8], steps=3, eta=eta, batch_size=4)
    # Identical content; CPU kernels may round the last bit differently for another batch size, which can move
    # a rare pixel by one level.
    assert np.abs(one.astype(int) - four).max() <= 1
    assert (one != four).mean() < 0.01
    assert not np.array_equal(one[0], one[2])


SAMPLE_SCRIPT = """
import sys
import numpy as np
import torch
from lpo.world.pipeline import load_pipeline, sample
images = sample(load_pipeline(sys.argv[1]), {prompts!r}, seeds=[5, 6, 7, 8], steps=3, batch_size=1)
if torch.distributed.get_rank() == 1:  # every process returns all the images
    np.save(sys.argv[2], images)
"""


def test_sampling_as_two_processes_gives_one_process_images(model, tmp_path):
    (tmp_path / "run.py").write_text(SAMPLE_SCRIPT.format(prompts=PROMPTS))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(tmp_path / "run.py"), str(model[0]), str(tmp_path / "two.npy")],
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    one = sample(load_pipeline(model[0]), PROMPTS, seeds=[5, 6, 7, 8], steps=3, batch_size=1)
    assert np.array_equal(np.load(tmp_path / "two.npy"), one)


def test_load_pipeline_names_the_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="world base-model") as error:
        load_pipeline(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value)


TRAIN_SCRIPT = """
import json, os, sys
from pathlib import Path
import numpy as np
from lpo.config import from_dict
from lpo.world.base_model import BaseModelConfig, train_base_model
args = json.loads(sys.argv[1])
data = np.load(args["data"])
metrics = train_base_model(data["images"], list(data["captions"]), args["vae"], args["tokenizer"],
                           from_dict(BaseModelConfig, args["config"], "base_model"), 0, args["out"],
                           args["out"] + ".snapshots")
# One file per process: the processes share the test's stdout pipe, where their lines can interleave.
Path(args["out"] + ".metrics" + os.environ.get("RANK", "0")).write_text(json.dumps(metrics))
"""


def script_args(world, tmp_path, config, out: str) -> str:
    np.savez(tmp_path / "data.npz", images=world["images"], captions=np.array(world["captions"]))
    return json.dumps({"data": str(tmp_path / "data.npz"), "vae": str(world["root"] / "vae"),
                       "tokenizer": str(world["root"] / "tokenizer"), "config": dataclasses.asdict(config),
                       "out": str(tmp_path / out)})


def test_two_processes_train_as_one(world, tmp_path):
    """The workflow's launch (torchrun, two CPU processes splitting each batch) trains the model one process
    trains, up to the order of floating-point sums."""
    config = dataclasses.replace(BASE, steps=6)
    (tmp_path / "run.py").write_text(TRAIN_SCRIPT)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(tmp_path / "run.py"), script_args(world, tmp_path, config, "two")],
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    two = [json.loads((tmp_path / f"two.metrics{rank}").read_text()) for rank in range(2)]
    one = train(world, tmp_path / "one", config)
    assert [m["processes"] for m in two] == [2, 2] and one["processes"] == 1
    assert np.allclose([v for _, v in two[0]["loss_curve"]], [v for _, v in one["loss_curve"]], rtol=1e-4)
    one_weights, two_weights = weights(tmp_path / "one"), weights(tmp_path / "two")
    torch.manual_seed(0)  # the initial UNet, built as train_base_model builds it
    build_text_encoder(BASE.text_encoder)
    initial = build_unet(BASE.unet, SIZE // 2, 4, BASE.text_encoder.hidden_size).state_dict()
    # Adam moves near-zero gradients' weights by about the learning rate whatever the gradient's last bits.
    gap = max((one_weights[k] - two_weights[k]).abs().max().item() for k in one_weights)
    moved = max((one_weights[f"unet.{k}"] - v).abs().max().item() for k, v in initial.items())
    assert moved > 1e-3 and gap < 0.01 * moved, (moved, gap)


def test_resume_after_a_kill_gives_the_uninterrupted_weights(world, tmp_path):
    # Snapshots before and after the kill: the resumed run takes the first from its checkpoint.
    config = dataclasses.replace(BASE, steps=30, checkpoint_every=5, snapshots=(3, 25))
    checkpoint = tmp_path / "resumed.ckpt" / "state.pt"
    # The killed run and its resumption (in this process) must sum in the same order: the same torch threads.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, script_args(world, tmp_path, config, "resumed")],
                          env=env, stderr=subprocess.DEVNULL) as run:
        deadline = time.time() + 120
        while not checkpoint.exists() and run.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        run.kill()
    assert checkpoint.exists() and not (tmp_path / "resumed").exists(), "the run ended before it could be killed"

    resumed = train(world, tmp_path / "resumed", config, snapshots_dir=tmp_path / "resumed.snapshots")
    uninterrupted = train(world, tmp_path / "uninterrupted", dataclasses.replace(config, checkpoint_every=1000),
                          snapshots_dir=tmp_path / "uninterrupted.snapshots")
    assert 3 < resumed["resumed_from_step"] < 25
    assert resumed["loss_curve"] == uninterrupted["loss_curve"]
    assert resumed["snapshots"] == uninterrupted["snapshots"] == [3, 25]
    assert_same_weights(tmp_path / "resumed", tmp_path / "uninterrupted")
    for step in ("step3", "step25"):
        assert_same_weights(tmp_path / "resumed.snapshots" / step, tmp_path / "uninterrupted.snapshots" / step)
        load_pipeline(tmp_path / "resumed.snapshots" / step)
    # Snapshots are the model at earlier steps: neither is the final one.
    final, early = weights(tmp_path / "resumed"), weights(tmp_path / "resumed.snapshots" / "step3")
    assert not all(torch.equal(final[k], early[k]) for k in final)
    assert not checkpoint.parent.exists()


def test_snapshot_settings_name_the_key():
    with pytest.raises(ValueError, match=r"base_model.snapshots=\[0\]"):
        dataclasses.replace(BASE, snapshots=(0,))
    with pytest.raises(ValueError, match="base_model.snapshots"):
        dataclasses.replace(BASE, steps=10, snapshots=(10,))
    with pytest.raises(ValueError, match="needs a directory"):
        train_base_model(np.zeros((1, SIZE, SIZE, 3), np.uint8), ["x"], "vae", "tok",
                         dataclasses.replace(BASE, snapshots=(1,)), 0, "out")
