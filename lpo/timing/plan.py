"""`lpo plan`: will a training stage fit, and how long does it take? A memory and time plan per stage, computed
from the config and the models' real topologies (built on the meta device: nothing is allocated), not typed.

Per GPU, for a stage with T trained and F frozen parameters and a per-device batch of b samples:

    memory = 16 B x T  (fp32 weights 4 + fp32 gradients 4 + AdamW's two fp32 moments 8)
           +  c B x F  (frozen weights in the compute dtype: c = 2 with fp16 / bf16, 4 without)
           +  A x b    (activations saved for the backward pass, A per sample, halved with fp16 / bf16)

A is measured, not estimated: one sample's forward pass runs with grad on meta tensors while
`torch.autograd.graph.saved_tensors_hooks` adds up the bytes of every tensor saved for backward, each storage
once, the parameters' own storages left out (they are the weights above). Attention runs as diffusers'
`AttnProcessor` (softmax(QK^T)V, the attention matrix saved): an upper bound, as fused SDPA kernels save far less.

Hours: a stage's measured wall time (Snakemake's benchmark of its rule), else, in the SD worlds, an estimate from a
training step timed on a GPU (`lpo timing train-step-arch`, reports/gpu/<device>/train_step_<arch>.csv):
seconds per micro-batch step x accumulation x optimizer steps; else "unmeasured".
"""
from __future__ import annotations

import csv
import datetime
import glob
import math
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from lpo.config import DEFAULT_CONFIG, read_config

GIB = 2 ** 30
REPO = DEFAULT_CONFIG.parents[1]
GPU_REPORTS = REPO / "reports" / "gpu"   # where benchmarks/gpu_check.sh writes, one folder per device
TRAIN_STEP_STAGES = ("lrm", "lpo", "diffusion_dpo")   # the trainers `lpo timing train-step-arch` times
SD_ARCHES = {"sd15": "SD1.5", "sdxl": "SDXL"}  # the presets lpo.timing.architectures has real-size topologies of
# What `lpo plan --write` records: world config (None: the embedded world, on the CPU), [(GPUs, GiB per GPU)].
WRITTEN = [("config/sd15.yaml", [(8, 80), (1, 24)]), ("config/sdxl.yaml", [(8, 80), (1, 24)]), (None, [(1, None)])]
WRITE_COMMAND = "python -m lpo plan --write reports/plan.md"


@dataclass(frozen=True)
class StageSpec:
    """A trainer as the plan sees it: its config section and the key of its global batch."""
    section: str
    title: str
    batch_key: str
    unit: str           # what one sample of the batch is
    sd_rule: str        # the SD worlds' Snakemake rule (resources.rules, benchmarks)
    shapes_rule: str


STAGES = {s.section: s for s in [
    StageSpec("base_model", "base model", "batch_size", "image", "", "world_base_model"),
    StageSpec("lrm", "LRM", "batch_size", "pair", "sd_reward_lrm", "reward_lrm"),
    StageSpec("lpo", "LPO", "train_batch_size", "tuple", "sd_optimize_lpo", "optimize_lpo"),
    StageSpec("spo", "SPO", "train_batch_size", "tuple", "", "optimize_spo"),
    StageSpec("diffusion_dpo", "Diffusion-DPO", "batch_size", "pair", "sd_optimize_diffusion_dpo",
              "optimize_diffusion_dpo"),
]}
# Only the base model's rule splits its batch over compute.processes (workflow/rules/world.smk); the embedded world's
# other trainers run as one process.
SHAPES_MULTIPROCESS = {"base_model"}


@dataclass(frozen=True)
class Footprint:
    """A stage's model facts, independent of batch and hardware."""
    stage: StageSpec
    trained: int                 # parameters the optimizer updates
    frozen: int                  # parameters held but not trained
    activations: float           # bytes saved for backward per sample, fp32, no checkpointing
    activations_checkpointed: float
    what: str                    # what one sample runs with grad, and what is frozen


