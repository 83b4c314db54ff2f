"""The noise-calibrated LRM options (DiNa-LRM): the Thurstone likelihood against hand-computed values, s(t) from the
noise schedule or learned, the FiLM head starting as the plain one, save / load, and their bad input."""
import math

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from lpo.config import from_dict
from lpo.reward.lrm import LatentRewardModel, LRMConfig
from lpo.reward.pair_loss import pair_loss
from lpo.timing.architectures import SD15_UNET, tiny
from test_lrm import PROMPTS, text_encoder, tokenizer  # noqa: F401 (a fixture)

ALPHAS = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod


def lrm(tokenizer, **config) -> LatentRewardModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**tiny(SD15_UNET), "sample_size": 16})
    return LatentRewardModel(unet, text_encoder(unet.config.cross_attention_dim), tokenizer,
                             LRMConfig(head_backend="reference", **config), alphas_cumprod=ALPHAS).eval()


def test_thurstone_pair_loss_by_hand():
    # P(0 > 1) = Phi((1 - 0) / (sqrt(2) * 1)) = Phi(0.70711) = 0.76025; a decided pair costs -log of its winner's P.
    one = torch.tensor([1.0])
    assert pair_loss(one, torch.tensor([0.0]), one, scale=one).item() == pytest.approx(-math.log(0.760250), abs=1e-5)
    assert pair_loss(one, torch.tensor([0.0]), torch.tensor([0.0]), scale=one).item() == pytest.approx(
        -math.log(1 - 0.760250), abs=1e-5)
    # Twice the uncertainty halves z: Phi(0.35355) = 0.63816.
    assert pair_loss(one, torch.tensor([0.0]), one, scale=2 * one).item() == pytest.approx(-math.log(0.638163),
                                                                                        abs=1e-5)
    # A tie predicted as a tie costs nothing, as under Bradley-Terry.
    assert pair_loss(one, one, torch.tensor([0.5]), scale=one).item() == pytest.approx(0.0, abs=1e-7)


def test_sigma_uncertainty_follows_the_noise_schedule(tokenizer):
    model = lrm(tokenizer, likelihood="thurstone", uncertainty="sigma", uncertainty_scale=0.5)
    t = torch.tensor([0, 501, 951])
    assert torch.allclose(model.noise_scale(t), 0.5 / ALPHAS[t].sqrt())
    assert (model.noise_scale(t).diff() > 0).all()  # more noise, less certainty


def test_learned_uncertainty_starts_at_its_scale_and_trains(tokenizer):
    model = lrm(tokenizer, likelihood="thurstone", uncertainty="learned", uncertainty_scale=2.0)
    t = torch.tensor([1, 501, 951])
    assert torch.allclose(model.noise_scale(t), torch.full((3,), 2.0))
    pair_loss(torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 1.0, 0.5]), torch.tensor([1.0, 1.0, 0.0]),
              scale=model.noise_scale(t)).backward()
    assert model.uncertainty.net[-1].weight.grad.abs().sum() > 0


def test_bradley_terry_has_no_uncertainty(tokenizer):
    model = lrm(tokenizer)
    assert model.noise_scale(torch.tensor([1])) is None and model.uncertainty is None and model.film is None
    p = model.pair_probability(torch.tensor([2.0]), torch.tensor([1.0]), 1)
    assert p.item() == pytest.approx(1 / (1 + math.exp(-1.0)))


def test_film_head_starts_as_the_plain_head(tokenizer):
    plain, film = lrm(tokenizer), lrm(tokenizer, head="film")
    film.load_state_dict(plain.state_dict(), strict=False)
    latents = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(film.score(latents, 501, PROMPTS), plain.score(latents, 501, PROMPTS))
        torch.nn.init.normal_(film.film.net[-1].weight)
        assert not torch.allclose(film.score(latents, 501, PROMPTS), plain.score(latents, 501, PROMPTS))
        # The modulation depends on t.
        assert not torch.allclose(film.score(latents, torch.tensor([1, 1]), PROMPTS),
                                  film.score(latents, torch.tensor([951, 951]), PROMPTS))


