"""Reading Pick-a-Pic-layout preference data, images decoded per batch (at the model size when asked): a tiny
DatasetDict of renders where the clean render beats a blurred one. `write_preferences` is shared with the pixel
reward and SPM tests."""
import dataclasses
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest

from lpo import preference_data
from lpo.preference_data import JUDGE_SCORES, MPCF_SCORES, concatenate_pairs, load_pairs, load_side_table
from lpo.tables import write_csv
from lpo.world.grammar import Scene
from lpo.images import decode_image, fit_square, png_bytes
from lpo.world.render import render

SPLIT_SIZES = {"train": 96, "validation_unique": 32, "test_unique": 48}
COLORS, SHAPES = ("red", "blue", "green", "yellow"), ("circle", "square", "triangle")
BACKGROUNDS, POSITIONS = ("gray", "white", "black"), ("left", "right", "center")


def rule_pairs(n: int, rng: np.random.Generator, image_size: int, tie_every: int = 8):
    """n pairs of renders of one scene each: a clean render against a blurred one, the clean one winning
    (label_0 = 1 when it is image 0); every tie_every-th pair is two clean renders, a tie."""
    captions, images_0, images_1, labels = [], [], [], []
    for i in range(n):
        scene = Scene("large", *(str(rng.choice(v)) for v in (COLORS, SHAPES, BACKGROUNDS, POSITIONS)))
        clean = render(scene, rng, image_size)
        tie = tie_every and i % tie_every == tie_every - 1
        other = render(scene, rng, image_size, None if tie else {"blur": float(rng.uniform(0.7, 1.0))})
        first = bool(rng.random() < 0.5)
        images_0.append(clean if first else other)
        images_1.append(other if first else clean)
        captions.append(scene.prompt)
        labels.append(0.5 if tie else float(first))
    return captions, images_0, images_1, labels


def records(n: int, rng: np.random.Generator, image_size: int) -> dict[str, list]:
    captions, images_0, images_1, labels = rule_pairs(n, rng, image_size)
    counts = {c: captions.count(c) for c in captions}
    return {"caption": captions, "jpg_0": [png_bytes(im) for im in images_0],
            "jpg_1": [png_bytes(im) for im in images_1], "label_0": labels, "label_1": [1 - x for x in labels],
            "has_label": [1] * n, "are_different": [1] * n, "num_example_per_prompt": [counts[c] for c in captions],
            "image_0_uid": [f"a{i}" for i in range(n)], "image_1_uid": [f"b{i}" for i in range(n)]}


