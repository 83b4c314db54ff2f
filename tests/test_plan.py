"""`lpo plan`: parameter counts and saved activations measured on the meta device agree with real builds, the batch
arithmetic is lpo.launch's, a setting over the memory says so with one that fits, and bad input is one clear line."""
import contextlib
import io
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor

from lpo.cli import main
from lpo.config import DEFAULT_CONFIG, from_dict, read_config
from lpo.optimize.step_trainer import add_lora
from lpo.reward.lrm import LatentRewardModel, LRMConfig
from lpo.timing.architectures import SD15_UNET, tiny
from lpo.timing.plan import (GIB, STAGES, Footprint, Setting, accumulation_steps, fitting_settings, footprint,
                             memory_bytes, saved_bytes, setting_table, shapes_models)
from lpo.world.base_model import (BaseModelConfig, VAEConfig, build_text_encoder, build_unet, build_vae,
                                  check_image_size)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes_config():
    return read_config([str(DEFAULT_CONFIG)])


def real_shapes_models(config):
    """The embedded world's models built for real on the CPU, as its stages build them."""
    base = from_dict(BaseModelConfig, config["base_model"], "base_model")
    vae = from_dict(VAEConfig, config["vae"], "vae")
    size = config["world"]["image_size"]
    unet = build_unet(base.unet, check_image_size(size, vae, base.unet), vae.latent_channels,
                      base.text_encoder.hidden_size)
    return unet, build_text_encoder(base.text_encoder), build_vae(vae, size)


def test_parameter_counts_on_meta_equal_a_real_build(shapes_config):
    unet, text_encoder, vae = real_shapes_models(shapes_config)
    lrm = LatentRewardModel(unet, text_encoder, None, LRMConfig())
    lrm_plan = footprint(STAGES["lrm"], shapes_config, lambda: shapes_models(shapes_config))
    assert lrm_plan.trained + lrm_plan.frozen == sum(p.numel() for m in (lrm, vae) for p in m.parameters())
    unread = sum(p.numel() for m in lrm.unread_modules() for p in m.parameters())
    assert lrm_plan.frozen == unread + sum(p.numel() for p in vae.parameters())

    lora = sum(p.numel() for p in add_lora(unet, shapes_config["diffusion_dpo"]["lora_rank"], seed=0))
    dpo_plan = footprint(STAGES["diffusion_dpo"], shapes_config, lambda: shapes_models(shapes_config))
    assert dpo_plan.trained == lora > 0
    base = sum(p.numel() for m in (text_encoder, vae) for p in m.parameters()) + \
        sum(p.numel() for n, p in unet.named_parameters() if "lora" not in n)
    assert dpo_plan.frozen == base


def test_saved_activations_on_meta_equal_the_real_ones_and_checkpointing_saves_less():
    config = {**tiny(SD15_UNET), "sample_size": 8}

    def measure(device):
        with torch.device(device):
            torch.manual_seed(0)
            unet = UNet2DConditionModel(**config)
            inputs = (torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, config["cross_attention_dim"]))
        unet.set_attn_processor(AttnProcessor())
        plain = saved_bytes(lambda: unet(*inputs), unet.parameters())
        unet.enable_gradient_checkpointing()
        return plain, saved_bytes(lambda: unet(*inputs), unet.parameters())

    meta, cpu = measure("meta"), measure("cpu")
    assert meta == cpu
    assert 0 < meta[1] < meta[0]


def test_footprints_checkpointed_below_plain(shapes_config):
    for name in ("base_model", "lrm", "lpo"):
        fp = footprint(STAGES[name], shapes_config, lambda: shapes_models(shapes_config))
        assert 0 < fp.activations_checkpointed < fp.activations, name


def test_accumulation_is_global_over_processes_and_micro_batches():
    assert accumulation_steps(128, 8, 16) == 1
    assert accumulation_steps(128, 1, 16) == 8
    assert accumulation_steps(128, 8, None) == 1
    with pytest.raises(ValueError, match="does not split evenly over 3 processes"):
        accumulation_steps(128, 3, None)