def test_calibrated_lrm_saves_and_loads(tokenizer, tmp_path):
    model = lrm(tokenizer, likelihood="thurstone", uncertainty="learned", head="film")
    with torch.no_grad():
        torch.nn.init.normal_(model.film.net[-1].weight)
        torch.nn.init.normal_(model.uncertainty.net[-1].weight)
    tokenizer.save_pretrained(tmp_path / "base" / "tokenizer")
    model.save(tmp_path / "lrm")
    again = LatentRewardModel.load(tmp_path / "lrm", tokenizer_dir=tmp_path / "base").eval()
    latents, t = torch.randn(2, 4, 16, 16), torch.tensor([51, 901])
    with torch.no_grad():
        assert torch.equal(again.score(latents, t, PROMPTS), model.score(latents, t, PROMPTS))
        assert torch.equal(again.noise_scale(t), model.noise_scale(t))
        assert torch.equal(again.uncertainty.alphas_cumprod, ALPHAS.float())


@pytest.mark.parametrize("settings, words", [
    ({"likelihood": "thurstone", "uncertainty": "sigma", "uncertainty_scale": 0.0},
     ["lrm.model.uncertainty_scale=0.0 must be > 0"]),
    ({"likelihood": "thurstone", "uncertainty_scale": -1.0}, ["lrm.model.uncertainty_scale=-1.0"]),
    ({"likelihood": "probit"}, ["lrm.model.likelihood='probit'", "bradley_terry or thurstone"]),
    ({"head": "mlp"}, ["lrm.model.head='mlp'", "plain or film"]),
])
def test_bad_calibration_settings_name_the_key(settings, words):
    with pytest.raises(ValueError) as error:
        LRMConfig(**settings)
    assert all(w in str(error.value) for w in words)


def test_thurstone_needs_the_noise_schedule(tokenizer):
    unet = UNet2DConditionModel(**{**tiny(SD15_UNET), "sample_size": 16})
    with pytest.raises(ValueError, match="noise schedule"):
        LatentRewardModel(unet, text_encoder(unet.config.cross_attention_dim), tokenizer,
                          LRMConfig(likelihood="thurstone"))


def test_a_calibrated_lrm_trains_and_its_uncertainty_learns(tmp_path):
    from test_preference_data import write_preferences
    from tiny_sd import IMAGE_SIZE, build_tiny_pipeline

    from lpo.preference_data import load_pairs
    from lpo.reward.lrm_training import LRMTrainConfig, train_lrm
    model = build_tiny_pipeline(tmp_path / "base")
    prefs = write_preferences(tmp_path / "prefs", image_size=IMAGE_SIZE,
                              sizes={"train": 16, "validation_unique": 8, "test_unique": 4})
    config = LRMTrainConfig(model=LRMConfig(head_backend="reference", likelihood="thurstone", head="film"), steps=4,
                            batch_size=4, learning_rate=1e-2, warmup_steps=1, validate_every=2, checkpoint_every=2)
    metrics = train_lrm(model, load_pairs(prefs, "train"), load_pairs(prefs, "validation_unique"), config, seed=0,
                        out_dir=tmp_path / "lrm")
    assert all(math.isfinite(loss) for _, loss in metrics["loss_curve"])
    trained = LatentRewardModel.load(tmp_path / "lrm", tokenizer_dir=model)
    assert trained.config.likelihood == "thurstone" and trained.film is not None
    t = torch.tensor([1, 951])
    with torch.no_grad():
        # The learned s(t) left its constant start, and the FiLM head its identity.
        assert not torch.allclose(trained.noise_scale(t), torch.ones(2))
        assert trained.film.net[-1].weight.abs().sum() > 0


def test_the_calibrated_section_overrides_the_lrm_model_settings_only():
    from lpo.reward.lrm import CalibratedLRMConfig
    model = LRMConfig(guidance_scale=3.0, multi_scale=False)
    calibrated = CalibratedLRMConfig().over(model)
    assert (calibrated.likelihood, calibrated.head, calibrated.uncertainty) == ("thurstone", "film", "learned")
    assert (calibrated.guidance_scale, calibrated.multi_scale) == (3.0, False)


@pytest.mark.parametrize("change, message", [
    ({"uncertainty_scale": 0.0}, "lrm_calibrated.uncertainty_scale=0.0 must be > 0"),
    ({"likelihood": "logistic"}, "lrm_calibrated.likelihood='logistic': use bradley_terry or thurstone"),
])
def test_bad_calibrated_settings_name_the_key(change, message):
    from lpo.reward.lrm import CalibratedLRMConfig
    with pytest.raises(ValueError, match=message):
        from_dict(CalibratedLRMConfig, change, "lrm_calibrated")
