"""Pick-a-Pic v1 (Kirstain et al. 2023), the paper's preference data: its splits with their columns checked, the
evaluation prompts (validation_unique), the 4k training prompts, and MPCF's score file joined with the train split.

A source is a hub id resolved in the local Hugging Face cache only (`yuvalkirstain/pickapic_v1`, or
`pickapic-anonymous/pickapic_v1` which the official evaluation streams), a `save_to_disk` folder, or local
parquet/arrow files whose names carry the split (`train-00000-of-00645-<hash>.parquet`, as the hub stores them,
or `<split>/0000.parquet`). Column names are those lpo.preference_data reads, and `write_preferences` lays a source
out as a preference directory for it, so the LRM stages read Pick-a-Pic as they read the Shapes world's data: as
arrow files (a save_to_disk source is linked, parquet and arrow files are saved there), memory-mapped, whose images
lpo.preference_data decodes batch by batch. Streaming serves only whole-column reads (captions, ids), never pairs.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lpo.io import atomic_path, load_or_explain
from lpo.reward.mpcf import GAP_COLUMNS
from lpo.preference_data import MPCF_SCORES, PAIR_COLUMNS, require_columns
from lpo.sd.hub import locate, resolve

log = logging.getLogger(__name__)

EVAL_SPLIT = "validation_unique"
EVAL_PROMPTS = 500          # Pick-a-Pic v1's validation_unique ([FT] Sec. 5.1)
# Columns that identify a pair; where the MPCF score file has one too, they must agree row by row.
ID_COLUMNS = ("ranking_id", "image_0_uid", "image_1_uid", "caption")
MPCF_FILE = "vqa_aes_clip_score_mp.csv"
_MPCF_HINT = (f"the authors' {MPCF_FILE} (Google Drive link in the README of github.com/Kwai-Kolors/LPO), or a "
              "file of your own with the columns " + ", ".join(GAP_COLUMNS) + " row-aligned with the train split")
_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}")
_DATA_FILES = (".parquet", ".arrow")


@dataclass(frozen=True)
class PickapicSource:
    ref: str                                # as configured
    path: Path                              # where it is on disk
    saved: bool                             # a save_to_disk DatasetDict folder (else data files)
    files: dict[str, tuple[Path, ...]]      # split -> parquet or arrow files, for data files

    @property
    def splits(self) -> list[str]:
        if self.saved:
            return json.loads((self.path / "dataset_dict.json").read_text())["splits"]
        return list(self.files)

    def describe(self) -> str:
        return f"'{self.ref}'" + (f" ({self.path})" if str(self.path) != self.ref else "")


@dataclass(frozen=True)
class TrainingPrompt:
    """One prompt of the LPO training set, as the authors' 4k_training_prompts.json stores it."""
    caption: str
    trainset_idx: int    # its row in the train split


def open_source(ref: str | PickapicSource, key: str = "sd_world.dataset") -> PickapicSource:
    """The source behind a hub id or local path; FileNotFoundError naming `key` when it is not there."""
    if isinstance(ref, PickapicSource):
        return ref
    return scan(ref, resolve(ref, key, "Pick-a-Pic dataset", repo_type="dataset"))


def scan(ref: str, path: Path) -> PickapicSource:
    for folder in (path, path / "dataset"):
        if (folder / "dataset_dict.json").is_file():
            return PickapicSource(ref, folder, True, {})
    found = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.suffix in _DATA_FILES and not any(s.startswith(".") for s in
                                                                         p.relative_to(path).parts))
    files: dict[str, list[Path]] = {}
    for f in found:
        match = _SHARD.match(f.name)
        split = match["split"] if match else f.stem
        if split.isdigit() or split == "data":  # <split>/0000.parquet, or save_to_disk's <split>/data-00000-...
            split = f.parent.name
        files.setdefault(split, []).append(f)
    if not files:
        raise FileNotFoundError(f"no Pick-a-Pic data at '{path}' ({ref}): expected a save_to_disk folder "
                                "(dataset_dict.json) or parquet/arrow files named by split "
                                "(train-00000-of-00645-<hash>.parquet or <split>/0000.parquet)")
    for split, paths in files.items():
        if len({p.suffix for p in paths}) > 1:
            raise ValueError(f"split '{split}' of '{path}' mixes parquet and arrow files: keep one format")
    return PickapicSource(ref, path, False, {k: tuple(v) for k, v in files.items()})