@dataclass(frozen=True)
class Setting:
    """How a stage runs: from the config, or a candidate the plan tries."""
    global_batch: int
    processes: int
    per_device: int | None       # None: the whole share at once
    mixed_precision: str
    checkpointing: bool
    section: str = "stage"       # the config section, named in messages
    batch_key: str = "batch_size"

    @property
    def share(self) -> int:
        return self.global_batch // self.processes

    def batch(self) -> int:
        """The per-device batch; a ValueError naming the config keys where the batch does not split."""
        from lpo.launch import layout
        return layout(self.global_batch, self.processes, self.per_device, f"{self.section}.{self.batch_key}",
                      f"{self.section}.per_device_batch_size").per_device

    @property
    def accumulation(self) -> int:
        return self.share // self.batch()


def _half(precision: str) -> bool:
    return precision in ("fp16", "bf16")


def static_bytes(footprint: Footprint, precision: str) -> float:
    """What a device holds whatever the batch: weights, gradients and optimizer state."""
    return 16 * footprint.trained + (2 if _half(precision) else 4) * footprint.frozen


def memory_bytes(footprint: Footprint, setting: Setting) -> float:
    """The module docstring's formula."""
    activation = footprint.activations_checkpointed if setting.checkpointing else footprint.activations
    return static_bytes(footprint, setting.mixed_precision) + \
        activation * (0.5 if _half(setting.mixed_precision) else 1.0) * setting.batch()


def accumulation_steps(global_batch: int, processes: int, per_device: int | None) -> int:
    return Setting(global_batch, processes, per_device, "no", False).accumulation


def fitting_settings(footprint: Footprint, setting: Setting, limit: float) -> list[Setting | None]:
    """The largest per-device batch that fits in `limit` bytes and divides the process's share: at the setting's
    precision and checkpointing, with gradient checkpointing, with bf16, with both; None where no batch fits."""
    tries = [(setting.mixed_precision, setting.checkpointing), (setting.mixed_precision, True),
             ("bf16", setting.checkpointing), ("bf16", True)]
    out, seen = [], set()
    for precision, checkpointing in tries:
        if (_half(precision), checkpointing) in seen:
            continue
        seen.add((_half(precision), checkpointing))
        candidates = [Setting(setting.global_batch, setting.processes, b, precision, checkpointing)
                      for b in range(setting.share, 0, -1) if setting.share % b == 0]
        out.append(next((s for s in candidates if memory_bytes(footprint, s) <= limit), None))
    return out


# ------------------------------------------------------------------------------------------------ measuring


def saved_bytes(forward: Callable[[], object], parameters: Iterable) -> int:
    """Bytes of the tensors `forward` saves for backward, each storage counted once, parameters' storages not."""
    import torch
    skip = {p.untyped_storage()._cdata for p in parameters}
    sizes: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in skip:
            sizes[storage._cdata] = storage.nbytes()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(sizes.values())


@dataclass
class Models:
    """A world's diffusion model at its real size, on the meta device."""
    name: str
    unet: object
    text_encoders: list
    vae: object
    text_length: int
    projection_dim: int | None = None   # SD1.5's LRM text projection; None: the encoder's own width or projection

    @property
    def xl(self) -> bool:
        return self.unet.config.addition_embed_type == "text_time"

    def unet_inputs(self, rows: int) -> dict:
        import torch
        size, width = self.unet.config.sample_size, self.unet.config.cross_attention_dim
        with torch.device("meta"):
            kwargs = {"sample": torch.empty(rows, self.unet.config.in_channels, size, size),
                      "timestep": torch.zeros(rows, dtype=torch.long),
                      "encoder_hidden_states": torch.empty(rows, self.text_length, width)}
            if self.xl:
                kwargs["added_cond_kwargs"] = {
                    "text_embeds": torch.empty(rows, self.text_encoders[-1].config.projection_dim),
                    "time_ids": torch.empty(rows, 6)}
        return kwargs

    def token_ids(self, rows: int):
        import torch
        return torch.zeros(rows, self.text_length, dtype=torch.long, device="meta")


