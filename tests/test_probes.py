"""Linear probes of frozen features: known answers for the probes, the correctness derivation and the intervals; the
LRM's probed vector is its reward head's input; the CLI end to end on a tiny world (world-CLIP included)."""
import json

import datasets
import numpy as np
import pytest
import torch
from test_preference_data import write_preferences
from tiny_sd import IMAGE_SIZE, build_tiny_pipeline

from lpo.cli import main
from lpo.images import png_bytes
from lpo.reward.lrm import LRMConfig
from lpo.reward.lrm_training import LatentEncoder, LRMTrainConfig, build_lrm
from lpo.reward.probes import (FeatureSet, JudgeView, ProbeConfig, Resampling, attribute_probe, defect_probe,
                               latent_features, lrm_pooled, plot_probes, probe_images, probe_rows, prompted_classes,
                               write_probe_report)
from lpo.tables import read_csv
from lpo.world.clip import CLIPArchitecture, WorldCLIP, load_tokenizer
from lpo.world.grammar import ATTRIBUTES, Grammar, Scene, Vocabulary
from lpo.world.judge import Judge, JudgeConfig, save_judge
from lpo.world.render import DEFECTS
from lpo_kernels.reference import score_pooled

L2 = ProbeConfig().l2
CLIP_ARCHITECTURE = CLIPArchitecture(width=4, embed_dim=8, text_width=8, text_layers=1, text_heads=2)


def test_a_probe_reads_a_linearly_encoded_label_and_noise_gives_the_majority():
    rng = np.random.default_rng(0)
    y = rng.choice(5, size=500, p=[0.6, 0.1, 0.1, 0.1, 0.1])
    fit, scored = slice(0, 300), slice(300, None)
    encoded = np.eye(5)[y] @ rng.normal(size=(5, 12)) + 0.3 * rng.normal(size=(500, 12))
    assert (attribute_probe(encoded[fit], y[fit], encoded[scored], 5, L2) == y[scored]).mean() > 0.97
    noise = rng.normal(size=(500, 12))
    accuracy = (attribute_probe(noise[fit], y[fit], noise[scored], 5, L2) == y[scored]).mean()
    assert abs(accuracy - (y[scored] == 0).mean()) < 0.08


def test_ridge_recovers_a_linear_target_and_r2_has_known_answers():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 8)) * rng.uniform(0.1, 10, size=8)  # unequal scales: the standardiser's job
    x[:, 3] = 2.0  # a flat feature
    y = np.stack([x @ rng.normal(size=8) + 0.5, 0.3 * x[:, 0]], 1)
    predicted = defect_probe(x[:300], y[:300], x[300:], L2)
    resampling = Resampling([f"p{i // 2}" for i in range(100)], n=200, seed=0)
    r2, draws = resampling.r2_draws(y[300:, 0], predicted[:, 0])
    assert r2 > 0.99 and resampling.interval(r2, draws).low > 0.98
    exact, draws = resampling.r2_draws(y[300:, 1], y[300:, 1])
    assert exact == 1.0 and resampling.interval(exact, draws).low == 1.0
    mean, _ = resampling.r2_draws(y[300:, 1], np.full(100, y[300:, 1].mean()))
    assert mean == pytest.approx(0.0, abs=1e-12)


GRAMMAR = Grammar(Vocabulary(), heldout_pairs=0, seed=0)


def test_captions_give_the_prompted_class_of_every_attribute():
    scenes = [Scene("small", "red", "circle", "gray", "left"), Scene("large", "pink", "cross", "brown", "center")]
    assert prompted_classes([s.prompt for s in scenes], GRAMMAR, Vocabulary()).tolist() == [[0] * 5, [1, 7, 4, 3, 4]]
    with pytest.raises(ValueError, match="not a sentence"):
        prompted_classes(["a blue moon"], GRAMMAR, Vocabulary())


SEVERITY_OF_COLOUR = np.random.default_rng(9).uniform(0, 1, size=(8, len(DEFECTS)))


def views(n: int, seed: int) -> JudgeView:
    """The judge finds about 70% of attributes as prompted; severities are a linear map of the colour it sees."""
    rng = np.random.default_rng(seed)
    classes = tuple(len(Vocabulary().values(a)) for a in ATTRIBUTES)
    prompted = np.stack([rng.integers(c, size=n) for c in classes], 1)
    wrong = np.stack([rng.integers(c, size=n) for c in classes], 1)
    values = np.where(rng.random(prompted.shape) < 0.7, prompted, wrong)
    defects = np.eye(8)[values[:, 1]] @ SEVERITY_OF_COLOUR
    return JudgeView(values, prompted, defects, classes)