def source_problems(ref: str, key: str, splits: list[str] | dict[str, Iterable[str]]) -> list[str]:
    """For lpo.sd.inputs.missing_inputs: why `ref` cannot serve `splits` (not there, a split missing, or, for
    `splits` given as {split: columns}, a column missing; only the schema is read)."""
    path, problem = locate(ref, key, "Pick-a-Pic dataset", repo_type="dataset")
    if problem:
        return [problem]
    try:
        source = scan(ref, path)
    except (FileNotFoundError, ValueError) as e:
        return [f"{key}: {e}"]
    lacking = [s for s in splits if s not in source.splits]
    if lacking:
        return [f"{key}: the Pick-a-Pic dataset {source.describe()} lacks split(s) {', '.join(lacking)} (it has: "
                f"{', '.join(source.splits)})"]
    problems = []
    for split, columns in (splits.items() if isinstance(splits, dict) else ()):
        present = split_columns(source, split, key)
        missing = [c for c in sorted(columns) if c not in present]
        if missing:
            problems.append(f"{key}: split '{split}' of the Pick-a-Pic dataset {source.describe()} lacks column(s) "
                            f"{', '.join(missing)} (it has: {', '.join(present)})")
    return problems


def _full_split(source: PickapicSource, split: str):
    """(every column of `split`, its parquet files or None): saved folders and arrow files are memory-mapped in
    place; for parquet only the schema is read here."""
    import datasets

    if split not in source.splits:
        raise ValueError(f"the Pick-a-Pic dataset {source.describe()} has no split '{split}' (it has: "
                         f"{', '.join(source.splits)})")
    what, fix = "the Pick-a-Pic dataset", "download it again, or point sd_world.dataset at a complete copy"
    # Opening an arrow file reads every record batch's header, so a truncated one fails here, not mid-training.
    if source.saved:
        return load_or_explain(source.path, what, fix, lambda p: datasets.load_from_disk(str(p))[split]), None
    if source.files[split][0].suffix == ".parquet":
        files = {split: [str(f) for f in source.files[split]]}
        return datasets.load_dataset("parquet", data_files=files, split=split, streaming=True), files
    return datasets.concatenate_datasets([load_or_explain(f, what, fix, lambda p: datasets.Dataset.from_file(str(p)))
                                          for f in source.files[split]]), None


def split_columns(source: str | PickapicSource, split: str, key: str = "sd_world.dataset") -> list[str]:
    return list(_full_split(open_source(source, key), split)[0].column_names)


def load_split(source: str | PickapicSource, split: str, columns: tuple[str, ...] | None = None,
               streaming: bool = False, key: str = "sd_world.dataset", cache_dir: str | os.PathLike | None = None):
    """One split as a `datasets.Dataset` (an IterableDataset when `streaming`), its columns checked: `columns`
    (only those are kept), else lpo.preference_data's pair columns (all are kept). A save_to_disk folder and arrow
    files are memory-mapped in place; parquet files are converted to arrow in `cache_dir` (default: the datasets
    library's cache) unless streamed."""
    import datasets

    source = open_source(source, key)
    data, parquet = _full_split(source, split)
    require_columns(data.column_names, columns or PAIR_COLUMNS,
                    f"split '{split}' of the Pick-a-Pic dataset {source.describe()}")
    if parquet:
        return datasets.load_dataset("parquet", data_files=parquet, split=split, streaming=streaming,
                                     columns=list(columns) if columns else None,
                                     cache_dir=None if cache_dir is None else str(cache_dir))
    if columns:
        data = data.select_columns(list(columns))
    return data.to_iterable_dataset() if streaming else data


def read_columns(source: str | PickapicSource, split: str, columns: tuple[str, ...],
                 key: str = "sd_world.dataset") -> dict[str, list]:
    """Whole columns of a split as lists, without decoding or caching images (parquet is streamed)."""
    source = open_source(source, key)
    parquet = not source.saved and split in source.files and source.files[split][0].suffix == ".parquet"
    data = load_split(source, split, columns, streaming=parquet)
    if not parquet:
        return data.to_dict()
    out: dict[str, list] = {c: [] for c in columns}
    for batch in data.iter(batch_size=10_000):
        for c in columns:
            out[c].extend(batch[c])
    return out


# --------------------------------------------------------------------------------------------------- prompts

def evaluation_prompts(source: str | PickapicSource, split: str = EVAL_SPLIT, expected: int | None = EVAL_PROMPTS,
                       key: str = "sd_world.eval_dataset") -> list[str]:
    """The unique captions of `split` in order (the official evaluation's prompts); `expected` checks the count
    (500 for Pick-a-Pic v1's validation_unique; None accepts any)."""
    source = open_source(source, key)
    prompts = list(dict.fromkeys(read_columns(source, split, ("caption",), key)["caption"]))
    if expected is not None and len(prompts) != expected:
        raise ValueError(f"split '{split}' of {source.describe()} has {len(prompts)} unique captions, expected "
                         f"{expected} (Pick-a-Pic v1's validation_unique has {EVAL_PROMPTS}): point {key} at "
                         f"Pick-a-Pic v1")
    return prompts