def sd_models(arch: str) -> Models:
    """SD1.5's or SDXL's UNet, text encoder(s) and VAE at their published configs (lpo.timing.architectures)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lpo.timing.architectures import CLIP_BIGG_TEXT, CLIP_L_TEXT, SD15_UNET, SD_VAE, SDXL_UNET, SDXL_VAE
    xl = arch == "sdxl"
    with torch.device("meta"):
        encoders = [CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))]
        if xl:
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT)))
        return Models("SDXL" if xl else "SD1.5", UNet2DConditionModel(**(SDXL_UNET if xl else SD15_UNET)), encoders,
                      AutoencoderKL(**(SDXL_VAE if xl else SD_VAE)), 77,
                      None if xl else CLIP_L_TEXT["projection_dim"])


def shapes_models(config: dict) -> Models:
    """The embedded world's base model at its config's sizes, built as lpo.world.base_model builds it."""
    import torch

    from lpo.config import from_dict
    from lpo.world.base_model import (BaseModelConfig, VAEConfig, build_text_encoder, build_unet, build_vae,
                                      check_image_size)
    from lpo.world.settings import WorldConfig
    from lpo.world.tokenizer import MAX_LENGTH
    world = from_dict(WorldConfig, config.get("world"), "world")
    vae = from_dict(VAEConfig, config.get("vae"), "vae")
    base = from_dict(BaseModelConfig, config.get("base_model"), "base_model")
    latent_size = check_image_size(world.image_size, vae, base.unet)
    with torch.device("meta"):
        return Models(world.name, build_unet(base.unet, latent_size, vae.latent_channels,
                                             base.text_encoder.hidden_size),
                      [build_text_encoder(base.text_encoder)], build_vae(vae, world.image_size), MAX_LENGTH)


def count(modules: Iterable) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _measure(models: Models, trained: list, forward: Callable[[], object]) -> tuple[float, float]:
    """(saved bytes, saved bytes with gradient checkpointing) of `forward`, `trained` modules checkpointed."""
    from diffusers.models.attention_processor import AttnProcessor

    from lpo.launch import enable_gradient_checkpointing
    models.unet.set_attn_processor(AttnProcessor())
    params = [p for m in [models.unet, *models.text_encoders] for p in m.parameters()]
    plain = saved_bytes(forward, params)
    # transformers renames gradient_checkpointing_enable in v6 and warns meanwhile; lpo.launch calls it so.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        enable_gradient_checkpointing(*trained)
        checkpointed = saved_bytes(forward, params)
    return plain, checkpointed


def _lora(models: Models, rank: int) -> int:
    """Adds the trainers' LoRA (lpo.optimize.step_trainer) to the UNet; returns its parameter count."""
    from peft import LoraConfig

    from lpo.optimize.step_trainer import LORA_TARGETS
    models.unet.requires_grad_(False)
    for encoder in models.text_encoders:
        encoder.requires_grad_(False)
    models.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=list(LORA_TARGETS)))
    return sum(p.numel() for p in models.unet.parameters() if p.requires_grad)