def one_hot(classes: np.ndarray, view: JudgeView) -> np.ndarray:
    return np.concatenate([np.eye(c)[classes[:, j]] for j, c in enumerate(view.classes)], 1)


def feature_set(name: str, family: str, timestep) -> FeatureSet:
    return FeatureSet(name, family, timestep, lambda images, captions: None)


@pytest.fixture(scope="module")
def rows():
    fit, scored = views(600, 0), views(300, 1)
    resampling = Resampling([f"p{i // 2}" for i in range(300)], n=200, seed=0)
    seeing = probe_rows(feature_set("LRM t=1", "LRM", 1), one_hot(fit.values, fit), one_hot(scored.values, scored),
                        fit, scored, resampling, L2)
    # Features of the caption alone, as a caption-conditioned model that ignores its image would give.
    echoing = probe_rows(feature_set("base UNet mid t=1", "base UNet mid", 1), one_hot(fit.prompted, fit),
                         one_hot(scored.prompted, scored), fit, scored, resampling, L2)
    return seeing + echoing, scored


def test_correctness_compares_the_probed_value_with_the_caption(rows):
    rows, scored = rows
    by = {(r["features"], r["kind"], r["target"]): r for r in rows}
    for j, attribute in enumerate(ATTRIBUTES):
        assert by["LRM t=1", "attribute", attribute]["value"] == 1.0
        assert by["LRM t=1", "correctness", attribute]["value"] == 1.0
        assert by["LRM t=1", "correctness", attribute]["gain_low"] > 0
        # Echoing the caption: right where the judge agrees with the caption, and correctness no better than
        # always saying "correct" (the majority).
        share = scored.correct[:, j].mean()
        assert by["base UNet mid t=1", "attribute", attribute]["value"] == pytest.approx(share, abs=0.01)
        assert by["base UNet mid t=1", "correctness", attribute]["value"] == pytest.approx(share, abs=0.01)
        assert by["base UNet mid t=1", "correctness", attribute]["gain_low"] <= 0
    assert by["LRM t=1", "defect", "blur"]["value"] > 0.99
    assert by["LRM t=1", "defect", "blur"]["baseline"] <= 0


def test_report_says_how_it_was_made_and_what_to_conclude(rows, tmp_path):
    rows, _ = rows
    rows = [{**r, "fit_images": 600, "scored_images": 300} for r in rows]
    plot_probes(rows, tmp_path / "probes.png")
    write_probe_report(tmp_path, "shapes", rows, "CPU (test)")
    text = (tmp_path / "probes.md").read_text()
    assert text.startswith("# Feature probes of the shapes world\n\nGenerated by `snakemake` (rule `reward_probes`")
    for heading in ("## What to conclude", "## The judge's recognised attribute values",
                    "## Attribute correctness", "## Defect severities"):
        assert heading in text
    assert "**LRM t=1** beats the baseline on values 5/5" in text
    assert "correctness 0/5 (none)" in text  # the caption echo
    assert "**Verdict:** the information is in the LRM's features at LRM t=1" in text
    assert len(read_csv(tmp_path / "probes.csv")) == len(rows) == 2 * (2 * len(ATTRIBUTES) + len(DEFECTS))
    assert (tmp_path / "probes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------ a tiny world

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe-world")
    model = build_tiny_pipeline(root / "base")
    build_lrm(model, LRMTrainConfig(model=LRMConfig(head_backend="reference"))).save(root / "lrm")
    torch.manual_seed(0)
    save_judge(Judge(Vocabulary(), IMAGE_SIZE, width=4), JudgeConfig(), root / "judge")
    WorldCLIP(CLIP_ARCHITECTURE, load_tokenizer(model / "tokenizer")).save(root / "clip")
    prefs = write_preferences(root / "prefs", image_size=IMAGE_SIZE,
                              sizes={"train": 24, "validation_unique": 8, "test_unique": 8})
    return {"model": model, "lrm": root / "lrm", "judge": root / "judge", "preferences": prefs, "clip": root / "clip"}


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_the_probed_lrm_vector_is_its_reward_heads_input(world, guidance_scale):
    lrm = build_lrm(world["model"], LRMTrainConfig(model=LRMConfig(guidance_scale, head_backend="reference"))).eval()
    latents, t = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 951])
    captions = ["a large red circle on a gray background, on the left", "a large blue cross on a white background,"
                " at the top", ""]
    pooled = lrm_pooled(lrm, latents, t, captions)
    assert pooled.shape == (3, lrm.feature_dim)
    with torch.no_grad():
        text = lrm.encode_text(**lrm.tokenize(captions))[1]
        expected = lrm.score(latents, t, captions)
    torch.testing.assert_close(score_pooled(pooled, lrm.visual_projection.weight, text, lrm.logit_scale), expected)


