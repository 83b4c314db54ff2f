"""The reward cost of one sampling step, LRM against SPM (paper Table 5), under pytest-benchmark.

Per step and prompt, K candidates: the LRM scores them directly (its text encoder, the UNet's down and mid blocks with
VFE, the reward head); the SPM first needs their x0 prediction (a guided UNet pass), the VAE decoding, then its pixel
model. The LRM under noise ensembling with M > 1 draws (`lrm_m<M>`, each M of timing.ensemble_draws' default) scores M
re-noisings of each candidate, one batch of M*K rows. CPU cases: random-weight models at the default world's sizes
(config/config.yaml). GPU cases: SD1.5 and SDXL at their published sizes, random weights, fp16, the SPM's pixel model a
CLIP ViT-H/14. Timing does not depend on the weights. The full table, denoising step included and beside the paper's
numbers, is `lpo timing step-cost` / `step-cost-arch`.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from lpo.timing.models import arch_models, random_world_models
from lpo.timing.report import device_name
from lpo.timing.step import StepParts, TimingConfig

K = TimingConfig().samples_per_step
GUIDANCE_SCALE = TimingConfig().guidance_scale
ENSEMBLED = {f"lrm_m{m}": m for m in TimingConfig().ensemble_draws if m > 1}  # M = 1 is the "lrm" case
REWARDS = ("lrm", "spm", *ENSEMBLED)
CONFIG = Path(__file__).resolve().parents[1] / "config" / "config.yaml"

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="SD1.5 and SDXL at their real sizes need a CUDA GPU (on a CPU one step "
                                          "takes minutes); the CPU cases time the world's sizes")


def step_reward(parts: StepParts, reward: str) -> tuple[Callable[[], torch.Tensor], int | dict[str, int]]:
    """Everything a step spends on scoring its K candidates with `reward`, and the rows its networks run on."""
    rows = parts.batch_rows()
    if reward == "lrm":
        return lambda: parts.lrm_reward(parts.candidates), rows["lrm_reward"]
    if reward in ENSEMBLED:
        noise, ids = parts.ensemble_inputs(ENSEMBLED[reward])
        return (lambda: parts.lrm_ensemble_reward(parts.candidates, noise, ids),
                ENSEMBLED[reward] * rows["lrm_reward"])
    return (lambda: parts.spm_reward(parts.vae_decoding(parts.x0_prediction(parts.candidates))),
            {p: rows[p] for p in ("x0_prediction", "vae_decoding", "spm_reward")})


def run(benchmark, parts: StepParts, reward: str, label: str, rounds: int) -> None:
    fn, network_rows = step_reward(parts, reward)
    cuda = parts.models.device.type == "cuda"

    def call():
        fn()
        if cuda:  # the step is done when the GPU is
            torch.cuda.synchronize()

    benchmark.group = f"step reward, {label}"
    with torch.no_grad():
        benchmark.pedantic(call, warmup_rounds=3, rounds=rounds)
    benchmark.extra_info.update({
        "models": parts.models.name, "device": device_name(parts.models.device),
        "dtype": str(parts.models.dtype), "samples_per_step": K, "latents": list(parts.models.latent_shape),
        "network_rows": network_rows})


@pytest.fixture(scope="module")
def world_parts() -> StepParts:
    models = random_world_models(yaml.safe_load(CONFIG.read_text()), torch.device("cpu"), torch.float32)
    return StepParts(models, K, GUIDANCE_SCALE)


@pytest.mark.parametrize("reward", REWARDS)
def test_world_sizes_cpu(benchmark, world_parts, reward):
    run(benchmark, world_parts, reward, "world sizes, CPU", rounds=20)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def arch_parts(request):
    models = arch_models(request.param, torch.device("cuda"), torch.float16)
    yield StepParts(models, K, GUIDANCE_SCALE)
    del models
    torch.cuda.empty_cache()


@requires_cuda
@pytest.mark.parametrize("reward", REWARDS)
def test_real_architectures_gpu(benchmark, arch_parts, reward):
    # An M-fold round costs about M plain LRM rounds (SDXL at M = 16: 128 rows a pass): fewer rounds keep the GPU
    # check's benchmark part within its time limit.
    run(benchmark, arch_parts, reward, arch_parts.models.name, rounds=5 if reward in ENSEMBLED else 20)