def footprint(stage: StageSpec, config: dict, build: Callable[[], Models]) -> Footprint:
    """Parameters and per-sample activations of `stage` on freshly built models (LoRA and freezing change them)."""
    import torch

    from lpo.reward.lrm import LatentRewardModel, LRMConfig, down_and_mid
    models = build()
    unet, encoders, vae = models.unet, models.text_encoders, models.vae
    encoders_params = count(encoders)
    if stage.section in ("lrm", "base_model"):
        if stage.section == "lrm":
            with torch.device("meta"):
                lrm = LatentRewardModel(unet, encoders[0], None, LRMConfig(**config["lrm"].get("model", {})),
                                        text_encoder_2=encoders[1] if models.xl else None,
                                        projection_dim=models.projection_dim)
            unread = count(lrm.unread_modules())
            for module in lrm.unread_modules():
                module.requires_grad_(False)
            trained, frozen = count([lrm]) - unread, unread + count([vae])
            vfe = lrm.config.guidance_scale != 1.0
            rows = 4 if vfe else 2

            def forward():
                # One pair: both images' latents, conditioned and (VFE) with the empty prompt: the UNet's down and
                # mid blocks on `rows` latents, the text encoders with grad on the pair's prompt and the empty one.
                states, _, added = lrm.encode_text(models.token_ids(2), models.token_ids(2) if models.xl else None)
                if vfe:
                    null, _, null_added = lrm.encode_text(models.token_ids(1),
                                                          models.token_ids(1) if models.xl else None)
                    states = torch.cat([states, null.expand(2, -1, -1)])
                    if added is not None:
                        added = {k: torch.cat([v, null_added[k].expand(2, *v.shape[1:])])
                                 for k, v in added.items()}
                inputs = models.unet_inputs(rows)
                down_and_mid(unet, inputs["sample"], inputs["timestep"], states, added)
            pair = "winner and loser, with the prompt and the empty one (VFE)" if vfe else "winner and loser"
            what = (f"{rows} down + mid block rows ({pair}), text encoder{'s' if models.xl else ''} with grad; "
                    f"frozen: UNet up blocks{', first text encoder last layer' if models.xl else ''}, VAE")
        else:
            trained, frozen = count([unet]) + encoders_params, count([vae])

            def forward():
                states = encoders[0](models.token_ids(1)).last_hidden_state
                unet(**{**models.unet_inputs(1), "encoder_hidden_states": states})
            what = "1 UNet row and the text encoder with grad; frozen: VAE"
        plain, checkpointed = _measure(models, [unet, *encoders], forward)
        return Footprint(stage, trained, frozen, plain, checkpointed, what)

    section = config[stage.section]
    base = count([unet])
    lora = _lora(models, section.get("lora_rank", 4))
    # LPO samples with the trained LRM, a second copy of the UNet and text encoders, held frozen beside the policy.
    reward = base + encoders_params if stage.section == "lpo" else 0
    frozen = base + encoders_params + count([vae]) + reward
    guided = stage.section != "diffusion_dpo" and section.get("guidance_scale", 1.0) != 1

    def forward():
        # The policy with grad on 2 rows: a tuple's parent with and without the prompt (CFG), or a pair's winner and
        # loser. The reference pass runs without grad and saves nothing.
        unet(**models.unet_inputs(2))
    plain, checkpointed = _measure(models, [unet], forward)
    what = (f"2 policy UNet rows with grad ({'the parent, CFG' if guided else 'winner and loser'}), the reference "
            f"without; LoRA rank {section.get('lora_rank', 4)}; frozen: UNet, VAE, text encoder(s)"
            f"{', the LRM (UNet + text encoders)' if reward else ''}"
            f"{'; the SPM pixel model is not counted' if stage.section == 'spo' else ''}")
    return Footprint(stage, lora, frozen, plain, checkpointed, what)


# ------------------------------------------------------------------------------------------------ hours


def measured_seconds(world: str, rule: str) -> tuple[float, str] | None:
    """A stage's measured wall time: Snakemake's benchmark of its rule (results/<world>/benchmarks/, or committed
    under reports/gpu/), else the embedded world's committed reports."""
    from lpo.stage import stage_costs
    for pattern in (f"results/{world}/benchmarks/{rule}.tsv", f"reports/gpu/*/{rule}.tsv"):
        for path in sorted(glob.glob(str(REPO / pattern))):
            rows = stage_costs([path])
            if rows:
                return rows[0]["seconds"], str(Path(path).relative_to(REPO))
    return _reported_seconds(world, rule)


