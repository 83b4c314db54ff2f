"""The Latent Reward Model (LRM): a diffusion model's own UNet as a noise-aware reward model of noisy latents.

S(p, x_t) = exp(logit_scale) * cos(V(x_t, t, p), T(p)) (paper Sec. 4.1, official `sd15_preference_model.py`):
- V: the UNet's down blocks and mid block only, never the up blocks. The last feature map of every down stage
  (its output before the downsampler: SD1.5's `down_block_res_samples[2, 5, 8, 11]`) and the mid block are
  average-pooled, concatenated and projected (4800 -> 768 for SD1.5, 3520 -> 1280 for SDXL);
- VFE: the mid block's features are enhanced with the unconditional (empty prompt) pass,
  V_mid = V_uncond + gs * (V_cond - V_uncond); the down-stage features come from the conditional pass only;
- T: the pooled text embedding through a text projection (SD1.5), or the pooled projected output of the second
  text encoder (SDXL, which has no extra projection).

The pooling-to-score head runs through `lpo_kernels.reward_head` (fused Triton on CUDA, PyTorch elsewhere).
Saved as the released checkpoints are laid out: `unet/`, `text_encoder/` (`text_encoder_2/` for SDXL), the head
(`visual_projection.weight`, `text_projection.weight`, `logit_scale`) and `lrm_config.json`, with one difference:
the head is `head.safetensors` (tensors only: reading it runs no code) where the release has a pickled
`state_dict.pt`, which `load` still reads. `lrm_config.json` and `tokenizer/` are extras a released checkpoint
lacks (defaults and the base model's tokenizer are used then).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lpo.io import atomic_path, load_or_explain, require_exists
from lpo.reward.pair_loss import pair_log_probabilities
from lpo_kernels import reward_head

LOGIT_SCALE_INIT = 2.6592  # CLIP's log(1 / 0.07), as the official LRM
CLIP_L14 = "openai/clip-vit-large-patch14"
_HEAD = "head.safetensors"
RELEASED_HEAD = "state_dict.pt"  # casiatao/LRM's pickled head
_CONFIG = "lrm_config.json"
TIME_FEATURES = 32  # sinusoidal features of t read by the FiLM head and the learned uncertainty


LIKELIHOODS = ("bradley_terry", "thurstone")
UNCERTAINTIES = ("learned", "sigma")
HEADS = ("plain", "film")


@dataclass(frozen=True)
class LRMConfig:
    guidance_scale: float = 7.5   # VFE on the mid block; 1.0 turns VFE off
    multi_scale: bool = True      # False: the mid block alone (the official `multi_scale=False`)
    head_backend: str = "auto"    # lpo_kernels.reward_head: "auto" (Triton on CUDA), "triton" or "reference"
    # The noise-calibrated LRM (DiNa-LRM): "thurstone" trains P(a > b | t) = Phi((r_a - r_b) / (sqrt(2) s(t)))
    # (lpo.reward.pair_loss); the paper's LRM is "bradley_terry", sigmoid(r_a - r_b) at every t.
    likelihood: str = "bradley_terry"
    # Thurstone's s(t): "learned" (s0 times a learned function of t, starting constant) or "sigma" (fixed from the
    # noise schedule, s0 / sqrt(alpha_bar_t): s0 at t = 0, growing with the noise-to-signal ratio).
    uncertainty: str = "learned"
    uncertainty_scale: float = 1.0  # s0
    head: str = "plain"           # "film": the pooled features scaled and shifted per channel by functions of t

    def __post_init__(self):
        if self.guidance_scale <= 0:
            raise ValueError(f"lrm.model.guidance_scale={self.guidance_scale} must be > 0 (1.0 turns VFE off)")
        if self.head_backend not in ("auto", "triton", "reference"):
            raise ValueError(f"lrm.model.head_backend={self.head_backend!r}: use auto, triton or reference")
        for key, allowed in (("likelihood", LIKELIHOODS), ("uncertainty", UNCERTAINTIES), ("head", HEADS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"lrm.model.{key}={getattr(self, key)!r}: use {' or '.join(allowed)}")
        if not self.uncertainty_scale > 0:
            raise ValueError(f"lrm.model.uncertainty_scale={self.uncertainty_scale} must be > 0: s(t) is the "
                             f"standard deviation of the Thurstone likelihood's reward noise (1.0 is a neutral start)")


@dataclass(frozen=True)
class CalibratedLRMConfig:
    """The noise-calibrated LRM the reward study trains beside the LRM (config section `lrm_calibrated`): these
    lrm.model settings over the LRM's, every other setting the LRM's."""
    likelihood: str = "thurstone"
    uncertainty: str = "learned"
    uncertainty_scale: float = 1.0
    head: str = "film"

    def __post_init__(self):
        try:
            LRMConfig(**asdict(self))
        except ValueError as e:
            raise ValueError(str(e).replace("lrm.model.", "lrm_calibrated.")) from None

    def over(self, model: LRMConfig) -> LRMConfig:
        return replace(model, **asdict(self))


def _timestep_features(timesteps: torch.Tensor) -> torch.Tensor:
    return get_timestep_embedding(timesteps.float().reshape(-1), TIME_FEATURES, flip_sin_to_cos=True,
                                  downscale_freq_shift=0)


class TimestepFiLM(nn.Module):
    """gamma(t), beta(t) for every pooled-feature channel, from t's sinusoidal embedding; the last layer starts at
    zero, so a fresh head is the plain one (gamma = 1, beta = 0)."""

    def __init__(self, channels: int, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(TIME_FEATURES, width), nn.SiLU(), nn.Linear(width, 2 * channels))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift = self.net(_timestep_features(timesteps).to(self.net[0].weight.dtype))
        gamma, beta = shift.chunk(2, dim=-1)
        return 1 + gamma, beta


class NoiseUncertainty(nn.Module):
    """s(t) > 0 of the Thurstone likelihood: s0 / sqrt(alpha_bar_t) ("sigma"), or s0 * exp(f(t)) with f a small
    network of t starting at zero ("learned"). alpha_bar is the base model's noise schedule, kept as a buffer so a
    saved LRM carries it."""

    def __init__(self, kind: str, scale: float, alphas_cumprod: torch.Tensor, width: int = 32):
        super().__init__()
        self.register_buffer("log_scale", torch.tensor(math.log(scale)))
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().float().clone())
        self.net = None
        if kind == "learned":
            self.net = nn.Sequential(nn.Linear(TIME_FEATURES, width), nn.SiLU(), nn.Linear(width, 1))
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, timesteps: torch.Tensor | int) -> torch.Tensor:
        t = torch.as_tensor(timesteps, device=self.alphas_cumprod.device).reshape(-1).long()
        if self.net is None:
            return self.log_scale.exp() / self.alphas_cumprod[t].sqrt()
        return (self.log_scale + self.net(_timestep_features(t)).squeeze(-1)).exp()


def stage_channels(unet: UNet2DConditionModel, multi_scale: bool = True) -> list[int]:
    """Channels of the pooled features, read from the UNet's config: every down stage, then the mid block."""
    channels = list(unet.config.block_out_channels)
    if not unet.config.down_block_types or not channels:
        raise ValueError("the LRM needs a UNet with down blocks: its config has no down_block_types")
    if unet.mid_block is None:
        raise ValueError("the LRM needs a UNet with a mid block (mid_block_type is None in its config)")
    return (channels if multi_scale else []) + [channels[-1]]


