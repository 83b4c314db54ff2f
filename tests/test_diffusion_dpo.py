"""Diffusion-DPO: the loss, the pair selection and the offline LoRA trainer on a tiny random SD1.5 pipeline, from
pairs in memory and from a stored dataset decoded batch by batch at the model's resolution."""
import dataclasses
import json
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from tiny_sd import IMAGE_SIZE, LATENT_SIZE, PROMPTS, SD15_DDIM, TEXT_DIM, build_tiny_pipeline, tiny_unet, unet_weights
from two_processes import launch_two_processes

import lpo.optimize.diffusion_dpo
import lpo.preference_data
from lpo.config import from_dict
from lpo.optimize.diffusion_dpo import DiffusionDPOConfig, decided_pairs, diffusion_dpo_loss, train_diffusion_dpo
from lpo.preference_data import load_pairs
from lpo.optimize.step_trainer import add_lora, reference_model
from lpo.images import decode_image, fit_square, png_bytes

CONFIG = DiffusionDPOConfig(lora_rank=2, learning_rate=1e-3, warmup_steps=2, batch_size=2, steps=4,
                            checkpoint_every=1)


def preference_data(n: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    images_0 = rng.integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    images_1 = rng.integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    label_0 = np.array([1.0, 0.0, 0.5, 1.0, 0.0, 1.0, 0.5, 0.0][:n])
    return images_0, images_1, captions, label_0


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("dpo") / "base")


def train(base, out, config=CONFIG, seed=0, metrics_path=None):
    return train_diffusion_dpo(base, *preference_data(), config, seed, out, metrics_path)


def test_loss_is_the_official_form():
    model_w, model_l, ref = torch.tensor([0.1000]), torch.tensor([0.1002]), torch.tensor([0.11])
    # inside = -5000 / 2 * ((0.1000 - 0.1002) - 0) = 0.5
    assert diffusion_dpo_loss(model_w, model_l, ref, ref, 5000.0).item() == pytest.approx(
        math.log1p(math.exp(-0.5)), rel=1e-4)
    assert diffusion_dpo_loss(model_w, model_w, ref, ref).item() == pytest.approx(math.log(2))


def test_ties_are_skipped_and_winners_come_first():
    images_0, images_1, captions, label_0 = preference_data()
    pairs = decided_pairs(images_0, images_1, captions, label_0)
    decided = [0, 1, 3, 4, 5, 7]
    assert len(pairs) == 6 and pairs.captions == [captions[i] for i in decided]
    winners, losers = pairs.batch(np.array([1, 0]))
    assert np.array_equal(winners[0], images_1[1]) and np.array_equal(losers[0], images_0[1])
    assert np.array_equal(winners[1], images_0[0]) and np.array_equal(losers[1], images_1[0])


