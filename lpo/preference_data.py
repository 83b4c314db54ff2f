"""Reading a Pick-a-Pic-layout preference dataset and the per-pair tables kept beside it.

The layout is what `lpo world preferences` writes and what Pick-a-Pic v1 saved with `save_to_disk` looks like:
`<dir>/dataset` is a `datasets.DatasetDict` (splits train / validation_unique / test_unique; columns caption,
jpg_0, jpg_1, label_0, has_label, num_example_per_prompt, ...), and `<dir>/mpcf_scores.csv`,
`<dir>/judge_scores.csv` hold one row per pair (`split`, `row`), row-aligned with their split. Only column names
are relied on, so a DatasetDict saved by someone else is read the same way (`<dir>` may also be the DatasetDict
folder itself).

Images stay in the memory-mapped arrow files until a batch asks for them (`ImageColumn`), so a split of any size
loads in the memory of its captions and labels; `fit_square` brings them to the model's resolution as they are
decoded.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lpo.io import load_or_explain, require_exists
from lpo.tables import read_csv
from lpo.images import decode_image, fit_square

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "has_label", "num_example_per_prompt")
MPCF_SCORES, JUDGE_SCORES = "mpcf_scores.csv", "judge_scores.csv"
_HINT = "run the `world preferences` stage, or save a Pick-a-Pic-layout DatasetDict there with save_to_disk"
_LABEL_COLUMNS = ("caption", "label_0", "has_label", "num_example_per_prompt")
# PIL releases the GIL while it decodes and resizes, so a batch's images decode in parallel threads.
_DECODE_THREADS = min(8, os.cpu_count() or 1)


@dataclass(frozen=True, eq=False)
class _StoredColumn:
    """An image column of one memory-mapped split, its image features left undecoded."""
    data: object   # datasets.Dataset holding only `column`
    column: str
    what: str      # "split 'train' of '<dir>'", for messages

    def read(self, rows: np.ndarray) -> list:
        """The stored bytes of `rows` (binary columns, or `datasets.Image` features kept as bytes or a path)."""
        return [_stored_bytes(v) for v in self.data[rows.tolist()][self.column]]

    def identity(self) -> list:
        """The arrow files behind the column (path, size, modification time): what a checkpoint must match,
        known without reading them."""
        files = [Path(f["filename"]).resolve() for f in self.data.cache_files]
        return [self.column, *[(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]]


def _stored_bytes(value):
    if not isinstance(value, dict):  # a binary column, as Pick-a-Pic and `world preferences` store images
        return value
    return value["bytes"] if value["bytes"] is not None else Path(value["path"]).read_bytes()


class ImageColumn:
    """One image column of stored pairs (jpg_0 or jpg_1) as a uint8 array (N, H, W, 3) that decodes only the rows
    it is indexed with: `column[rows]` and `column[i:j]` decode those images, `take` selects rows without decoding,
    and `np.asarray(column)` decodes every one (for a batch or the Shapes world, never a Pick-a-Pic split).

    With `image_size`, every image is brought to image_size x image_size by lpo.images.fit_square; without
    it, the images of one batch must share a shape (`shape` reports the first image's)."""

    dtype, ndim = np.dtype(np.uint8), 4

    def __init__(self, sources: tuple[_StoredColumn, ...], source: np.ndarray, rows: np.ndarray,
                 image_size: int | None = None):
        self._sources, self._source, self._rows, self.image_size = sources, source, rows, image_size
        self._first_shape: tuple[int, ...] | None = None

    @classmethod
    def from_split(cls, data, column: str, what: str, rows: np.ndarray, image_size: int | None) -> ImageColumn:
        """Rows `rows` of `column` of the split `data` (a memory-mapped `datasets.Dataset`)."""
        import datasets

        data = data.select_columns([column])
        if isinstance(data.features[column], datasets.Image):
            data = data.cast_column(column, datasets.Image(decode=False))  # a schema change, no data is read
        return cls((_StoredColumn(data, column, what),), np.zeros(len(rows), np.int32), np.asarray(rows, np.int64),
                   image_size)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        if self.image_size is not None:
            return len(self), self.image_size, self.image_size, 3
        if not len(self):
            return 0, 0, 0, 3
        if self._first_shape is None:
            self._first_shape = self._decode(np.zeros(1, np.int64)).shape[1:]
        return (len(self), *self._first_shape)

    def __getitem__(self, index) -> np.ndarray:
        head, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        positions = np.arange(len(self))[head]
        if positions.ndim == 0:
            return self._decode(positions[None])[0][rest]
        if positions.ndim != 1:
            raise IndexError(f"an ImageColumn takes one index array of rows, got shape {positions.shape}")
        return self._decode(positions)[(slice(None), *rest)]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        images = self._decode(np.arange(len(self)))
        return images if dtype is None else images.astype(dtype)

    def take(self, indices, axis: int = 0) -> ImageColumn:
        """The rows at `indices`, still undecoded (numpy's `take` along the first axis)."""
        if axis != 0:
            raise ValueError("an ImageColumn selects rows only (axis=0)")
        positions = np.arange(len(self))[np.asarray(indices)]
        return ImageColumn(self._sources, self._source[positions], self._rows[positions], self.image_size)

    def resized(self, size: int) -> ImageColumn:
        """The same rows decoded to size x size (from the stored bytes, so an image is resampled once)."""
        return ImageColumn(self._sources, self._source, self._rows, size)

    def digest(self) -> str:
        """Identifies the images without decoding them: the stored files, the row ids and the image size."""
        h = hashlib.sha256(repr([[s.identity() for s in self._sources], self.image_size]).encode())
        for array in (self._source, self._rows):
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()

    @staticmethod
    def concatenate(columns: list[ImageColumn]) -> ImageColumn:
        """The rows of `columns` one after another, undecoded; they must share an image size."""
        sizes = {c.image_size for c in columns}
        if len(sizes) > 1:
            raise ValueError(f"image columns of different image sizes {sorted(sizes, key=str)} cannot be joined: "
                             f"load them with the same image_size")
        sources, source = [], []
        for c in columns:
            source.append(c._source + len(sources))
            sources.extend(c._sources)
        return ImageColumn(tuple(sources), np.concatenate(source), np.concatenate([c._rows for c in columns]),
                           sizes.pop())

    def _decode(self, positions: np.ndarray) -> np.ndarray:
        if not len(positions):
            side = self.image_size or 0
            return np.zeros((0, side, side, 3), np.uint8)
        source, rows = self._source[positions], self._rows[positions]
        items: list = [None] * len(positions)
        for s in np.unique(source):
            at = np.flatnonzero(source == s)
            stored = self._sources[s]
            for i, data in zip(at, stored.read(rows[at])):
                items[i] = (data, f"{stored.what}, row {rows[i]}, {stored.column}")
        with ThreadPoolExecutor(min(_DECODE_THREADS, len(items))) as pool:
            images = list(pool.map(self._image, items))
        shapes = sorted({im.shape for im in images})
        if len(shapes) > 1:
            raise ValueError(f"{self._sources[source[0]].what}, rows {rows[:8].tolist()}: images of one batch have "
                             f"different shapes {shapes[:4]}; load the pairs with image_size to resize them")
        return np.stack(images)

    def _image(self, item: tuple[bytes, str]) -> np.ndarray:
        data, what = item
        try:
            image = decode_image(data, what)
        except ValueError as e:
            raise ValueError(f"{e}. The stored bytes are damaged: restore that row of the dataset (re-run the "
                             f"`world preferences` stage, or fetch the Pick-a-Pic shard again)") from e
        return image if self.image_size is None else fit_square(image, self.image_size)


def images_digest(images: np.ndarray | ImageColumn) -> str:
    """Identifies pair images for checkpoint fingerprints: an ImageColumn without decoding it, an array by its
    pixels."""
    if isinstance(images, ImageColumn):
        return images.digest()
    images = np.ascontiguousarray(images)
    return hashlib.sha256(repr((images.shape, images.dtype.str)).encode() + images.tobytes()).hexdigest()


def at_resolution(images: np.ndarray | ImageColumn, size: int) -> np.ndarray | ImageColumn:
    """Pair images at size x size (lpo.images.fit_square): an ImageColumn is decoded at that size batch by
    batch; an array in memory is resized now unless it already has that size."""
    if isinstance(images, ImageColumn):
        return images if images.image_size == size else images.resized(size)
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([fit_square(image, size) for image in images]) if len(images) else \
        np.zeros((0, size, size, 3), np.uint8)


@dataclass
class PreferencePairs:
    """The labelled pairs of one split; `rows` are their row ids in the split (the side tables' `row`).

    images_0 / images_1 are uint8 (N, H, W, 3): arrays, or (from load_pairs) ImageColumns that decode only what
    is indexed, so `pairs.images_0[rows]` and `pairs.take(rows).images_0` are one batch's images while
    whole-array uses (np.asarray, np.concatenate, .tobytes of all pairs) decode every image of the split."""
    images_0: np.ndarray | ImageColumn
    images_1: np.ndarray | ImageColumn
    captions: list[str]
    label_0: np.ndarray               # (N,) float: 1 (image 0 preferred), 0, or 0.5 (tie)
    num_example_per_prompt: np.ndarray  # (N,) int
    rows: np.ndarray                  # (N,) int
    split: str
    split_rows: int                   # rows in the whole split, what the side tables must have
    unlabeled: int = 0                # rows dropped because has_label == 0

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, index) -> PreferencePairs:
        """The pairs at `index` (integer indices or a boolean mask into these pairs), e.g. after MPCF filtering;
        stored images stay undecoded."""
        index = np.arange(len(self))[np.asarray(index)]
        return replace(self, images_0=self.images_0.take(index, axis=0), images_1=self.images_1.take(index, axis=0),
                       captions=[self.captions[i] for i in index], label_0=self.label_0[index],
                       num_example_per_prompt=self.num_example_per_prompt[index], rows=self.rows[index])

    def digest(self) -> str:
        """Identifies these pairs (images as by images_digest, labels, per-prompt counts, captions) for checkpoint
        fingerprints, without decoding stored images."""
        h = hashlib.sha256()
        for images in (self.images_0, self.images_1):
            h.update(images_digest(images).encode())
        for array in (self.label_0, self.num_example_per_prompt):
            h.update(np.ascontiguousarray(array).tobytes())
        h.update("\n".join(self.captions).encode())
        return h.hexdigest()


