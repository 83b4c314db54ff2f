"""Reading a Pick-a-Pic-layout preference dataset and the per-pair tables kept beside it.

The layout is what `lpo world preferences` writes and what Pick-a-Pic v1 saved with `save_to_disk` looks like:
`<dir>/dataset` is a `datasets.DatasetDict` (splits train / validation_unique / test_unique; columns caption,
jpg_0, jpg_1, label_0, has_label, num_example_per_prompt, ...), and `<dir>/mpcf_scores.csv`,
`<dir>/judge_scores.csv` hold one row per pair (`split`, `row`), row-aligned with their split. Only column names
are relied on, so a DatasetDict saved by someone else is read the same way (`<dir>` may also be the DatasetDict
folder itself).
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from lpo.io import require_exists
from lpo.tables import read_csv
from lpo.world.images import decode_image

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "has_label", "num_example_per_prompt")
MPCF_SCORES, JUDGE_SCORES = "mpcf_scores.csv", "judge_scores.csv"
_HINT = "run the `world preferences` stage, or save a Pick-a-Pic-layout DatasetDict there with save_to_disk"


@dataclass
class PreferencePairs:
    """The labelled pairs of one split; `rows` are their row ids in the split (the side tables' `row`)."""
    images_0: np.ndarray              # uint8 (N, H, W, 3)
    images_1: np.ndarray
    captions: list[str]
    label_0: np.ndarray               # (N,) float: 1 (image 0 preferred), 0, or 0.5 (tie)
    num_example_per_prompt: np.ndarray  # (N,) int
    rows: np.ndarray                  # (N,) int
    split: str
    split_rows: int                   # rows in the whole split, what the side tables must have
    skipped: int = 0                  # rows dropped because an image failed to decode
    unlabeled: int = 0                # rows dropped because has_label == 0

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, index) -> "PreferencePairs":
        """The pairs at `index` (integer indices or a boolean mask into these pairs), e.g. after MPCF filtering."""
        index = np.arange(len(self))[np.asarray(index)]
        return replace(self, images_0=self.images_0[index], images_1=self.images_1[index],
                       captions=[self.captions[i] for i in index], label_0=self.label_0[index],
                       num_example_per_prompt=self.num_example_per_prompt[index], rows=self.rows[index])


def dataset_path(dataset_dir: str | os.PathLike) -> Path:
    """The DatasetDict folder: `<dir>/dataset`, or `<dir>` itself when it is one."""
    root = require_exists(dataset_dir, "preference data", _HINT)
    for path in (root / "dataset", root):
        if (path / "dataset_dict.json").is_file():
            return path
    raise FileNotFoundError(f"no DatasetDict at '{root}/dataset' or '{root}' (dataset_dict.json missing): {_HINT}")


def load_split(dataset_dir: str | os.PathLike, split: str):
    """One split of the DatasetDict as a `datasets.Dataset` (memory-mapped, images not decoded)."""
    import datasets

    path = dataset_path(dataset_dir)
    splits = datasets.load_from_disk(str(path))
    if split not in splits:
        raise ValueError(f"the preference data at '{path}' has no split '{split}' (it has: {', '.join(splits)})")
    return splits[split]


def require_columns(present, needed, what: str) -> None:
    missing = [c for c in needed if c not in present]
    if missing:
        raise ValueError(f"{what} lacks column(s) {', '.join(missing)} (it has: {', '.join(present)}); "
                         f"a Pick-a-Pic-layout dataset needs {', '.join(needed)}")


