"""The training checkpoint every trainer shares: `<out>.ckpt/state.pt`, the state a trainer composes (weights,
optimizer, RNG, curves) and the fingerprint of the run that made it.

A kill at any moment leaves the previous checkpoint or the new one, never a half-written one, and a rerun with the
same inputs resumes from it; a checkpoint made for other settings, data, seed or starting weights is ignored, so a
rerun with changed inputs starts afresh instead of continuing someone else's run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lpo.io import CorruptInput, atomic_path, load_or_explain

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)


def fingerprint(settings: dict, seed: int, *data) -> str:
    """Identifies the run a checkpoint belongs to: `settings` and `seed` as JSON, then each of `data` by its bytes
    (tensors, arrays, str, bytes), so other settings, seed, data or starting weights give another fingerprint."""
    digest = hashlib.sha256(json.dumps({"settings": settings, "seed": seed}, sort_keys=True, default=str).encode())
    for part in data:
        digest.update(_bytes(part))
    return digest.hexdigest()


def _bytes(part) -> bytes:
    if isinstance(part, bytes):
        return part
    if isinstance(part, str):
        return part.encode()
    if isinstance(part, torch.Tensor):
        # Viewed as bytes because numpy has no bfloat16.
        return part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(part).tobytes()


class Checkpoint:
    """`<out>.ckpt/state.pt` for the output `out_dir`: a trainer's state after `position` steps or rounds (`unit`).

    With an `accelerator`, only its main process writes and every process waits for the write, so no process
    runs ahead of a checkpoint the others may still resume from.
    """

    def __init__(self, out_dir: str | os.PathLike, fingerprint: str, unit: str,
                 accelerator: Accelerator | None = None):
        self.dir = Path(out_dir).with_name(Path(out_dir).name + ".ckpt")
        self.fingerprint, self.unit, self.accelerator = fingerprint, unit, accelerator
        self.saved_at: int | None = None

    def save(self, state: dict, position: int) -> None:
        if self.accelerator is None or self.accelerator.is_main_process:
            with atomic_path(self.dir) as tmp:
                tmp.mkdir()
                torch.save({"fingerprint": self.fingerprint, "position": position, "state": state},
                           tmp / "state.pt")
        self.saved_at = position
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def load(self) -> tuple[int, dict] | None:
        """(position, state) of this run's checkpoint; None, to start afresh, without one. One that cannot be read
        (a damaged file, or one holding more than tensors) is moved aside to `<dir>.corrupt-<n>`: left in place it
        would fail this run and every rerun, and moved rather than deleted it stays there to look into."""
        path = self.dir / "state.pt"
        if not path.exists():
            return None
        try:
            fingerprint, position, state = load_or_explain(
                path, "the training checkpoint", "nothing to do, the training restarts from scratch", _read_checkpoint)
        except CorruptInput as e:
            # Every process fails on the same file; one moves it, and the others find it gone.
            if self.accelerator is None or self.accelerator.is_main_process:
                aside = _corrupt_sibling(self.dir)
                os.replace(self.dir, aside)
                log.warning("%s; the checkpoint was moved to %s", e, aside)
            return None
        if fingerprint != self.fingerprint:
            log.warning("ignoring checkpoint %s: it was written for other settings, data, seed or starting weights",
                        self.dir)
            return None
        self.saved_at = position
        log.info("resuming from %s after %d %s", self.dir, self.saved_at, self.unit)
        return position, state

    def describe(self) -> str:
        if self.saved_at is None:
            return "no checkpoint was written yet"
        return f"the last checkpoint is {self.dir} (after {self.saved_at} {self.unit}), from which a rerun resumes"

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _read_checkpoint(path: Path) -> tuple[str, int, dict]:
    saved = torch.load(path, weights_only=True, map_location="cpu")
    return saved["fingerprint"], saved["position"], saved["state"]


def _corrupt_sibling(path: Path) -> Path:
    """`<path>.corrupt-<n>` for the smallest n >= 1 not taken: earlier ones stay."""
    n = 1
    while path.with_name(f"{path.name}.corrupt-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}.corrupt-{n}")


def check_finite_loss(loss: float, what: str, checkpoint: Checkpoint | None, last: float | None,
                      knobs: dict[str, float]) -> None:
    """Stop on a non-finite loss, naming `what` (the stage and its step), the `last` finite loss and the settings
    (`knobs`: name -> value) whose lowering most likely keeps the training finite."""
    if not np.isfinite(loss):
        before = f"the last finite loss was {last:.4g}" if last is not None else "no finite loss before it"
        lower = " or ".join(f"{name} (now {value:g})" for name, value in knobs.items())
        saved = "" if checkpoint is None else f"; {checkpoint.describe()}"
        raise FloatingPointError(f"{what} loss is {loss} ({before}): the training diverged; lower {lower}. If it "
                                 f"never was finite, check the inputs. Stopping without output{saved}")
