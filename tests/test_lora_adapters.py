"""The LoRA adapter every trainer writes beside its merged pipeline: the base pipeline with diffusers'
load_lora_weights, and a bare UNet with peft, compute what the merged pipeline computes."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import LoraConfig, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from test_diffusion_dpo import CONFIG as DPO_CONFIG, preference_data
from test_step_trainer import CONFIG as STEP_PO_CONFIG, keep_all
from tiny_sd import PROMPTS, TEXT_DIM, build_tiny_pipeline, build_tiny_sdxl_pipeline

from lpo.optimize.diffusion_dpo import train_diffusion_dpo
from lpo.optimize.step_trainer import reference_model, train_step_po
from lpo.pipelines import load_pipeline_dir

ADAPTER = "pytorch_lora_weights.safetensors"
# Two optimizer steps each (LPO: 2 prompts x 2 optimised steps = 4 tuples, 2 a step), at learning rates high enough
# to move the images far past the tolerance.
STEP_PO = dataclasses.replace(STEP_PO_CONFIG, timestep_range=(0, 500), rounds=1, learning_rate=2e-2)
DPO = dataclasses.replace(DPO_CONFIG, warmup_steps=0, steps=2, learning_rate=2e-2)
TOLERANCE = 1e-4


def train(trainer: str, base, out):
    if trainer == "step_po":
        train_step_po(base, PROMPTS, keep_all, STEP_PO, 0, out)
    else:
        train_diffusion_dpo(base, *preference_data(), DPO, 0, out)
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"sd": build_tiny_pipeline(root / "sd"), "sdxl": build_tiny_sdxl_pipeline(root / "sdxl")}


def image(pipe) -> np.ndarray:
    return pipe(PROMPTS[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").images[0]


# Both trainers save through the same code; SDXL-type pipelines once, their pipeline class saving the adapter.
@pytest.mark.parametrize("trainer, kind", [("step_po", "sd"), ("diffusion_dpo", "sd"), ("diffusion_dpo", "sdxl")])
def test_the_base_pipeline_with_the_adapter_gives_the_merged_pipelines_image(bases, tmp_path, trainer, kind):
    out = train(trainer, bases[kind], tmp_path / "out")
    with safe_open(out / ADAPTER, "pt") as adapter:
        assert {key.split(".")[0] for key in adapter.keys()} == {"unet"}  # diffusers' layout; the UNet only
    merged = image(load_pipeline_dir(out))
    pipe = load_pipeline_dir(bases[kind])
    unadapted = image(pipe)
    pipe.load_lora_weights(out)
    adapted = image(pipe)
    assert np.abs(merged - unadapted).max() > 100 * TOLERANCE, "training should have changed the image"
    assert np.abs(merged - adapted).max() < TOLERANCE


def test_the_adapter_loads_into_a_bare_unet_with_peft(bases, tmp_path):
    """Its metadata is the LoraConfig it was trained with; its weights, in peft's names, fill that config's LoRA."""
    out = train("step_po", bases["sd"], tmp_path / "out")
    with safe_open(out / ADAPTER, "pt") as adapter:
        metadata = json.loads(adapter.metadata()["lora_adapter_metadata"])
    # Sorted, not in the set order of this process's string hashing: the same run writes the same bytes.
    assert metadata["unet.target_modules"] == sorted(metadata["unet.target_modules"])
    config = LoraConfig(**{key.removeprefix("unet."): value for key, value in metadata.items()})
    assert config.r == config.lora_alpha == STEP_PO.lora_rank
    unet = UNet2DConditionModel.from_pretrained(bases["sd"], subfolder="unet")
    unet.add_adapter(config)
    weights = {key.removeprefix("unet."): value for key, value in load_file(out / ADAPTER).items()}
    loaded = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(weights))
    assert not loaded.unexpected_keys and not [key for key in loaded.missing_keys if "lora" in key]

    merged = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, TEXT_DIM, generator=g)
    with torch.no_grad():
        expected = merged(latents, 500, encoder_hidden_states=text).sample
        assert torch.allclose(unet(latents, 500, encoder_hidden_states=text).sample, expected, atol=TOLERANCE)
        with reference_model(unet):
            assert not torch.allclose(unet(latents, 500, encoder_hidden_states=text).sample, expected,
                                      atol=100 * TOLERANCE)