def down_and_mid(unet: UNet2DConditionModel, sample: torch.Tensor, timestep: torch.Tensor,
                 encoder_hidden_states: torch.Tensor, added_cond_kwargs: dict | None = None
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The UNet's forward pass up to and including the mid block: (last map of each down stage, mid map).
    Follows UNet2DConditionModel.forward for text-to-image UNets (no class labels, adapters or ControlNets)."""
    if not unet.down_blocks:
        raise ValueError("the LRM needs a UNet with down blocks")
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                             added_cond_kwargs=added_cond_kwargs or {})
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    hidden = unet.conv_in(sample)
    stages = []
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            hidden, res = block(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            hidden, res = block(hidden_states=hidden, temb=emb)
        # The stage's last map at its own resolution: before the downsampler when the block has one.
        stages.append(res[-2] if getattr(block, "downsamplers", None) else res[-1])
    if getattr(unet.mid_block, "has_cross_attention", False):
        mid = unet.mid_block(hidden, emb, encoder_hidden_states=encoder_hidden_states)
    else:
        mid = unet.mid_block(hidden, emb)
    return stages, mid


class LatentRewardModel(nn.Module):
    """LRM over a UNet and its text encoder(s). With `text_encoder_2` (SDXL) the UNet is conditioned on both
    encoders' penultimate states and the reward's text embedding is text_encoder_2's pooled projection."""

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 config: LRMConfig = LRMConfig(), text_encoder_2: CLIPTextModelWithProjection | None = None,
                 tokenizer_2: CLIPTokenizer | None = None, projection_dim: int | None = None,
                 text_projection_weight: torch.Tensor | None = None, alphas_cumprod: torch.Tensor | None = None):
        """alphas_cumprod: the base model's noise schedule, which a Thurstone LRM's s(t) reads."""
        super().__init__()
        if (unet.config.addition_embed_type == "text_time") != (text_encoder_2 is not None):
            raise ValueError("an SDXL-type UNet (addition_embed_type 'text_time') needs text_encoder_2 and "
                             "tokenizer_2, and only it takes them: build the LRM from the UNet's own pipeline")
        self.unet, self.text_encoder, self.text_encoder_2 = unet, text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.config = config
        if text_encoder_2 is not None:
            dim = text_encoder_2.config.projection_dim
            self.text_projection = None
        else:
            width = text_encoder.config.hidden_size
            dim = projection_dim or width
            self.text_projection = nn.Linear(width, dim, bias=False)
            if text_projection_weight is not None:
                self.text_projection.weight.data.copy_(text_projection_weight)
            elif dim == width:
                # No pretrained CLIP projection (the Shapes world): start from the pooled embedding itself.
                nn.init.eye_(self.text_projection.weight)
        self.visual_projection = nn.Linear(sum(stage_channels(unet, config.multi_scale)), dim, bias=False)
        nn.init.normal_(self.visual_projection.weight, std=0.02)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.film = TimestepFiLM(self.feature_dim) if config.head == "film" else None
        self.uncertainty = None
        if config.likelihood == "thurstone":
            if alphas_cumprod is None:
                raise ValueError("a Thurstone LRM needs the base model's noise schedule (alphas_cumprod) for s(t): "
                                 "build it with lpo.reward.lrm_training.build_lrm")
            self.uncertainty = NoiseUncertainty(config.uncertainty, config.uncertainty_scale, alphas_cumprod)
        self._null_cache = None

    def train(self, mode: bool = True) -> "LatentRewardModel":
        self._null_cache = None  # the text encoder may change while training
        return super().train(mode)

    @property
    def feature_dim(self) -> int:
        return self.visual_projection.in_features

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        def ids(tokenizer):
            return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.logit_scale.device)
        out = {"input_ids": ids(self.tokenizer)}
        if self.tokenizer_2 is not None:
            out["input_ids_2"] = ids(self.tokenizer_2)
        return out

    def encode_text(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
        """(UNet conditioning, reward text embedding T, SDXL's added conditions or None)."""
        if self.text_encoder_2 is None:
            out = self.text_encoder(input_ids)
            return out.last_hidden_state, self.text_projection(out.pooler_output), None
        if input_ids_2 is None:
            raise ValueError("an SDXL LRM needs input_ids_2 from its second tokenizer")
        first = self.text_encoder(input_ids, output_hidden_states=True)
        second = self.text_encoder_2(input_ids_2, output_hidden_states=True)
        states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        size = self.unet.config.sample_size * 8
        # SDXL's micro-conditioning for an uncropped square image at the model's resolution.
        time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=states.dtype, device=states.device)
        added = {"text_embeds": second.text_embeds, "time_ids": time_ids.expand(len(states), -1)}
        return states, second.text_embeds, added

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor | int, input_ids: torch.Tensor,
                input_ids_2: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (B,) of noisy latents (B, C, h, w) at `timesteps` for the prompts' token ids."""
        features, null_mid, text = self.stage_features(latents, timesteps, input_ids, input_ids_2)
        if self.film is not None:
            features, null_mid = self._modulate(features, null_mid, timesteps)
        return reward_head(features, null_mid, self.config.guidance_scale, self.visual_projection.weight, text,
                           self.logit_scale, backend=self.config.head_backend)

    def _modulate(self, features: list[torch.Tensor], null_mid: torch.Tensor | None, timesteps
                  ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """FiLM on every channel of the maps the head pools: pooling is linear and VFE affine, so this equals FiLM on
        the pooled (and guided) features, and the fused head stays as it is."""
        t = torch.as_tensor(timesteps, device=features[0].device).reshape(-1).expand(len(features[0]))
        gamma, beta = self.film(t)
        channels = [f.shape[1] for f in features]
        parts = zip(features, gamma.split(channels, dim=1), beta.split(channels, dim=1))
        scaled = [f * g[:, :, None, None].to(f) + b[:, :, None, None].to(f) for f, g, b in parts]
        if null_mid is not None:
            g, b = gamma[:, -null_mid.shape[1]:], beta[:, -null_mid.shape[1]:]
            null_mid = null_mid * g[:, :, None, None].to(null_mid) + b[:, :, None, None].to(null_mid)
        return scaled, null_mid

    def noise_scale(self, timesteps: torch.Tensor | int) -> torch.Tensor | None:
        """s(t) of a Thurstone LRM per timestep; None under Bradley-Terry (lpo.reward.pair_loss)."""
        return None if self.uncertainty is None else self.uncertainty(timesteps)

    def pair_probability(self, score_0: torch.Tensor, score_1: torch.Tensor, timesteps: torch.Tensor | int
                         ) -> torch.Tensor:
        """P(image 0 is preferred) under the model's own likelihood, from its two rewards at `timesteps`."""
        scale = self.noise_scale(timesteps)
        if scale is not None:
            scale = scale.to(score_0.device).expand(len(score_0))
        return pair_log_probabilities(score_0, score_1, scale)[:, 0].exp()

    def stage_features(self, latents: torch.Tensor, timesteps: torch.Tensor | int, input_ids: torch.Tensor,
                       input_ids_2: torch.Tensor | None = None
                       ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]:
        """What the reward head reads: the last feature map of every down stage (multi-scale) and the mid block's,
        conditioned on the prompts; the mid block's for the empty prompt (VFE), or None; the prompts' text
        embedding."""
        batch = len(latents)
        timesteps = torch.as_tensor(timesteps, device=latents.device).expand(batch)
        states, text, added = self.encode_text(input_ids, input_ids_2)
        vfe = self.config.guidance_scale != 1.0
        if vfe:
            null = self._null_states(batch, latents.device)
            states = torch.cat([states, null[0]])
            if added is not None:
                added = {k: torch.cat([v, null[1][k]]) for k, v in added.items()}
            latents, timesteps = torch.cat([latents, latents]), torch.cat([timesteps, timesteps])
        stages, mid = down_and_mid(self.unet, latents, timesteps, states, added)
        features = [s[:batch] for s in stages] if self.config.multi_scale else []
        features.append(mid[:batch])
        return features, (mid[batch:] if vfe else None), text

    def score(self, latents: torch.Tensor, timesteps: torch.Tensor | int, prompts: list[str]) -> torch.Tensor:
        return self(latents, timesteps, **self.tokenize(prompts))

    def _null_states(self, batch: int, device) -> tuple[torch.Tensor, dict | None]:
        """The empty prompt's conditioning for VFE; cached in eval mode without grad, where it cannot change
        (a sampler scores every step with it)."""
        cacheable = not self.training and not torch.is_grad_enabled()
        if cacheable and self._null_cache is not None and self._null_cache[0].device == device:
            states, added = self._null_cache
        else:
            states, _, added = self.encode_text(**self.tokenize([""]))
            if cacheable:
                self._null_cache = (states, added)
        expand = {k: v.expand(batch, *v.shape[1:]) for k, v in added.items()} if added else None
        return states.expand(batch, -1, -1), expand

    # ------------------------------------------------------------------------------------------ save / load

    def save(self, out_dir: str | os.PathLike) -> None:
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            self.unet.save_pretrained(tmp / "unet")
            self.text_encoder.save_pretrained(tmp / "text_encoder")
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            if self.text_encoder_2 is not None:
                self.text_encoder_2.save_pretrained(tmp / "text_encoder_2")
                self.tokenizer_2.save_pretrained(tmp / "tokenizer_2")
            own = self.state_dict()
            save_file({key: own[key].detach().cpu().contiguous() for key in self._head_state()}, str(tmp / _HEAD))
            (tmp / _CONFIG).write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def load(cls, lrm_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
             config: LRMConfig | None = None) -> "LatentRewardModel":
        """Load our save() or a released LRM (e.g. casiatao/LRM's lrm_sd15): `tokenizer_dir` names the base
        model's tokenizer folder(s) parent when the LRM directory has none."""
        root = require_exists(lrm_dir, "LRM directory", "train one with `lpo reward lrm`, or download a released "
                                                        "LRM (hub id casiatao/LRM) and point --lrm at it")
        head = root / _HEAD if (root / _HEAD).exists() else root / RELEASED_HEAD
        require_exists(head, "LRM head", f"'{root}' is not an LRM directory (unet/, text_encoder/, {_HEAD} or the "
                                         f"released {RELEASED_HEAD})")
        again = ("re-run the stage that trained it (`snakemake ... --forcerun reward_lrm`, or sd_reward_lrm in an "
                 "SD world), or download the released LRM again")
        if config is None:
            config = (load_or_explain(root / _CONFIG, "the LRM's config", again,
                                      lambda file: LRMConfig(**json.loads(file.read_text())))
                      if (root / _CONFIG).exists() else LRMConfig())
        tokenizers = Path(tokenizer_dir) if tokenizer_dir else root
        unet = load_or_explain(root / "unet", "the LRM's UNet", again,
                               lambda folder: UNet2DConditionModel.from_pretrained(folder, local_files_only=True))
        text_encoder = load_or_explain(root / "text_encoder", "the LRM's text encoder", again,
                                       lambda folder: CLIPTextModel.from_pretrained(folder, local_files_only=True))
        tokenizer = CLIPTokenizer.from_pretrained(require_exists(tokenizers / "tokenizer", "tokenizer",
                                                                 "pass the base model's directory"))
        kwargs = {}
        if (root / "text_encoder_2").exists():
            kwargs["text_encoder_2"] = load_or_explain(
                root / "text_encoder_2", "the LRM's second text encoder", again,
                lambda folder: CLIPTextModelWithProjection.from_pretrained(folder, local_files_only=True))
            kwargs["tokenizer_2"] = CLIPTokenizer.from_pretrained(require_exists(
                tokenizers / "tokenizer_2", "second tokenizer", "pass the SDXL base model's directory"))
        state = load_or_explain(head, "the LRM head's weights", again,
                                lambda file: load_file(str(file)) if file.name == _HEAD
                                else torch.load(file, map_location="cpu", weights_only=True))
        if "text_projection.weight" in state:
            kwargs["projection_dim"] = state["text_projection.weight"].shape[0]
        if config.likelihood == "thurstone":
            if "uncertainty.alphas_cumprod" not in state:
                raise ValueError(f"{root / _CONFIG} says likelihood 'thurstone' but {head} has no s(t) "
                                 f"(uncertainty.*): the directory mixes two trainings; {again}")
            kwargs["alphas_cumprod"] = state["uncertainty.alphas_cumprod"]
        model = cls(unet, text_encoder, tokenizer, config, **kwargs)
        missing = [k for k in model._head_state() if k not in state]
        if missing:
            raise ValueError(f"{head} lacks {', '.join(missing)}: not an LRM of this architecture")
        model.load_state_dict({**model.state_dict(), **state})
        return model

    def unread_modules(self) -> list[nn.Module]:
        """Submodules no reward depends on: the UNet's up path (the LRM stops at its mid block) and, in LRM-XL, the
        first text encoder's last layer and final norm (the UNet reads its penultimate states, the reward the second
        encoder's pooled projection). Training freezes them: DDP needs a gradient for every parameter it syncs."""
        modules = [*self.unet.up_blocks, self.unet.conv_norm_out, self.unet.conv_out]
        if self.text_encoder_2 is not None:
            text = getattr(self.text_encoder, "text_model", self.text_encoder)  # transformers 4 nests the tower
            modules += [text.encoder.layers[-1], text.final_layer_norm]
        return [m for m in modules if m is not None]

    def _head_state(self) -> list[str]:
        """The keys of head.safetensors: what the LRM adds to the UNet and text encoders."""
        keys = ["visual_projection.weight", "logit_scale"]
        keys += ["text_projection.weight"] if self.text_projection is not None else []
        for name in ("film", "uncertainty"):
            module = getattr(self, name)
            keys += [f"{name}.{key}" for key in module.state_dict()] if module is not None else []
        return keys


def clip_text_projection(path: str | os.PathLike | None, key: str = "lrm.clip_text_projection") -> torch.Tensor:
    """SD1.5's LRM initialises its text projection from CLIP ViT-L/14's `text_projection` (a local hub-layout
    directory of openai/clip-vit-large-patch14)."""
    if not path or not Path(path).exists():
        raise FileNotFoundError(f"{key}: CLIP text projection not found at '{path}'. Download {CLIP_L14} "
                                f"(config.json + model.safetensors) and set {key} to its directory")
    return CLIPTextModelWithProjection.from_pretrained(path, local_files_only=True).text_projection.weight.detach()