def write_preferences(root: Path, image_size: int = 32, seed: int = 0, sizes: dict | None = None,
                      corrupt: dict | None = None, unlabeled: dict | None = None) -> Path:
    """A preference directory as `world preferences` writes it: dataset/ plus the two side tables.
    corrupt / unlabeled: {split: [rows]} whose jpg_1 is garbage / whose has_label is 0."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (sizes or SPLIT_SIZES).items():
        data = records(n, rng, image_size)
        for row in (corrupt or {}).get(split, []):
            data["jpg_1"][row] = b"not an image"
        for row in (unlabeled or {}).get(split, []):
            data["has_label"][row] = 0
        splits[split] = data
    datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in splits.items()}).save_to_disk(
        str(root / "dataset"))
    write_csv(root / MPCF_SCORES, [{"split": s, "row": r, "aesthetic_gap": 0.1 * r, "different_flag": 1}
                                   for s, d in splits.items() for r in range(len(d["caption"]))])
    write_csv(root / JUDGE_SCORES, [{"split": s, "row": r, "overall_0": float(d["label_0"][r]),
                                     "overall_1": float(d["label_1"][r])}
                                    for s, d in splits.items() for r in range(len(d["caption"]))])
    return root


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    return write_preferences(tmp_path_factory.mktemp("prefs"), image_size=16,
                             sizes={"train": 12, "validation_unique": 6, "test_unique": 6},
                             corrupt={"train": [3]}, unlabeled={"train": [5]})


def test_pairs_keep_order_labels_and_row_ids(prefs):
    pairs = load_pairs(prefs, "validation_unique")
    raw = datasets.load_from_disk(str(prefs / "dataset"))["validation_unique"]
    assert len(pairs) == 6 and pairs.split_rows == 6 and pairs.unlabeled == 0
    assert pairs.images_0.dtype == np.uint8 and pairs.images_0.shape == (6, 16, 16, 3) == pairs.images_1.shape
    assert pairs.captions == raw["caption"] and np.array_equal(pairs.rows, np.arange(6))
    assert np.array_equal(pairs.label_0, raw["label_0"])
    assert np.array_equal(pairs.num_example_per_prompt, raw["num_example_per_prompt"])


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """The records lpo.preference_data decodes, in call order: each decode_image call appends its `what`."""
    calls = []

    def counted(data, what):
        calls.append(what)
        return decode_image(data, what)

    monkeypatch.setattr(preference_data, "decode_image", counted)
    return calls


def test_loading_decodes_nothing_and_a_batch_decodes_its_rows_as_the_eager_decode(prefs, decodes):
    pairs = load_pairs(prefs, "train")
    subset = pairs.take([7, 0, 2]).take([True, False, True])
    resized = load_pairs(prefs, "train", image_size=8)
    assert len(pairs) == 11 and len(subset) == 2 and resized.images_0.shape == (11, 8, 8, 3)
    assert decodes == []
    raw = datasets.load_from_disk(str(prefs / "dataset"))["train"]

    def eager(column: str, positions) -> np.ndarray:
        return np.stack([decode_image(raw[int(pairs.rows[i])][column], "test") for i in positions])

    batch = pairs.images_1[[9, 2, 4]]
    assert len(decodes) == 3 and all(f", row {r}, jpg_1" in w for w, r in zip(decodes, pairs.rows[[9, 2, 4]]))
    assert batch.dtype == np.uint8 and np.array_equal(batch, eager("jpg_1", [9, 2, 4]))
    assert np.array_equal(subset.images_0[:], eager("jpg_0", [7, 2])) and len(decodes) == 5
    assert np.array_equal(pairs.images_0[1:4], eager("jpg_0", [1, 2, 3]))
    assert np.array_equal(pairs.images_0[-1], eager("jpg_0", [10])[0])
    assert np.array_equal(pairs.images_0[[0, 1], 2:5, :3], eager("jpg_0", [0, 1])[:, 2:5, :3])
    assert np.array_equal(resized.images_0[[3]], fit_square(eager("jpg_0", [3])[0], 8)[None])
    # Whole-array uses decode every image they cover (what the Shapes world's small splits may do).
    before = len(decodes)
    assert np.array_equal(np.concatenate([subset.images_0, subset.images_1]),
                          np.concatenate([eager("jpg_0", [7, 2]), eager("jpg_1", [7, 2])]))
    assert len(decodes) == before + 4


def test_a_corrupt_image_is_named_when_its_batch_is_decoded_unlabelled_rows_dropped(prefs, caplog):
    with caplog.at_level(logging.INFO, logger="lpo.preference_data"):
        pairs = load_pairs(prefs, "train")
    assert pairs.unlabeled == 1 and pairs.split_rows == 12
    assert "dropped 1 row(s) without a label" in caplog.text
    assert pairs.rows.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert len(pairs.captions) == len(pairs.label_0) == len(pairs.images_1) == 11
    # The rows that remain are the right ones: their labels are those of the same rows in the dataset.
    raw = datasets.load_from_disk(str(prefs / "dataset"))["train"]
    assert pairs.label_0.tolist() == [raw["label_0"][r] for r in pairs.rows]
    assert pairs.images_1[[0, 1, 2, 4]].shape == (4, 16, 16, 3) and pairs.images_0[3].shape == (16, 16, 3)
    with pytest.raises(ValueError, match=r"corrupt image in split 'train' of '.*dataset', row 3, jpg_1: .*damaged"):
        pairs.images_1[[2, 3]]


def test_row_subsets_and_take(prefs):
    pairs = load_pairs(prefs, "train", rows=[11, 5, 0])
    assert pairs.rows.tolist() == [11, 0] and pairs.unlabeled == 1
    full = load_pairs(prefs, "train")
    assert np.array_equal(pairs.images_0[0], full.images_0[-1])
    taken = full.take(full.label_0 == 0.5)
    assert len(taken) == int(np.sum(full.label_0 == 0.5)) and np.all(taken.label_0 == 0.5)
    assert np.array_equal(taken.images_0[:], full.images_0[np.flatnonzero(full.label_0 == 0.5)])
    with pytest.raises(ValueError, match="outside"):
        load_pairs(prefs, "train", rows=[12])


def test_digests_identify_pairs_without_decoding(prefs, decodes):
    a, b = load_pairs(prefs, "validation_unique"), load_pairs(prefs, "validation_unique")
    assert a.digest() == b.digest() and decodes == []
    assert a.take([0, 1]).digest() != a.digest() != load_pairs(prefs, "validation_unique", image_size=8).digest()
    in_memory = dataclasses.replace(a, images_0=np.asarray(a.images_0), images_1=np.asarray(a.images_1))
    changed = in_memory.images_1.copy()
    changed[0, 0, 0, 0] ^= 1
    assert in_memory.digest() == dataclasses.replace(b, images_0=np.asarray(b.images_0),
                                                     images_1=np.asarray(b.images_1)).digest()
    assert dataclasses.replace(in_memory, images_1=changed).digest() != in_memory.digest()


def test_concatenated_splits_stay_undecoded(prefs, decodes):
    validation, test = load_pairs(prefs, "validation_unique"), load_pairs(prefs, "test_unique")
    merged = concatenate_pairs([validation, test])
    assert len(merged) == 12 and merged.split == "validation_unique+test_unique" and merged.split_rows == 12
    assert merged.rows.tolist() == [*range(6), *range(6)] and decodes == []
    both = merged.images_1[[1, 6 + 4]]
    assert [(w.split(" of ")[0], w.split(", ")[-2]) for w in decodes] == [("split 'validation_unique'", "row 1"),
                                                                          ("split 'test_unique'", "row 4")]
    assert np.array_equal(both, np.stack([validation.images_1[1], test.images_1[4]]))
    with pytest.raises(ValueError, match="same image_size"):
        concatenate_pairs([validation, load_pairs(prefs, "test_unique", image_size=8)])


@pytest.mark.parametrize("shape", [(23, 37), (40, 17), (9, 12), (16, 16)])
def test_fit_square_is_torchvision_resize_then_centre_crop(shape):
    """Larger and smaller, wide and tall images come out at the model size, as the official data pipeline's
    transforms.Resize(size, BILINEAR) + CenterCrop(size) make them."""
    from PIL import Image
    from torchvision import transforms

    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    official = transforms.Compose([transforms.Resize(16, interpolation=transforms.InterpolationMode.BILINEAR),
                                   transforms.CenterCrop(16)])
    fitted = fit_square(image, 16)
    assert fitted.shape == (16, 16, 3) and fitted.dtype == np.uint8
    assert np.array_equal(fitted, np.asarray(official(Image.fromarray(image))))


def test_missing_split_and_missing_columns_are_named(prefs, tmp_path):
    with pytest.raises(ValueError, match="no split 'validation'.*validation_unique"):
        load_pairs(prefs, "validation")
    raw = datasets.load_from_disk(str(prefs / "dataset"))
    raw.remove_columns(["num_example_per_prompt", "has_label"]).save_to_disk(str(tmp_path / "dataset"))
    with pytest.raises(ValueError, match="has_label, num_example_per_prompt"):
        load_pairs(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="world preferences"):
        load_pairs(tmp_path / "nowhere", "train")


def test_a_datasetdict_saved_elsewhere_with_image_features_and_other_sizes(prefs, tmp_path):
    """As Pick-a-Pic saved by someone else: the DatasetDict folder itself, an Image feature, mixed image sizes."""
    raw = datasets.load_from_disk(str(prefs / "dataset"))["test_unique"].to_dict()
    raw["jpg_0"][0] = png_bytes(np.zeros((20, 30, 3), np.uint8))
    data = datasets.Dataset.from_dict(raw).cast_column("jpg_0", datasets.Image())
    assert isinstance(data.features["jpg_0"], datasets.Image)
    datasets.DatasetDict({"test_unique": data}).save_to_disk(str(tmp_path))
    as_stored = load_pairs(tmp_path, "test_unique")
    assert as_stored.images_0[0].shape == (20, 30, 3) and as_stored.images_0[1:].shape == (5, 16, 16, 3)
    with pytest.raises(ValueError, match=r"split 'test_unique' .* rows \[0, 1\]: .*different shapes.*image_size"):
        as_stored.images_0[:2]
    pairs = load_pairs(tmp_path, "test_unique", image_size=8)
    assert pairs.images_0.shape == (6, 8, 8, 3) and pairs.images_1.shape == (6, 8, 8, 3)
    assert np.asarray(pairs.images_0).shape == (6, 8, 8, 3) and np.all(pairs.images_0[0] == 0)
    assert np.array_equal(pairs.images_1[2], fit_square(as_stored.images_1[2], 8))


def test_side_tables_are_row_aligned_with_their_split(prefs):
    table = load_side_table(prefs, MPCF_SCORES, "train", 12, columns=("aesthetic_gap",))
    assert table["row"].tolist() == list(range(12))
    assert np.allclose(table["aesthetic_gap"], 0.1 * np.arange(12))
    judged = load_side_table(prefs, JUDGE_SCORES, "test_unique", 6)
    raw = datasets.load_from_disk(str(prefs / "dataset"))["test_unique"]
    assert judged["overall_0"].tolist() == raw["label_0"]


@pytest.mark.parametrize("damage, message", [
    (lambda rows: rows[:-1], "has 11 row.*split has 12.*not row-aligned"),
    (lambda rows: [rows[1], rows[0], *rows[2:]], "entry 0 has row id 1, expected 0"),
])
def test_misaligned_side_tables_are_refused_naming_the_file(prefs, tmp_path, damage, message):
    from lpo.tables import read_csv
    rows = read_csv(prefs / MPCF_SCORES)
    train = [r for r in rows if r["split"] == "train"]
    write_csv(tmp_path / MPCF_SCORES, damage(train))
    with pytest.raises(ValueError, match=message) as error:
        load_side_table(tmp_path, MPCF_SCORES, "train", 12)
    assert MPCF_SCORES in str(error.value)


def test_side_table_columns_and_file_are_checked(prefs, tmp_path):
    with pytest.raises(ValueError, match="lacks column.*vqascore_gap") as error:
        load_side_table(prefs, MPCF_SCORES, "train", 12, columns=("aesthetic_gap", "vqascore_gap"))
    assert MPCF_SCORES in str(error.value)
    with pytest.raises(FileNotFoundError, match="judge_scores.csv"):
        load_side_table(tmp_path, JUDGE_SCORES, "train", 12)
