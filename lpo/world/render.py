"""The Shapes world renderer: draws a Scene as an anti-aliased uint8 RGB image, optionally with defects.

Lengths are set for 32-pixel images and scale with the image size. Every random draw comes from the caller's
numpy Generator, and the clean geometry is drawn before any defect parameter, so a defective render and the
clean render from the same generator state show the same shape in the same place.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from lpo.world.grammar import BACKGROUNDS, COLORS, Scene

DEFECTS = ("blur", "noise", "low_contrast", "clipping", "bleeding")

MIN_IMAGE_SIZE = 16
_SUPERSAMPLE = 4
# Bounding extent as a fraction of the image side. A small shape spans ~3 latent pixels of the 4x-downsampling
# VAE: at 0.28 (2.2 pixels) its reconstructions kept the shape of 68% of small squares and 8% of small crosses
# (judged; 0.85 of all shapes at 0.38 against 0.70).
_EXTENT = {"small": 0.38, "large": 0.6}
_REGION = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
           "center": (0.5, 0.5)}
_BORDERS = ("left", "right", "top", "bottom")
_ARM = 0.4  # half the cross's arm thickness in unit coordinates: arms are 40% of its extent thick
_UNIT_POLYGONS = {  # vertices in [-1, 1]^2, y pointing down
    "square": ((-1, -1), (1, -1), (1, 1), (-1, 1)),
    "diamond": ((0, -1), (1, 0), (0, 1), (-1, 0)),
    "triangle": ((0, -1), (1, 1), (-1, 1)),
    "cross": ((-1, -_ARM), (-_ARM, -_ARM), (-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM),
              (1, _ARM), (_ARM, _ARM), (_ARM, 1), (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM)),
}
_UNIT_CIRCLE = tuple((math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 96, endpoint=False))


def render(scene: Scene, rng: np.random.Generator, image_size: int = 32,
           defects: Mapping[str, float] | None = None) -> np.ndarray:
    """Render `scene` as a uint8 (H, W, 3) image; `defects` maps defect names to severities in [0, 1]."""
    _check_size(image_size)
    defects = _check_defects(defects)
    scale = image_size / 32
    shape = _draw_shape(scene, rng, image_size)
    color = _jitter_color(COLORS[scene.color], rng)
    background = _jitter_color(BACKGROUNDS[scene.background], rng)
    if "clipping" in defects:
        shape = _clip_at_border(shape, scene.position, defects["clipping"], rng, image_size)
    image = np.broadcast_to(background, (image_size, image_size, 3)).astype(np.float32)
    if "bleeding" in defects:
        image = _composite(image, color, _halo(shape, defects["bleeding"], rng, image_size, scale))
    image = _composite(image, color, _coverage(shape, image_size))
    image = _degrade(image, defects, rng, scale)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _degrade(image: np.ndarray, defects: dict[str, float], rng: np.random.Generator, scale: float) -> np.ndarray:
    """The whole-image defects; noise comes last so that neither blur nor low contrast softens it."""
    if "blur" in defects:
        image = gaussian_blur(image, (0.6 + 1.4 * defects["blur"]) * scale)
    if "low_contrast" in defects:
        mean = image.mean(axis=(0, 1), keepdims=True)
        image = mean + (image - mean) * (1 - 0.75 * defects["low_contrast"])
    if "noise" in defects:
        block = max(1, round(2 * scale))  # 2x2 at 32 px: coarse enough for a 4x-downsampling VAE to carry
        image = image + _block_noise(rng, image.shape[0], 10 + 40 * defects["noise"], block)
    return image


def render_batch(scenes: Sequence[Scene], rng: np.random.Generator, image_size: int = 32,
                 defects: Sequence[Mapping[str, float]] | None = None) -> np.ndarray:
    """Render scenes in order from one generator; uint8 (N, H, W, 3)."""
    _check_size(image_size)
    if defects is not None and len(defects) != len(scenes):
        raise ValueError(f"render_batch got {len(scenes)} scenes but {len(defects)} defect mappings")
    out = np.empty((len(scenes), image_size, image_size, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        out[i] = render(scene, rng, image_size, None if defects is None else defects[i])
    return out


def random_defects(rng: np.random.Generator, max_defects: int = 2) -> dict[str, float]:
    """1..max_defects distinct defects with severities in [0.4, 1.0], keyed in DEFECTS order."""
    if not 1 <= max_defects <= len(DEFECTS):
        raise ValueError(f"max_defects={max_defects} must be in [1, {len(DEFECTS)}]")
    count = int(rng.integers(1, max_defects + 1))
    chosen = sorted(rng.choice(len(DEFECTS), size=count, replace=False))
    return {DEFECTS[i]: float(rng.uniform(0.4, 1.0)) for i in chosen}


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over the first two axes, edges extended (float in, float32 out)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = np.asarray(image, dtype=np.float32)
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        out = sum(w * np.take(padded, np.arange(k, k + n), axis=axis) for k, w in enumerate(taps))
    return out.astype(np.float32)


@dataclass(frozen=True)
class _Shape:
    """A shape's outline in image pixels: unit vertices scaled by `half` and centred on (cx, cy)."""
    unit: np.ndarray
    half: float
    cx: float
    cy: float

    def vertices(self, dx: float = 0.0, dy: float = 0.0, grow: float = 1.0) -> np.ndarray:
        return self.unit * self.half * grow + (self.cx + dx, self.cy + dy)

    def bounds(self) -> tuple[float, float, float, float]:
        vertices = self.vertices()
        (x0, y0), (x1, y1) = vertices.min(axis=0), vertices.max(axis=0)
        return x0, y0, x1, y1