def load_pairs(dataset_dir: str | os.PathLike, split: str, rows=None, image_size: int | None = None
               ) -> PreferencePairs:
    """The labelled pairs of `split` (of all rows, or of the row ids `rows`), images decoded to uint8.

    Rows with has_label == 0 are dropped, and so are rows with an image that does not decode; both are counted
    (and the second logged), not raised, because one bad image in a million-row crawl should not stop training.
    `image_size`: resize the shorter side to it and centre-crop (as the LRM's data pipeline does); without it all
    images must already share one shape.
    """
    data = load_split(dataset_dir, split)
    what = f"split '{split}' of '{dataset_path(dataset_dir)}'"
    require_columns(data.column_names, PAIR_COLUMNS, what)
    split_rows = len(data)
    if rows is None:
        rows = np.arange(split_rows)
    else:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        outside = rows[(rows < 0) | (rows >= split_rows)]
        if outside.size:
            raise ValueError(f"row id(s) {outside[:5].tolist()} are outside {what}, which has {split_rows} rows")
        data = data.select(rows)
    labelled = np.asarray(data["has_label"], dtype=bool)
    data, rows = data.select(np.flatnonzero(labelled)), rows[labelled]
    unlabeled = int((~labelled).sum())
    if unlabeled:
        log.info("%s: dropped %d row(s) without a label (has_label == 0)", what, unlabeled)
    decoded, failures = [], []
    ok = np.ones(len(rows), dtype=bool)
    for i, (row, data_0, data_1) in enumerate(zip(rows, _image_bytes(data, "jpg_0"), _image_bytes(data, "jpg_1"))):
        try:
            decoded.append(tuple(_fit(decode_image(d, f"{what}, row {row}, {c}"), image_size)
                                 for d, c in ((data_0, "jpg_0"), (data_1, "jpg_1"))))
        except ValueError as e:
            ok[i] = False
            failures.append(str(e))
    if failures:
        log.warning("%s: skipped %d row(s) whose image failed to decode; first: %s", what, len(failures),
                    failures[0])
    images_0, images_1 = _stack([d[0] for d in decoded], what), _stack([d[1] for d in decoded], what)
    label_0 = np.asarray(data["label_0"], dtype=np.float64)[ok]
    if np.any((label_0 < 0) | (label_0 > 1)):
        raise ValueError(f"{what}: label_0 must lie in [0, 1] (1, 0 or 0.5 in Pick-a-Pic), got {np.unique(label_0)}")
    return PreferencePairs(
        images_0=images_0, images_1=images_1, captions=[c for c, k in zip(data["caption"], ok) if k],
        label_0=label_0, num_example_per_prompt=np.asarray(data["num_example_per_prompt"], dtype=np.int64)[ok],
        rows=rows[ok], split=split, split_rows=split_rows, skipped=len(failures), unlabeled=unlabeled)


def _image_bytes(data, column: str) -> list:
    """Raw bytes of an image column, whether it is stored as binary or as a `datasets.Image` feature."""
    import datasets

    if isinstance(data.features[column], datasets.Image):
        data = data.cast_column(column, datasets.Image(decode=False))
        return [v["bytes"] if v["bytes"] is not None else Path(v["path"]).read_bytes() for v in data[column]]
    return data[column]


def _fit(image: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or image.shape[:2] == (size, size):
        return image
    h, w = image.shape[:2]
    scale = size / min(h, w)
    resized = Image.fromarray(image).resize((max(size, round(w * scale)), max(size, round(h * scale))),
                                            Image.Resampling.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)))


def _stack(images: list[np.ndarray], what: str) -> np.ndarray:
    if not images:
        return np.zeros((0, 0, 0, 3), np.uint8)
    shapes = sorted({im.shape for im in images})
    if len(shapes) > 1:
        raise ValueError(f"{what}: images have different shapes {shapes[:4]}; pass image_size to resize them")
    return np.stack(images)


def load_side_table(dataset_dir: str | os.PathLike, name: str, split: str, n_rows: int,
                    columns: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Column -> array for the rows of `split` in `<dir>/<name>` (mpcf_scores.csv or judge_scores.csv), checked
    to be row-aligned with the split: exactly `n_rows` rows (the split's length), with row ids 0..n_rows-1 in
    order. Numeric columns come back as float arrays, `row` as int."""
    path = require_exists(Path(dataset_dir) / name, f"side table {name}",
                          "it is written beside dataset/ by the `world preferences` stage")
    with open(path, newline="") as f:
        present = next(csv.reader(f), [])
    table = read_csv(path)
    require_columns(present, ("split", "row", *columns), f"'{path}'")
    table = [r for r in table if r["split"] == split]
    if len(table) != n_rows:
        raise ValueError(f"'{path}' has {len(table)} row(s) for split '{split}' but the split has {n_rows}: the "
                         f"table is not row-aligned with the dataset (write both with the same `world preferences` "
                         f"run)")
    ids = np.array([int(r["row"]) for r in table], dtype=np.int64)
    wrong = np.flatnonzero(ids != np.arange(n_rows))
    if wrong.size:
        raise ValueError(f"'{path}', split '{split}': entry {wrong[0]} has row id {ids[wrong[0]]}, expected "
                         f"{wrong[0]}: the table is not row-aligned with the dataset")
    out = {"row": ids}
    for column in present:
        if column not in ("split", "row"):
            values = [r[column] for r in table]
            try:
                out[column] = np.array(values, dtype=np.float64)
            except ValueError:
                out[column] = np.array(values, dtype=object)
    return out
