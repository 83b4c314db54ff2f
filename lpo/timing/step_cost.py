"""The cost of one sampling step with K candidates, in the form of the paper's Table 5 ([FT]: "time of each
sampling step on a single A100").

The parts of one step from x_{t+1} of one prompt (t_cur = 451, the middle of the 20-step DDIM grid; costs do not
depend on t), each timed alone on fixed, seeded inputs (PART_DOCS says what each runs): the denoising step, which both
methods pay once; the x0 prediction and the VAE decoding of the K candidates, which only the SPM needs; and each
reward model on the K candidates (the SPM's pixel model on the decoded images, the LRM on the noisy latents).

Batch: the K candidates of one prompt run as one batch, as the sampler scores them; a per-candidate time is the
batch's time / K, so the table's "K x part" equals the measured batch. Totals follow the paper's accounting:
SPM = denoise + K (x0 + decode + reward), LRM = denoise + K reward. Not counted (Table 5 has no column for them):
encoding the prompt for the policy (once per trajectory), picking the winner and loser, and the saving of a sampler
that reuses the continuing candidate's x0 pass as the next step's denoising pass (lpo.optimize.sampler does, for SPO).

Timing: `warmup` untimed calls, then the median of `repeats` timed calls: CUDA events on a GPU (the events queue
behind the calls, so host overhead counts only where the GPU waits for it), time.perf_counter on the CPU.

Models: the world's trained ones (base model, LRM, SPM), random-weight ones at the world's configured sizes, or
random-weight ones at the published SD1.5 / SDXL configs with a CLIP ViT-H/14 pixel model (SPO's SPM is PickScore,
a ViT-H/14 CLIP); timing does not depend on the weights' values.
"""
from __future__ import annotations

import copy
import datetime
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lpo.timing.architectures import CLIP_BIGG_TEXT, CLIP_L_TEXT, SD15_UNET, SD_VAE, SDXL_UNET, tiny
from lpo.config import from_dict
from lpo.io import atomic_path
from lpo.latex import write_latex
from lpo.reward.lrm import LatentRewardModel, LRMConfig
from lpo.reward.report import PAPER_NUMBERS
from lpo.optimize.sampler import Conditioning, cfg_noise, ddim_mean, step_coefficients
from lpo.evaluate.scorers.common import CLIP_MEAN, CLIP_STD, quiet_loading
from lpo.reward.spm import SPM, decode_latents
from lpo.tables import markdown, write_csv
from lpo.optimize.threshold import ddim_steps

INFERENCE_STEPS = 20          # the paper's DDIM steps; the step timed is the middle one (t_cur = 451 for SD)
PROMPT = "a small red circle on a gray background, on the left"  # padded to 77 tokens: any prompt costs the same
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ARCHES = ("sd15", "sdxl")
# SDXL's VAE (madebyollin/sdxl-vae-fp16-fix, the one LPO samples SDXL with): SD's VAE topology at 1024 px.
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": False}
# Test-sized stand-ins for the text towers and the ViT-H/14: same code path, widths a CPU runs in milliseconds.
_TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "projection_dim": 32}
_TINY_VIT = {"embed_dim": 32,
             "vision_cfg": {"image_size": 28, "layers": 1, "width": 32, "head_width": 16, "patch_size": 14},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}

# What each timed part runs (the report's "what each column includes").
PART_DOCS = {
    "denoise": "one guided UNet pass over the prompt's latent x_{t+1} (2 rows with CFG), DDIM's eta = 1 mean and "
               "the K candidates drawn around it.",
    "x0_prediction": "one guided UNet pass over the K candidates (2K rows) at their timestep, then DDIM's x̂_0 "
                     "formula.",
    "vae_decoding": "the VAE decoder on the K predicted clean latents.",
    "spm_reward": "the step-aware pixel model on the K decoded images, its text tower on the prompt included.",
    "lrm_reward": "the LRM's text encoder (K prompt rows + the empty prompt), the UNet's down and mid blocks over "
                  "2K rows (VFE's conditional and unconditional passes batched) and the reward head, on the K "
                  "noisy candidates.",
}
CAVEAT = ("The paper names neither the model nor the precision behind its Table 5: only the ratio compares across "
          "devices and model sizes.")