def concatenate_pairs(parts: list[PreferencePairs]) -> PreferencePairs:
    """The pairs of `parts` one after another (e.g. validation and test for a study over both splits); stored
    images stay undecoded when every part's are."""
    def images(name: str):
        columns = [getattr(p, name) for p in parts]
        if all(isinstance(c, ImageColumn) for c in columns):
            return ImageColumn.concatenate(columns)
        return np.concatenate([np.asarray(c) for c in columns])

    return PreferencePairs(
        images_0=images("images_0"), images_1=images("images_1"), captions=[c for p in parts for c in p.captions],
        label_0=np.concatenate([p.label_0 for p in parts]),
        num_example_per_prompt=np.concatenate([p.num_example_per_prompt for p in parts]),
        rows=np.concatenate([p.rows for p in parts]), split="+".join(p.split for p in parts),
        split_rows=sum(p.split_rows for p in parts),
        unlabeled=sum(p.unlabeled for p in parts))


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
    # Memory-mapped whatever HF_DATASETS_IN_MEMORY_MAX_SIZE says: ImageColumn reads rows from, and identifies a
    # split by, its arrow files. Opening them reads every record batch's header, so a truncated one fails here.
    splits = load_or_explain(path, "the preference dataset", "re-run the stage that wrote it (`snakemake ... "
                             "--forcerun world_preferences`, or sd_preferences in an SD world)",
                             lambda folder: datasets.load_from_disk(str(folder), keep_in_memory=False))
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
    """The labelled pairs of `split` (of all rows, or of the row ids `rows`), no image decoded: images_0 and
    images_1 are ImageColumns over the memory-mapped split, decoded batch by batch; with `image_size` to
    image_size x image_size (shorter side resized, centre cropped: lpo.images.fit_square), without it as
    stored. Memory holds the captions, labels and row ids, whatever the split's size (Pick-a-Pic v1's train split
    has ~1M rows).

    Rows with has_label == 0 are dropped and counted. A corrupt image is not skipped: decoding a batch that holds
    one raises ValueError naming the split, the row and the column. Skipping it then would change which pairs a
    seeded batch holds, and finding such rows up front means decoding the whole split; the official LRM and
    Diffusion-DPO loaders fail on one too. (The scorers, lpo.evaluate.scorers, do skip and count undecodable images:
    those are generated images being evaluated, not training data.)
    """
    data = load_split(dataset_dir, split)
    what = f"split '{split}' of '{dataset_path(dataset_dir)}'"
    require_columns(data.column_names, PAIR_COLUMNS, what)
    split_rows = len(data)
    labels = data.select_columns(list(_LABEL_COLUMNS))
    if rows is None:
        rows, values = np.arange(split_rows), labels[:]
    else:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        outside = rows[(rows < 0) | (rows >= split_rows)]
        if outside.size:
            raise ValueError(f"row id(s) {outside[:5].tolist()} are outside {what}, which has {split_rows} rows")
        values = labels[rows.tolist()]
    labelled = np.asarray(values["has_label"], dtype=bool)
    unlabeled = int((~labelled).sum())
    if unlabeled:
        log.info("%s: dropped %d row(s) without a label (has_label == 0)", what, unlabeled)
    label_0 = np.asarray(values["label_0"], dtype=np.float64)[labelled]
    if np.any((label_0 < 0) | (label_0 > 1)):
        raise ValueError(f"{what}: label_0 must lie in [0, 1] (1, 0 or 0.5 in Pick-a-Pic), got {np.unique(label_0)}")
    rows = rows[labelled]
    images_0, images_1 = (ImageColumn.from_split(data, c, what, rows, image_size) for c in ("jpg_0", "jpg_1"))
    return PreferencePairs(
        images_0=images_0, images_1=images_1,
        captions=[c for c, keep in zip(values["caption"], labelled) if keep], label_0=label_0,
        num_example_per_prompt=np.asarray(values["num_example_per_prompt"], dtype=np.int64)[labelled],
        rows=rows, split=split, split_rows=split_rows, unlabeled=unlabeled)


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