def draw_training_prompts(source: str | PickapicSource, n: int = 4000, seed: int = 0,
                          key: str = "sd_world.dataset") -> list[TrainingPrompt]:
    """`n` distinct non-blank captions of the train split drawn uniformly with `seed`, each with the first row it
    appears in: the paper's "4k prompts randomly sampled from the Pick-a-Pic v1 training set"."""
    source = open_source(source, key)
    first: dict[str, int] = {}
    for row, caption in enumerate(read_columns(source, "train", ("caption",), key)["caption"]):
        if caption and caption.strip():
            first.setdefault(caption, row)
    if len(first) < n:
        raise ValueError(f"the train split of {source.describe()} has {len(first)} distinct captions, fewer than "
                         f"the {n} training prompts asked for")
    items = list(first.items())
    pick = np.random.default_rng(seed).choice(len(items), size=n, replace=False)
    return [TrainingPrompt(*items[i]) for i in pick]


def read_training_prompts(path: str | os.PathLike, source: str | PickapicSource | None = None,
                          key: str = "sd_world.train_prompts") -> list[TrainingPrompt]:
    """A prompt list in the authors' 4k_training_prompts.json format (a JSON list of {caption, trainset_idx});
    with `source`, every caption is checked against the train split's row `trainset_idx`."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{key}: cannot read '{path}' as a JSON prompt list ({e})") from e
    problem = _prompt_entries_problem(entries)
    if problem:
        raise ValueError(f"{key}: '{path}' {problem}")
    prompts = [TrainingPrompt(e["caption"], int(e["trainset_idx"])) for e in entries]
    if source is not None:
        source = open_source(source)
        captions = read_columns(source, "train", ("caption",))["caption"]
        wrong = [p for p in prompts if not (0 <= p.trainset_idx < len(captions))
                 or captions[p.trainset_idx] != p.caption]
        if wrong:
            raise ValueError(f"{len(wrong)} of the {len(prompts)} prompts in '{path}' do not match row trainset_idx "
                             f"of the train split of {source.describe()} (first: {wrong[0]}): the file was drawn "
                             f"from another copy or version of Pick-a-Pic")
    return prompts


def _prompt_entries_problem(entries) -> str | None:
    if not isinstance(entries, list) or not entries:
        return "must be a non-empty JSON list of {\"caption\": ..., \"trainset_idx\": ...} objects"
    for i, e in enumerate(entries):
        if not (isinstance(e, dict) and isinstance(e.get("caption"), str) and e["caption"].strip()
                and isinstance(e.get("trainset_idx"), int) and not isinstance(e["trainset_idx"], bool)):
            return f"entry {i} is not {{\"caption\": non-empty text, \"trainset_idx\": integer}}: {str(e)[:120]}"
    return None


def prompt_file_problems(ref: str, key: str) -> list[str]:
    """For lpo.sd.inputs.missing_inputs: why the training prompt file `ref` cannot be used."""
    path, problem = locate(ref, key, "training prompt file (the authors' lpo/prompts/4k_training_prompts.json)")
    if problem:
        return [problem]
    try:
        read_training_prompts(path, key=key)
    except ValueError as e:
        return [str(e)]
    return []


def write_training_prompts(path: str | os.PathLike, prompts: list[TrainingPrompt]) -> None:
    """In the authors' format, so a draw can be reused or compared with their file."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps([{"caption": p.caption, "trainset_idx": p.trainset_idx} for p in prompts],
                                  indent=1, ensure_ascii=False) + "\n")


def prompt_sets(config, seed: int) -> dict[str, list[str]]:
    """The world's prompt sets for an lpo.sd.config.SDWorldConfig, in the shape of the Shapes world's prompt file
    (lpo.optimize.methods.training_prompts reads "train"): the training prompts (the configured file, else a draw with
    `seed`) and the evaluation prompts."""
    if config.train_prompts is None:
        train = draw_training_prompts(config.dataset, config.train_prompt_count, seed)
    else:
        train = read_training_prompts(resolve(config.train_prompts, "sd_world.train_prompts",
                                              "training prompt file"))
    return {"train": [p.caption for p in train],
            EVAL_SPLIT: evaluation_prompts(config.eval_dataset, expected=config.eval_prompt_count)}


# ------------------------------------------------------------------------------------------------------ MPCF

def mpcf_file_problems(ref: str | None, key: str) -> list[str]:
    """For lpo.sd.inputs.missing_inputs: why the MPCF score file cannot be used (its rows are checked on load)."""
    if ref is None:
        return [f"{key}: MPCF score file not configured: {_MPCF_HINT}; set {key} to its path"]
    path, problem = locate(ref, key, f"MPCF score file ({_MPCF_HINT})")
    if problem:
        return [problem]
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    lacking = [c for c in GAP_COLUMNS if c not in header]
    return [f"{key}: MPCF score file '{path}' lacks column(s) {', '.join(lacking)} (it has: "
            f"{', '.join(header) or 'nothing'})"] if lacking else []


