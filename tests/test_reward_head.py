"""The LRM reward head: the Triton path and the PyTorch reference against an independent fp64 loop definition."""
import os

import torch

# Without CUDA the Triton path runs on the CPU interpreter, which triton picks when it is first imported.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from lpo_kernels import reward_head, reward_head_reference  # noqa: E402
from lpo_kernels.reward_head import INTERPRETED, RewardHeadFunction, fused_pool  # noqa: E402

CUDA = torch.cuda.is_available()
if not CUDA and not INTERPRETED:
    raise RuntimeError("triton was imported before this module set TRITON_INTERPRET=1 (another test module imported "
                       "it first): set the variable in tests/conftest.py when CUDA is absent")
DEVICE = "cuda" if CUDA else "cpu"
LOGIT_SCALE = 2.6592  # the paper's initial value
# (C, H, W) per map, mid block last; the second set has odd spatial sizes and channels that are not powers of two.
MAPS = {"pow2": ([(4, 8, 8), (8, 4, 4), (8, 2, 2)], (8, 2, 2), 16),
        "odd": ([(3, 5, 7), (6, 3, 5), (5, 2, 3)], (7, 3, 3), 12)}
DTYPES = [pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
          pytest.param(torch.float16, 1e-4, 1e-4, id="fp16"),
          # The interpreter's bf16 is broken (environment.md), so bf16 runs on a GPU only.
          pytest.param(torch.bfloat16, 1e-4, 1e-4, marks=pytest.mark.skipif(not CUDA, reason="bf16 needs CUDA"),
                       id="bf16")]


