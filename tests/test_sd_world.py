"""The SD worlds' inputs, offline: tiny same-topology SD1.5 and SDXL pipelines (lpo.timing.architectures.tiny) saved in
hub layout, loaded from a local path and through a fake local Hugging Face cache (models--org--name/snapshots/<rev>
with refs/main) under the presets' own hub ids; the official UNets, the fp16-fix VAE and released-layout LRMs;
and `missing_inputs` naming every input a world lacks, with its hub id and config key."""
import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from test_pickapic import REV, cache_dataset, pickapic_splits, write_mpcf
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lpo.pipelines import load_pipeline_dir
from lpo.sd import config as sd_config
from lpo.sd import hub as sd_hub
from lpo.sd import inputs as sd_inputs
from lpo.sd import pipelines as sd_pipelines
from lpo.timing.architectures import CLIP_BIGG_TEXT, CLIP_L_TEXT, SD15_UNET, SD_VAE, SDXL_UNET, tiny
from lpo.reward.lrm import LatentRewardModel
from lpo.world.pipeline import load_pipeline as load_by_path
from lpo.world.pipeline import sample
from lpo.world.tokenizer import SD_MAX_LENGTH, build_clip_tokenizer

IMAGE = 64  # the tiny VAE's 3 downsamplings give 8x8 latents
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   steps_offset=1, timestep_spacing="leading")
SD15_TEXT = tiny(SD15_UNET)["cross_attention_dim"]
SD21_TEXT = 24  # the tiny OpenCLIP-style text encoder's width (SD2.1's is 1024)
SDXL_TEXT = (16, 32)  # the two tiny text encoders' widths; the UNet attends to both, concatenated


