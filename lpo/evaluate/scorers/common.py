"""What every real scorer shares: decoding and batching images, the preprocessing steps the reference packages use,
and loading local checkpoints with errors that name the file, the mismatching keys or the hub id to download."""
from __future__ import annotations

import abc
import contextlib
import inspect
import io
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError

from lpo.io import CorruptInput, load_or_explain

# OpenAI CLIP's normalisation, used by every scorer here (BLIP's ViT in ImageReward included).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageItem = Image.Image | np.ndarray | bytes | bytearray | str | os.PathLike
Images = np.ndarray | Sequence[ImageItem]


class CheckpointMismatch(CorruptInput):
    """A checkpoint that cannot serve: unreadable, or with keys or shapes not those of the architecture being
    loaded."""


@dataclass(frozen=True)
class Checkpoint:
    """Where a constructor argument's files come from: a hub repository (a directory in hub layout when `filename`
    is None, else one file of it; `url` for a file hosted elsewhere) and, for directories, the files that must be
    there (a tuple = any one of them)."""
    hub_id: str
    filename: str | None = None
    contents: tuple[str | tuple[str, ...], ...] = ()
    optional: bool = False
    url: str | None = None

    def download_hint(self, path: Path | None = None) -> str:
        """What to download, and the command that puts it at `path` (when given)."""
        if self.url is not None:
            return f"download {self.filename} from {self.url} ({self.hub_id})"
        if self.filename is None:
            where = f" (`hf download {self.hub_id} --local-dir {path}`)" if path else ""
            return f"download the hub repository {self.hub_id}{where}"
        where = f" (`hf download {self.hub_id} {self.filename} --local-dir {path.parent}`)" if path else ""
        return f"download {self.filename} from the hub repository {self.hub_id}{where}"

    def problem(self, path: str | os.PathLike) -> str | None:
        """Why `path` cannot serve as this checkpoint, or None when it can."""
        path = Path(path)
        if self.filename is not None:
            return None if path.is_file() else f"'{path}' not found: {self.download_hint(path)}"
        if not path.is_dir():
            return f"'{path}' not found: {self.download_hint(path)}"
        for entry in self.contents:
            names = (entry,) if isinstance(entry, str) else entry
            if not any((path / name).is_file() for name in names):
                return f"'{path}' lacks {' or '.join(names)}: {self.download_hint(path)}"
        return None


HF_MODEL_FILES = ("config.json", ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                                  "pytorch_model.bin.index.json"))
HF_PROCESSOR_FILES = ("preprocessor_config.json", ("tokenizer.json", "vocab.json"))


@dataclass(frozen=True)
class Scores:
    """One score per input image in input order; NaN where the image failed to decode (listed in `skipped`)."""
    values: np.ndarray
    skipped: tuple[int, ...]

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