TABLE5_COLUMNS = ("reward model", "denoising step (x_{t+1}→x_t)", "x̂_{0,t} prediction", "VAE decoding",
                  "reward prediction")   # then "total with K=<K>"
TEX_COLUMNS = ("Reward model", "Denoising step", "x0 prediction", "VAE decoding", "Reward prediction")


@dataclass(frozen=True)
class TimingConfig:
    samples_per_step: int = 4     # K, as the paper's Table 5 and LPO's sampler
    guidance_scale: float = 5.0   # CFG of the denoising and x0 passes (LPO's and SPO's SD1.5 sampling)
    warmup: int = 3               # untimed calls before each part
    repeats: int = 20             # timed calls per part; the median is reported
    dtype: str = "auto"           # auto: float16 on CUDA (LPO's official code samples in fp16), float32 on CPU

    def __post_init__(self):
        if self.samples_per_step < 2:
            raise ValueError(f"timing.samples_per_step={self.samples_per_step}: K must be >= 2 (a winner and a "
                             f"loser per step)")
        if self.guidance_scale < 1:
            raise ValueError(f"timing.guidance_scale={self.guidance_scale} must be >= 1 (1: no guidance)")
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError(f"timing.warmup={self.warmup} must be >= 0 and timing.repeats={self.repeats} >= 1")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"timing.dtype={self.dtype!r}: use auto or one of {', '.join(DTYPES)}")

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]


# ---------------------------------------------------------------------------------------------------- models

@dataclass
class StepModels:
    """Everything one sampling step runs, placed on one device."""
    name: str                     # what was timed, for the report
    unet: UNet2DConditionModel    # the policy: denoising and the SPM's x0_hat
    scheduler: object             # its DDIM scheduler (the 20-step schedule is read from its config)
    vae: AutoencoderKL
    lrm: LatentRewardModel
    spm_reward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (images [-1, 1], timesteps) -> scores
    cond: Conditioning
    null: Conditioning
    description: dict[str, str] = field(default_factory=dict)        # model -> what it is, for the report

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return self.unet.config.in_channels, size, size

    @property
    def image_size(self) -> int:
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)


