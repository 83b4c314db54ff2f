"""SPO's step-aware preference model on a tiny random Stable Diffusion (VAE and UNet (8, 16), 16x16 images)."""
import dataclasses
import logging

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from kills import killed_at_call
from test_preference_data import write_preferences

from lpo.reward.pixel import PixelReward, PixelRewardConfig, step_aware_copy
from lpo.preference_data import load_pairs
from lpo.reward import spm as spm_module
from lpo.reward.spm import (SPM, SPO_GRID, CleanImagePredictor, SPMConfig, decode_latents, spo_timesteps, train_spm,
                            x0_prediction)
from lpo.world.base_model import (TextEncoderConfig, UNetConfig, VAEConfig, build_text_encoder, build_unet, build_vae,
                                  sampling_scheduler)
from lpo.images import to_tensor
from lpo.world.clip import CLIPArchitecture, load_tokenizer
from lpo.world.tokenizer import build_clip_tokenizer

SIZE = 16
PIXEL = PixelRewardConfig()
ARCH = CLIPArchitecture(width=8, embed_dim=16, text_width=16, text_layers=1, text_heads=2)
TINY = SPMConfig(steps=4, batch_size=8, learning_rate=1e-3, warmup_steps=1, validate_every=2,
                 validation_grid=(0, 750))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    tokenizer = build_clip_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    vae = build_vae(VAEConfig(block_out_channels=(8, 16)), SIZE)
    text_encoder = build_text_encoder(TextEncoderConfig(hidden_size=16, layers=1, heads=2))
    unet = build_unet(UNetConfig(block_out_channels=(8, 16), norm_num_groups=8), SIZE // 2, 4, 16)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=sampling_scheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    prefs = write_preferences(root / "prefs", image_size=SIZE, sizes={"train": 24, "validation_unique": 8})
    pixel = PixelReward(PIXEL, ARCH, load_tokenizer(root / "tokenizer")).eval()
    return {"pipeline": pipeline, "pixel": pixel, "train": load_pairs(prefs, "train"),
            "validation": load_pairs(prefs, "validation_unique")}


def test_x0_prediction_is_the_ddim_formula(world):
    pipe = world["pipeline"]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((4, 4, SIZE // 2, SIZE // 2), generator=generator)
    timesteps = torch.tensor([1, 251, 501, 751])
    predictor = CleanImagePredictor(pipe)
    with torch.no_grad():
        cond = pipe.text_encoder(predictor.prompt_ids(["a red circle"] * 4))[0]
        uncond = pipe.text_encoder(predictor.prompt_ids([""] * 4))[0]
        eps_c = pipe.unet(latents, timesteps, encoder_hidden_states=cond).sample.double()
        eps_u = pipe.unet(latents, timesteps, encoder_hidden_states=uncond).sample.double()
        plain = x0_prediction(pipe.unet, pipe.scheduler, latents, timesteps, cond)
        guided = x0_prediction(pipe.unet, pipe.scheduler, latents, timesteps, cond, 5.0, uncond)
    a = pipe.scheduler.alphas_cumprod[timesteps].double().reshape(-1, 1, 1, 1)
    for eps, x0 in ((eps_c, plain), (eps_u + 5.0 * (eps_c - eps_u), guided)):
        by_hand = (latents.double() - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
        assert torch.allclose(x0.double(), by_hand, atol=1e-4)
    # The same x0_hat diffusers' DDIM step reports.
    pipe.scheduler.set_timesteps(20)
    t = pipe.scheduler.timesteps[5]
    with torch.no_grad():
        reference = pipe.scheduler.step(pipe.unet(latents[:1], t, encoder_hidden_states=cond[:1]).sample, t,
                                        latents[:1]).pred_original_sample
        ours = x0_prediction(pipe.unet, pipe.scheduler, latents[:1], t, cond[:1])
    assert torch.allclose(ours, reference, atol=1e-5)


def test_spo_grid_lands_on_the_20_step_sampler_timesteps(world):
    scheduler = world["pipeline"].scheduler
    timesteps = spo_timesteps(scheduler, SPO_GRID)
    assert timesteps.tolist() == list(range(1, 752, 50))
    scheduler.set_timesteps(20)
    assert set(timesteps.tolist()) <= set(scheduler.timesteps.tolist())
    with pytest.raises(ValueError, match="leaves the scheduler"):
        spo_timesteps(scheduler, [999])


def test_spm_scores_latents_at_every_grid_timestep(world):
    pipe, pixel = world["pipeline"], world["pixel"]
    spm = SPM(step_aware_copy(pixel), pipe, SPMConfig())
    latents = torch.randn((3, 4, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(1))
    captions = ["a large red circle on a gray background, in the center"] * 3
    predictor = spm.predictor
    for t in [0, *spo_timesteps(pipe.scheduler, SPO_GRID).tolist()]:
        scores = spm.score_latents(latents, t, captions)
        assert scores.shape == (3,) and torch.isfinite(scores).all()
        # Before training, the SPM is the pixel model on the decoded x0_hat; at t = 0 the latent itself is decoded.
        timesteps = torch.full((3,), t)
        with torch.no_grad():
            if t == 0:
                images = decode_latents(pipe.vae, latents)
            else:
                cond, uncond = predictor.text_embeddings(predictor.prompt_ids(captions))
                images = decode_latents(pipe.vae, x0_prediction(pipe.unet, pipe.scheduler, latents, timesteps, cond,
                                                                5.0, uncond))
            assert torch.allclose(scores, pixel(images, captions), atol=1e-5)
            assert torch.allclose(spm.score_clean_latents(
                latents if t == 0 else x0_prediction(pipe.unet, pipe.scheduler, latents, timesteps, cond, 5.0,
                                                     uncond), t, captions), scores, atol=1e-5)
    ids = predictor.prompt_ids(captions)
    assert torch.allclose(spm.score_latents(latents, torch.tensor([1, 51, 101]), ids),
                          torch.stack([spm.score_latents(latents[i:i + 1], t, captions[:1])[0]
                                       for i, t in enumerate((1, 51, 101))]), atol=1e-5)


def test_shared_noise_noises_both_images_of_a_pair_alike(world):
    predictor = CleanImagePredictor(world["pipeline"])
    images = to_tensor(np.concatenate([world["train"].images_0[:4]] * 2))
    t = torch.full((8,), 951)

    def gap(shared):
        x = predictor.noisy_latents(images, t, torch.Generator().manual_seed(0), shared)
        return (x[:4] - x[4:]).abs().mean().item()

    assert gap(True) < 0.25 * gap(False)


@pytest.fixture(scope="module")
def trained(world):
    return train_spm(world["pixel"], world["pipeline"], world["train"], world["validation"], TINY, seed=0)


def test_training_reaches_the_timestep_conditioning_and_leaves_the_pixel_model(world, trained):
    spm, metrics = trained
    assert all(m.weight.abs().sum() > 0 for m in spm.model.image_tower.modulations)
    assert not world["pixel"].step_aware and not hasattr(world["pixel"], "time_embedding")
    # Batch-norm statistics stay the pixel model's: adapting to the timestep is AdaLN's job.
    pixel_buffers = dict(world["pixel"].named_buffers())
    assert all(torch.equal(v, pixel_buffers[k]) for k, v in spm.model.named_buffers() if "running" in k)
    assert [c["step"] for c in metrics["validation_curve"]] == [0, 2, 4]
    assert set(metrics["best_validation"]["accuracy_by_timestep"]) == {"1", "751"}
    assert metrics["grid_timesteps"] == list(range(1, 752, 50))


def test_same_seed_same_spm(world, trained):
    again, _ = train_spm(world["pixel"], world["pipeline"], world["train"], world["validation"], TINY, seed=0)
    other, _ = train_spm(world["pixel"], world["pipeline"], world["train"], world["validation"],
                         dataclasses.replace(TINY, validate_every=10), seed=1)
    a, b, c = (s.model.state_dict() for s in (trained[0], again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


RESUMABLE = dataclasses.replace(TINY, steps=6, validate_every=3, checkpoint_every=2)


def spm_run(world, config, seed=0, out=None):
    return train_spm(world["pixel"], world["pipeline"], world["train"], world["validation"], config, seed, out=out)


def killed_run(world, out, config=RESUMABLE):
    """A run killed at step 4 of 6: after the checkpoint of step 2, before the one of step 4."""
    with killed_at_call(spm_module, "pair_loss", 4):
        spm_run(world, config, out=out)
    assert (out.parent / (out.name + ".ckpt") / "state.pt").exists() and not out.exists()


def test_kill_then_rerun_resumes_and_ends_with_the_same_weights(world, tmp_path):
    whole, whole_metrics = spm_run(world, RESUMABLE)
    killed_run(world, tmp_path / "killed")
    resumed, metrics = spm_run(world, RESUMABLE, out=tmp_path / "killed")
    assert metrics["resumed_from_step"] == 2 and whole_metrics["resumed_from_step"] == 0
    a = whole.model.state_dict()
    for b in (resumed.model.state_dict(), SPM.load(tmp_path / "killed", world["pipeline"]).model.state_dict()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for key in ("loss_curve", "validation_curve", "best_step"):
        assert metrics[key] == whole_metrics[key]
    assert not (tmp_path / "killed.ckpt").exists()


def test_a_checkpoint_of_other_settings_is_ignored(world, trained, tmp_path, caplog):
    killed_run(world, tmp_path / "spm")
    with caplog.at_level(logging.WARNING, logger="lpo.checkpoint"):
        spm, metrics = spm_run(world, TINY, out=tmp_path / "spm")
    assert metrics["resumed_from_step"] == 0 and "ignoring checkpoint" in caplog.text
    a, b = trained[0].model.state_dict(), spm.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "spm" / "spm.json").exists() and not (tmp_path / "spm.ckpt").exists()


def test_save_then_load_gives_identical_scores(world, trained, tmp_path):
    spm, _ = trained
    spm.save(tmp_path / "spm")
    loaded = SPM.load(tmp_path / "spm", world["pipeline"])
    assert loaded.config == spm.config
    latents = torch.randn((4, 4, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(2))
    captions = world["validation"].captions[:4]
    t = torch.tensor([1, 201, 501, 751])
    assert torch.equal(loaded.score_latents(latents, t, captions), spm.score_latents(latents, t, captions))


def test_bad_inputs_get_clear_errors(world, tmp_path):
    with pytest.raises(ValueError, match="step-aware"):
        SPM(world["pixel"], world["pipeline"], SPMConfig())
    with pytest.raises(FileNotFoundError, match="reward spm"):
        SPM.load(tmp_path / "missing", world["pipeline"])
    cropped = dataclasses.replace(world["train"], images_0=world["train"].images_0[:, :14, :14],
                                  images_1=world["train"].images_1[:, :14, :14])
    with pytest.raises(ValueError, match="multiples of 4"):
        train_spm(world["pixel"], world["pipeline"], cropped, world["validation"], TINY, seed=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        SPMConfig(guidance_scale=0.5)
