"""Image conventions: uint8 arrays (N, H, W, 3) on disk and in numpy; float tensors (N, 3, H, W) in [-1, 1]
for models (the diffusers VAE convention)."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes, what: str) -> np.ndarray:
    """Decode stored image bytes; a corrupt image names the record it came from."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises several unrelated types for bad bytes
        raise ValueError(f"corrupt image in {what}: {e}") from e


def fit_square(image: np.ndarray, size: int) -> np.ndarray:
    """`image` (H, W, 3) uint8 at size x size: the shorter side resized to `size` (bilinear) and the centre
    cropped, as the official Diffusion-DPO data pipeline does (torchvision Resize(size) then CenterCrop(size) on a
    PIL image; the LRM's official code resizes to (size, size) instead, the same on square images). An image
    already size x size is returned as it is."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    # torchvision's output size: the shorter side becomes `size`, the longer one is scaled and truncated.
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    return np.asarray(resized.crop((left, top, left + size, top + size)))