def _world_models(name: str, pipe, lrm: LatentRewardModel, spm: SPM, weights: str) -> StepModels:
    """`pipe` is already on its device and dtype; the SPM's pixel model stays float32, as lpo.reward.spm.SPM feeds it."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    lrm = lrm.to(device, dtype).eval()
    ids = spm.predictor.prompt_ids([PROMPT, ""])
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]
    prompt_ids = ids[:1]

    def spm_reward(images: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return spm.score_images(images, timesteps, prompt_ids.expand(len(images), -1))

    pixel = spm.model
    description = {"policy": f"{weights} UNet {list(pipe.unet.config.block_out_channels)}",
                   "VAE": f"{weights} AutoencoderKL {list(pipe.vae.config.block_out_channels)}",
                   "LRM": f"{weights}, UNet {list(lrm.unet.config.block_out_channels)}, VFE gs "
                          f"{lrm.config.guidance_scale:g}, head backend {lrm.config.head_backend}",
                   "SPM pixel model": f"{weights} step-aware conv tower (width {pixel.config.width}), float32"}
    return StepModels(name, pipe.unet.eval(), pipe.scheduler, pipe.vae.eval(), lrm, spm_reward,
                      Conditioning(states[:1]), Conditioning(states[1:]), description)


def _placed(pipe, device: torch.device, dtype: torch.dtype):
    """The pipeline on `device`, cast only when its dtype differs (diffusers warns about every cast)."""
    pipe = pipe.to(device)
    return pipe if pipe.unet.dtype == dtype else pipe.to(dtype=dtype)


def load_world_models(model_dir, lrm_dir, spm_dir, device: torch.device, dtype: torch.dtype,
                      name: str = "trained models") -> StepModels:
    """The world's trained base model, LRM and SPM (the DAG's results/<world>/...)."""
    from lpo.world.pipeline import load_pipeline
    pipe = _placed(load_pipeline(model_dir), device, dtype)
    lrm = LatentRewardModel.load(lrm_dir, tokenizer_dir=model_dir)
    return _world_models(name, pipe, lrm, SPM.load(spm_dir, pipe), "trained")


def random_world_models(params: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> StepModels:
    """Random-weight models at the sizes of a world's config (sections world, vae, base_model, lrm, pixel_reward,
    spm; missing ones take their defaults)."""
    from lpo.reward.lrm_training import LRMTrainConfig
    from lpo.reward.pixel import PixelReward, PixelRewardConfig
    from lpo.reward.spm import SPMConfig
    from lpo.world.base_model import (
        BaseModelConfig,
        VAEConfig,
        build_text_encoder,
        build_unet,
        build_vae,
        check_image_size,
        sampling_scheduler,
    )
    from lpo.world.settings import WorldConfig

    world = from_dict(WorldConfig, params.get("world"), "world")
    vae_config = from_dict(VAEConfig, params.get("vae"), "vae")
    base = from_dict(BaseModelConfig, params.get("base_model"), "base_model")
    latent_size = check_image_size(world.image_size, vae_config, base.unet)
    tokenizer = _clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = build_text_encoder(base.text_encoder)
    unet = build_unet(base.unet, latent_size, vae_config.latent_channels, base.text_encoder.hidden_size)
    pipe = StableDiffusionPipeline(vae=build_vae(vae_config, world.image_size), text_encoder=text_encoder,
                                   tokenizer=tokenizer, unet=unet, scheduler=sampling_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    lrm = LatentRewardModel(copy.deepcopy(unet), copy.deepcopy(text_encoder), tokenizer,
                            from_dict(LRMTrainConfig, params.get("lrm"), "lrm").model)
    pixel = PixelReward(from_dict(PixelRewardConfig, params.get("pixel_reward"), "pixel_reward"),
                        copy.deepcopy(text_encoder), tokenizer, step_aware=True)
    pipe = _placed(pipe, device, dtype)
    spm = SPM(pixel, pipe, from_dict(SPMConfig, params.get("spm"), "spm"))
    return _world_models(f"random weights at the {world.name} world's sizes", pipe, lrm, spm, "random")


def arch_models(arch: str, device: torch.device, dtype: torch.dtype, tiny_widths: bool = False,
                seed: int = 0) -> StepModels:
    """Random-weight models at the published configs: SD1.5 (UNet, VAE, CLIP ViT-L/14 text) or SDXL (UNet, the
    fp16-fix VAE, CLIP ViT-L/14 + OpenCLIP ViT-bigG text), the LRM over the same UNet and text encoders, and the SPM's
    pixel model as a CLIP ViT-H/14 (open_clip's 'ViT-H-14' config). `tiny_widths`: the same topology with tiny widths
    (a set-up check that runs on a CPU; its times say nothing about the real models)."""
    import open_clip

    from lpo.world.base_model import sampling_scheduler
    if arch not in ARCHES:
        raise ValueError(f"--arch {arch!r}: use one of {', '.join(ARCHES)}")
    if device.type != "cuda" and not tiny_widths:
        raise ValueError(f"timing the real {arch} architecture needs a CUDA GPU, not {device}: on a CPU one "
                         f"step of its UNet, VAE and ViT-H/14 takes minutes and {'~25' if arch == 'sdxl' else '~10'} "
                         f"GB of memory. Run it on a GPU machine, time the world's models with `lpo timing step-cost`, "
                         f"or pass --tiny to check the set-up with tiny widths")
    xl = arch == "sdxl"
    unet_config, vae_config = dict(SDXL_UNET if xl else SD15_UNET), dict(SDXL_VAE if xl else SD_VAE)
    text_configs = [CLIP_L_TEXT, CLIP_BIGG_TEXT] if xl else [CLIP_L_TEXT]
    vit = {}
    if tiny_widths:
        unet_config, vae_config, vit = tiny(unet_config), tiny(vae_config), _TINY_VIT
        text_configs = [{**c, **_TINY_TEXT} for c in text_configs]
        unet_config["sample_size"], vae_config["sample_size"] = 8, 64
        unet_config["cross_attention_dim"] = sum(c["hidden_size"] for c in text_configs)
        if xl:
            unet_config["projection_class_embeddings_input_dim"] = \
                text_configs[1]["projection_dim"] + 6 * unet_config["addition_time_embed_dim"]
    tokenizer = _clip_tokenizer(sd=True)
    torch.manual_seed(seed)
    with torch.device(device):  # 2.6 B parameters for SDXL: initialise them where they will run
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_configs[0]))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_configs[1])) if xl else None
        with quiet_loading():  # open_clip warns that the model it builds has random weights: that is the point
            clip = open_clip.create_model("ViT-H-14", pretrained=None, device=device, **vit)
    # The LRM shares the policy's UNet and text encoders: the same computation as its own copy, half the memory.
    lrm = LatentRewardModel(unet, text_encoder, tokenizer, LRMConfig(), text_encoder_2=text_encoder_2,
                            tokenizer_2=tokenizer if xl else None,
                            projection_dim=None if xl else text_configs[0]["projection_dim"]).to(device, dtype)
    if dtype != torch.float32:  # built in float32; diffusers warns about every cast, even a no-op
        vae, clip = vae.to(dtype), clip.to(dtype)
    with torch.no_grad():
        (cond, _, cond_added), (null, _, null_added) = (lrm.encode_text(**lrm.tokenize([p])) for p in (PROMPT, ""))
    label = f"{'SDXL' if xl else 'SD1.5'}{' (tiny widths)' if tiny_widths else ''}"
    size = unet_config["sample_size"] * 8
    description = {
        "policy": f"{label} UNet, random weights, {size}x{size} px",
        "VAE": f"{'SDXL fp16-fix' if xl else 'SD'} AutoencoderKL, random weights",
        "LRM": f"the policy's UNet (down + mid blocks) and text encoder{'s' if xl else ''}, VFE gs "
               f"{lrm.config.guidance_scale:g}, head backend {lrm.config.head_backend}",
        "SPM pixel model": f"open_clip ViT-H-14{' (tiny widths)' if tiny_widths else ''}, random weights, "
                           f"{clip.visual.image_size[0]} px input"}
    return StepModels(f"{label}, random weights", unet.eval(), sampling_scheduler(), vae.eval(), lrm.eval(),
                      ClipPixelModel(clip.eval()), Conditioning(cond, cond_added), Conditioning(null, null_added),
                      description)


class ClipPixelModel:
    """SPO's SPM at real size: PickScore-style CLIP scoring of decoded images (resized to the tower's input, CLIP
    normalisation) against the prompt. The timestep conditioning is left out of the cost: here it is an AdaLN MLP on
    a timestep embedding (lpo.reward.pixel), tiny next to a ViT-H/14."""

    def __init__(self, clip):
        import open_clip
        self.clip = clip
        param = next(clip.parameters())
        self.ids = open_clip.tokenizer.SimpleTokenizer(context_length=77)([PROMPT]).to(param.device)
        self.mean = torch.tensor(CLIP_MEAN, device=param.device).reshape(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=param.device).reshape(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        size = self.clip.visual.image_size
        x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
        x = ((x + 1) / 2 - self.mean) / self.std
        dtype = next(self.clip.parameters()).dtype
        image = self.clip.encode_image(x.to(dtype), normalize=True)
        text = self.clip.encode_text(self.ids.expand(len(images), -1), normalize=True)
        return self.clip.logit_scale.exp() * (image * text).sum(-1)


def _clip_tokenizer(sd: bool = False):
    from lpo.world.tokenizer import MAX_LENGTH, SD_MAX_LENGTH, build_clip_tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        return build_clip_tokenizer(Path(tmp) / "tokenizer", SD_MAX_LENGTH if sd else MAX_LENGTH)


# ---------------------------------------------------------------------------------------------------- parts

class StepParts:
    """The calls of one sampling step on fixed, seeded inputs: the prompt's latent x_{t+1} at t_cur and K candidates
    at t_next (random latents: the cost does not depend on their values)."""

    def __init__(self, models: StepModels, samples_per_step: int, guidance_scale: float, seed: int = 0):
        self.models, self.k, self.guidance_scale = models, samples_per_step, guidance_scale
        device, dtype, shape = models.device, models.dtype, models.latent_shape
        steps = ddim_steps(models.scheduler.config, INFERENCE_STEPS)
        i = INFERENCE_STEPS // 2
        self.t_cur, t_next = int(steps.timesteps[i]), int(steps.prev_timesteps[i])
        self.prediction_type = steps.prediction_type
        generator = torch.Generator().manual_seed(seed)
        self.parent = torch.randn((1, *shape), generator=generator).to(device, dtype)
        self.candidates = torch.randn((self.k, *shape), generator=generator).to(device, dtype)
        self.alpha, self.alpha_prev, self.sigma = step_coefficients(steps, torch.tensor(i), self.parent[0])
        self.noise = torch.Generator(device).manual_seed(seed)
        self.cur = torch.full((1,), self.t_cur, device=device)
        self.next = torch.full((self.k,), t_next, device=device)
        self.lrm_ids = models.lrm.tokenize([PROMPT] * self.k)

    def denoise(self) -> torch.Tensor:
        """x_{t+1} -> the K candidates x_t^k = mu + sigma z_k."""
        m = self.models
        noise = cfg_noise(m.unet, self.parent, self.cur, m.cond, m.null, self.guidance_scale)
        mean, _ = ddim_mean(self.parent, noise, self.alpha, self.alpha_prev, self.sigma, self.prediction_type)
        z = torch.randn((self.k, *self.parent.shape[1:]), generator=self.noise, device=mean.device, dtype=mean.dtype)
        return mean + self.sigma * z

    def x0_prediction(self, candidates: torch.Tensor) -> torch.Tensor:
        """Predicted clean latents of the candidates at their own timestep, as lpo.optimize.sampler computes SPO's input."""
        m = self.models
        noise = cfg_noise(m.unet, candidates, self.next, m.cond.expand(len(candidates)), m.null,
                          self.guidance_scale)
        zero = torch.zeros_like(self.alpha_prev)
        return ddim_mean(candidates, noise, self.alpha_prev, zero, zero, self.prediction_type)[1]

    def vae_decoding(self, x0: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.models.vae, x0)

    def spm_reward(self, images: torch.Tensor) -> torch.Tensor:
        return self.models.spm_reward(images, self.next)

    def lrm_reward(self, candidates: torch.Tensor) -> torch.Tensor:
        # The LRM is called with t_cur, the parent's timestep, as the official sampler does.
        return self.models.lrm(candidates, self.t_cur, **self.lrm_ids)

    def batch_rows(self) -> dict[str, int]:
        """Rows each part's network runs on (guidance and VFE double them)."""
        guided = 1 if self.guidance_scale == 1 else 2
        vfe = 1 if self.models.lrm.config.guidance_scale == 1 else 2
        return {"denoise": guided, "x0_prediction": guided * self.k, "vae_decoding": self.k,
                "spm_reward": self.k, "lrm_reward": vfe * self.k}


