"""The LRM: feature sizes from the published configs, down + mid only, VFE, save/load in the released layout."""
import math
from unittest import mock

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lpo_kernels import reward_head_reference
from lpo.timing.architectures import SD15_UNET, SDXL_UNET, tiny
from lpo.reward.lrm import LatentRewardModel, LRMConfig, clip_text_projection, down_and_mid, stage_channels
from lpo.reward.pair_loss import pair_accuracy, pair_loss
from lpo.world.tokenizer import build_clip_tokenizer

PROMPTS = ["a small red circle on a gray background, on the left", "a large blue cross on a white background"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    build_clip_tokenizer(path)
    return CLIPTokenizer.from_pretrained(path)


def text_encoder(width: int, projection: bool = False):
    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=width)
    torch.manual_seed(0)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def sd15_lrm(tokenizer, guidance_scale=7.5) -> LatentRewardModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**tiny(SD15_UNET), "sample_size": 16})
    return LatentRewardModel(unet, text_encoder(unet.config.cross_attention_dim), tokenizer,
                             LRMConfig(guidance_scale=guidance_scale, head_backend="reference")).eval()


@pytest.mark.parametrize("config, features", [(SD15_UNET, 4800), (SDXL_UNET, 3520)])
def test_feature_size_of_published_configs(config, features):
    with torch.device("meta"):  # 2.6 B parameters for SDXL: shapes only
        unet = UNet2DConditionModel(**config)
    assert sum(stage_channels(unet)) == features


def test_sd15_topology_stages_at_their_resolutions(tokenizer):
    lrm = sd15_lrm(tokenizer)
    ids = lrm.tokenize(PROMPTS)["input_ids"]
    states = lrm.text_encoder(ids).last_hidden_state
    stages, mid = down_and_mid(lrm.unet, torch.randn(2, 4, 16, 16), torch.tensor([1, 951]), states)
    channels = lrm.unet.config.block_out_channels
    assert [tuple(s.shape[1:]) for s in stages] == [(channels[0], 16, 16), (channels[1], 8, 8),
                                                     (channels[2], 4, 4), (channels[3], 2, 2)]
    assert tuple(mid.shape[1:]) == (channels[3], 2, 2)
    assert lrm.feature_dim == sum(channels) + channels[-1]


def test_sdxl_topology_scores_with_second_text_encoder(tokenizer):
    lrm = sdxl_lrm(tokenizer).eval()
    channels = lrm.unet.config.block_out_channels
    assert lrm.text_projection is None and lrm.feature_dim == sum(channels) + channels[-1]
    scores = lrm.score(torch.randn(2, 4, 16, 16), 501, PROMPTS)
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def sdxl_lrm(tokenizer, width: int = 16) -> LatentRewardModel:
    config = tiny(SDXL_UNET)
    config.update(cross_attention_dim=2 * width, sample_size=16,
                  projection_class_embeddings_input_dim=width + 6 * config["addition_time_embed_dim"])
    torch.manual_seed(0)
    return LatentRewardModel(UNet2DConditionModel(**config), text_encoder(width), tokenizer,
                             LRMConfig(head_backend="reference"), text_encoder_2=text_encoder(width, projection=True),
                             tokenizer_2=tokenizer)


@pytest.mark.parametrize("build", [sd15_lrm, sdxl_lrm])
def test_the_unread_modules_are_exactly_what_gets_no_gradient(tokenizer, build):
    lrm = build(tokenizer).train()
    lrm.score(torch.randn(2, 4, 16, 16), torch.tensor([1, 501]), PROMPTS).sum().backward()
    unread = {id(p) for module in lrm.unread_modules() for p in module.parameters()}
    names = {n for n, p in lrm.named_parameters() if id(p) in unread}
    assert {n for n, p in lrm.named_parameters() if p.grad is None} == names
    assert any(n.startswith("unet.up_blocks.") for n in names)
    assert any(n.startswith("text_encoder.") for n in names) == (lrm.text_encoder_2 is not None)


def test_up_blocks_never_run(tokenizer):
    lrm = sd15_lrm(tokenizer)
    with mock.patch.object(type(lrm.unet.up_blocks[0]), "forward", side_effect=AssertionError("up block ran")), \
            mock.patch.object(type(lrm.unet.up_blocks[-1]), "forward", side_effect=AssertionError("up block ran")), \
            mock.patch.object(lrm.unet.conv_out, "forward", side_effect=AssertionError("conv_out ran")):
        scores = lrm.score(torch.randn(2, 4, 16, 16), torch.tensor([1, 501]), PROMPTS)
    assert torch.isfinite(scores).all()
    with mock.patch.object(type(lrm.unet.up_blocks[0]), "forward", side_effect=AssertionError("up block ran")):
        with pytest.raises(AssertionError):  # the patch does catch a full UNet pass
            states = torch.randn(1, 77, lrm.unet.config.cross_attention_dim)
            lrm.unet(torch.randn(1, 4, 16, 16), 1, encoder_hidden_states=states)