def _reported_seconds(world: str, rule: str) -> tuple[float, str] | None:
    reports = REPO / "reports" / world
    costs = {"reward_lrm": ("LPO", "reward modelling (s)"), "optimize_lpo": ("LPO", "preference optimisation (s)"),
             "optimize_spo": ("SPO", "preference optimisation (s)"),
             "optimize_diffusion_dpo": ("Diffusion-DPO", "preference optimisation (s)")}
    if rule in costs and (reports / "optimize_cost.csv").exists():
        method, column = costs[rule]
        with open(reports / "optimize_cost.csv", newline="") as f:
            for row in csv.DictReader(f):
                if row["method"] == method and row.get(column, "-") not in ("", "-"):
                    return float(row[column]), f"reports/{world}/optimize_cost.csv"
    if (reports / "world.md").exists():
        match = re.search(rf"^\| {re.escape(rule)} \| ([0-9.]+) \|", (reports / "world.md").read_text(), re.M)
        if match:
            return float(match.group(1)), f"reports/{world}/world.md"
    return None


def _shown(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def optimizer_steps(config: dict, stage: StageSpec) -> tuple[int, str]:
    """The optimizer steps of a run of a stage that `lpo timing train-step-arch` times, and how they were counted
    where the config does not give them: LPO makes one per `train_batch_size` kept tuples of a round, and a round
    keeps at most one tuple per prompt and optimised step."""
    from lpo.config import from_dict
    from lpo.optimize.diffusion_dpo import DiffusionDPOConfig
    from lpo.optimize.methods import LPOConfig
    from lpo.optimize.step_trainer import optimised_steps
    from lpo.optimize.threshold import ddim_steps
    from lpo.reward.lrm_training import LRMTrainConfig
    from lpo.world.base_model import sampling_scheduler
    kind = {"lrm": LRMTrainConfig, "lpo": LPOConfig, "diffusion_dpo": DiffusionDPOConfig}[stage.section]
    section = from_dict(kind, config.get(stage.section), stage.section)
    if stage.section != "lpo":
        return section.steps, ""
    optimised = int(optimised_steps(ddim_steps(sampling_scheduler().config, section.num_inference_steps),
                                    section.timestep_range).sum())
    per_round = math.ceil(section.sample_batch_size * optimised / section.train_batch_size)
    return section.rounds * per_round, (f"{per_round} a round x {section.rounds} rounds if every tuple of "
                                        f"{section.sample_batch_size} prompts x {optimised} steps is kept")


def _train_step_rows(path: Path, stage: StageSpec, setting: Setting) -> list[tuple[int, float]]:
    """(per-device batch, seconds per micro-batch step) of the file's rows at the setting's precision and
    checkpointing; a setting that ran out of memory has no seconds."""
    with open(path, newline="") as f:
        return [(int(row["per_device_batch"]), float(row["seconds_per_step"])) for row in csv.DictReader(f)
                if row["stage"] == stage.section and row["precision"] == _precision(setting.mixed_precision)
                and row["gradient_checkpointing"] == _on(setting.checkpointing) and row["seconds_per_step"]]


def estimated_hours(config: dict, stage: StageSpec, setting: Setting, gpu_reports: Path = GPU_REPORTS) -> str | None:
    """Hours of an SD world's stage from a training step timed by `lpo timing train-step-arch` (the first
    <gpu_reports>/*/train_step_<arch>.csv with a row at the setting's precision and checkpointing): seconds per
    micro-batch step x accumulation x optimizer steps, the step's seconds scaled linearly from the nearest measured
    per-device batch where none was measured at the setting's; None where no file has such a row."""
    arch = config["sd_world"].get("preset") or config.get("world", {}).get("name")
    if stage.section not in TRAIN_STEP_STAGES or arch not in SD_ARCHES:
        return None
    batch = setting.batch()
    for path in sorted(Path(gpu_reports).glob(f"*/train_step_{arch}.csv")):
        rows = _train_step_rows(path, stage, setting)
        if not rows:
            continue
        measured, seconds = min(rows, key=lambda r: (abs(math.log(r[0] / batch)), -r[0]))
        seconds *= batch / measured
        steps, counted = optimizer_steps(config, stage)
        hours = seconds * setting.accumulation * steps / 3600
        scaled = f" (scaled from batch {measured})" if measured != batch else ""
        bound = "≤ " if counted else ""
        how = f" ({counted}); optimisation only, sampling not included" if counted else ""
        return (f"{bound}{hours:.3g} h (est.: {seconds:.3g} s a micro-batch step{scaled} x {setting.accumulation} x "
                f"{bound}{steps} optimizer steps{how}; {_shown(path)})")
    return None


ESTIMATE_NOTE = ("- Hours marked \"est.\": the seconds of one micro-batch step that `lpo timing train-step-arch` "
                 "timed at the stage's precision and checkpointing (the real architecture, random weights; scaled "
                 "linearly from the nearest per-device batch timed where the plan's was not) x accumulation x the "
                 "run's optimizer steps: the wall time with every process computing its share at once. Not counted: "
                 "gradient synchronisation between processes, decoding the data set's images, LPO's sampling "
                 "rounds, the LRM's validation, checkpoints.")


# ------------------------------------------------------------------------------------------------ the plan


def check_inputs(configfile: str | None, gpus: int | None, gpu_mem: float | None) -> None:
    if gpus is not None and gpus < 1:
        raise ValueError(f"--gpus {gpus}: give the number of GPUs a stage runs on, a whole number >= 1")
    if gpu_mem is not None and not (gpu_mem > 0 and math.isfinite(gpu_mem)):
        raise ValueError(f"--gpu-mem {gpu_mem:g}: give each GPU's memory in GiB, a number > 0 (e.g. 80 or 24)")
    if configfile is not None and not Path(configfile).is_file():
        raise FileNotFoundError(f"--configfile {configfile}: no such file; give a world config, e.g. "
                                f"config/sd15.yaml or config/sdxl.yaml (none: the embedded world)")


def _size(value: float) -> str:
    return f"{value / GIB:.2f} GiB" if value >= GIB / 10 else f"{value / 2 ** 20:.1f} MiB"


def _millions(value: int) -> str:
    return f"{value / 1e6:.2f} M" if value >= 1e6 else f"{value / 1e3:.1f} k"


def _setting(config: dict, stage: StageSpec, processes: int) -> Setting:
    section = config[stage.section]
    return Setting(section[stage.batch_key], processes, section.get("per_device_batch_size"),
                   section.get("mixed_precision") or "no", bool(section.get("gradient_checkpointing")),
                   stage.section, stage.batch_key)


def _precision(mixed_precision: str) -> str:
    return "fp32" if mixed_precision == "no" else mixed_precision


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _describe(setting: Setting) -> str:
    return f"per-device batch {setting.batch()} (accumulation {setting.accumulation}), " \
        f"{_precision(setting.mixed_precision)}" + \
        (", gradient checkpointing" if setting.checkpointing else "")


def models_table(footprints: list[Footprint]) -> list[str]:
    lines = ["| stage | trained params | frozen params | weights + grads + AdamW (fp32) | frozen weights fp32 / half | "
             "activations per sample, fp32 (checkpointed) | one sample runs |",
             "|---|---|---|---|---|---|---|"]
    for fp in footprints:
        lines.append(f"| {fp.stage.title} | {_millions(fp.trained)} | {_millions(fp.frozen)} | "
                     f"{_size(16 * fp.trained)} | {_size(4 * fp.frozen)} / {_size(2 * fp.frozen)} | "
                     f"{_size(fp.activations)} ({_size(fp.activations_checkpointed)}) | {fp.what} |")
    return lines


def setting_table(config: dict, world: str, footprints: list[Footprint], processes: dict[str, int],
                  limit: float | None, device: str, gpu_reports: Path = GPU_REPORTS) -> list[str]:
    """One row per stage at the config's settings, then a line per stage that does not fit, with what fits.
    `gpu_reports`: where the SD worlds' timed training steps are looked for (`estimated_hours`)."""
    rules = config.get("resources", {}).get("rules", {})
    default = config.get("resources", {}).get("default", {})
    lines = [f"| stage | global batch | processes | per-device batch | accumulation | precision | checkpointing | "
             f"memory per {device} | fit | hours (measured) | requested wall time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes, estimated = [], False
    for fp in footprints:
        stage = fp.stage
        setting = _setting(config, stage, processes[stage.section])
        rule = stage.sd_rule if "sd_world" in config else stage.shapes_rule
        measured = measured_seconds(world, rule)
        hours = f"{measured[0] / 3600:.3g} h ({measured[1]})" if measured else "unmeasured"
        requested = rules.get(rule, {}).get("runtime", default.get("runtime"))
        head = f"| {stage.title} | {setting.global_batch} {stage.unit}s | {setting.processes} |"
        how = f"{_precision(setting.mixed_precision)} | {_on(setting.checkpointing)}"
        try:
            batch, accumulation = setting.batch(), setting.accumulation
        except ValueError as e:
            lines.append(f"{head} - | - | {how} | - | **invalid** | {hours} | {requested} min |")
            notes.append(f"- **{stage.title} cannot run as configured**: {e}." + _suggestion(fp, setting, limit))
            continue
        estimate = None if measured or "sd_world" not in config else \
            estimated_hours(config, stage, setting, gpu_reports)
        if estimate:
            hours, estimated = estimate, True
        need = memory_bytes(fp, setting)
        fits = limit is None or need <= limit
        verdict = "fits" if fits else "**does not fit**"
        lines.append(f"{head} {batch} | {accumulation} | {how} | {_size(need)} | {verdict} | {hours} | "
                     f"{requested} min |")
        if not fits:
            notes.append(f"- **{stage.title} does not fit** in {limit / GIB:g} GiB at per-device batch {batch} "
                         f"({_size(need)})." + _suggestion(fp, setting, limit))
    notes += [ESTIMATE_NOTE] if estimated else []
    return lines + ([""] + notes if notes else [])


def _suggestion(fp: Footprint, setting: Setting, limit: float | None) -> str:
    """The settings that fit, as a sentence; what stands in the way where none does."""
    if setting.global_batch % setting.processes:
        return ""
    unit, section = fp.stage.unit, fp.stage.section
    options = fitting_settings(fp, setting, math.inf if limit is None else limit)
    found = [f"{_describe(s)}, {_size(memory_bytes(fp, s))}" for s in options if s]
    if not found:
        return (f" Nothing fits at any per-device batch: weights and optimizer state alone need "
                f"{_size(static_bytes(fp, 'bf16'))} even in bf16 (shard the optimizer state, e.g. DeepSpeed ZeRO, "
                f"or use a larger GPU).")
    return (f" Largest per-device batch that fits and divides the {setting.share} {unit}s per process: "
            + "; ".join(found) + f". Set `{section}.per_device_batch_size` (and `{section}.mixed_precision`, "
            f"`{section}.gradient_checkpointing`) to one of these.")


def plan_world(configfile: str | None, hardware: list[tuple[int, float | None]]) -> list[str]:
    """Markdown for one world: an SD world (`configfile`) on each (GPUs, GiB per GPU) of `hardware`, or the embedded
    world (None) on the CPU, its processes those of its config, against this machine's RAM unless a GiB is given."""
    for gpus, gpu_mem in hardware:
        check_inputs(configfile, gpus, gpu_mem)
    files = [str(DEFAULT_CONFIG), *([configfile] if configfile else [])]
    config = read_config(files)
    shown = " + ".join(str(Path(f).resolve().relative_to(REPO)) if Path(f).resolve().is_relative_to(REPO) else f
                       for f in files)
    world = config["world"]["name"]
    if "sd_world" in config:
        arch = config["sd_world"].get("preset", world)
        if arch not in SD_ARCHES:
            raise ValueError(f"sd_world.preset = {arch!r}: the plan has real-size topologies of "
                             f"{', '.join(SD_ARCHES)} only (lpo/timing/architectures.py)")
        trained = config.get("sd_pipeline", {}).get("trained", ["lpo", "diffusion_dpo"])
        stages = [STAGES["lrm"], *(STAGES[s] for s in trained if s in STAGES)]
        footprints = [footprint(stage, config, lambda: sd_models(arch)) for stage in stages]
        lines = [f"## {SD_ARCHES[arch]} ({shown})", ""]
        settings = [(f"### On {gpus} x {gpu_mem:g} GiB GPUs" if gpu_mem else f"### On {gpus} GPU(s)",
                     {s.section: gpus for s in stages}, gpu_mem * GIB if gpu_mem else None, "GPU")
                    for gpus, gpu_mem in hardware]
    else:
        stages = [STAGES[s] for s in ("base_model", "lrm", "lpo", "spo", "diffusion_dpo")]
        footprints = [footprint(stage, config, lambda: shapes_models(config)) for stage in stages]
        lines = [f"## The embedded {world} world ({shown}), on the CPU", ""]
        cpu = config["compute"]["processes"]
        processes = {s.section: cpu if s.section in SHAPES_MULTIPROCESS else 1 for s in stages}
        settings = [(f"### Against {gpu_mem:g} GiB per process" if gpu_mem else
                     f"### Against this machine's RAM ({_host_ram() / GIB:.1f} GiB)", processes,
                     gpu_mem * GIB if gpu_mem else _host_ram(), "process") for _, gpu_mem in hardware]
    lines += [*models_table(footprints), ""]
    for title, processes, limit, device in settings:
        lines += [title, "", *setting_table(config, world, footprints, processes, limit, device), ""]
    return lines


def _host_ram() -> float:
    import os
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


ASSUMPTIONS = [
    "Memory per device = 16 B x trained params (fp32 weights, fp32 gradients, AdamW's two fp32 moments) + frozen "
    "params x (2 B with fp16/bf16, 4 B without) + activations per sample x per-device batch.",
    "Activations: measured per sample (module docstring of lpo/timing/plan.py): one forward pass with grad on meta "
    "tensors, adding up the bytes `torch.autograd.graph.saved_tensors_hooks` sees, each storage once, parameters "
    "left out. Attention is diffusers' `AttnProcessor` (the attention matrix saved): an **upper bound**; fused SDPA "
    "(flash / memory-efficient) attention saves far less. Checkpointed: the same with the trained modules' "
    "gradient checkpointing on.",
    "Activations scale linearly with the per-device batch, and are half the fp32 size with fp16 / bf16 (autocast); "
    "master weights, gradients and AdamW state stay fp32 either way.",
    "Not counted: the CUDA context and allocator slack (~1-3 GiB), temporaries of the backward pass, the reference "
    "pass (no grad, freed at once), LPO's sampling rounds (no grad) and the VAE encoding of a batch.",
    "Global batch = the config's batch key (pairs or tuples per optimizer step, over all processes); per-device "
    "batch = `per_device_batch_size` (null: the whole share of a process); accumulation = global / (processes x "
    "per-device), as lpo.launch.layout lays it out. Fit: the memory against the whole GiB given, no reserve.",
    "Hours: a stage's measured wall time, only where one was measured: Snakemake's benchmark of its rule "
    "(results/<world>/benchmarks/<rule>.tsv, or a <rule>.tsv committed under reports/gpu/), or the embedded world's "
    "committed reports; it is the time of the run as it was configured then, not rescaled to the GPUs above. "
    "Else \"unmeasured\": no number is made up. The requested wall time is the config's "
    "`resources.rules.<rule>.runtime`, a request to the scheduler, not a measurement.",
]


def render(worlds: list[list[str]], command: str) -> str:
    header = [f"# Memory and time plan", "",
              f"Generated by `{command}` on {datetime.date.today().isoformat()}: computed from the configs and the "
              f"models' real topologies (meta device), not typed. Every number here is an estimate of memory from "
              f"the formula below; hours are measurements only where the table names the file they come from.", "",
              "## How it is computed", "", *(f"- {a}" for a in ASSUMPTIONS), ""]
    return "\n".join(header + [line for world in worlds for line in world]).rstrip() + "\n"


def write_plan(path: str | Path) -> None:
    from lpo.io import atomic_path
    worlds = [plan_world(configfile, hardware) for configfile, hardware in WRITTEN]
    text = render(worlds, WRITE_COMMAND)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