# ---------------------------------------------------------------------------------------------------- timing

def time_call(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(repeats)]
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1000 for start, end in events]
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


@dataclass(frozen=True)
class PartTiming:
    seconds: tuple[float, ...]
    rows: int                     # rows of the batch its network ran on

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def iqr(self) -> tuple[float, float]:
        if len(self.seconds) < 2:
            return self.seconds[0], self.seconds[0]
        q1, _, q3 = statistics.quantiles(self.seconds, n=4, method="inclusive")
        return q1, q3


@dataclass(frozen=True)
class StepCost:
    """One row of Table 5, in seconds; the per-candidate parts run K times a step."""
    reward_model: str
    denoise: float
    x0_prediction: float
    vae_decoding: float
    reward_prediction: float
    samples_per_step: int

    @property
    def total(self) -> float:
        return self.denoise + self.samples_per_step * (self.x0_prediction + self.vae_decoding +
                                                       self.reward_prediction)


@dataclass(frozen=True)
class StepCostMeasurement:
    parts: dict[str, PartTiming]
    samples_per_step: int

    def table(self) -> list[StepCost]:
        """[SPM, LRM] from the part medians; per-candidate = batch / K."""
        k, p = self.samples_per_step, {name: t.median for name, t in self.parts.items()}
        return [StepCost("SPM", p["denoise"], p["x0_prediction"] / k, p["vae_decoding"] / k, p["spm_reward"] / k, k),
                StepCost("LRM", p["denoise"], 0.0, 0.0, p["lrm_reward"] / k, k)]


