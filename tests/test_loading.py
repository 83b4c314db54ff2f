"""Every file a stage reads, damaged (cut short, or overwritten with random bytes): the error names the file, what it
is and the stage to re-run, and never repeats torch's advice to load unsafely; a damaged resume checkpoint is moved
aside and the training starts afresh."""
import dataclasses
import logging
import shutil
import traceback
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from kills import killed_at_call
from test_side_scorers import VOCAB as SIDE_VOCAB
from test_side_scorers import make_corpus
from test_world_clip import GRAMMAR, TINY
from tiny_sd import build_tiny_lrm, build_tiny_pipeline

from lpo.cli import main
from lpo.io import CorruptInput, load_or_explain
from lpo.pipelines import load_pipeline_dir
from lpo.preference_data import load_split
from lpo.reward.lrm import LatentRewardModel
from lpo.samples import SampleSet
from lpo.world import clip as clip_module
from lpo.world.clip import CLIPArchitecture, WorldCLIP, train_world_clip
from lpo.world.corpus import Corpus, CorpusConfig, build_corpus
from lpo.world.grammar import Grammar
from lpo.world.judge import JudgeConfig, load_judge, save_judge, train_judge
from lpo.world.pipeline import load_pipeline
from lpo.world.side_scorers import SideScorerConfig, SideScorers, train_side_scorers
from lpo.world.tokenizer import build_clip_tokenizer


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def scramble(path):
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


DAMAGES = [truncate, scramble]


def explained(error: BaseException, path, what: str, fix: str) -> str:
    """The message of `error`, checked to name `path`, `what` and `fix`, and its traceback free of unsafe advice."""
    message = str(error)
    assert isinstance(error, CorruptInput)
    assert f"'{path}'" in message and what in message and fix in message, message
    assert "weights_only=False" not in "".join(traceback.format_exception(error))
    return message


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer")


@pytest.fixture(scope="module")
def world_models(tmp_path_factory) -> tuple[Path, Path]:
    """A judge and side scorers of one training step each, saved as their stages save them."""
    root = tmp_path_factory.mktemp("world-models")
    grammar = Grammar(SIDE_VOCAB, heldout_pairs=0, seed=0)
    config = JudgeConfig(steps=1, batch_size=4, width=4, pool_size=16, fresh_per_step=4)
    save_judge(train_judge(grammar, 16, config, seed=0)[0], config, root / "judge")
    side = SideScorerConfig(clip_steps=1, vqa_steps=1, batch_size=8, embed_dim=8)
    train_side_scorers(make_corpus(grammar, 32, seed=0), grammar, side, seed=0)[0].save(root / "side_scorers")
    return root / "judge", root / "side_scorers"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("pipeline") / "base_model")


def test_the_layer_passes_a_good_load_through_and_keeps_missing_files_as_they_were(tmp_path):
    (tmp_path / "x.json").write_text("[1, 2]")
    assert load_or_explain(tmp_path / "x.json", "the list", "remake it", lambda p: p.read_text()) == "[1, 2]"
    with pytest.raises(FileNotFoundError, match=r"the list not found at '.*nowhere\.json': remake it"):
        load_or_explain(tmp_path / "nowhere.json", "the list", "remake it", lambda p: p.read_text())


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_weights_and_configs_of_the_judge_and_side_scorers(world_models, tmp_path, damage, name):
    judge, side_scorers = (shutil.copytree(folder, tmp_path / folder.name) for folder in world_models)
    damage(judge / name)
    damage(side_scorers / name)
    what = "weights" if name == "model.safetensors" else "config"
    with pytest.raises(CorruptInput) as error:
        load_judge(judge)
    explained(error.value, judge / name, f"the judge's {what}", "--forcerun world_judge")
    with pytest.raises(CorruptInput) as error:
        SideScorers.load(side_scorers)
    explained(error.value, side_scorers / name, f"the MPCF side scorers' {what}", "--forcerun world_side_scorers")


@pytest.mark.parametrize("damage", DAMAGES)
def test_the_lrm_head_and_unet(pipeline, tmp_path, damage):
    lrm = build_tiny_lrm(pipeline, tmp_path / "lrm")
    assert isinstance(LatentRewardModel.load(lrm, tokenizer_dir=pipeline), LatentRewardModel)
    damage(lrm / "head.safetensors")
    with pytest.raises(CorruptInput) as error:
        LatentRewardModel.load(lrm, tokenizer_dir=pipeline)
    explained(error.value, lrm / "head.safetensors", "the LRM head's weights", "--forcerun reward_lrm")
    damage(lrm / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CorruptInput) as error:
        LatentRewardModel.load(lrm, tokenizer_dir=pipeline)
    explained(error.value, lrm / "unet", "the LRM's UNet", "--forcerun reward_lrm")