def make_inputs(maps, mid, d, batch, vfe, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = [torch.randn(batch, *shape, generator=gen) for shape in [*maps, mid]]
    uncond = torch.randn(batch, *mid, generator=gen) if vfe else None
    weight = torch.randn(d, sum(shape[0] for shape in [*maps, mid]), generator=gen)
    text = torch.randn(batch, d, generator=gen)
    cast = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return [cast(x) for x in features], cast(uncond), cast(weight), cast(text), cast(torch.tensor(LOGIT_SCALE))


def naive_pooled(features, mid_uncond, gs) -> list[list[float]]:
    """Per image: every channel's spatial mean, in maps order, mid block VFE-combined (exact sums in fp64)."""
    pooled = []
    for b in range(features[0].shape[0]):
        row = []
        for i, x in enumerate(features):
            for c in range(x.shape[1]):
                mean = math.fsum(x[b, c].double().flatten().tolist()) / (x.shape[2] * x.shape[3])
                if i == len(features) - 1 and mid_uncond is not None:
                    uncond = math.fsum(mid_uncond[b, c].double().flatten().tolist()) / (x.shape[2] * x.shape[3])
                    mean = uncond + gs * (mean - uncond)
                row.append(mean)
        pooled.append(row)
    return pooled


def naive_head(features, mid_uncond, gs, weight, text, logit_scale) -> torch.Tensor:
    weight_rows, scale = weight.double().tolist(), math.exp(logit_scale.double().item())
    scores = []
    for row, t in zip(naive_pooled(features, mid_uncond, gs), text.double().tolist()):
        visual = [math.fsum(w * v for w, v in zip(w_row, row)) for w_row in weight_rows]
        dot = math.fsum(v * u for v, u in zip(visual, t))
        scores.append(scale * dot / math.sqrt(math.fsum(v * v for v in visual) * math.fsum(u * u for u in t)))
    return torch.tensor(scores, dtype=torch.float64)


def check_close(got, want, atol, rtol):
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double().cpu(), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("vfe", [False, True], ids=["vfe_off", "vfe_on"])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("stages", [1, 3])
@pytest.mark.parametrize("shapes", list(MAPS))
def test_both_backends_match_the_naive_head(shapes, stages, batch, vfe, dtype, atol, rtol):
    maps, mid, d = MAPS[shapes]
    inputs = make_inputs(maps[:stages], mid, d, batch, vfe, dtype, seed=batch * 10 + stages)
    want = naive_head(inputs[0], inputs[1], 7.5, *inputs[2:])
    check_close(reward_head_reference(inputs[0], inputs[1], 7.5, *inputs[2:]), want, atol, rtol)
    check_close(reward_head(inputs[0], inputs[1], 7.5, *inputs[2:], backend="triton"), want, atol, rtol)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_guidance_scale_one_is_vfe_off(backend):
    maps, mid, d = MAPS["odd"]
    features, uncond, weight, text, logit_scale = make_inputs(maps, mid, d, batch=3, vfe=True, seed=1)
    on = reward_head(features, uncond, 1.0, weight, text, logit_scale, backend=backend)
    off = reward_head(features, None, 1.0, weight, text, logit_scale, backend=backend)
    torch.testing.assert_close(on, off, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(on, reward_head(features, uncond, 7.5, weight, text, logit_scale, backend=backend))


def test_fused_pool_writes_every_pooled_channel():
    maps, mid, d = MAPS["odd"]
    features, uncond, *_ = make_inputs(maps, mid, d, batch=3, vfe=True, seed=2)
    out = torch.full((3, sum(shape[0] for shape in [*maps, mid])), float("nan"), device=DEVICE)
    assert fused_pool(features, uncond, 7.5, out=out) is out
    want = torch.tensor(naive_pooled(features, uncond, 7.5), dtype=torch.float64)
    torch.testing.assert_close(out.double().cpu(), want, atol=1e-6, rtol=1e-6)


def test_fused_pool_rejects_an_out_buffer_of_the_wrong_shape():
    maps, mid, d = MAPS["pow2"]
    features, uncond, *_ = make_inputs(maps, mid, d, batch=2, vfe=True)
    with pytest.raises(ValueError, match="out must be a contiguous float32 \\[2, 28\\]"):
        fused_pool(features, uncond, 7.5, out=torch.empty(2, 27, device=DEVICE))


def test_wide_head_splits_channels_batch_and_embedding():
    """Past one projection block in every direction: 2 channel chunks, 2 batch blocks, 5 x 64 and 2 x 256 of D."""
    features, uncond, weight, text, logit_scale = make_inputs([(300, 2, 2)], (220, 1, 1), 260, batch=17, vfe=True)
    want = naive_head(features, uncond, 7.5, weight, text, logit_scale)
    check_close(reward_head(features, uncond, 7.5, weight, text, logit_scale, backend="triton"), want, 1e-5, 1e-5)


def test_non_contiguous_maps_are_read_correctly():
    maps, mid, d = MAPS["odd"]
    features, uncond, weight, text, logit_scale = make_inputs(maps, mid, d, batch=3, vfe=True, seed=3)
    strided = [x.transpose(2, 3).contiguous().transpose(2, 3) for x in features[:-1]]
    strided.append(features[-1].contiguous(memory_format=torch.channels_last))
    assert not any(x.is_contiguous() for x in strided)
    uncond_strided = uncond.contiguous(memory_format=torch.channels_last)
    got = reward_head(strided, uncond_strided, 7.5, weight, text, logit_scale, backend="triton")
    check_close(got, naive_head(features, uncond, 7.5, weight, text, logit_scale), 1e-5, 1e-5)


def leaves(inputs, dtype):
    features, uncond, weight, text, logit_scale = inputs
    clone = lambda t: None if t is None else t.detach().to(dtype).requires_grad_()  # noqa: E731
    return [clone(x) for x in features], clone(uncond), clone(weight), clone(text), clone(logit_scale)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-3)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("vfe", [False, True], ids=["vfe_off", "vfe_on"])
def test_gradients_of_the_triton_function_match_the_reference(vfe, dtype, tol):
    maps, mid, d = MAPS["odd"]
    inputs = make_inputs(maps, mid, d, batch=3, vfe=vfe, seed=4)
    upstream = torch.randn(3, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    grads = {}
    for backend in ("triton", "reference"):
        features, uncond, weight, text, logit_scale = leaves(inputs, dtype)
        (reward_head(features, uncond, 7.5, weight, text, logit_scale, backend=backend) * upstream).sum().backward()
        tensors = [*features, weight, text, logit_scale] + ([uncond] if vfe else [])
        assert all(t.grad is not None and t.grad.dtype == dtype and t.grad.shape == t.shape for t in tensors)
        grads[backend] = [t.grad.float() for t in tensors]
    for got, want in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("trained", ["features", "weight", "text", "logit_scale"])
def test_gradient_of_one_trained_input_alone_matches_the_reference(trained):
    """Only some inputs need a gradient (a frozen text tower, a frozen UNet): backward must skip the rest."""
    maps, mid, d = MAPS["pow2"]
    names = ["features", "uncond", "weight", "text", "logit_scale"]
    grads = []
    for backend in ("triton", "reference"):
        inputs = dict(zip(names, make_inputs(maps, mid, d, batch=2, vfe=True, seed=6)))
        leaves = inputs[trained] if trained == "features" else [inputs[trained]]
        for t in leaves:
            t.requires_grad_()
        reward_head(inputs["features"], inputs["uncond"], 7.5, inputs["weight"], inputs["text"],
                    inputs["logit_scale"], backend=backend).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(CUDA, reason="checks the CPU dispatch")
def test_auto_backend_is_the_reference_off_cuda(monkeypatch):
    maps, mid, d = MAPS["pow2"]
    inputs = make_inputs(maps, mid, d, batch=2, vfe=True, seed=7)

    def no_triton(*args):
        raise AssertionError("backend='auto' launched the Triton head on CPU tensors")

    monkeypatch.setattr(RewardHeadFunction, "apply", no_triton)
    got = reward_head(inputs[0], inputs[1], 7.5, *inputs[2:])
    assert torch.equal(got, reward_head_reference(inputs[0], inputs[1], 7.5, *inputs[2:]))


@pytest.mark.skipif(CUDA, reason="checks the CPU-without-interpreter error")
def test_triton_backend_without_cuda_or_interpreter_says_how_to_fix():
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "kernels"), env.get("PYTHONPATH", "")])
    call = ("import torch; from lpo_kernels import reward_head; "
            "reward_head([torch.ones(1, 2, 1, 1)], None, 1.0, torch.ones(3, 2), torch.ones(1, 3), torch.zeros(()), "
            "backend='triton')")
    result = subprocess.run([sys.executable, "-c", call], env=env, cwd=root, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "RuntimeError: reward_head backend='triton' got cpu tensors" in result.stderr
    assert "TRITON_INTERPRET=1" in result.stderr


BAD = {
    "features": lambda f, u, w, t, s: ([], u, w, t, s, "auto"),
    r"features\[1\]": lambda f, u, w, t, s: ([f[0], f[1][:1], f[2]], u, w, t, s, "auto"),
    r"features\[0\] is torch.int64": lambda f, u, w, t, s: ([f[0].long(), *f[1:]], u, w, t, s, "auto"),
    "mid_uncond": lambda f, u, w, t, s: (f, u[:, :, :1], w, t, s, "auto"),
    r"weight has shape \(16, 27\)": lambda f, u, w, t, s: (f, u, w[:, 1:], t, s, "auto"),
    "text has shape": lambda f, u, w, t, s: (f, u, w, t[:, 1:], s, "auto"),
    "logit_scale has 2 elements": lambda f, u, w, t, s: (f, u, w, t, s.repeat(2), "auto"),
    "backend='cuda'": lambda f, u, w, t, s: (f, u, w, t, s, "cuda"),
}


@pytest.mark.parametrize("message", list(BAD))
def test_bad_inputs_are_named(message):
    maps, mid, d = MAPS["pow2"]
    f, u, w, t, s, backend = BAD[message](*make_inputs(maps, mid, d, batch=2, vfe=True))
    with pytest.raises(ValueError, match=message):
        reward_head(f, u, 7.5, w, t, s, backend=backend)