@pytest.mark.parametrize("change, message", [
    ({"label_0": np.full(8, 0.5)}, "all 8 pairs are ties"),
    ({"captions": PROMPTS[:2]}, "one of each per pair"),
    ({"images_1": np.zeros((8, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)}, "images_1 must be uint8"),
    ({"label_0": np.full(8, 0.7)}, "label_0 must hold")])
def test_bad_pairs_are_named(change, message):
    images_0, images_1, captions, label_0 = preference_data()
    data = {"images_0": images_0, "images_1": images_1, "captions": captions, "label_0": label_0, **change}
    with pytest.raises(ValueError, match=message):
        decided_pairs(**data)


def test_gradient_prefers_the_winner():
    """After a few steps the policy denoises the winner better, relative to the reference, than the loser."""
    unet = tiny_unet().eval()
    params = add_lora(unet, rank=4, seed=0)
    scheduler = DDPMScheduler(**{k: v for k, v in SD15_DDIM.items() if k != "set_alpha_to_one"})
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE, generator=g)  # winner, loser
    noise = torch.randn(1, 4, LATENT_SIZE, LATENT_SIZE, generator=g).repeat(2, 1, 1, 1)
    timesteps = torch.tensor([400, 400])
    embeds = torch.randn(1, 77, TEXT_DIM, generator=g).repeat(2, 1, 1)
    noisy = scheduler.add_noise(latents, noise, timesteps)

    def errors():
        return (unet(noisy, timesteps, encoder_hidden_states=embeds).sample - noise).pow(2).flatten(1).mean(1)

    with torch.no_grad(), reference_model(unet):
        reference = errors()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for _ in range(5):
        model = errors()
        loss = diffusion_dpo_loss(model[:1], model[1:], reference[:1], reference[1:], beta_dpo=5000.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        model = errors()
    assert (model[0] - model[1]) - (reference[0] - reference[1]) < 0


def test_trains_and_saves_a_loadable_merged_pipeline(base, tmp_path):
    metrics = train(base, tmp_path / "dpo", metrics_path=tmp_path / "dpo.json")
    StableDiffusionPipeline.from_pretrained(tmp_path / "dpo", local_files_only=True)
    merged, original = unet_weights(tmp_path / "dpo"), unet_weights(base)
    assert merged.keys() == original.keys() and any(not torch.equal(merged[k], original[k]) for k in merged)
    assert metrics["pairs"] == 6 and metrics["ties_skipped"] == 2
    assert [s for s, _ in metrics["loss_curve"]] == [1, 2, 3, 4]
    assert metrics["loss_curve"][0][1] == pytest.approx(math.log(2), abs=1e-6)
    assert json.loads((tmp_path / "dpo.json").read_text()) == json.loads(json.dumps(metrics))
    assert not (tmp_path / "dpo.ckpt").exists()


class Interrupted(Exception):
    pass


def test_resume_after_an_interruption_gives_the_uninterrupted_weights(base, tmp_path, monkeypatch):
    real_loss, calls = lpo.optimize.diffusion_dpo.diffusion_dpo_loss, []

    def dies_at_step_three(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(lpo.optimize.diffusion_dpo, "diffusion_dpo_loss", dies_at_step_three)
    with pytest.raises(Interrupted):
        train(base, tmp_path / "resumed")
    assert (tmp_path / "resumed.ckpt" / "state.pt").exists() and not (tmp_path / "resumed").exists()
    resumed = train(base, tmp_path / "resumed")
    uninterrupted = train(base, tmp_path / "uninterrupted", dataclasses.replace(CONFIG, checkpoint_every=100))
    assert resumed["resumed_from_step"] == 2 and resumed["loss_curve"] == uninterrupted["loss_curve"]
    a, b = unet_weights(tmp_path / "resumed"), unet_weights(tmp_path / "uninterrupted")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_loss_stops_naming_the_step_and_the_checkpoint(base, tmp_path, monkeypatch):
    real_loss, calls = lpo.optimize.diffusion_dpo.diffusion_dpo_loss, []

    def nan_at_step_three(*args, **kwargs):
        calls.append(1)
        return real_loss(*args, **kwargs) * (math.nan if len(calls) == 3 else 1.0)

    monkeypatch.setattr(lpo.optimize.diffusion_dpo, "diffusion_dpo_loss", nan_at_step_three)
    with pytest.raises(FloatingPointError) as error:
        train(base, tmp_path / "out", metrics_path=tmp_path / "metrics.json")
    assert "optimizer step 3" in str(error.value) and "after 2 steps" in str(error.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "metrics.json").exists()


def test_bad_settings_are_named():
    for change, message in (({"lora_rank": 0}, "lora_rank=0"), ({"beta_dpo": 0}, "beta_dpo=0"),
                            ({"steps": 0}, "steps=0")):
        with pytest.raises(ValueError, match=message):
            from_dict(DiffusionDPOConfig, {**dataclasses.asdict(CONFIG), **change}, "diffusion_dpo")


def stored_pairs(root: Path, shape: tuple[int, int] = (24, 20)) -> Path:
    """The preference data as a Pick-a-Pic-layout DatasetDict, its images larger than the model and not square."""
    _, _, captions, label_0 = preference_data()
    rng = np.random.default_rng(1)
    n = len(captions)
    images = rng.integers(0, 256, (2, n, *shape, 3), dtype=np.uint8)
    train = {"caption": captions, "jpg_0": [png_bytes(im) for im in images[0]],
             "jpg_1": [png_bytes(im) for im in images[1]], "label_0": label_0.tolist(), "has_label": [1] * n,
             "num_example_per_prompt": [1] * n}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(train)}).save_to_disk(str(root / "dataset"))
    return root