class Scorer(abc.ABC):
    """A reward model scoring (image, prompt) pairs, fp32, in eval mode, from local checkpoints only."""
    name: ClassVar[str]
    convention: ClassVar[str]
    # Constructor argument -> where its files come from; `missing_checkpoints` reads it.
    checkpoints: ClassVar[dict[str, Checkpoint]]

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    @classmethod
    def missing(cls, **paths: Any) -> list[str]:
        """One message per checkpoint argument whose path is missing or incomplete; other constructor arguments
        (device, ...) are accepted and ignored, so a scorer's whole config can be passed."""
        known = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        unknown = sorted(set(paths) - set(known))
        if unknown:
            raise ValueError(f"unknown argument(s) for scorer '{cls.name}': {', '.join(unknown)} "
                             f"(known: {', '.join(known)})")
        problems = []
        for arg, spec in cls.checkpoints.items():
            if paths.get(arg) is None:
                if not spec.optional:
                    problems.append(f"{cls.name}.{arg}: not configured: {spec.download_hint()} "
                                    f"and set {cls.name}.{arg} to its path")
            elif problem := spec.problem(paths[arg]):
                problems.append(f"{cls.name}.{arg}: {problem}")
        return problems

    def _require(self, arg: str, path: str | os.PathLike | None) -> Path:
        if path is None:
            raise ValueError(f"{self.name}: `{arg}` is required ({self.checkpoints[arg].hub_id})")
        if problem := self.checkpoints[arg].problem(path):
            raise FileNotFoundError(f"{self.name}.{arg}: {problem}")
        return Path(path)

    @torch.inference_mode()
    def score(self, images: Images, prompts: str | Sequence[str], batch_size: int = 16) -> Scores:
        """Score every image against its prompt (one prompt for all, or one per image), `batch_size` at a time."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(images)
        prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
        if len(prompts) != n:
            raise ValueError(f"{self.name}: {n} images but {len(prompts)} prompts")
        values = np.full(n, np.nan)
        skipped = []
        pending: list[tuple[int, Image.Image]] = []
        for i, image in enumerate(_iter_images(images)):
            if image is None:
                skipped.append(i)
                continue
            pending.append((i, image))
            if len(pending) == batch_size:
                self._fill(values, pending, prompts)
                pending = []
        if pending:
            self._fill(values, pending, prompts)
        return Scores(values, tuple(skipped))

    def _fill(self, values: np.ndarray, batch: list[tuple[int, Image.Image]], prompts: list[str]) -> None:
        index = [i for i, _ in batch]
        scores = self._score_batch([im for _, im in batch], [prompts[i] for i in index])
        values[index] = scores.double().cpu().numpy()

    @abc.abstractmethod
    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """Scores (B,) for decoded images in their original mode."""


def _iter_images(images: Images) -> Iterator[Image.Image | None]:
    if isinstance(images, np.ndarray) and (images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3):
        raise ValueError(f"image arrays must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    for item in images:
        yield decode(item)


# What PIL raises for bytes that are not a (complete) image.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def decode(item: ImageItem) -> Image.Image | None:
    """A fully loaded PIL image in its stored mode, or None when encoded bytes or a file do not decode."""
    if isinstance(item, Image.Image):
        try:
            item.load()  # an Image.open()ed file decodes lazily: make a truncated one fail here
        except _DECODE_ERRORS:
            return None
        return item
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 3 or item.shape[-1] != 3:
            raise ValueError(f"image arrays must be uint8 (H, W, 3), got {item.dtype} {item.shape}")
        return Image.fromarray(item)
    if isinstance(item, (bytes, bytearray)):
        source = io.BytesIO(item)
    elif isinstance(item, (str, os.PathLike)):
        if not Path(item).is_file():
            raise FileNotFoundError(f"image file '{item}' not found")
        source = item
    else:
        raise TypeError(f"cannot score an image of type {type(item).__name__}: pass PIL images, uint8 arrays, "
                        "encoded bytes or file paths")
    try:
        with Image.open(source) as image:
            image.load()  # decode now: a truncated file fails here, not mid-batch
            return image.copy()
    except _DECODE_ERRORS:
        return None


# ------------------------------------------------------------------------------------------- preprocessing

def clip_transform(image: Image.Image, size: int) -> torch.Tensor:
    """OpenAI CLIP's `_transform` (also ImageReward's): PIL bicubic resize of the shorter side to `size`, centre crop
    (torchvision's rounding), then RGB, [0, 1], CLIP normalisation. Returns (3, size, size)."""
    image = TF.center_crop(TF.resize(image, size, interpolation=TF.InterpolationMode.BICUBIC), [size, size])
    return TF.normalize(TF.to_tensor(image.convert("RGB")), CLIP_MEAN, CLIP_STD)


# ---------------------------------------------------------------------------------------------- checkpoints

def load_state_dict_file(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A PyTorch checkpoint of tensors (weights_only: a pickle with code in it is refused, not run)."""
    state = load_or_explain(path, what, "download it again: a file that is not a PyTorch checkpoint of tensors is "
                            "refused, never unpickled", lambda file: torch.load(file, map_location="cpu",
                                                                                weights_only=True),
                            error=CheckpointMismatch)
    if not isinstance(state, Mapping):
        raise CheckpointMismatch(f"{what}: '{path}' holds a {type(state).__name__}, not a state dict")
    return dict(state)


def check_state_dict(expected: Mapping[str, torch.Size], found: Mapping[str, torch.Tensor], path: Path,
                     what: str, ignore_unexpected: Sequence[str] = ()) -> None:
    """Raise CheckpointMismatch naming `path` and a few offending keys unless `found` has exactly the expected keys
    and shapes (keys starting with an `ignore_unexpected` prefix may be extra)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(k for k in set(found) - set(expected) if not k.startswith(tuple(ignore_unexpected)))
    mismatched = sorted(f"{k} {tuple(found[k].shape)} vs {tuple(expected[k])}"
                        for k in set(expected) & set(found) if tuple(found[k].shape) != tuple(expected[k]))
    if missing or unexpected or mismatched:
        raise CheckpointMismatch(
            f"{what}: '{path}' does not fit the expected architecture: " + "; ".join(
                f"{len(keys)} {label} (e.g. {', '.join(keys[:4])})" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
                if keys))


@contextlib.contextmanager
def quiet_loading():
    """transformers prints a loading report for every mismatch and open_clip warns that a model it builds is
    random; the scorers load the weights themselves and say what is wrong in one error."""
    from transformers.utils import logging as hf_logging
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(disabled)
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_pretrained(cls: Any, path: Path, what: str) -> torch.nn.Module:
    """`cls.from_pretrained` on a local hub-layout directory, fp32, eval mode; missing or mis-shaped weights raise
    CheckpointMismatch naming the weights file (transformers would otherwise initialise them randomly)."""
    with quiet_loading():
        model, info = cls.from_pretrained(path, local_files_only=True, ignore_mismatched_sizes=True,
                                          output_loading_info=True, dtype=torch.float32)
    missing, mismatched = sorted(info["missing_keys"]), sorted(str(k) for k in info["mismatched_keys"])
    if missing or mismatched:
        weights = next((path / name for name in HF_MODEL_FILES[1] if (path / name).is_file()), path)
        raise CheckpointMismatch(
            f"{what}: '{weights}' does not fit {cls.__name__} as configured by '{path / 'config.json'}': " + "; ".join(
                f"{len(keys)} {label} (e.g. {', '.join(keys[:4])})" for label, keys in
                (("missing keys", missing), ("shape mismatches", mismatched)) if keys))
    return model.eval()


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)