def spm_over_lrm(rows: list[StepCost]) -> float:
    """How many times longer an SPM step takes than an LRM step."""
    total = {r.reward_model: r.total for r in rows}
    return total["SPM"] / total["LRM"]


@torch.no_grad()
def measure_step_cost(models: StepModels, config: TimingConfig, seed: int = 0) -> StepCostMeasurement:
    """Time every part of one step (see the module docstring) on `models`' device."""
    parts = StepParts(models, config.samples_per_step, config.guidance_scale, seed)
    x0 = parts.x0_prediction(parts.candidates)
    images = parts.vae_decoding(x0)
    calls = {"denoise": parts.denoise,
             "x0_prediction": lambda: parts.x0_prediction(parts.candidates),
             "vae_decoding": lambda: parts.vae_decoding(x0),
             "spm_reward": lambda: parts.spm_reward(images),
             "lrm_reward": lambda: parts.lrm_reward(parts.candidates)}
    rows = parts.batch_rows()
    return StepCostMeasurement({name: PartTiming(tuple(time_call(fn, models.device, config.warmup, config.repeats)),
                                                 rows[name]) for name, fn in calls.items()},
                               config.samples_per_step)


# ---------------------------------------------------------------------------------------------------- report

def paper_table5() -> tuple[list[StepCost], dict]:
    """The paper's Table 5 rows and its entry in reports/paper_numbers.yaml (source, device, K)."""
    entry = yaml.safe_load(PAPER_NUMBERS.read_text())["table5_step_cost"]
    rows = [StepCost(r["reward_model"], r["denoise"], r["x0_prediction"], r["vae_decoding"], r["reward_prediction"],
                     entry["samples_per_step"]) for r in entry["rows"]]
    return rows, entry


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"CPU ({cpu}, {torch.get_num_threads()} torch threads)"


