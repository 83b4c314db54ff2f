"""The scorers' reference implementations, run for tests/test_scorer_parity.py in a SUBPROCESS whose PYTHONPATH
starts with a `pip install --no-deps --target` of the reference packages (image-reward, hpsv2x and the old
transformers/timm/... their code needs), so that they never enter the test process.

    python tests/reference_scorers.py JOB.json OUT.json

JOB names a `kind` and its paths; OUT receives {"scores": [...]} in the job's image order. Where a reference
creates its model itself, this script draws the shared random weights on THEIR model and saves them in their
checkpoint layout, so the layout our loaders read is the one their code writes.

The one thing changed in their code paths is where weights come from: they download at run time (CLIP-H
laion2B weights that the HPS checkpoint overwrites anyway, OpenAI's ViT-L/14), which cannot happen here.
This module imports only torch at the top level: the test process imports `randomize` from it.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

_NORM_WEIGHT = re.compile(r"(^|[._])(ln|norm|layernorm|layrnorm|layer_norm)[^.]*\.weight$", re.IGNORECASE)


def randomize(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights for a state dict, of a scale that keeps deep towers well-conditioned: N(0, 1/fan_in)
    matrices, LayerNorm gains 1 + N(0, 0.1^2), other vectors N(0, 0.1^2). Scalars (logit scales) and integer
    buffers keep their values. Model inits are not used: BLIP's vision init is ~1e-10 and would make every
    image score alike, which no parity test could tell apart."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(state):
        value = state[name]
        if not value.is_floating_point() or value.ndim == 0:
            out[name] = value.clone()
            continue
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float32)
        if value.ndim >= 2:
            out[name] = noise / (value[0].numel() ** 0.5)
        elif _NORM_WEIGHT.search(name):
            out[name] = 1.0 + 0.1 * noise
        else:
            out[name] = 0.1 * noise
    return out


def _pickscore(job: dict) -> list[float]:
    """The PickScore_v1 model card's `calc_probs`, before the softmax, with plain transformers calls."""
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(job["processor"])
    model = AutoModel.from_pretrained(job["model"]).eval()
    scores = []
    with torch.no_grad():
        for path, prompt in zip(job["images"], job["prompts"]):
            image_inputs = processor(images=[Image.open(path)], padding=True, truncation=True, max_length=77,
                                     return_tensors="pt")
            text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
            image_embs = model.get_image_features(**image_inputs)
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = model.get_text_features(**text_inputs)
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            scores.append((model.logit_scale.exp() * (text_embs @ image_embs.T)[0]).item())
    return scores


def _hps(job: dict) -> list[float]:
    """hpsv2.img_score.score with its model created as its initialize_model does, but from the test's
    architecture config and without the laion2B download (`pretrained=None`)."""
    from hpsv2 import img_score
    from hpsv2.src.open_clip import factory

    factory.add_model_config(job["model_config"])
    model, _, preprocess_val = factory.create_model_and_transforms(
        Path(job["model_config"]).stem, None, precision="amp", device="cpu", jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
        image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
        with_score_predictor=False, with_region_predictor=False)
    torch.save({"state_dict": randomize(model.state_dict(), job["seed"])}, job["checkpoint"])
    img_score.model_dict["model"] = model
    img_score.model_dict["preprocess_val"] = preprocess_val
    return [float(img_score.score(path, prompt, cp=job["checkpoint"])[0])
            for path, prompt in zip(job["images"], job["prompts"])]


def _image_reward(job: dict) -> list[float]:
    """ImageReward.load + ImageReward.score, on a checkpoint drawn on the package's own ImageReward model."""
    import ImageReward as RM

    reference_class = sys.modules["ImageReward.ImageReward"].ImageReward
    model = reference_class(med_config=job["med_config"], device="cpu")
    state = randomize(model.state_dict(), job["seed"])
    # The package's vision_proj/text_proj are unused by the reward but present in ImageReward.pt: keep them.
    torch.save(state, job["checkpoint"])
    del model
    model = RM.load(job["checkpoint"], device="cpu", med_config=job["med_config"])
    # load() uses strict=False: make sure every saved tensor really arrived.
    loaded = model.state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state), "partial load"
    with torch.no_grad():
        return [float(model.score(prompt, path)) for path, prompt in zip(job["images"], job["prompts"])]


def _aesthetic(job: dict) -> list[float]:
    """image-reward's AestheticScore (the improved-aesthetic-predictor inference) via its load_score. clip.load
    would download ViT-L/14 (a TorchScript archive); instead it returns what its jit=False branch returns for a
    plain state dict, from openai-clip's own build_model and _transform. The rest is the package's."""
    import clip
    import ImageReward as RM

    def load_local(name, device="cpu", jit=False, download_root=None):
        model = clip.model.build_model(torch.load(job["clip"], map_location="cpu")).to(device)
        if str(device) == "cpu":
            model.float()
        return model, clip.clip._transform(model.visual.input_resolution)

    clip.load = load_local
    model = RM.load_score("Aesthetic", device="cpu", download_root=job["download_root"])
    with torch.no_grad():
        return [float(model.score(prompt, path)) for path, prompt in zip(job["images"], job["prompts"])]


KINDS = {"pickscore": _pickscore, "hps": _hps, "imagereward": _image_reward, "aesthetic": _aesthetic}


def main(job_file: str, out_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    scores = KINDS[job["kind"]](job)
    Path(out_file).write_text(json.dumps({"scores": scores}))


if __name__ == "__main__":
    main(*sys.argv[1:])