def _read_csv_columns(path: Path) -> dict[str, list[str]]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        columns: list[list[str]] = [[] for _ in header]
        for line, values in enumerate(reader, start=2):
            if len(values) != len(header):
                raise ValueError(f"'{path}' line {line} has {len(values)} fields, the header {len(header)}")
            for column, value in zip(columns, values):
                column.append(value)
    return dict(zip(header, columns))


def _aligned_mpcf_table(csv_path: str | os.PathLike, source: PickapicSource, key: str) -> dict[str, list[str]]:
    path = Path(csv_path)
    table = _read_csv_columns(path)
    require_columns(list(table), GAP_COLUMNS, f"the MPCF score file '{path}' ({key})")
    n = len(table[GAP_COLUMNS[0]])
    present = split_columns(source, "train")
    shared = [c for c in ID_COLUMNS if c in table and c in present]
    split = read_columns(source, "train", tuple(shared or ["caption"]))
    rows = len(next(iter(split.values())))
    if n != rows:
        raise ValueError(f"the MPCF score file '{path}' has {n} rows but the train split of the Pick-a-Pic dataset "
                         f"{source.describe()} has {rows}: the file must be row-aligned with that split (the "
                         f"authors' {MPCF_FILE} is aligned with yuvalkirstain/pickapic_v1's train split)")
    for column in shared:
        ours = np.asarray([str(v) for v in split[column]], dtype=object)
        theirs = np.asarray(table[column], dtype=object)
        wrong = np.flatnonzero(ours != theirs)
        if wrong.size:
            i = int(wrong[0])
            raise ValueError(f"the MPCF score file '{path}' is not row-aligned with the train split of "
                             f"{source.describe()}: {wrong.size} row(s) differ in '{column}', first row {i} "
                             f"({theirs[i]!r} in the file, {ours[i]!r} in the dataset)")
    return table


def load_mpcf_scores(csv_path: str | os.PathLike, source: str | PickapicSource,
                     key: str = "sd_world.mpcf_scores") -> dict[str, np.ndarray]:
    """The MPCF score table (column -> array; numbers as float, `row` the train-split row), checked to be
    row-aligned with the train split: the same number of rows and, for every identifying column both have
    (ranking_id, image uids, caption), the same value in every row."""
    table = _aligned_mpcf_table(csv_path, open_source(source), key)
    out: dict[str, np.ndarray] = {}
    for column, values in table.items():
        try:
            out[column] = np.asarray(values, dtype=np.float64)
        except ValueError:
            out[column] = np.asarray(values, dtype=object)
    out["row"] = np.arange(len(table[GAP_COLUMNS[0]]))
    return out


def write_preferences(source: str | PickapicSource, out_dir: str | os.PathLike, mpcf_scores=None,
                      splits: tuple[str, ...] = ("train", "validation_unique", "test_unique")) -> Path:
    """A preference directory as lpo.preference_data reads it: `dataset/` (a link to a save_to_disk source;
    otherwise the splits saved with save_to_disk, a copy of the data) and, with `mpcf_scores`, `mpcf_scores.csv`
    (split, row and the score file's columns as written there, checked as by `load_mpcf_scores`)."""
    import datasets

    source = open_source(source)
    lacking = [s for s in splits if s not in source.splits]
    if lacking:
        raise ValueError(f"the Pick-a-Pic dataset {source.describe()} lacks split(s) {', '.join(lacking)}")
    table = _aligned_mpcf_table(mpcf_scores, source, "mpcf_scores") if mpcf_scores is not None else None
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        if source.saved:
            for split in splits:
                load_split(source, split)  # checks the pair columns now, not in the first training stage
            (tmp / "dataset").symlink_to(source.path.resolve(), target_is_directory=True)
        else:
            # The parquet-to-arrow conversion goes next to tmp, which atomic_path removes: one copy is kept.
            cache = tmp.parent / "datasets-cache"
            datasets.DatasetDict({s: load_split(source, s, cache_dir=cache) for s in splits}).save_to_disk(
                str(tmp / "dataset"))
        if table is not None:
            columns = [c for c in table if c not in ("split", "row")]
            with open(tmp / MPCF_SCORES, "w", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(["split", "row", *columns])
                writer.writerows(["train", i, *values] for i, values in enumerate(zip(*(table[c] for c in columns))))
    log.info("wrote the Pick-a-Pic preference directory %s from %s", out_dir, source.describe())
    return Path(out_dir)
