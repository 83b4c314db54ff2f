"""The LRM reward head (paper Sec. 4.1, Fig. 3) fused in Triton, with its autograd Function and the backend switch.

score_b = exp(logit_scale) * cos(W @ concat_i(mean_hw F_i[b]), T_b), the mid block (last map) VFE-combined.

Forward passes. The feature maps dominate the bytes, so each is read exactly once: one pooling launch per map
reduces H*W for a block of channels and writes its slice of a [B, sum C] fp32 pooled vector (no concatenated copy of
the maps); with VFE the mid block's conditional and unconditional maps are read by the same programs and combined
there. The projection then reads W once per 16 images, split over sum C into partial sums that the score kernel
adds in a fixed order (no atomics: GPU results repeat bit for bit) before normalising and scaling.
Pooling is deliberately not fused with the projection: W (768 x 4800 for SD1.5) holds more elements than one SD1.5
image's feature maps, so multiplying by W inside each (image, channel block) program would re-read W once per image.

Backward. The Function saves only the small pooled vector (W, T and logit_scale are held by autograd anyway).
backward re-runs the tail (projection, normalisation, cosine; O(B * D * sum C) flops) under PyTorch autograd from
it, then spreads each pooled gradient evenly over its map, since d mean_hw / d x = 1 / (H * W); the map gradients
are returned as broadcast views, so this head writes no map-sized buffer.

Layout. Maps must be NCHW; any other strides (channels_last, slices) are copied with .contiguous() first.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from triton.runtime.interpreter import InterpretedFunction

from lpo_kernels.reference import reward_head_reference, score_pooled

BACKENDS = ("auto", "triton", "reference")
MAP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
POOL_TILE = 2048   # elements per pooling program and step: wide enough for vector loads, small enough for registers
BLOCK_B = 16       # images per projection program; tl.dot needs at least 16 rows
PROJ_BLOCK_D = 64
PROJ_BLOCK_K = 32
K_CHUNK = 512      # pooled channels per projection program: ~100+ programs for SD1.5/SDXL even at batch 1
SCORE_BLOCK_D = 256
NORM_EPS = 1e-12   # as F.normalize


@triton.jit
def _pool_kernel(x_ptr, u_ptr, out_ptr, C, HW, out_stride, col_offset, inv_hw, guidance_scale,
                 HAS_UNCOND: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = channels < C
    rows = b * C * HW + channels[:, None].to(tl.int64) * HW
    acc = tl.zeros((BLOCK_C, BLOCK_HW), tl.float32)
    acc_uncond = tl.zeros((BLOCK_C, BLOCK_HW), tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = in_c[:, None] & (hw < HW)[None, :]
        acc += tl.load(x_ptr + rows + hw[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_UNCOND:
            acc_uncond += tl.load(u_ptr + rows + hw[None, :], mask=mask, other=0.0).to(tl.float32)
    pooled = tl.sum(acc, axis=1) * inv_hw
    if HAS_UNCOND:
        uncond = tl.sum(acc_uncond, axis=1) * inv_hw
        pooled = uncond + guidance_scale * (pooled - uncond)
    tl.store(out_ptr + b * out_stride + col_offset + channels, pooled, mask=in_c)


@triton.jit
def _project_kernel(pooled_ptr, w_ptr, partial_ptr, B, D, K, k_chunk,
                    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    outs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(2)
    acc = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
    for k0 in range(0, k_chunk, BLOCK_K):
        ks = split * k_chunk + k0 + tl.arange(0, BLOCK_K)
        pooled = tl.load(pooled_ptr + rows[:, None] * K + ks[None, :],
                         mask=(rows < B)[:, None] & (ks < K)[None, :], other=0.0)
        w_t = tl.load(w_ptr + outs[None, :].to(tl.int64) * K + ks[:, None],
                      mask=(outs < D)[None, :] & (ks < K)[:, None], other=0.0).to(tl.float32)
        # ieee: TF32 would cost ~1e-3 relative error on a product that is a rounding error of the run time
        acc = tl.dot(pooled, w_t, acc, input_precision="ieee")
    tl.store(partial_ptr + split * B * D + rows[:, None] * D + outs[None, :], acc,
             mask=(rows < B)[:, None] & (outs < D)[None, :])


@triton.jit
def _score_kernel(partial_ptr, text_ptr, logit_scale_ptr, score_ptr, B, D, splits, eps, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    vv = tl.zeros((BLOCK_D,), tl.float32)
    vt = tl.zeros((BLOCK_D,), tl.float32)
    tt = tl.zeros((BLOCK_D,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        in_d = ds < D
        v = tl.zeros((BLOCK_D,), tl.float32)
        for s in range(0, splits):
            v += tl.load(partial_ptr + s * B * D + b * D + ds, mask=in_d, other=0.0)
        t = tl.load(text_ptr + b * D + ds, mask=in_d, other=0.0).to(tl.float32)
        vv += v * v
        vt += v * t
        tt += t * t
    norms = tl.maximum(tl.sqrt(tl.sum(vv, axis=0)), eps) * tl.maximum(tl.sqrt(tl.sum(tt, axis=0)), eps)
    scale = tl.exp(tl.load(logit_scale_ptr).to(tl.float32))
    tl.store(score_ptr + b, scale * tl.sum(vt, axis=0) / norms)


# triton.jit picks the CPU interpreter from TRITON_INTERPRET, and triton.language's own helpers are decorated when
# triton is first imported, so the variable must be set before that; record what the kernels actually got.
INTERPRETED = isinstance(_pool_kernel, InterpretedFunction)


def _require_launchable(device: torch.device) -> None:
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"reward_head backend='triton' got {device.type} tensors: the Triton head needs CUDA "
                           "tensors, or TRITON_INTERPRET=1 set before triton is first imported to run it on the CPU "
                           "interpreter; backend='auto' picks the PyTorch reference off CUDA")


def _on(device: torch.device):
    """Triton launches on the current CUDA device, which need not be the tensors' one (e.g. cuda:1 without
    torch.cuda.set_device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_maps(features: Sequence[torch.Tensor], mid_uncond: torch.Tensor | None) -> None:
    if len(features) == 0:
        raise ValueError("reward_head: `features` is empty; pass the selected down-block maps, mid block last")
    batch = features[0].shape[0] if features[0].dim() == 4 else None
    for i, x in enumerate(features):
        if x.dim() != 4 or x.shape[0] != batch or x.numel() == 0:
            raise ValueError(f"reward_head: features[{i}] has shape {tuple(x.shape)}; every map must be a "
                             f"non-empty [B, C, H, W] with the same B ({batch})")
        if x.dtype not in MAP_DTYPES:
            raise ValueError(f"reward_head: features[{i}] is {x.dtype}; use float32, float16 or bfloat16")
        if x.device != features[0].device:
            raise ValueError(f"reward_head: features[{i}] is on {x.device}, features[0] on {features[0].device}")
    if mid_uncond is not None:
        if mid_uncond.shape != features[-1].shape or mid_uncond.device != features[-1].device:
            raise ValueError(f"reward_head: mid_uncond {tuple(mid_uncond.shape)} on {mid_uncond.device} must match "
                             f"the mid block features[-1] {tuple(features[-1].shape)} on {features[-1].device}")
        if mid_uncond.dtype not in MAP_DTYPES:
            raise ValueError(f"reward_head: mid_uncond is {mid_uncond.dtype}; use float32, float16 or bfloat16")