FAKE = Footprint(STAGES["lrm"], trained=400_000_000, frozen=600_000_000, activations=7 * GIB,
                 activations_checkpointed=0.4 * GIB, what="")


def test_memory_formula():
    setting = Setting(128, 8, 16, "no", False)
    assert memory_bytes(FAKE, setting) == 16 * 4e8 + 4 * 6e8 + 7 * GIB * 16
    half = Setting(128, 8, 16, "bf16", True)
    assert memory_bytes(FAKE, half) == 16 * 4e8 + 2 * 6e8 + 0.4 * GIB * 0.5 * 16


def test_a_setting_over_the_memory_says_so_and_gives_one_that_fits():
    config = {"sd_world": {}, "lrm": {"batch_size": 128, "per_device_batch_size": 16, "mixed_precision": "bf16"},
              "resources": {"default": {"runtime": 60}, "rules": {"sd_reward_lrm": {"runtime": 1125}}}}
    lines = setting_table(config, "no-such-world", [FAKE], {"lrm": 1}, 24 * GIB, "GPU")
    row = next(line for line in lines if line.startswith("| LRM"))
    assert "**does not fit**" in row and "| 16 | 8 | bf16 |" in row and "unmeasured" in row and "1125 min" in row
    note = next(line for line in lines if line.startswith("- **LRM does not fit** in 24 GiB"))
    assert "per-device batch 4 (accumulation 32), bf16," in note
    assert "per-device batch 64 (accumulation 2), bf16, gradient checkpointing," in note
    for fitting in fitting_settings(FAKE, Setting(128, 1, 16, "bf16", False), 24 * GIB):
        assert fitting is None or (128 % fitting.batch() == 0 and memory_bytes(FAKE, fitting) <= 24 * GIB)

    huge = Footprint(STAGES["lrm"], 2_000_000_000, 0, GIB, GIB, "")
    lines = setting_table(config, "no-such-world", [huge], {"lrm": 1}, 24 * GIB, "GPU")
    assert any("Nothing fits at any per-device batch" in line for line in lines)


def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("argv, names", [
    (["--gpus", "0"], ["--gpus 0", ">= 1"]),
    (["--gpu-mem", "-1"], ["--gpu-mem -1", "> 0"]),
    (["--gpu-mem", "nan"], ["--gpu-mem nan", "> 0"]),
    (["--configfile", "config/no-such.yaml"], ["--configfile config/no-such.yaml", "config/sd15.yaml"]),
])
def test_bad_input_is_one_clear_line(argv, names):
    code, out, err = run_cli("plan", *argv)
    assert code == 2 and not out
    errors = [line for line in err.splitlines() if line.startswith("lpo: error: ")]
    assert len(errors) == 1 and all(name in errors[0] for name in names), err


def test_the_embedded_world_plan(shapes_config):
    code, out, _ = run_cli("plan")
    assert code == 0
    assert out.startswith("# Memory and time plan\n\nGenerated by `python -m lpo plan --gpus 1`")
    for stage in ("base model", "LRM", "LPO", "SPO", "Diffusion-DPO"):
        assert sum(line.startswith(f"| {stage} |") for line in out.splitlines()) == 2, stage
    base_row = [line for line in out.splitlines() if line.startswith("| base model |")][1]
    processes = shapes_config["compute"]["processes"]
    assert f"| {processes} | {shapes_config['base_model']['batch_size'] // processes} | 1 |" in base_row


def test_committed_plan_covers_the_three_worlds():
    text = (REPO / "reports" / "plan.md").read_text()
    assert "Generated by `python -m lpo plan --write reports/plan.md` on " in text
    for heading in ("## SD1.5 (config/config.yaml + config/sd15.yaml)", "## SDXL (config/config.yaml + "
                    "config/sdxl.yaml)", "## The embedded shapes world (config/config.yaml), on the CPU"):
        assert heading in text
    assert text.count("### On 8 x 80 GiB GPUs") == 2 and text.count("### On 1 x 24 GiB GPUs") == 2
    assert "**does not fit**" in text and "upper bound" in text
