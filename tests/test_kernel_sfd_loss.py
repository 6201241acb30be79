"""Fused SFD generator loss kernel vs the plain-torch reference (sfd_fast.losses.generator_loss).

CPU tier: Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set below before triton is
imported). GPU tier: run with TRITON_INTERPRET=0 on a CUDA machine and the same tests run natively.
Shapes are kept small: every interpreted program is a numpy loop.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (`pip install triton`); kernel tests skipped")

from sfd_fast.kernels import sfd_loss as K  # noqa: E402

from sfd_fast.losses import generator_loss  # noqa: E402

DEVICE = "cuda" if (torch.cuda.is_available() and not K.kernel_interpreted()) else "cpu"

# (dtype, atol, rtol), each with its reason.
DTYPE_CASES = [
    # fp32: same math, only the summation order differs (blocked fp32 sums vs torch's pairwise sums).
    pytest.param(torch.float32, 1e-4, 1e-5, id="fp32"),
    # bf16: 8 mantissa bits; gradients are rounded once to bf16 (2^-9 relative), loss stays fp32.
    pytest.param(torch.bfloat16, 2e-2, 1e-2, id="bf16"),
    # fp16: 11 mantissa bits; gradients are rounded once to fp16 (2^-12 relative), loss stays fp32.
    pytest.param(torch.float16, 2e-3, 1e-3, id="fp16"),
]

SHAPES = [
    pytest.param((8, 4, 16, 16), id="realistic-8x4x16x16"),
    pytest.param((1, 4, 16, 16), id="batch1"),
    pytest.param((3, 1, 7, 11), id="prime-3x1x7x11"),
    pytest.param((5, 3, 13, 17), id="prime-5x3x13x17"),
]


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xg = torch.randn(shape, generator=gen)
    # Realistic relation: the two x0-estimates are near each other and near x_g.
    yr = xg + 0.5 * torch.randn(shape, generator=gen)
    yf = yr + 0.3 * torch.randn(shape, generator=gen)
    return [t.to(device=DEVICE, dtype=dtype) for t in (xg, yr, yf)]


def _run(fn, inputs, upstream, alpha):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    loss = fn(*leaves, alpha)
    loss.backward(upstream)
    return loss.detach(), [t.grad for t in leaves]


def _plain_lowp(x_g, y_real, y_fake, alpha):
    """The same math in the input dtype, no upcast: the 'plain bf16 torch' error yardstick."""
    flat = lambda t: t.reshape(t.shape[0], -1)  # noqa: E731
    xg, yr, yf = flat(x_g), flat(y_real), flat(y_fake)
    omega = (xg - yr).abs().mean(dim=1).clamp_min(1e-5).detach()
    d = yr - yf
    return (d * ((yr - xg) - alpha * d)).sum(dim=1) / omega


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("alpha", [1.0, 1.2])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_CASES)
def test_forward_and_gradients_match_reference(dtype, atol, rtol, shape, alpha):
    inputs = _inputs(shape, dtype)
    upstream = torch.randn(shape[0], generator=torch.Generator().manual_seed(1)).to(DEVICE)

    loss, grads = _run(K.sfd_generator_loss, inputs, upstream, alpha)
    # fp32 reference on the very same (possibly rounded) values.
    ref_loss, ref_grads = _run(generator_loss, [t.float() for t in inputs], upstream, alpha)

    assert loss.dtype == torch.float32 and loss.shape == (shape[0],)
    torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=rtol)
    for name, g, rg, x in zip(("x_g", "y_real", "y_fake"), grads, ref_grads, inputs):
        assert g.dtype == dtype and g.shape == x.shape, name
        torch.testing.assert_close(g.float(), rg, atol=atol, rtol=rtol, msg=lambda m: f"d/d{name}: {m}")

    if dtype != torch.float32:
        # Kernel error vs fp32 reference at most ~2x plain low-precision torch's error.
        pt_loss, pt_grads = _run(_plain_lowp, inputs, upstream.to(dtype), alpha)
        assert _max_err(loss, ref_loss) <= 2 * _max_err(pt_loss, ref_loss) + 1e-5
        for name, g, pg, rg in zip(("x_g", "y_real", "y_fake"), grads, pt_grads, ref_grads):
            assert _max_err(g, rg) <= 2 * _max_err(pg, rg) + 1e-5, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nan_rows_behave_like_reference(dtype):
    shape = (4, 3, 5, 7)
    inputs = _inputs(shape, dtype, seed=3)
    inputs[0][1, 0, 2, 3] = float("nan")  # in x_g: omega is NaN too, so the whole row's grads are
    inputs[2][2, 1, 0, 0] = float("nan")  # in y_fake: omega finite, one NaN element per grad
    upstream = torch.ones(shape[0], device=DEVICE)

    loss, grads = _run(K.sfd_generator_loss, inputs, upstream, 1.2)
    ref_loss, ref_grads = _run(generator_loss, [t.float() for t in inputs], upstream, 1.2)

    assert torch.isnan(loss).tolist() == [False, True, True, False]
    torch.testing.assert_close(loss, ref_loss, equal_nan=True, atol=2e-2, rtol=1e-2)
    for g, rg in zip(grads, ref_grads):
        assert torch.equal(torch.isnan(g), torch.isnan(rg))
        torch.testing.assert_close(g.float(), rg, equal_nan=True, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("shape", [(3, 1, 7, 11), (5, 3, 13, 17)], ids=["D77", "D663"])
def test_split_rows_path(monkeypatch, shape):
    """Rows split into several chunks (the GPU path for small batches) + the finalize kernel."""
    block, chunk = 16, 32
    monkeypatch.setattr(K, "_launch_config", lambda B, D, device, split_rows: (block, chunk, -(-D // chunk), 4))
    inputs = _inputs(shape, torch.float32, seed=5)
    upstream = torch.randn(shape[0], generator=torch.Generator().manual_seed(6)).to(DEVICE)
    loss, grads = _run(K.sfd_generator_loss, inputs, upstream, 1.2)
    ref_loss, ref_grads = _run(generator_loss, inputs, upstream, 1.2)
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-4, rtol=1e-5)


def test_noncontiguous_and_mixed_dtype_inputs():
    shape = (2, 3, 5, 6)
    xg, yr, yf = _inputs(shape, torch.float32, seed=7)
    xg = xg.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous strides
    yr = yr.to(torch.bfloat16)
    assert not xg.is_contiguous()
    upstream = torch.ones(shape[0], device=DEVICE)
    loss, grads = _run(K.sfd_generator_loss, [xg, yr, yf], upstream, 1.0)
    ref_loss, ref_grads = _run(generator_loss, [xg, yr.float(), yf], upstream, 1.0)
    assert [g.dtype for g in grads] == [torch.float32, torch.bfloat16, torch.float32]
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), rg, atol=2e-2, rtol=1e-2)


def test_bad_inputs_raise_clear_errors():
    a = torch.randn(2, 3, device=DEVICE)
    with pytest.raises(ValueError, match="shapes differ"):
        K.sfd_generator_loss(a, a, torch.randn(2, 4, device=DEVICE), 1.0)
    with pytest.raises(TypeError, match="dtype"):
        K.sfd_generator_loss(a.double(), a.double(), a.double(), 1.0)


def test_missing_triton_gives_install_hint(monkeypatch):
    monkeypatch.setattr(K, "_HAS_TRITON", False)
    a = torch.randn(2, 3, device=DEVICE)
    with pytest.raises(ImportError, match="pip install triton"):
        K.sfd_generator_loss(a, a, a, 1.0)


def test_package_imports_without_triton():
    """kernels/ imports (and says why it cannot run) on a machine without Triton."""
    pkg_parent = Path(__file__).resolve().parents[1]
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "from sfd_fast.kernels import triton_support\n"
        "assert triton_support.triton_available() is False\n"
        "from sfd_fast.kernels import sfd_loss as mod\n"
        "import torch; a = torch.randn(2, 3)\n"
        "try:\n    mod.sfd_generator_loss(a, a, a, 1.0)\nexcept ImportError as e:\n"
        "    assert 'pip install triton' in str(e); print('OK')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pkg_parent), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr


def test_opcheck():
    """torch.library's own consistency checks: schema, fake (meta) impl, autograd registration."""
    inputs = [t.requires_grad_(True) for t in _inputs((2, 1, 3, 5), torch.float32, seed=8)]
    torch.library.opcheck(torch.ops.sfd_fast.sfd_generator_loss.default, (*inputs, 1.2))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_inside_torch_compile_fullgraph(backend):
    """The custom op composes with torch.compile(fullgraph=True): no graph break, same values.

    aot_eager: Dynamo + AOTAutograd (fake impl, the registered autograd formula), ~1 s.
    inductor: also the custom-op fallback in Inductor's graph lowering around generated C++ code;
    ~20-25 s with a cold Inductor cache on 2 CPU cores, a few seconds warm.
    """
    torch._dynamo.reset()

    def step(xg, yr, yf, loss_fn=K.sfd_generator_loss):
        per_sample = loss_fn(xg, yr, yf, 1.2)
        finite = torch.isfinite(per_sample)
        return torch.where(finite, per_sample, torch.zeros_like(per_sample)).sum() / per_sample.shape[0]

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    inputs = _inputs((3, 2, 5, 7), torch.float32, seed=9)
    upstream = torch.tensor(1.0, device=DEVICE)
    out, grads = _run(lambda a, b, c, _alpha: compiled(a, b, c), inputs, upstream, None)
    ref, ref_grads = _run(lambda a, b, c, _alpha: step(a, b, c, generator_loss), inputs, upstream, None)
    torch.testing.assert_close(out, ref)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)