def _check_head(features: Sequence[torch.Tensor], weight: torch.Tensor, text: torch.Tensor,
                logit_scale: torch.Tensor) -> None:
    batch, channels, device = features[0].shape[0], sum(x.shape[1] for x in features), features[0].device
    if weight.dim() != 2 or weight.shape[1] != channels:
        raise ValueError(f"reward_head: weight has shape {tuple(weight.shape)}; the visual projection must be "
                         f"[D, {channels}] (D x the channels of all feature maps together)")
    if tuple(text.shape) != (batch, weight.shape[0]):
        raise ValueError(f"reward_head: text has shape {tuple(text.shape)}; expected [B, D] = "
                         f"[{batch}, {weight.shape[0]}] (one projected text embedding per image)")
    if logit_scale.numel() != 1:
        raise ValueError(f"reward_head: logit_scale has {logit_scale.numel()} elements; expected a scalar")
    for name, t in (("weight", weight), ("text", text), ("logit_scale", logit_scale)):
        if t.device != device:
            raise ValueError(f"reward_head: {name} is on {t.device} but the feature maps are on {device}")
        if not t.is_floating_point():
            raise ValueError(f"reward_head: {name} is {t.dtype}; expected a floating-point tensor")


def fused_pool(features: Sequence[torch.Tensor], mid_uncond: torch.Tensor | None, guidance_scale: float,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton `reference.pool_features`: [B, sum C] fp32 written into `out` (allocated if None), each map read once."""
    _check_maps(features, mid_uncond)
    _require_launchable(features[0].device)
    batch, channels = features[0].shape[0], sum(x.shape[1] for x in features)
    if out is None:
        out = torch.empty(batch, channels, dtype=torch.float32, device=features[0].device)
    elif out.shape != (batch, channels) or out.dtype != torch.float32 or not out.is_contiguous() \
            or out.device != features[0].device:
        raise ValueError(f"fused_pool: out must be a contiguous float32 [{batch}, {channels}] tensor on "
                         f"{features[0].device}; got {out.dtype} {tuple(out.shape)} on {out.device}")
    offset = 0
    with _on(out.device):
        for i, x in enumerate(features):
            x = x.contiguous()
            uncond = mid_uncond.contiguous() if i == len(features) - 1 and mid_uncond is not None else None
            c, hw = x.shape[1], x.shape[2] * x.shape[3]
            block_hw = min(triton.next_power_of_2(hw), 1024)
            block_c = min(triton.next_power_of_2(c), max(1, POOL_TILE // block_hw))
            _pool_kernel[(batch, triton.cdiv(c, block_c))](
                x, x if uncond is None else uncond, out, c, hw, channels, offset, 1.0 / hw, float(guidance_scale),
                HAS_UNCOND=uncond is not None, BLOCK_C=block_c, BLOCK_HW=block_hw)
            offset += c
    return out


def _fused_score(pooled: torch.Tensor, weight: torch.Tensor, text: torch.Tensor,
                 logit_scale: torch.Tensor) -> torch.Tensor:
    """Triton `reference.score_pooled` for a contiguous fp32 [B, K] pooled vector: [B] fp32 scores."""
    _require_launchable(pooled.device)
    weight, text = weight.detach().contiguous(), text.detach().contiguous()
    (batch, k), d = pooled.shape, weight.shape[0]
    splits = triton.cdiv(k, K_CHUNK)
    partial = torch.empty(splits, batch, d, dtype=torch.float32, device=pooled.device)
    scores = torch.empty(batch, dtype=torch.float32, device=pooled.device)
    with _on(pooled.device):
        _project_kernel[(triton.cdiv(batch, BLOCK_B), triton.cdiv(d, PROJ_BLOCK_D), splits)](
            pooled, weight, partial, batch, d, k, K_CHUNK,
            BLOCK_B=BLOCK_B, BLOCK_D=PROJ_BLOCK_D, BLOCK_K=PROJ_BLOCK_K)
        _score_kernel[(batch,)](partial, text, logit_scale.detach().reshape(1), scores, batch, d, splits, NORM_EPS,
                                BLOCK_D=min(triton.next_power_of_2(d), SCORE_BLOCK_D))
    return scores


class RewardHeadFunction(torch.autograd.Function):
    """Triton forward; PyTorch backward from the saved pooled vector (see the module docstring)."""

    @staticmethod
    def forward(ctx, guidance_scale: float, weight: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                mid_uncond: torch.Tensor | None, *features: torch.Tensor) -> torch.Tensor:
        pooled = fused_pool(features, mid_uncond, guidance_scale)
        ctx.save_for_backward(pooled, weight, text, logit_scale)
        ctx.guidance_scale, ctx.has_uncond = guidance_scale, mid_uncond is not None
        ctx.maps = [(x.shape, x.dtype) for x in features]
        return _fused_score(pooled, weight, text, logit_scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_score: torch.Tensor):
        pooled, weight, text, logit_scale = ctx.saved_tensors
        needs_maps = any(ctx.needs_input_grad[4:])
        leaves = [t.detach().requires_grad_(need) for t, need in
                  zip((pooled, weight, text, logit_scale), (needs_maps, *ctx.needs_input_grad[1:4]))]
        wanted = [t for t in leaves if t.requires_grad]
        with torch.enable_grad():
            grads = iter(torch.autograd.grad(score_pooled(*leaves), wanted, grad_score) if wanted else ())
        grad_pooled, grad_weight, grad_text, grad_logit_scale = (next(grads) if t.requires_grad else None
                                                                 for t in leaves)
        grad_maps, grad_uncond, offset = [], None, 0
        for i, (shape, dtype) in enumerate(ctx.maps):
            mean_grad = grad_pooled[:, offset:offset + shape[1]] / (shape[2] * shape[3]) if needs_maps else None
            offset += shape[1]
            if mean_grad is not None and i == len(ctx.maps) - 1 and ctx.has_uncond:
                # VFE: pooled_mid = gs * pool(cond) + (1 - gs) * pool(uncond)
                grad_uncond = _spread((1 - ctx.guidance_scale) * mean_grad, shape, dtype)
                mean_grad = ctx.guidance_scale * mean_grad
            grad_maps.append(None if mean_grad is None else _spread(mean_grad, shape, dtype))
        return None, grad_weight, grad_text, grad_logit_scale, grad_uncond, *grad_maps


def _spread(mean_grad: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    return mean_grad.to(dtype)[:, :, None, None].expand(shape)


def reward_head(features: Sequence[torch.Tensor], mid_uncond: torch.Tensor | None, guidance_scale: float,
                weight: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                backend: str = "auto") -> torch.Tensor:
    """LRM scores [B] fp32 from text-conditioned feature maps [B, C_i, H_i, W_i] (mid block last).

    mid_uncond: the unconditional mid-block map, or None for VFE off (guidance_scale is then unused);
    weight: visual projection [D, sum C_i]; text: projected, unnormalised text embeddings [B, D];
    logit_scale: scalar, the score is exp(logit_scale) * cosine. backend: "auto" (Triton on CUDA tensors, the
    PyTorch reference elsewhere), "triton" (on CPU only under TRITON_INTERPRET=1) or "reference".
    Differentiable in features, mid_uncond, weight, text and logit_scale on every backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"reward_head: backend={backend!r}; choose one of {BACKENDS}")
    _check_maps(features, mid_uncond)
    _check_head(features, weight, text, logit_scale)
    if backend == "reference" or (backend == "auto" and not features[0].is_cuda):
        return reward_head_reference(features, mid_uncond, guidance_scale, weight, text, logit_scale)
    return RewardHeadFunction.apply(float(guidance_scale), weight, text, logit_scale, mid_uncond, *features)