def _seconds(s: float) -> str:
    return "0" if s == 0 else f"{s * 1e3:.3g} ms" if s < 1e-3 else f"{s:.3g} s"


def table5_rows(rows: list[StepCost], label: str) -> list[dict]:
    """Rows in Table 5's columns (TABLE5_COLUMNS + "total with K=<K>")."""
    out = []
    for r in rows:
        per = [_seconds(v) if v == 0 else f"K × {_seconds(v)}" for v in (r.x0_prediction, r.vae_decoding,
                                                                         r.reward_prediction)]
        out.append(dict(zip((*TABLE5_COLUMNS, f"total with K={r.samples_per_step}"),
                            (f"{r.reward_model} ({label})", _seconds(r.denoise), *per, _seconds(r.total)))))
    return out


def write_step_cost_report(out_dir: str | Path, stem: str, models: StepModels, measurement: StepCostMeasurement,
                           config: TimingConfig, command: str) -> None:
    """<stem>.md, <stem>.csv and <stem>.tex in out_dir: our Table 5 beside the paper's."""
    out = Path(out_dir)
    device = device_name(models.device)
    ours = measurement.table()
    paper, entry = paper_table5()
    k = measurement.samples_per_step
    dtype = str(models.dtype).removeprefix("torch.")
    csv_rows = [{"source": source, "device": dev, "dtype": dt, "reward_model": r.reward_model,
                 "samples_per_step": r.samples_per_step, "denoise_s": r.denoise, "x0_prediction_s": r.x0_prediction,
                 "vae_decoding_s": r.vae_decoding, "reward_prediction_s": r.reward_prediction, "total_s": r.total,
                 "spm_over_lrm": spm_over_lrm(table) if r.reward_model == "SPM" else 1.0}
                for source, dev, dt, table in (("ours", device, dtype, ours),
                                               (entry["source"], entry["device"], "not stated", paper))
                for r in table]
    write_csv(out / f"{stem}.csv", csv_rows)
    table = table5_rows(ours, "ours") + table5_rows(paper, f"paper, {entry['device']}")
    parts = [{"part": name, "batch rows": t.rows, "median": _seconds(t.median),
              "IQR": f"{_seconds(t.iqr[0])} – {_seconds(t.iqr[1])}",
              "per candidate": "-" if name == "denoise" else _seconds(t.median / k)}
             for name, t in measurement.parts.items()]
    size = models.image_size
    channels, latent, _ = models.latent_shape
    clock = "CUDA events" if models.device.type == "cuda" else "time.perf_counter"
    setup = (f"Generated on {datetime.date.today()} by `{command}`. Device: **{device}**, {dtype}. "
             f"Latents {channels}×{latent}×{latent} ({size}×{size} px images); K = {k} candidates of one prompt "
             f"timed as one batch (per-candidate times are the batch's / K); sampler CFG {config.guidance_scale:g}. "
             f"Medians of {config.repeats} timed calls per part after {config.warmup} untimed warm-up "
             f"call{'' if config.warmup == 1 else 's'} ({clock}).")
    ratio = (f"SPM step / LRM step: **{spm_over_lrm(ours):.2g}×** here; the paper's: {spm_over_lrm(paper):.2g}× "
             f"({entry['source']}, {entry['device']}; the paper calls the LRM's cost \"only 1/6 that of SPM\").")
    total = ("- Total: denoise + K × (x̂_0 + decode + reward) for the SPM, denoise + K × reward for the LRM, the "
             "paper's accounting. Not counted (Table 5 has no column for them): the policy's prompt encoding (once "
             "per trajectory), choosing the winner and loser, and the SPM-side saving of a sampler that reuses the "
             "continuing candidate's x̂_0 pass as the next step's denoising pass (lpo.optimize.sampler does).")
    lines = [f"# Cost of one sampling step (paper Table 5): {models.name}", "", setup, "",
             "## Time of each sampling step", "", markdown(table), "", ratio, "",
             "## Parts as measured", "", markdown(parts), "",
             "## What each column includes", "",
             f"- Denoising step: {PART_DOCS['denoise']}",
             f"- x̂_0 prediction (SPM only): {PART_DOCS['x0_prediction']}",
             f"- VAE decoding (SPM only): {PART_DOCS['vae_decoding']}",
             f"- Reward prediction, SPM: {PART_DOCS['spm_reward']}",
             f"- Reward prediction, LRM: {PART_DOCS['lrm_reward']}",
             total, "",
             "## Models", "", *[f"- {name}: {what}" for name, what in models.description.items()], "",
             CAVEAT, ""]
    with atomic_path(out / f"{stem}.md") as tmp:
        tmp.write_text("\n".join(lines))
    # LaTeX gets ASCII headers and cells: pdflatex has no glyph for x-hat, the arrow or the times sign by default.
    tex_columns = [*TEX_COLUMNS, f"Total (K={k})"]
    write_latex(out / f"{stem}.tex", [{c: str(v).replace("×", "x") for c, v in zip(tex_columns, r.values())}
                                      for r in table],
                caption=f"Time of each sampling step: {models.name}, ours on {device} ({dtype}), the paper's on "
                        f"{entry['device']} ({entry['source']}).", label=f"tab:{stem.replace('_', '-')}")