def test_stored_pairs_are_decoded_per_batch_at_the_model_resolution(base, tmp_path, monkeypatch):
    """Pairs read lazily from a dataset of 24x20 images train as the same pairs decoded, resized and centre-cropped
    to the model's 16x16 up front; only the images of each step's batch are decoded."""
    pairs = load_pairs(stored_pairs(tmp_path), "train")
    decodes = []

    def counted(data, what):
        decodes.append(what)
        return decode_image(data, what)

    monkeypatch.setattr(lpo.preference_data, "decode_image", counted)
    lazy = train_diffusion_dpo(base, pairs.images_0, pairs.images_1, pairs.captions, pairs.label_0, CONFIG, 0,
                               tmp_path / "lazy")
    assert len(decodes) == CONFIG.steps * CONFIG.batch_size * 2
    eager = [np.stack([fit_square(im, IMAGE_SIZE) for im in np.asarray(images)])
             for images in (pairs.images_0, pairs.images_1)]
    assert eager[0].shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3)
    resized = train_diffusion_dpo(base, *eager, pairs.captions, pairs.label_0, CONFIG, 0, tmp_path / "eager")
    assert lazy["pairs"] == 6 and lazy["loss_curve"] == resized["loss_curve"]
    a, b = unet_weights(tmp_path / "lazy"), unet_weights(tmp_path / "eager")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Arrays in memory of another size are resized up front, the same way.
    larger = [np.asarray(images) for images in (pairs.images_0, pairs.images_1)]
    assert decided_pairs(*larger, pairs.captions, pairs.label_0).at_resolution(IMAGE_SIZE).batch(
        np.arange(6))[0].shape == (6, IMAGE_SIZE, IMAGE_SIZE, 3)


TWO_PROCESSES = """
import json, sys
import numpy as np
from lpo.config import from_dict
from lpo.optimize.diffusion_dpo import DiffusionDPOConfig, train_diffusion_dpo
args = json.loads(sys.argv[1])
data = np.load(args["data"])
train_diffusion_dpo(args["base"], data["images_0"], data["images_1"], list(data["captions"]), data["label_0"],
                    from_dict(DiffusionDPOConfig, args["config"], "diffusion_dpo"), 0, args["out"], args["metrics"])
"""


def test_two_processes_give_the_update_of_one_process_accumulating_two_micro_batches(base, tmp_path):
    images_0, images_1, captions, label_0 = preference_data()
    np.savez(tmp_path / "data.npz", images_0=images_0, images_1=images_1, captions=np.array(captions),
             label_0=label_0)
    two_processes = dataclasses.replace(CONFIG, steps=3)  # a pair per process and step
    args = {"base": str(base), "data": str(tmp_path / "data.npz"), "config": dataclasses.asdict(two_processes),
            "out": str(tmp_path / "two"), "metrics": str(tmp_path / "two.json")}
    run = launch_two_processes(TWO_PROCESSES, args, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    one = train(base, tmp_path / "one", dataclasses.replace(two_processes, per_device_batch_size=1))
    assert (two["processes"], two["accumulation_steps"]) == (2, 1)
    assert (one["processes"], one["accumulation_steps"]) == (1, 2)
    # beta_dpo = 5000 magnifies last-bit differences of the two runs' kernels in the loss, not in the weights.
    assert np.allclose([loss for _, loss in two["loss_curve"]], [loss for _, loss in one["loss_curve"]], rtol=1e-3)
    w_two, w_one = unet_weights(tmp_path / "two"), unet_weights(tmp_path / "one")
    assert max((w_one[k] - w_two[k]).abs().max().item() for k in w_one) < 1e-5
