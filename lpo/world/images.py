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