def test_vfe_scale_one_is_conditional_features_and_vfe_combines_mid(tokenizer):
    torch.manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([51, 701])
    plain, enhanced = sd15_lrm(tokenizer, 1.0), sd15_lrm(tokenizer, 7.5)
    ids = plain.tokenize(PROMPTS)["input_ids"]
    with torch.no_grad():
        states, text, _ = plain.encode_text(ids)
        stages, mid = down_and_mid(plain.unet, x, t, states)
        null = plain.encode_text(plain.tokenize(["", ""])["input_ids"])[0]
        _, mid_null = down_and_mid(plain.unet, x, t, null)
        w, scale = plain.visual_projection.weight, plain.logit_scale
        assert torch.allclose(plain(x, t, ids), reward_head_reference(stages + [mid], None, 1.0, w, text, scale),
                              atol=1e-5)
        expected = reward_head_reference(stages + [mid], mid_null, 7.5, w, text, scale)
        assert torch.allclose(enhanced(x, t, ids), expected, atol=1e-5)
        assert not torch.allclose(enhanced(x, t, ids), plain(x, t, ids), atol=1e-4)


def test_pair_loss_by_hand_with_ties_and_prompt_weights():
    s0, s1 = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 3.0, 1.0])
    labels, per_prompt = torch.tensor([1.0, 1.0, 0.5]), torch.tensor([1.0, 2.0, 2.0])

    def log_p(a, b):
        return a - math.log(math.exp(a) + math.exp(b))
    losses = [-log_p(2, 1), -log_p(0, 3), -(0.5 * log_p(1, 1) + 0.5 * log_p(1, 1)) + math.log(0.5)]
    weights = [1.0, 0.5, 0.5]
    expected = sum(l * w for l, w in zip(losses, weights)) / sum(weights)
    assert pair_loss(s0, s1, labels, per_prompt).item() == pytest.approx(expected, rel=1e-6)
    assert losses[2] == pytest.approx(0.0, abs=1e-12)  # a perfect tie costs nothing
    assert pair_loss(s0, s1, labels).item() == pytest.approx(sum(losses) / 3, rel=1e-6)
    assert pair_accuracy(s0, s1, labels).item() == 0.5  # ties left out


def test_save_load_released_layout_gives_identical_scores(tokenizer, tmp_path):
    lrm = sd15_lrm(tokenizer)
    with torch.no_grad():
        lrm.logit_scale.fill_(3.0)
    lrm.save(tmp_path / "lrm")
    state = load_file(tmp_path / "lrm" / "head.safetensors")
    assert set(state) == {"visual_projection.weight", "text_projection.weight", "logit_scale"}
    assert (tmp_path / "lrm" / "unet" / "config.json").exists() and (tmp_path / "lrm" / "text_encoder").is_dir()
    loaded = LatentRewardModel.load(tmp_path / "lrm").eval()
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.score(x, 251, PROMPTS), lrm.score(x, 251, PROMPTS))
    # A released checkpoint has no lrm_config.json or tokenizer: the base model's tokenizer is used.
    (tmp_path / "lrm" / "lrm_config.json").unlink()
    released = LatentRewardModel.load(tmp_path / "lrm", tokenizer_dir=tmp_path / "lrm")
    assert released.config.guidance_scale == 7.5


def test_bad_inputs_name_what_is_wrong(tokenizer, tmp_path):
    unet = UNet2DConditionModel(**{**tiny(SD15_UNET), "sample_size": 16})
    unet.register_to_config(down_block_types=[])
    with pytest.raises(ValueError, match="down blocks"):
        stage_channels(unet)
    with pytest.raises(FileNotFoundError, match="clip_text_projection.*openai/clip-vit-large-patch14"):
        clip_text_projection(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="LRM directory"):
        LatentRewardModel.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="guidance_scale"):
        LRMConfig(guidance_scale=0)
    # SDXL's UNet needs SDXL's second text encoder for its added conditions, and only it takes one.
    xl_unet = UNet2DConditionModel(**{**tiny(SDXL_UNET), "sample_size": 16})
    with pytest.raises(ValueError, match="SDXL-type UNet.*needs text_encoder_2"):
        LatentRewardModel(xl_unet, text_encoder(16), tokenizer)
    with pytest.raises(ValueError, match="SDXL-type UNet.*only it takes them"):
        LatentRewardModel(unet, text_encoder(16), tokenizer, text_encoder_2=text_encoder(16, projection=True),
                          tokenizer_2=tokenizer)