@pytest.mark.parametrize("damage", DAMAGES)
def test_safetensors_of_the_world_clip(tokenizer, tmp_path, damage):
    WorldCLIP(CLIPArchitecture(width=4, embed_dim=8, text_width=8, text_layers=1, text_heads=2),
              tokenizer).save(tmp_path / "clip")
    damage(tmp_path / "clip" / "model.safetensors")
    with pytest.raises(CorruptInput) as error:
        WorldCLIP.load(tmp_path / "clip")
    explained(error.value, tmp_path / "clip" / "model.safetensors", "the world-CLIP's weights", "world clip")


@pytest.mark.parametrize("damage", DAMAGES)
def test_the_sample_archive_and_the_corpus_images(tmp_path, damage):
    n = 4
    SampleSet(np.zeros((n, 8, 8, 3), np.uint8), np.array(["p"] * n), np.array(["eval_seen"] * n), np.arange(n),
              np.arange(n)).save(tmp_path / "samples.npz")
    damage(tmp_path / "samples.npz")
    with pytest.raises(CorruptInput) as error:
        SampleSet.load(tmp_path / "samples.npz")
    explained(error.value, tmp_path / "samples.npz", "the sample archive", "--forcerun sample_base")
    build_corpus(GRAMMAR, CorpusConfig(images=n), 16, seed=0).save(tmp_path / "corpus")
    damage(tmp_path / "corpus" / "images.npy")
    with pytest.raises(CorruptInput) as error:
        Corpus.load(tmp_path / "corpus")
    explained(error.value, tmp_path / "corpus" / "images.npy", "the corpus's images", "--forcerun world_corpus")


@pytest.mark.parametrize("damage", DAMAGES)
def test_an_arrow_shard_of_the_preference_dataset_fails_at_load_not_mid_training(tmp_path, damage):
    rows = 2000  # several record batches, so a cut lands inside one
    datasets.DatasetDict({split: datasets.Dataset.from_dict({"caption": [f"{split} {i}" for i in range(rows)]})
                          for split in ("train", "test_unique")}).save_to_disk(str(tmp_path / "dataset"))
    assert len(load_split(tmp_path, "test_unique")) == rows
    damage(next((tmp_path / "dataset" / "train").glob("*.arrow")))
    for split in ("train", "test_unique"):  # every split is opened, so any split's load reports the damage
        with pytest.raises(CorruptInput) as error:
            load_split(tmp_path, split)
        explained(error.value, tmp_path / "dataset", "the preference dataset", "--forcerun world_preferences")


def test_a_damaged_prompt_file_is_named_by_the_stage_that_reads_it(tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text('{"eval_seen": ["a red circle"')
    assert main(["sample", "--model", str(tmp_path / "model"), "--prompts", str(prompts), "--sets", "eval_seen",
                 "--out", str(tmp_path / "s.npz")]) == 2
    error = capsys.readouterr().err
    assert f"cannot read the prompt file at '{prompts}'" in error and "--forcerun world_prompts" in error, error
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("damage", DAMAGES)
def test_the_unet_of_a_saved_pipeline(pipeline, tmp_path, damage):
    copy = Path(shutil.copytree(pipeline, tmp_path / "base_model"))
    damage(copy / "unet" / "diffusion_pytorch_model.safetensors")
    for load in (load_pipeline, load_pipeline_dir):
        with pytest.raises(CorruptInput) as error:
            load(copy)
        message = explained(error.value, copy, "the diffusion pipeline", "--forcerun")
        assert "world_base_model" in message and "diffusion_pytorch_model.safetensors" in message


def test_a_damaged_resume_checkpoint_is_moved_aside_and_the_rerun_trains_from_scratch(tmp_path, caplog):
    corpus = build_corpus(GRAMMAR, CorpusConfig(images=96, defect_rate=0.0, caption_error_rate=0.0), 16, seed=0)
    tokenizer = build_clip_tokenizer(tmp_path / "tokenizer")
    config = dataclasses.replace(TINY, steps=4, batch_size=16)
    whole, _ = train_world_clip(corpus.images, corpus.captions, tokenizer, config, seed=3)
    with killed_at_call(clip_module, "contrastive_loss", 4):  # after the checkpoint of step 2
        train_world_clip(corpus.images, corpus.captions, tokenizer, config, seed=3, out=tmp_path / "clip")
    scramble(tmp_path / "clip.ckpt" / "state.pt")
    with caplog.at_level(logging.WARNING, logger="lpo.checkpoint"):
        resumed, metrics = train_world_clip(corpus.images, corpus.captions, tokenizer, config, seed=3,
                                            out=tmp_path / "clip")
    assert metrics["resumed_from_step"] == 0
    assert (tmp_path / "clip.ckpt.corrupt-1" / "state.pt").exists() and not (tmp_path / "clip.ckpt").exists()
    assert str(tmp_path / "clip.ckpt" / "state.pt") in caplog.text and "restarts from scratch" in caplog.text
    assert str(tmp_path / "clip.ckpt.corrupt-1") in caplog.text and "weights_only" not in caplog.text
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