def test_latent_features_do_not_depend_on_batching(world):
    encoder = LatentEncoder(world["model"], "cpu")
    pooling = lambda lat, t, caps: lat.flatten(1)  # noqa: E731  the noisy latent itself
    images = np.random.default_rng(0).integers(0, 256, size=(5, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    a = latent_features(encoder, pooling, 500, batch_size=2, seed=3)(images, [""] * 5)
    np.testing.assert_allclose(a, latent_features(encoder, pooling, 500, batch_size=5, seed=3)(images, [""] * 5),
                               atol=1e-5)
    assert not np.allclose(a, latent_features(encoder, pooling, 500, batch_size=5, seed=4)(images, [""] * 5))
    with pytest.raises(ValueError, match="probes.timesteps"):
        latent_features(encoder, pooling, 1000, batch_size=2, seed=3)


def test_images_are_deduplicated_by_uid_and_capped(tmp_path):
    rng = np.random.default_rng(0)
    images = [png_bytes(rng.integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)) for _ in range(4)]
    caption = Scene("large", "red", "circle", "gray", "left").prompt
    pairs = [(0, 1), (0, 2), (3, 1)]  # four distinct images in three pairs
    split = {"caption": [caption] * 3, "jpg_0": [images[a] for a, _ in pairs], "jpg_1": [images[b] for _, b in pairs],
             "label_0": [1.0] * 3, "has_label": [1] * 3, "num_example_per_prompt": [3] * 3,
             "image_0_uid": [f"u{a}" for a, _ in pairs], "image_1_uid": [f"u{b}" for _, b in pairs]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(split)}).save_to_disk(str(tmp_path / "dataset"))
    found = probe_images(tmp_path, ["train"], IMAGE_SIZE, max_images=10, seed=0)
    assert found.uids == ["u0", "u3", "u1", "u2"] and found.images.shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert png_bytes(found.images[1]) == images[3]
    capped = probe_images(tmp_path, ["train"], IMAGE_SIZE, max_images=2, seed=0)
    assert len(capped) == 2 and set(capped.uids) <= set(found.uids)
    split.pop("image_1_uid")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(split)}).save_to_disk(str(tmp_path / "bare"))
    with pytest.raises(ValueError, match="image_1_uid"):
        probe_images(tmp_path / "bare", ["train"], IMAGE_SIZE, max_images=10, seed=0)


def run_cli(world, out, **override) -> int:
    paths = {k: v for k, v in world.items() if k != "clip"} | override
    params = {"seed": 0, "world": {"name": "shapes", "image_size": IMAGE_SIZE},
              "probes": {"timesteps": [501], "bootstrap": 50, "max_images": 30}}
    return main(["--threads", "1", "reward", "probes", "--params", json.dumps(params),
                 *[a for k in ("model", "judge", "lrm", "preferences", "clip") if k in paths
                   for a in (f"--{k}", str(paths[k]))], "--out", str(out)])


def test_cli_writes_the_report_for_every_feature_set(world, tmp_path):
    assert run_cli(world, tmp_path / "report", clip=world["clip"]) == 0
    rows = read_csv(tmp_path / "report" / "probes.csv")
    assert list(dict.fromkeys(r["features"] for r in rows)) == ["LRM t=501", "base UNet mid t=501", "world-CLIP"]
    # The test data's uids (a0, b0, ...) repeat in every split: validation_unique's and test_unique's count once.
    assert {r["fit_images"] for r in rows} == {"30"} and {r["scored_images"] for r in rows} == {"16"}
    assert {r["dim"] for r in rows if r["family"] == "world-CLIP"} == {str(CLIP_ARCHITECTURE.features)}
    assert (tmp_path / "report" / "probes.png").exists() and (tmp_path / "report" / "probes.md").exists()


@pytest.mark.parametrize("flag, what", [("judge", "judge"), ("lrm", "LRM directory"), ("model", "diffusion pipeline"),
                                        ("preferences", "preference data"), ("clip", "world-CLIP")])
def test_a_missing_input_is_named(world, tmp_path, capsys, flag, what):
    missing = tmp_path / "nowhere"
    assert run_cli(world, tmp_path / "report", **{flag: missing}) == 2
    err = capsys.readouterr().err
    assert what in err and str(missing) in err
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("key, value", [("timesteps", []), ("max_images", 0), ("l2", -1.0), ("bootstrap", 0)])
def test_bad_config_names_the_key(key, value):
    with pytest.raises(ValueError, match=f"probes.{key}"):
        ProbeConfig(**{key: value})
