"""Atomic outputs: a killed stage leaves either the old output or none, never a half-written one. And the one way
inputs are read: a missing input or one that cannot be read (truncated, overwritten, of another format) is named
with what it is and how to make it again."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from safetensors.torch import load_file, save_file

T = TypeVar("T")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary sibling path (file or directory) that is renamed onto `path` on success, with the modes
    of a fresh open() or mkdir() under the umask (`_normalise_modes`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        yield tmp
        _normalise_modes(tmp)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def _normalise_modes(root: Path) -> None:
    """Give `root` and everything in it the mode open() or mkdir() would under the current umask (executable files
    stay executable): some writers narrow it (safetensors writes 0o600) and copies carry their sources' modes, so
    without this an output's readers would depend on how each file came to be. Links are left alone: their targets
    lie outside the output, and chmod would follow them."""
    umask = _umask()
    paths = [root]
    if root.is_dir() and not root.is_symlink():
        paths += [Path(folder, name) for folder, dirs, files in os.walk(root) for name in dirs + files]
    for entry in paths:
        mode = entry.lstat().st_mode
        if not stat.S_ISLNK(mode):
            full = 0o777 if stat.S_ISDIR(mode) or mode & 0o111 else 0o666
            entry.chmod(full & ~umask)


def _umask() -> int:
    # The umask can only be read by setting it; a file another thread creates in between gets the private 0o077.
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike, what: str = "the JSON file",
              fix: str = "re-run the rule that writes it (`snakemake ... --forcerun RULE`)"):
    """The JSON at `path`, an output of one of our stages (`load_or_explain`: `what` it is, the `fix`)."""
    return load_or_explain(path, what, fix, lambda p: json.loads(p.read_text()))


WEIGHTS, META = "model.safetensors", "config.json"


def write_weights(folder: Path, state: dict, meta: dict) -> None:
    """A small model of ours as `folder/model.safetensors` (tensors only, so reading it runs no code) and
    `folder/config.json` (what rebuilding it needs: sizes, vocabularies, settings)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / WEIGHTS))
    (folder / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_weights(folder: Path, what: str, fix: str) -> tuple[dict, dict]:
    """(tensors, config) that `write_weights` wrote; a missing or damaged file is named (`load_or_explain`)."""
    folder = require_exists(folder, what, fix)
    its = f"{what}'" if what.endswith("s") else f"{what}'s"
    meta = load_or_explain(folder / META, f"{its} config", fix, lambda file: json.loads(file.read_text()))
    state = load_or_explain(folder / WEIGHTS, f"{its} weights", fix, lambda file: load_file(str(file)))
    return state, meta


def require_exists(path: str | os.PathLike, what: str, hint: str) -> Path:
    """Fail early, naming the missing input and how to produce it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found at '{path}': {hint}")
    return path


class CorruptInput(ValueError):
    """An input that is there but cannot be read: truncated, overwritten, or of another format."""


def load_or_explain(path: str | os.PathLike, what: str, fix: str, loader: Callable[[Path], T],
                    error: type[CorruptInput] = CorruptInput) -> T:
    """`loader(path)`; any failure of it raises `error` naming `path`, `what` it is (in our words: "the judge's
    weights") and the `fix` (which stage to re-run), as does a missing `path` FileNotFoundError (`require_exists`).
    Libraries fail on a damaged file with messages that name no file of ours, or none at all."""
    path = require_exists(path, what, fix)
    try:
        return loader(path)
    except Exception as e:  # torch, safetensors, pyarrow, json and diffusers each raise their own types
        cause = str(e).strip()
        # torch's refusal suggests weights_only=False, which would run any code a tampered file holds.
        unsafe = "weights_only" in cause
        brief = type(e).__name__ if unsafe or not cause else f"{type(e).__name__}: {_first_line(cause)}"
        raise error(f"cannot read {what} at '{path}': it is damaged (e.g. truncated by a killed write) or not in "
                    f"the expected format ({brief}). To fix: {fix}") from (None if unsafe else e)


def _first_line(message: str, limit: int = 200) -> str:
    line = message.splitlines()[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."
