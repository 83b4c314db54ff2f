"""Scorer behaviour on small random checkpoints in the real layouts: every image scored whatever the batching,
undecodable images skipped and counted, wrong checkpoints refused by name, missing ones named by hub id."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from scorer_checkpoints import PROMPTS, TINY_VIT_H_14, sample_images, save_hps_checkpoint, save_table2_scorers
from transformers import BertConfig, BertModel

from lpo.evaluate.scorers import SCORERS, CheckpointMismatch, build_scorer, missing_checkpoints
from lpo.evaluate.scorers.aesthetic import AestheticMLP

@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, dict]:
    """Constructor arguments of every registered scorer, pointing at small random checkpoints."""
    torch.set_num_threads(1)
    table2 = save_table2_scorers(tmp_path_factory.mktemp("scorers"))
    return {**table2, "clipscore": {"model": table2["pickscore"]["processor"]}}


@pytest.fixture(scope="module")
def scorers(configs):
    return {name: build_scorer(name, **kwargs) for name, kwargs in configs.items()}


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_registry_holds_every_scorer_with_its_convention():
    assert set(SCORERS) == {"pickscore", "hpsv2", "hpsv2.1", "imagereward", "aesthetic", "clipscore"}
    for name, cls in SCORERS.items():
        assert cls.name == name and cls.convention.strip()


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_every_image_is_scored_in_order_whatever_the_batch_size(scorers, name):
    images = sample_images(5, seed=1)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(5)]
    one_by_one = scorers[name].score(images, prompts, batch_size=1)
    assert one_by_one.values.shape == (5,) and np.isfinite(one_by_one.values).all() and one_by_one.n_skipped == 0
    assert np.ptp(one_by_one.values) > 1e-4, "random weights should tell these images apart"
    for batch_size in (2, 16):
        np.testing.assert_allclose(scorers[name].score(images, prompts, batch_size).values, one_by_one.values,
                                   rtol=1e-5, atol=1e-5)
    reversed_ = scorers[name].score(images[::-1], prompts[::-1], batch_size=3)
    np.testing.assert_allclose(reversed_.values[::-1], one_by_one.values, rtol=1e-5, atol=1e-5)


def test_scores_of_the_clip_family_follow_their_conventions(configs):
    """PickScore is logit_scale.exp() * cos and CLIP score 100 * cos: on one model they differ by that factor."""
    clip_h = configs["pickscore"]["processor"]
    pick = build_scorer("pickscore", model=clip_h, processor=clip_h)
    clip = build_scorer("clipscore", model=clip_h)
    images, prompts = sample_images(3), PROMPTS[:3]
    ratio = 100.0 / pick.model.logit_scale.exp().item()
    np.testing.assert_allclose(clip.score(images, prompts).values, ratio * pick.score(images, prompts).values,
                               rtol=1e-5)


def test_undecodable_images_are_skipped_counted_and_keep_the_others_aligned(scorers, tmp_path):
    scorer = scorers["hpsv2"]
    arrays = sample_images(4, seed=2)
    good_file, bad_file = tmp_path / "good.png", tmp_path / "bad.png"
    Image.fromarray(arrays[3]).save(good_file)
    bad_file.write_bytes(b"not an image at all")
    truncated = png(arrays[1])[:200]
    (tmp_path / "truncated.png").write_bytes(png(arrays[1])[:-100])
    lazy_truncated = Image.open(tmp_path / "truncated.png")  # opens fine, fails when decoded
    inputs = [Image.fromarray(arrays[0]), b"\x89PNG garbage", truncated, png(arrays[2]), bad_file, good_file,
              lazy_truncated]
    prompts = PROMPTS + ["a fifth prompt", "a sixth prompt", "a seventh prompt"]
    scores = scorer.score(inputs, prompts, batch_size=2)
    assert scores.skipped == (1, 2, 4, 6) and scores.n_skipped == 4
    assert np.isnan(scores.values[[1, 2, 4, 6]]).all()
    alone = scorer.score([arrays[0], arrays[2], arrays[3]], [prompts[0], prompts[3], prompts[5]])
    np.testing.assert_allclose(scores.values[[0, 3, 5]], alone.values, rtol=0, atol=1e-5)


def test_inputs_that_are_not_images_are_errors_not_skips(scorers, tmp_path):
    scorer = scorers["aesthetic"]
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        scorer.score([tmp_path / "nowhere.png"], "p")
    with pytest.raises(ValueError, match="uint8"):
        scorer.score(np.zeros((2, 8, 8, 3), np.float32), "p")
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        scorer.score(sample_images(2), ["a", "b", "c"])


def test_a_checkpoint_of_another_architecture_is_refused_naming_file_and_keys(configs, tmp_path):
    # HPS: an open_clip model of other widths.
    wider = json.loads(json.dumps(TINY_VIT_H_14))
    wider["vision_cfg"]["width"] = 128
    save_hps_checkpoint(tmp_path / "wide.pt", wider, seed=0)
    with pytest.raises(CheckpointMismatch, match=r"wide\.pt.*shape mismatches \(e\.g\. visual\."):
        build_scorer("hpsv2", **{**configs["hpsv2"], "checkpoint": tmp_path / "wide.pt"})
    # ImageReward given an HPS checkpoint: nothing fits.
    with pytest.raises(CheckpointMismatch, match=r"HPS_v2_compressed\.pt.*missing keys.*unexpected keys"):
        build_scorer("imagereward", **{**configs["imagereward"], "checkpoint": configs["hpsv2"]["checkpoint"]})
    # The aesthetic MLP of another input width.
    torch.save(AestheticMLP(16).state_dict(), tmp_path / "mlp16.pth")
    with pytest.raises(CheckpointMismatch, match=r"mlp16\.pth.*layers\.0\.weight \(1024, 16\) vs \(1024, 32\)"):
        build_scorer("aesthetic", **{**configs["aesthetic"], "mlp": tmp_path / "mlp16.pth"})
    # Not a checkpoint at all.
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(CheckpointMismatch, match=r"notes\.pt.*not a PyTorch checkpoint"):
        build_scorer("hpsv2", **{**configs["hpsv2"], "checkpoint": tmp_path / "notes.pt"})


def test_a_hub_directory_of_another_model_is_refused_naming_its_weights(configs, tmp_path):
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    with pytest.raises(CheckpointMismatch, match=r"bert/model\.safetensors.*CLIPModel.*missing keys"):
        build_scorer("pickscore", model=tmp_path / "bert", processor=configs["pickscore"]["processor"])
    # config.json and weights of different widths.
    shutil.copytree(configs["pickscore"]["model"], tmp_path / "resized")
    config = json.loads((tmp_path / "resized" / "config.json").read_text())
    config["vision_config"]["intermediate_size"] *= 2
    (tmp_path / "resized" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatch, match=r"resized/model\.safetensors.*shape mismatches.*vision_model"):
        build_scorer("pickscore", model=tmp_path / "resized", processor=configs["pickscore"]["processor"])


def test_missing_checkpoints_are_listed_with_the_hub_files_to_download(configs, tmp_path):
    assert missing_checkpoints(configs) == []
    nowhere = tmp_path / "nowhere"
    problems = "\n".join(missing_checkpoints({
        "pickscore": {"model": nowhere / "PickScore_v1", "processor": nowhere / "clip-h"},
        "hpsv2": {"checkpoint": nowhere / "a.pt"},
        "hpsv2.1": {"checkpoint": nowhere / "b.pt"},
        "imagereward": {"checkpoint": nowhere / "c.pt", "med_config": nowhere / "d.json", "vocab": nowhere / "e"},
        "aesthetic": {"clip": nowhere / "clip", "mlp": nowhere / "f.pth"},
        "clipscore": {"model": nowhere / "clip-h"},
    }))
    for expected in ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                     "HPS_v2_compressed.pt from the hub repository xswu/HPSv2",
                     "HPS_v2.1_compressed.pt from the hub repository xswu/HPSv2",
                     "ImageReward.pt from the hub repository THUDM/ImageReward", "med_config.json",
                     "vocab.txt from the hub repository google-bert/bert-base-uncased",
                     "openai/clip-vit-large-patch14", "sac+logos+ava1-l14-linearMSE.pth"):
        assert expected in problems
    assert len(problems.splitlines()) == 10
    # A directory without weights, an argument left out, a name that is no scorer.
    (tmp_path / "empty").mkdir()
    assert "lacks config.json" in missing_checkpoints({"clipscore": {"model": tmp_path / "empty"}})[0]
    assert "aesthetic.mlp: not configured" in missing_checkpoints({"aesthetic": {"clip": nowhere}})[1]
    with pytest.raises(ValueError, match="unknown scorer 'hps'"):
        missing_checkpoints({"hps": {}})
    with pytest.raises(ValueError, match="unknown argument.*chekpoint"):
        missing_checkpoints({"hpsv2": {"chekpoint": nowhere}})


def test_constructors_never_download_and_name_the_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="yuvalkirstain/PickScore_v1"):
        build_scorer("pickscore", model=tmp_path / "PickScore_v1", processor=tmp_path / "clip-h")
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt from the hub repository xswu/HPSv2"):
        build_scorer("hpsv2.1", checkpoint=tmp_path / "HPS_v2.1_compressed.pt")