def text_encoder(base: dict, width: int, cls=CLIPTextModel):
    return cls(CLIPTextConfig(**{**base, "hidden_size": width, "intermediate_size": 2 * width,
                                 "num_hidden_layers": 1, "num_attention_heads": 2, "projection_dim": width,
                                 "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}))


def tiny_unet(xl: bool, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    if not xl:
        return UNet2DConditionModel(**{**tiny(SD15_UNET), "sample_size": IMAGE // 8})
    config = {**tiny(SDXL_UNET), "sample_size": IMAGE // 8, "cross_attention_dim": sum(SDXL_TEXT)}
    config["projection_class_embeddings_input_dim"] = 6 * config["addition_time_embed_dim"] + SDXL_TEXT[1]
    return UNet2DConditionModel(**config)


def tiny_vae(seed: int, scaling_factor: float = 0.18215) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**{**tiny(SD_VAE), "sample_size": IMAGE, "scaling_factor": scaling_factor})


def save_sd15(out: Path, tokenizer, seed: int = 0) -> Path:
    """SD1.5's hub layout: PNDM scheduler config, no safety checker weights."""
    torch.manual_seed(seed)
    StableDiffusionPipeline(
        vae=tiny_vae(seed), text_encoder=text_encoder(CLIP_L_TEXT, SD15_TEXT), tokenizer=tokenizer,
        unet=tiny_unet(False, seed), scheduler=PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True,
                                                             set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(out)
    return out


def save_sd21(out: Path, tokenizer, seed: int = 0) -> Path:
    """SD2.1-base's hub layout: SD1.5's UNet blocks with linear attention projections, an OpenCLIP-style (gelu)
    text encoder of its own width, PNDM scheduler config, epsilon prediction."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**tiny(SD15_UNET), "sample_size": IMAGE // 8, "use_linear_projection": True,
                                   "cross_attention_dim": SD21_TEXT})
    StableDiffusionPipeline(
        vae=tiny_vae(seed), text_encoder=text_encoder(CLIP_BIGG_TEXT, SD21_TEXT), tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(out)
    return out


def save_sdxl(out: Path, tokenizer, seed: int = 0) -> Path:
    """SDXL's hub layout: two text encoders (the second with a projection), Euler scheduler config."""
    torch.manual_seed(seed)
    StableDiffusionXLPipeline(
        vae=tiny_vae(seed, 0.13025), text_encoder=text_encoder(CLIP_L_TEXT, SDXL_TEXT[0]),
        text_encoder_2=text_encoder(CLIP_BIGG_TEXT, SDXL_TEXT[1], CLIPTextModelWithProjection),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=tiny_unet(True, seed),
        scheduler=EulerDiscreteScheduler(**SD_SCHEDULE)).save_pretrained(out)
    return out


def save_released_lrm(pipeline_dir: Path, out: Path, xl: bool) -> Path:
    """An LRM in casiatao/LRM's layout: unet/, text_encoder/[_2], state_dict.pt, no tokenizer or config."""
    tokenizer = build_clip_tokenizer(out.parent / f"{out.name}-tokenizer", SD_MAX_LENGTH)
    kwargs = {}
    if xl:
        kwargs = {"text_encoder_2": CLIPTextModelWithProjection.from_pretrained(pipeline_dir / "text_encoder_2"),
                  "tokenizer_2": tokenizer}
    torch.manual_seed(7)
    LatentRewardModel(UNet2DConditionModel.from_pretrained(pipeline_dir / "unet"),
                      CLIPTextModel.from_pretrained(pipeline_dir / "text_encoder"), tokenizer, **kwargs).save(out)
    for extra in ("tokenizer", "tokenizer_2", "lrm_config.json"):
        shutil.rmtree(out / extra, ignore_errors=True)
        (out / extra).unlink(missing_ok=True)
    torch.save(load_file(out / "head.safetensors"), out / "state_dict.pt")  # the release pickles its head
    (out / "head.safetensors").unlink()
    return out


def cache_model(cache: Path, repo: str, source: Path | None = None, inner: str = "",
                files: tuple[str, ...] = ()) -> None:
    """Put `source` (a folder) at `inner` of the cached snapshot of model repo `repo`, or empty `files`."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / REV
    if source is not None:
        shutil.copytree(source, snapshot / inner, dirs_exist_ok=True)
    for name in files:
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(b"")
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(REV)


def weights(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd_world")
    tokenizer = build_clip_tokenizer(root / "tokenizer", SD_MAX_LENGTH)
    out = {"sd15": save_sd15(root / "sd15", tokenizer), "sdxl": save_sdxl(root / "sdxl", tokenizer)}
    out["lpo_unet"] = root / "lpo_unet"
    tiny_unet(False, seed=1).save_pretrained(out["lpo_unet"])
    out["fp16_vae"] = root / "fp16_vae"
    tiny_vae(seed=5, scaling_factor=0.13025).save_pretrained(out["fp16_vae"])
    out["lrm_sd15"] = save_released_lrm(out["sd15"], root / "lrm_sd15", xl=False)
    out["lrm_sdxl"] = save_released_lrm(out["sdxl"], root / "lrm_sdxl", xl=True)
    return out


@pytest.fixture(scope="module")
def cache(built, tmp_path_factory) -> Path:
    """A local HF cache holding what the sd15 and sdxl presets name (their base models, VAE, LRMs, LPO's UNet,
    Pick-a-Pic), as `hf download` leaves it."""
    cache = tmp_path_factory.mktemp("hub")
    cache_model(cache, "stable-diffusion-v1-5/stable-diffusion-v1-5", built["sd15"])
    cache_model(cache, "stabilityai/stable-diffusion-xl-base-1.0", built["sdxl"])
    cache_model(cache, "madebyollin/sdxl-vae-fp16-fix", built["fp16_vae"])
    cache_model(cache, "casiatao/LRM", built["lrm_sd15"], "lrm_sd15")
    cache_model(cache, "casiatao/LRM", built["lrm_sdxl"], "lrm_sdxl")
    cache_model(cache, "casiatao/LPO", built["lpo_unet"], "lpo_sd15_merge/unet")
    for repo in ("yuvalkirstain/pickapic_v1", "pickapic-anonymous/pickapic_v1"):
        cache_dataset(cache, repo, pickapic_splits())
    return cache


@pytest.fixture
def hub(cache, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "datasets-cache")


# ---------------------------------------------------------------------------------------------------- config

def test_presets_merge_with_overrides():
    config = sd_config.sd_world_config({
        "preset": "sdxl", "official_unets": {"spo": None}, "eval_guidance_scale": {"lpo": 6.0},
        "scorers": {"aesthetic": None, "pickscore": {"model": "/models/PickScore_v1"}}})
    assert (config.vae, config.lrm, config.resolution) == ("madebyollin/sdxl-vae-fp16-fix", "casiatao/LRM/lrm_sdxl",
                                                           1024)
    assert config.official_unets.spo is None and config.official_unets.lpo == "casiatao/LPO/lpo_sdxl_merge/unet"
    assert "aesthetic" not in config.scorers
    assert config.scorers["pickscore"] == {"model": "/models/PickScore_v1",
                                           "processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"}
    assert config.scorers["hpsv2"] == {"checkpoint": "xswu/HPSv2/HPS_v2_compressed.pt"}
    assert (config.guidance_scale("lpo"), config.guidance_scale("original")) == (6.0, 5.0)
    sd15 = sd_config.sd_world_config({"preset": "sd15"})
    assert (sd15.guidance_scale("original"), sd15.guidance_scale("spo"), sd15.resolution) == (7.5, 5.0, 512)
    assert sd_config.sd_world_config({"preset": "sd21"}).lrm == "casiatao/LRM/lrm_sd15"  # heterogeneous: LRM-1.5
    for bad, message in (({"preset": "sd3"}, "sd_world.preset='sd3'"),
                         ({"preset": "sd15", "vea": "x"}, "unknown key.*vea"),
                         ({"preset": "sd15", "scorers": {"clip": {}}}, "unknown scorer.*clip"),
                         ({"preset": "sd15", "eval_guidance_scale": {"dpo": 5}}, "eval_guidance_scale")):
        with pytest.raises(ValueError, match=message):
            sd_config.sd_world_config(bad)


def test_hub_references_and_local_paths(tmp_path, monkeypatch):
    assert sd_hub.hub_parts("casiatao/LRM/lrm_sd15") == ("casiatao/LRM", "lrm_sd15")
    assert sd_hub.hub_parts("xswu/HPSv2/HPS_v2_compressed.pt") == ("xswu/HPSv2", "HPS_v2_compressed.pt")
    assert sd_hub.hub_parts("madebyollin/sdxl-vae-fp16-fix") == ("madebyollin/sdxl-vae-fp16-fix", "")
    for local in ("/data/sd15", "./models/sd15", "~/sd15", "sd15"):
        assert sd_hub.hub_parts(local) is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "sd15").mkdir(parents=True)
    assert sd_hub.hub_parts("models/sd15") is None  # exists here: a path
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert sd_hub.hub_cache() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert sd_hub.hub_cache() == tmp_path / "elsewhere"


# ------------------------------------------------------------------------------------------- missing inputs

SD15_MISSING = {  # config key -> what its line must name
    "base_model": ["stable-diffusion-v1-5/stable-diffusion-v1-5", "hf download"],
    "vae": None,
    "lrm": ["casiatao/LRM", "--include 'lrm_sd15/*'"],
    "mpcf_scores": ["not configured", "vqa_aes_clip_score_mp.csv", "Kwai-Kolors/LPO"],
    "clip_text_projection": ["openai/clip-vit-large-patch14", "text_projection"],
    "dataset": ["yuvalkirstain/pickapic_v1", "--repo-type dataset"],
    "eval_dataset": ["pickapic-anonymous/pickapic_v1", "--repo-type dataset"],
    "official_unets.lpo": ["casiatao/LPO", "--include 'lpo_sd15_merge/unet/*'"],
    "official_unets.spo": ["SPO-Diffusion-Models/SPO-SD-v1-5_4k-p_10ep", "--include 'unet/*'"],
    "official_unets.diffusion_dpo": ["mhdang/dpo-sd1.5-text2image-v1", "--include 'unet/*'"],
    "scorers.pickscore.model": ["yuvalkirstain/PickScore_v1"],
    "scorers.pickscore.processor": ["laion/CLIP-ViT-H-14-laion2B-s32B-b79K"],
    "scorers.imagereward.checkpoint": ["hf download THUDM/ImageReward ImageReward.pt"],
    "scorers.imagereward.med_config": ["hf download THUDM/ImageReward med_config.json"],
    "scorers.imagereward.vocab": ["hf download google-bert/bert-base-uncased vocab.txt"],
    "scorers.hpsv2.checkpoint": ["hf download xswu/HPSv2 HPS_v2_compressed.pt"],
    "scorers.hpsv2.1.checkpoint": ["hf download xswu/HPSv2 HPS_v2.1_compressed.pt"],
    "scorers.aesthetic.clip": ["openai/clip-vit-large-patch14"],
    "scorers.aesthetic.mlp": ["not configured", "sac+logos+ava1-l14-linearMSE.pth",
                              "github.com/christophschuhmann/improved-aesthetic-predictor"],
}


@pytest.mark.parametrize("preset", ["sd15", "sdxl"])
def test_with_nothing_downloaded_every_input_is_listed(preset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    expected = dict(SD15_MISSING)
    if preset == "sdxl":
        expected |= {"vae": ["madebyollin/sdxl-vae-fp16-fix"], "lrm": ["casiatao/LRM", "--include 'lrm_sdxl/*'"],
                     "clip_text_projection": None,
                     "base_model": ["stabilityai/stable-diffusion-xl-base-1.0"],
                     "official_unets.lpo": ["casiatao/LPO", "--include 'lpo_sdxl_merge/unet/*'"],
                     "official_unets.spo": ["SPO-Diffusion-Models/SPO-SDXL_4k-p_10ep"],
                     "official_unets.diffusion_dpo": ["mhdang/dpo-sdxl-text2image-v1"]}
    expected = {k: v for k, v in expected.items() if v is not None}
    lines = sd_inputs.missing_inputs({"preset": preset})
    assert len(lines) == len(expected) and all("\n" not in line for line in lines)
    for key, names in expected.items():
        [line] = [line for line in lines if line.startswith(f"sd_world.{key}: ")]
        assert all(name in line for name in names), line
    with pytest.raises(FileNotFoundError) as error:
        sd_inputs.require_inputs({"preset": preset})
    assert f"lacks {len(expected)} input(s)" in str(error.value)
    assert all(line in str(error.value) for line in lines)
    # base model (+ VAE), evaluation prompts, 9 scorer checkpoints
    assert len(sd_inputs.missing_inputs({"preset": preset}, stages=("evaluate",))) == 11 + (preset == "sdxl")


def test_incomplete_inputs_are_named(built, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache_model(cache, "casiatao/LRM", built["lrm_sdxl"], "lrm_sdxl")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    broken = tmp_path / "sd15"
    shutil.copytree(built["sd15"], broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    for name in ("merges.txt", "vocab.json", "tokenizer.json"):
        (broken / "tokenizer" / name).unlink(missing_ok=True)
    lines = sd_inputs.missing_inputs({"preset": "sd15", "base_model": str(broken)}, stages=("optimize", "official"))
    [base] = [line for line in lines if line.startswith("sd_world.base_model: ")]
    assert "unet/diffusion_pytorch_model.safetensors" in base
    assert "tokenizer/tokenizer.json (or vocab.json + merges.txt)" in base
    [lrm] = [line for line in lines if line.startswith("sd_world.lrm: ")]
    assert "lacks 'lrm_sd15'" in lrm and "hf download casiatao/LRM --include 'lrm_sd15/*'" in lrm
    with pytest.raises(FileNotFoundError, match="sd_world.base_model: .* lacks .*unet/diffusion_pytorch_model"):
        sd_pipelines.load_pipeline(sd_config.sd_world_config({"preset": "sd15", "base_model": str(broken)}))
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps(index | {"_class_name": "FluxPipeline"}))
    [base] = sd_inputs.missing_inputs({"preset": "sd15", "base_model": str(broken)}, stages=("evaluate",))[:1]
    assert base == (f"sd_world.base_model: '{broken}' holds a FluxPipeline; the SD worlds load "
                    "StableDiffusionPipeline or StableDiffusionXLPipeline")


def test_a_complete_world_lacks_nothing(hub, built, tmp_path):
    """Every stage's inputs in place, scorer checkpoints included (files only: nothing is loaded)."""
    cache_model(hub, "yuvalkirstain/PickScore_v1", files=("config.json", "model.safetensors"))
    cache_model(hub, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", files=("preprocessor_config.json", "tokenizer.json"))
    cache_model(hub, "xswu/HPSv2", files=("HPS_v2_compressed.pt",))
    cache_model(hub, "openai/clip-vit-large-patch14", files=("config.json", "model.safetensors"))
    train = pickapic_splits()["train"]
    config = {"preset": "sd15", "mpcf_scores": str(write_mpcf(tmp_path / "vqa_aes_clip_score_mp.csv", train)),
              "official_unets": {"spo": None, "diffusion_dpo": None},
              "scorers": {"imagereward": None, "hpsv2.1": None, "aesthetic": None}}
    assert sd_inputs.missing_inputs(config) == []
    paths = sd_pipelines.scorer_paths(sd_inputs.require_inputs(config))
    assert Path(paths["hpsv2"]["checkpoint"]).is_file() and Path(paths["pickscore"]["model"]).is_dir()


def test_prompt_sets_of_a_world(hub, tmp_path):
    from lpo.sd import pickapic

    config = sd_config.sd_world_config({"preset": "sd15", "train_prompt_count": 5, "eval_prompt_count": 6})
    sets = pickapic.prompt_sets(config, seed=2)
    drawn = pickapic.draw_training_prompts("yuvalkirstain/pickapic_v1", 5, seed=2)
    assert sets == {"train": [p.caption for p in drawn],
                    "validation_unique": [f"validation_unique prompt {i}" for i in range(6)]}
    pickapic.write_training_prompts(tmp_path / "4k_training_prompts.json", drawn[:2])
    config = sd_config.sd_world_config({"preset": "sd15", "eval_prompt_count": 6,
                                       "train_prompts": str(tmp_path / "4k_training_prompts.json")})
    assert pickapic.prompt_sets(config, seed=0)["train"] == [p.caption for p in drawn[:2]]
    with pytest.raises(ValueError, match="has 6 unique captions, expected 500"):
        pickapic.prompt_sets(sd_config.sd_world_config({"preset": "sd15", "train_prompt_count": 5}), seed=0)


# --------------------------------------------------------------------------------------------------- loading

def check_ddim(pipe, prediction_type: str = "epsilon") -> None:
    scheduler = pipe.scheduler
    assert isinstance(scheduler, DDIMScheduler)
    assert (scheduler.config.prediction_type, scheduler.config.steps_offset, scheduler.config.timestep_spacing,
            scheduler.config.beta_schedule, scheduler.config.set_alpha_to_one, scheduler.config.clip_sample) == (
        prediction_type, 1, "leading", "scaled_linear", False, False)


@pytest.mark.parametrize("where", ["path", "hub"])
def test_sd15_loads_from_a_path_and_from_the_cache(built, hub, where):
    config = sd_config.sd_world_config({"preset": "sd15"} | ({"base_model": str(built["sd15"])}
                                                            if where == "path" else {}))
    pipe = sd_pipelines.load_pipeline(config)
    assert type(pipe) is StableDiffusionPipeline and pipe.safety_checker is None
    check_ddim(pipe)  # set_alpha_to_one from SD1.5's PNDM config, not DDIM's default
    assert same_weights(weights(pipe.unet), weights(UNet2DConditionModel.from_pretrained(built["sd15"] / "unet")))
    images = sample(pipe, ["a red cube"], [0], steps=2, guidance_scale=config.guidance_scale("original"))
    assert images.shape == (1, IMAGE, IMAGE, 3)


def test_a_v_prediction_scheduler_config_is_kept(built, tmp_path):
    """SD2.1 at 768 px predicts v; the DDIM scheduler is built from the model's own config, so it does too."""
    model = tmp_path / "sd21-v"
    shutil.copytree(built["sd15"], model)
    config_path = model / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"prediction_type": "v_prediction"}))
    pipe = sd_pipelines.load_pipeline(sd_config.sd_world_config({"preset": "sd21", "base_model": str(model)}))
    check_ddim(pipe, "v_prediction")


def test_official_unets_replace_the_base_unet(built, hub):
    config = sd_config.sd_world_config({"preset": "sd15"})
    pipe = sd_pipelines.load_pipeline(config, "lpo")
    assert same_weights(weights(pipe.unet), weights(UNet2DConditionModel.from_pretrained(built["lpo_unet"])))
    assert config.guidance_scale("lpo") == 5.0
    with pytest.raises(FileNotFoundError, match=r"sd_world.official_unets.spo: .*SPO-Diffusion-Models/"
                                                r"SPO-SD-v1-5_4k-p_10ep/unet' is not in the local Hugging Face cache"):
        sd_pipelines.load_pipeline(config, "spo")
    with pytest.raises(ValueError, match="no official lpo model"):
        sd_pipelines.load_pipeline(sd_config.sd_world_config({"preset": "sd21", "base_model": str(built["sd15"])}),
                               "lpo")


def test_sdxl_preset_loads_with_the_fp16_fix_vae_from_the_cache(built, hub):
    config = sd_config.sd_world_config({"preset": "sdxl"})
    assert sd_inputs.missing_inputs(config, stages=("optimize",)) == []
    pipe = sd_pipelines.load_pipeline(config)
    assert type(pipe) is StableDiffusionXLPipeline
    check_ddim(pipe)
    assert same_weights(weights(pipe.vae), weights(AutoencoderKL.from_pretrained(built["fp16_vae"])))
    assert sample(pipe, ["a red cube"], [0], steps=2, guidance_scale=5.0).shape == (1, IMAGE, IMAGE, 3)
    lrm = sd_pipelines.load_lrm(config).eval()
    assert lrm.text_encoder_2 is not None
    with torch.no_grad():
        scores = lrm.score(torch.randn(2, 4, IMAGE // 8, IMAGE // 8, generator=torch.Generator().manual_seed(0)),
                           951, ["a red cube", "a blue ball"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_the_released_lrm_loads_with_the_base_models_tokenizer(built, hub):
    lrm = sd_pipelines.load_lrm(sd_config.sd_world_config({"preset": "sd15"})).eval()
    assert same_weights(weights(lrm.unet), weights(UNet2DConditionModel.from_pretrained(built["lrm_sd15"] / "unet")))
    assert lrm.tokenizer("a red cube").input_ids[0] == 49406
    with torch.no_grad():
        scores = lrm.score(torch.zeros(1, 4, IMAGE // 8, IMAGE // 8), 1, ["a red cube"])
    assert scores.shape == (1,) and torch.isfinite(scores).all()


def test_link_pipeline_serves_the_path_based_stages(built, hub, tmp_path):
    config = sd_config.sd_world_config({"preset": "sd15"})
    linked = sd_pipelines.link_pipeline(config, tmp_path / "lpo-official", "lpo")
    assert (linked / "unet").is_symlink() and (linked / "unet").resolve() == (
        hub / "models--casiatao--LPO" / "snapshots" / REV / "lpo_sd15_merge" / "unet").resolve()
    pipe = load_by_path(linked)
    check_ddim(pipe)
    assert same_weights(weights(pipe.unet), weights(UNet2DConditionModel.from_pretrained(built["lpo_unet"])))
    xl = sd_pipelines.link_pipeline(sd_config.sd_world_config({"preset": "sdxl"}), tmp_path / "sdxl")
    assert (xl / "vae").resolve() == (hub / "models--madebyollin--sdxl-vae-fp16-fix" / "snapshots" / REV).resolve()
    assert type(StableDiffusionXLPipeline.from_pretrained(xl, local_files_only=True).scheduler) is DDIMScheduler


# ------------------------------------------------------------------------------------------- pipeline settings

def test_the_pipeline_settings_choose_the_stages_to_check():
    sd15, sd21 = sd_config.sd_world_config({"preset": "sd15"}), sd_config.sd_world_config({"preset": "sd21"})
    default = sd_config.SDPipelineConfig()
    assert default.trains_lrm and sd_config.sd_stages(sd15, default) == ("evaluate", "reward", "optimize", "official")
    released = sd_config.SDPipelineConfig(trained=("lpo",), lpo_lrm="released")
    assert not released.trains_lrm
    assert sd_config.sd_stages(sd21, released) == ("evaluate", "optimize", "official")  # official: the released LRM
    evaluation_only = sd_config.sd_world_config({"preset": "sd21", "lrm": None})
    assert sd_config.sd_stages(evaluation_only, sd_config.SDPipelineConfig(trained=())) == ("evaluate",)
    assert sd_config.official_methods(sd15) == ["lpo", "spo", "diffusion_dpo"] and not sd_config.official_methods(sd21)
    with pytest.raises(ValueError, match="sd_pipeline.lpo_lrm=released but sd_world.lrm is not set"):
        sd_config.sd_stages(evaluation_only, released)
    for bad, message in (({"trained": ("spo",)}, "cannot train spo"), ({"lpo_lrm": "mine"}, "lpo_lrm"),
                         ({"steps": 0}, "sd_pipeline.steps"), ({"reward_timesteps": (1000,)}, "reward_timesteps"),
                         ({"dtype": "int8"}, "sd_pipeline.dtype")):
        with pytest.raises(ValueError, match=message):
            sd_config.SDPipelineConfig(**bad)


def test_training_needs_no_released_lrm(built, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    config = {"preset": "sd15", "base_model": str(built["sd15"]), "dataset": str(tmp_path / "nowhere")}
    lines = sd_inputs.missing_inputs(config, stages=("optimize",))
    assert [line.split(":")[0] for line in lines] == ["sd_world.dataset"]


def test_saved_and_linked_pipelines_load_by_path(built, hub, tmp_path):
    linked = sd_pipelines.link_pipeline(sd_config.sd_world_config({"preset": "sdxl"}), tmp_path / "sdxl")
    assert type(load_pipeline_dir(linked)) is StableDiffusionXLPipeline
    pipe = load_pipeline_dir(built["sd15"], torch.float16)
    assert type(pipe) is StableDiffusionPipeline and pipe.unet.dtype == torch.float16
    with pytest.raises(FileNotFoundError, match="model_index.json missing"):
        load_pipeline_dir(tmp_path)


def test_a_unet_of_another_architecture_is_named(built, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    xl_unet = tmp_path / "xl_unet"
    shutil.copytree(built["sdxl"] / "unet", xl_unet)
    config = {"preset": "sd15", "base_model": str(built["sd15"]), "lrm": str(built["lrm_sd15"]),
              "official_unets": {"lpo": str(built["lpo_unet"]), "spo": str(xl_unet), "diffusion_dpo": None}}
    [line] = sd_inputs.missing_inputs(config, stages=("official",))
    assert line.startswith(f"sd_world.official_unets.spo: '{xl_unet}' holds a UNet of another architecture than the "
                           "base model's: ")
    assert "addition_embed_type='text_time' (base model: None)" in line
    no_official = {m: None for m in ("lpo", "spo", "diffusion_dpo")}
    assert sd_inputs.missing_inputs(config | {"lrm": str(built["lrm_sdxl"]), "official_unets": no_official},
                                    stages=("official",)) == []  # an LRM needs only the same latent channels