def _check_size(image_size: int) -> None:
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size} is too small: the Shapes renderer needs at least "
                         f"{MIN_IMAGE_SIZE} pixels")


def _check_defects(defects: Mapping[str, float] | None) -> dict[str, float]:
    checked = {}
    for name, severity in (defects or {}).items():
        if name not in DEFECTS:
            raise ValueError(f"unknown defect {name!r}: known defects are {', '.join(DEFECTS)}")
        if not 0 <= severity <= 1:
            raise ValueError(f"defect {name!r} has severity {severity}: it must be in [0, 1]")
        if severity > 0:
            checked[name] = float(severity)
    return checked


def _draw_shape(scene: Scene, rng: np.random.Generator, size: int) -> _Shape:
    extent = _EXTENT[scene.size] * size * rng.uniform(0.9, 1.1)
    angle = math.radians(rng.uniform(-8, 8))
    jitter = rng.uniform(-0.05, 0.05, size=2) * size
    unit = _unit_outline(scene.shape, angle)
    shape = _Shape(unit, extent / 2, 0.0, 0.0)
    fx, fy = _REGION[scene.position]
    x0, y0, x1, y1 = shape.bounds()
    margin = max(1.0, 0.035 * size)
    # Large shapes near a border are pulled inwards so that a clean render is never cut off.
    cx = np.clip(fx * size + jitter[0], margin - x0, size - margin - x1)
    cy = np.clip(fy * size + jitter[1], margin - y0, size - margin - y1)
    return replace(shape, cx=float(cx), cy=float(cy))


def _unit_outline(shape: str, angle: float) -> np.ndarray:
    """The shape's vertices rotated by `angle` and rescaled so its bounding box spans 2 on the longer side."""
    if shape == "circle":
        return np.array(_UNIT_CIRCLE)
    vertices = np.array(_UNIT_POLYGONS[shape], dtype=np.float64)
    c, s = math.cos(angle), math.sin(angle)
    vertices = vertices @ np.array([[c, s], [-s, c]])
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    return (vertices - (lo + hi) / 2) * (2 / (hi - lo).max())


def _jitter_color(rgb: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.array(rgb) + rng.integers(-8, 9, size=3), 0, 255).astype(np.float32)


def _clip_at_border(shape: _Shape, position: str, severity: float, rng: np.random.Generator,
                    size: int) -> _Shape:
    """Move the shape past its nearest border so that a share 0.3 + 0.4 * severity of its extent is cut off."""
    random_border = _BORDERS[rng.integers(len(_BORDERS))]  # drawn always, so later draws do not depend on position
    border = position if position in _BORDERS else random_border
    cut = 0.3 + 0.4 * severity
    x0, y0, x1, y1 = shape.bounds()
    w, h = x1 - x0, y1 - y0
    cx, cy = shape.cx, shape.cy
    if border == "left":
        cx += -cut * w - x0
    elif border == "right":
        cx += size + cut * w - x1
    elif border == "top":
        cy += -cut * h - y0
    else:
        cy += size + cut * h - y1
    return replace(shape, cx=cx, cy=cy)


def _coverage(shape: _Shape, size: int, dx: float = 0.0, dy: float = 0.0, grow: float = 1.0) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], (H, W): drawn at 4x and box-filtered down."""
    big = size * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    points = [tuple(p) for p in shape.vertices(dx, dy, grow) * _SUPERSAMPLE]
    ImageDraw.Draw(canvas).polygon(points, fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255


def _halo(shape: _Shape, severity: float, rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Colour bleeding: a blurred copy of the shape, slightly grown and offset, at alpha 0.3 + 0.5 * severity."""
    direction = rng.uniform(0, 2 * math.pi)
    offset = 1.5 * scale
    copy = _coverage(shape, size, offset * math.cos(direction), offset * math.sin(direction), grow=1.15)
    spread = np.clip(2 * gaussian_blur(copy, 1.5 * scale), 0, 1)
    return spread * (0.3 + 0.5 * severity)


def _composite(image: np.ndarray, color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return image * (1 - a) + color * a


def _block_noise(rng: np.random.Generator, size: int, std: float, block: int) -> np.ndarray:
    cells = -(-size // block)
    noise = rng.normal(0, std, size=(cells, cells, 3)).astype(np.float32)
    return noise.repeat(block, axis=0).repeat(block, axis=1)[:size, :size]
