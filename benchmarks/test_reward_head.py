"""Fused Triton reward head vs the eager PyTorch reference at the LRM's real feature sizes (paper Sec. 4.1).

Forward with VFE on (gs 7.5) in bf16, as the LRM trains. Besides pytest-benchmark's wall time (each call ends in a
synchronize), extra_info holds the CUDA-event median, the feature-map read bandwidth it implies and, as the yardstick,
a device-to-device copy of the same number of bytes.
"""
from __future__ import annotations

import pytest
import torch

from lpo_kernels import reward_head, reward_head_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="times CUDA kernels and no CUDA device is visible; the CPU interpreter's "
                                       "timings mean nothing (correctness runs in tests/test_reward_head.py)")

# (C, H, W) of the selected down-block maps, the mid-block map, and the projection width D.
MODELS = {"sd15": ([(320, 64, 64), (640, 32, 32), (1280, 16, 16), (1280, 8, 8)], (1280, 8, 8), 768),
          "sdxl": ([(320, 128, 128), (640, 64, 64), (1280, 32, 32)], (1280, 32, 32), 1280)}
GUIDANCE_SCALE = 7.5
DTYPE = torch.bfloat16
LOGIT_SCALE = 2.6592


def make_inputs(model: str, batch: int):
    maps, mid, d = MODELS[model]
    gen = torch.Generator(device="cuda").manual_seed(batch)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device="cuda", dtype=DTYPE)  # noqa: E731
    features = [randn(batch, *shape) for shape in [*maps, mid]]
    weight = randn(d, sum(shape[0] for shape in [*maps, mid])) * 0.02  # the LRM's N(0, 0.02) init
    return features, randn(batch, *mid), GUIDANCE_SCALE, weight, randn(batch, d), \
        torch.tensor(LOGIT_SCALE, device="cuda")


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("batch", [1, 8, 32])
@pytest.mark.parametrize("model", list(MODELS))
def test_reward_head_forward(benchmark, cuda_ms, copy_gbps, report_row, model, batch, impl):
    inputs = make_inputs(model, batch)
    fused = lambda: reward_head(*inputs, backend="triton")  # noqa: E731
    reference = lambda: reward_head_reference(*inputs)  # noqa: E731
    # A fast wrong kernel is worth nothing: both compute in fp32 from the same bf16 maps.
    torch.testing.assert_close(fused(), reference(), atol=1e-3, rtol=1e-3)
    head = fused if impl == "fused" else reference

    def call():
        head()
        torch.cuda.synchronize()

    benchmark.pedantic(call, warmup_rounds=5, rounds=50)
    features, mid_uncond, _, weight, *_ = inputs
    map_bytes = sum(x.numel() * x.element_size() for x in [*features, mid_uncond])
    ms = cuda_ms(head)
    copy = copy_gbps(map_bytes)
    row = {"model": model, "batch": batch, "impl": impl, "median_ms": ms, "map_mb": map_bytes / 1e6,
           "weight_mb": weight.numel() * weight.element_size() / 1e6, "map_read_gbps": map_bytes / ms / 1e6,
           "copy_gbps": copy, "fraction_of_copy": map_bytes / ms / 1e6 / copy}
    benchmark.extra_info.update(row)
    report_row(row)