def judge_gap(dataset_dir: str | os.PathLike, pairs: PreferencePairs) -> np.ndarray:
    """The judge's noiseless overall_0 - overall_1 of each of `pairs` (judge_scores.csv beside the dataset)."""
    judge = load_side_table(dataset_dir, JUDGE_SCORES, pairs.split, pairs.split_rows, ("overall_0", "overall_1"))
    return (judge["overall_0"] - judge["overall_1"])[pairs.rows]


SOURCE_COLUMNS = ("model_0", "model_1", "guidance_scale_0", "guidance_scale_1")


def same_source(dataset_dir: str | os.PathLike, pairs: PreferencePairs) -> np.ndarray | None:
    """Whether both images of each of `pairs` come from one source: the same model (`model_0` / `model_1`, as
    Pick-a-Pic records them) and, where the dataset records it, the same CFG. None when the dataset names no
    models."""
    data = load_split(dataset_dir, pairs.split)
    present = [c for c in SOURCE_COLUMNS if c in data.column_names]
    if not {"model_0", "model_1"} <= set(present):
        return None
    values = data.select_columns(present)[pairs.rows.tolist()]
    same = np.asarray(values["model_0"], dtype=object) == np.asarray(values["model_1"], dtype=object)
    if {"guidance_scale_0", "guidance_scale_1"} <= set(present):
        same &= np.asarray(values["guidance_scale_0"], dtype=np.float64) == np.asarray(values["guidance_scale_1"],
                                                                                        dtype=np.float64)
    return same
