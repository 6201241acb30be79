"""The GPU launch arithmetic of the fused SFD loss (`_gpu_launch_config`) and the split-row reduction
with its finalize kernel, run on CPU under Triton's interpreter with the GPU's own configuration
(an H100's 132 SMs, and a small SM count / block to force many chunks): on the interpreter
`_launch_config` itself always picks one chunk per row, so without this the multi-chunk path and
the finalize kernel would only ever run on a GPU.

Tolerances: fp32 inputs, the same math with a different summation order (per-chunk fp32 sums, then
the chunk partials in a fixed order, vs torch's pairwise sums): the error of a sum of n terms is
about sqrt(n) * 2^-24 relative to the sum of magnitudes; for D <= 16384 that is < 1e-5 relative,
so rtol 1e-5 with an absolute floor of 1e-5 x the largest magnitude. bf16 inputs: gradients are
rounded once to bf16 (2^-9 relative), as in tests/test_kernel_sfd_loss.py.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (`pip install triton`); kernel tests skipped")

from sfd_fast.kernels import sfd_loss as K  # noqa: E402

from sfd_fast.losses import generator_loss  # noqa: E402

pytestmark = pytest.mark.skipif(not K.kernel_interpreted(), reason="needs TRITON_INTERPRET=1 (CPU tier)")


@pytest.mark.parametrize("B,D,split", [(1, 16384, True), (4, 16384, True), (64, 16384, True), (8, 77, True),
                                       (3, 1000, True), (2, 2 ** 27, True), (4, 16384, False), (1, 1, True)])
@pytest.mark.parametrize("sm_count", [1, 132])
def test_gpu_launch_config_covers_every_row_once(B, D, split, sm_count):
    block, chunk, n_chunks, warps = K._gpu_launch_config(B, D, split, sm_count)
    assert block & (block - 1) == 0 and block <= 1024 and chunk % block == 0
    assert (n_chunks - 1) * chunk < D <= n_chunks * chunk          # every element, no empty chunk
    assert n_chunks <= K._MAX_GRID_Y and warps in (4, 8)
    if not split:
        assert n_chunks == -(-D // block)                          # backward: one block per program


def test_gpu_launch_config_splits_small_batches_of_big_rows():
    """SD latents (4x64x64 = 16 blocks of 1024 per row) on an H100 (132 SMs, target 528 programs):
    batch 4 -> 16 chunks per row; batch 256 (4096 blocks) -> 8 blocks per chunk, 2 chunks; batch
    2048 -> one chunk per row (the grid is full anyway)."""
    assert K._gpu_launch_config(4, 16384, True, 132)[2] == 16
    assert K._gpu_launch_config(256, 16384, True, 132)[2] == 2
    assert K._gpu_launch_config(2048, 16384, True, 132)[2] == 1


def _forced(sm_count, max_block):
    return lambda B, D, device, split_rows: K._gpu_launch_config(B, D, split_rows, sm_count, max_block)


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    xg = torch.randn(shape, generator=g)
    yr = xg + 0.5 * torch.randn(shape, generator=g)
    yf = yr + 0.3 * torch.randn(shape, generator=g)
    up = torch.randn(shape[0], generator=g)
    return [t.to(dtype) for t in (xg, yr, yf)], up


def _run(fn, inputs, up):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    loss = fn(*leaves, 1.2)
    loss.backward(up)
    return [loss.detach()] + [t.grad.float() for t in leaves]


def _close(got, ref, rtol=1e-5):
    for a, b in zip(got, ref):
        scale = b[torch.isfinite(b)].abs().max().item() if torch.isfinite(b).any() else 1.0
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-5 * scale, equal_nan=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape,sm_count,max_block", [
    ((4, 4, 64, 64), 132, 1024),   # an SD latent batch as an H100 splits it: 16 chunks per row
    ((1, 3, 10, 33), 1, 64),       # D = 990: 4 chunks, the last one partly masked
    ((3, 1, 7, 11), 1, 16),        # D = 77: odd rows, 5 blocks in 2 chunks
])
def test_split_rows_match_reference(shape, sm_count, max_block, seed, monkeypatch):
    monkeypatch.setattr(K, "_launch_config", _forced(sm_count, max_block))
    D = shape[1] * shape[2] * shape[3]
    assert K._gpu_launch_config(shape[0], D, True, sm_count, max_block)[2] > 1, "the case must split rows"
    inputs, up = _inputs(shape, torch.float32, seed)
    _close(_run(K.sfd_generator_loss, inputs, up), _run(generator_loss, inputs, up))


def test_split_rows_nan_row_and_bf16(monkeypatch):
    """A NaN in one row stays in that row through the partials and the finalize kernel; bf16 inputs
    accumulate in fp32 there too."""
    monkeypatch.setattr(K, "_launch_config", _forced(1, 64))
    inputs, up = _inputs((3, 4, 8, 8), torch.float32, 7)
    inputs[0][1, 2, 3, 4] = float("nan")
    got, ref = _run(K.sfd_generator_loss, inputs, up), _run(generator_loss, inputs, up)
    assert torch.isnan(got[0]).tolist() == [False, True, False]
    _close(got, ref)
    low, _ = _inputs((2, 4, 16, 16), torch.bfloat16, 8)
    got = _run(K.sfd_generator_loss, low, up[:2])
    ref = _run(generator_loss, [t.float() for t in low], up[:2])
    _close(got[:1], ref[:1], rtol=1e-5)                 # the loss: fp32 sums of the same bf16 values
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=2 ** -8, atol=2 ** -8 * b.abs().max().item())
