"""A folder of generated images as the SD worlds' sampling writes them and the scorers read them: one PNG per
image and `index.csv` naming each file's prompt, its place among the evaluation prompts and its seed. Plain files,
so the scorers' environment needs no diffusion stack and an image that does not decode is one named file."""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

INDEX = "index.csv"
COLUMNS = ("file", "prompt", "prompt_index", "image_index", "seed")


def image_name(i: int) -> str:
    return f"{i:05d}.png"


def save_image(out: str | os.PathLike, i: int, image: np.ndarray) -> None:
    """Image `i` (uint8 (H, W, 3)) into folder `out`."""
    Image.fromarray(image).save(Path(out) / image_name(i))


def write_index(out: str | os.PathLike, rows: Sequence[dict]) -> None:
    """The index of folder `out`; row i (COLUMNS but `file`) describes image_name(i)."""
    with open(Path(out) / INDEX, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({**row, "file": image_name(i)} for i, row in enumerate(rows))


def read_index(folder: str | os.PathLike) -> list[dict]:
    """The index rows, each `file` an absolute path; errors name the folder and what is wrong."""
    folder = Path(folder)
    index = folder / INDEX
    if not index.is_file():
        raise FileNotFoundError(f"no sample index at '{index}': sample the evaluation prompts first (lpo sd sample)")
    with open(index, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"'{index}' lacks column(s) {', '.join(missing)} (it has: "
                             f"{', '.join(reader.fieldnames or [])})")
        rows = list(reader)
    if not rows:
        raise ValueError(f"'{index}' lists no images: nothing to score")
    for row in rows:
        row["file"] = str(folder / row["file"])
        row["prompt_index"], row["image_index"], row["seed"] = (int(row[k]) for k in ("prompt_index", "image_index",
                                                                                        "seed"))
    return rows
