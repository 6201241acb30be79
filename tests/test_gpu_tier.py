"""GPU tier (`pytest tests -m gpu`, run by bench/gpu_check.sh with TRITON_INTERPRET=0): the Triton
kernel natively, the compiled step vs eager over several steps, and one SFD step of the
SD1.5-architecture networks at full size (random weights). Each skips with a reason without CUDA.

Under bench/gpu_check.sh --rehearse (GPU_CHECK_REHEARSE=1) the tier runs on CPU instead, at tiny
sizes: the Triton kernel under its interpreter, the compiled digits step with Inductor's CPU
backend, the SD step on the tiny pipeline; same tests, same code, smaller."""
import os
import sys
from pathlib import Path

import pytest
import torch

from sfd_fast.config import load_config
from sfd_fast.digits.build import build_parts as build_digits_parts
from sfd_fast.losses import generator_loss
from sfd_fast.trainer import SFDTrainer

from .helpers import tiny_digits_config

REHEARSE = os.environ.get("GPU_CHECK_REHEARSE", "") == "1"   # bench/rehearsal.py
DEVICE = "cpu" if REHEARSE else "cuda"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() and not REHEARSE, reason="GPU tier: no CUDA device")]


def _native_kernel():
    from sfd_fast.kernels import sfd_loss
    from sfd_fast.kernels.triton_support import triton_available

    if not triton_available():
        pytest.skip("Triton is not installed (`pip install triton`)")
    if sfd_loss.kernel_interpreted() and not REHEARSE:
        pytest.skip("TRITON_INTERPRET=1 is set: run with TRITON_INTERPRET=0 for the native kernel")
    return sfd_loss.sfd_generator_loss


@pytest.mark.parametrize("dtype,atol,rtol", [
    (torch.float32, 1e-3, 1e-4),   # blocked fp32 sums vs torch's reduction order over 16k terms
    (torch.bfloat16, 0.0, 0.0),    # checked against an fp32 reference: <= 2x plain bf16 torch's error
])
@pytest.mark.parametrize("shape", [(8, 4, 64, 64), (1, 3, 7, 11), (13, 4, 17, 19)])
def test_triton_kernel_native_matches_reference(shape, dtype, atol, rtol):
    kernel = _native_kernel()
    g = torch.Generator(device=DEVICE).manual_seed(0)
    xg = torch.randn(shape, device=DEVICE, generator=g)
    yr = xg + 0.5 * torch.randn(shape, device=DEVICE, generator=g)
    yf = yr + 0.3 * torch.randn(shape, device=DEVICE, generator=g)
    up = torch.randn(shape[0], device=DEVICE, generator=g)

    def run(fn, dt):
        ins = [t.to(dt).requires_grad_(True) for t in (xg, yr, yf)]
        loss = fn(*ins, 1.2)
        grads = torch.autograd.grad(loss, ins, up)
        return [loss.float()] + [gr.float() for gr in grads]

    ref32 = run(generator_loss, torch.float32)
    got = run(kernel, dtype)
    if dtype == torch.float32:
        for a, b in zip(got, ref32):
            torch.testing.assert_close(a, b, atol=atol * b.abs().max().item(), rtol=rtol)
    else:
        plain = run(generator_loss, dtype)
        for a, p, r in zip(got, plain, ref32):
            err_k, err_p = (a - r).abs().max().item(), (p - r).abs().max().item()
            assert err_k <= 2 * err_p + 1e-6 * r.abs().max().item()


def _trainer(tmp_path, name, **engine):
    cfg = load_config(tiny_digits_config(tmp_path, run={"device": DEVICE}))
    for k, v in engine.items():
        setattr(cfg.engine, k, v)
    d = tmp_path / name
    d.mkdir()
    return SFDTrainer(cfg, build_digits_parts(cfg), d, torch.device(DEVICE))


def test_compiled_step_matches_eager_on_cuda(tmp_path):  # CPU Inductor under --rehearse
    """Inductor-compiled networks vs eager over 5 steps, fused loss on; no recompiles after step 1."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    eager = _trainer(tmp_path, "eager", compile=False, kernels="auto")
    comp = _trainer(tmp_path, "comp", compile=True, kernels="auto")
    counters.clear()
    eager.train_step()
    comp.train_step()
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(4):
        eager.train_step()
        comp.train_step()
    assert counters["stats"]["unique_graphs"] == graphs and not counters["recompiles"]
    assert not counters["graph_break"]
    # inductor fuses and reorders fp32 reductions (and may use TF32-free but differently blocked
    # GEMMs): after 5 Adam steps the weights agree to ~1e-4 relative.
    for a, b in zip(eager.generator.parameters(), comp.generator.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(eager.stats, comp.stats, rtol=1e-3, atol=1e-3)


def test_sd15_architecture_step_full_size(tmp_path):
    """One SFD step (batch 1 remain + 1 forget, CFG 4.5, bf16) of SD1.5-sized networks."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import sd_parts

    if REHEARSE:
        from sfd_fast.sd.tiny import build_tiny_sd
        sd = sd_parts.build_tiny(build_tiny_sd(tmp_path / "tiny_sd"))
    else:
        sd = sd_parts.build_sd15(device="cuda")
        assert sum(p.numel() for p in sd.unet.parameters()) == pytest.approx(859.5e6, rel=1e-3)
    cfg = sd_parts.sd_config(1, "bf16", device=DEVICE)
    tr = sd_parts.build_fast_trainer(sd, cfg, DEVICE, tmp_path)
    before = [p.detach().clone() for p in list(tr.generator.parameters())[:4]]
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        tr.train_step()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        print(f"sd15 full-size step peak allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    assert torch.isfinite(tr.stats).all() and tr.skipped.tolist() == [0.0, 0.0]
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.generator.parameters()))
