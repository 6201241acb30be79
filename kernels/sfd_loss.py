"""Fused SiD / SFD generator loss: one read of the inputs forward, one read + one write backward.

Math (reference: ``sfd_fast.losses.generator_loss``), per sample i over its D = C*H*W elements,
with d = y_real - y_fake and r = y_real - x_g:

    omega_i = max(mean_j |x_g - y_real|, 1e-5)               (no gradient; NaN stays NaN)
    L_i     = sum_j d_j * (r_j - alpha * d_j) / omega_i

Backward, with upstream g_i and s_i = g_i / omega_i (omega treated as a constant):

    dL/dx_g    = -s_i * d
    dL/dy_fake =  s_i * (2 alpha d - r)
    dL/dy_real =  s_i * (r - 2 alpha d + d) = -(dL/dx_g + dL/dy_fake)

(the three gradients sum to zero: L is invariant to shifting all three inputs by the same amount).

Shapes: x_g, y_real, y_fake are (B, ...) with the same shape (any dtype among fp32 / fp16 / bf16,
mixed allowed); viewed as (B, D). Output: loss (B,) float32. The op also returns omega (B,) float32,
which autograd saves for the backward (no recomputation of the |x_g - y_real| pass).

Accumulation: fp32 whatever the input dtype (the reference upcasts too). Each program sums a chunk
of a row into two fp32 vectors (|x_g - y_real| and d * (r - alpha d)); when a row spans several
chunks the per-chunk partials are reduced by a tiny second kernel in a fixed order (deterministic,
no atomics). Gradients are computed in fp32 and stored in each input's own dtype.

Bytes moved, N = B*D, e = element size:
    forward : reads 3*N*e, writes 8*B (+ 8*B*chunks of partials when a row is split)
    backward: reads 3*N*e + 8*B, writes 3*N*e
The plain-torch reference moves several times that (upcast copies, d, r and product temporaries,
and autograd's saved intermediates).

Triton is optional. Without it, ``sfd_generator_loss`` raises ImportError with the install hint;
``sfd_loss_ref`` always works. On CPU the kernels only run in Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported), which is for tests, not for speed.
"""
from __future__ import annotations

import functools

import torch

from .triton_support import TRITON_INSTALL_HINT, triton_available

_HAS_TRITON = triton_available()
if _HAS_TRITON:
    import triton
    import triton.language as tl

OMEGA_MIN = 1e-5
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OP_NAMESPACE = "sfd_fast"
_OP_NAME = "sfd_generator_loss"
_OP_BWD_NAME = "sfd_generator_loss_backward"


# --------------------------------------------------------------------------------------------------
# Reference (plain torch)
# --------------------------------------------------------------------------------------------------
def sfd_loss_ref(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float) -> torch.Tensor:
    """The reference math: ``sfd_fast.losses.generator_loss`` (per-sample loss (B,), float32)."""
    from sfd_fast.losses import generator_loss

    return generator_loss(x_g, y_real, y_fake, alpha)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if _HAS_TRITON:

    @triton.jit
    def _sfd_loss_fwd_kernel(
        xg_ptr, yr_ptr, yf_ptr,           # (B, D) contiguous inputs
        abs_part_ptr, dot_part_ptr,       # (B, n_chunks) fp32 partials (unused when SINGLE_CHUNK)
        loss_ptr, omega_ptr,              # (B,) fp32 outputs (written only when SINGLE_CHUNK)
        D, n_chunks, D_float, alpha,
        CHUNK: tl.constexpr, BLOCK: tl.constexpr, SINGLE_CHUNK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1).to(tl.int64)
        row_start = row * D                 # 64-bit: B*D may exceed 2**31
        col0 = chunk * CHUNK
        offs = tl.arange(0, BLOCK)
        acc_abs = tl.zeros([BLOCK], dtype=tl.float32)
        acc_dot = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, CHUNK, BLOCK):
            cols = col0 + start + offs
            mask = cols < D
            # Masked lanes load 0 for all three inputs and so add exactly 0 to both sums.
            xg = tl.load(xg_ptr + row_start + cols, mask=mask, other=0.0).to(tl.float32)
            yr = tl.load(yr_ptr + row_start + cols, mask=mask, other=0.0).to(tl.float32)
            yf = tl.load(yf_ptr + row_start + cols, mask=mask, other=0.0).to(tl.float32)
            score = yr - yf
            acc_abs += tl.abs(xg - yr)
            acc_dot += score * ((yr - xg) - alpha * score)
        s_abs = tl.sum(acc_abs, axis=0)
        s_dot = tl.sum(acc_dot, axis=0)
        if SINGLE_CHUNK:
            mean = s_abs / D_float
            # clamp_min that keeps NaN (NaN < x is False), like torch.clamp_min in the reference.
            omega = tl.where(mean < 1e-5, 1e-5, mean)
            tl.store(omega_ptr + row, omega)
            tl.store(loss_ptr + row, s_dot / omega)
        else:
            tl.store(abs_part_ptr + row * n_chunks + chunk, s_abs)
            tl.store(dot_part_ptr + row * n_chunks + chunk, s_dot)

    @triton.jit
    def _sfd_loss_finalize_kernel(
        abs_part_ptr, dot_part_ptr, loss_ptr, omega_ptr, n_chunks, D_float, BLOCK_C: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_C)
        mask = offs < n_chunks
        s_abs = tl.sum(tl.load(abs_part_ptr + row * n_chunks + offs, mask=mask, other=0.0), axis=0)
        s_dot = tl.sum(tl.load(dot_part_ptr + row * n_chunks + offs, mask=mask, other=0.0), axis=0)
        mean = s_abs / D_float
        omega = tl.where(mean < 1e-5, 1e-5, mean)
        tl.store(omega_ptr + row, omega)
        tl.store(loss_ptr + row, s_dot / omega)

    @triton.jit
    def _sfd_loss_bwd_kernel(
        xg_ptr, yr_ptr, yf_ptr,           # (B, D) contiguous inputs
        grad_ptr, omega_ptr,              # (B,) fp32 upstream gradient and saved omega
        dxg_ptr, dyr_ptr, dyf_ptr,        # (B, D) outputs, each in its input's dtype
        D, alpha,
        CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1).to(tl.int64)
        row_start = row * D
        col0 = chunk * CHUNK
        offs = tl.arange(0, BLOCK)
        scale = tl.load(grad_ptr + row) / tl.load(omega_ptr + row)
        for start in range(0, CHUNK, BLOCK):
            cols = col0 + start + offs
            mask = cols < D
            xg = tl.load(xg_ptr + row_start + cols, mask=mask, other=0.0).to(tl.float32)
            yr = tl.load(yr_ptr + row_start + cols, mask=mask, other=0.0).to(tl.float32)
            yf = tl.load(yf_ptr + row_start + cols, mask=mask, other=0.0).to(tl.float32)
            score = yr - yf
            resid = yr - xg
            dxg = -scale * score
            dyf = scale * (2.0 * alpha * score - resid)
            dyr = -(dxg + dyf)
            tl.store(dxg_ptr + row_start + cols, dxg.to(dxg_ptr.dtype.element_ty), mask=mask)
            tl.store(dyr_ptr + row_start + cols, dyr.to(dyr_ptr.dtype.element_ty), mask=mask)
            tl.store(dyf_ptr + row_start + cols, dyf.to(dyf_ptr.dtype.element_ty), mask=mask)

    # Decided by triton when the kernels were decorated (TRITON_INTERPRET at import time).
    _INTERPRETED = type(_sfd_loss_fwd_kernel).__name__ == "InterpretedFunction"
else:  # pragma: no cover - exercised only without triton
    _INTERPRETED = False


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
_MAX_GRID_Y = 65535  # CUDA limit on grid dimension 1 (chunks per row)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    # Queried at call time (never at import): ARCHITECTURE.md property 6.
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _launch_config(B: int, D: int, device: torch.device, split_rows: bool) -> tuple[int, int, int, int]:
    """(BLOCK, CHUNK, n_chunks, num_warps) for a (B, D) problem.

    Interpreter: one program per row and big blocks (each program is a numpy loop, fewer is faster).
    GPU: `_gpu_launch_config` with the device's SM count.
    """
    if _INTERPRETED or device.type != "cuda":
        block = min(_next_pow2(D), 4096)
        iters = -(-D // block)
        return block, block * iters, 1, 4
    sm_count = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return _gpu_launch_config(B, D, split_rows, sm_count)


def _gpu_launch_config(B: int, D: int, split_rows: bool, sm_count: int,
                       max_block: int = 1024) -> tuple[int, int, int, int]:
    """The GPU launch arithmetic (pure: tested on CPU, and run through the interpreter with a small
    sm_count / max_block to force several chunks): blocks of max_block elements; for the
    reduction, rows are split into chunks so that small batches of big rows still fill the SMs
    (about 4 programs per SM), and merged back otherwise."""
    block = min(_next_pow2(D), max_block)
    blocks_per_row = -(-D // block)
    iters = 1
    if split_rows:
        target_programs = 4 * sm_count
        iters = max(1, (B * blocks_per_row) // target_programs)
        iters = min(_next_pow2(iters), 64, _next_pow2(blocks_per_row))
    while -(-blocks_per_row // iters) > _MAX_GRID_Y:
        iters *= 2
    chunk = block * iters
    return block, chunk, -(-D // chunk), 4 if block <= 1024 else 8


def _check_inputs(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor) -> None:
    if not (x_g.shape == y_real.shape == y_fake.shape):
        raise ValueError(
            f"sfd_generator_loss: shapes differ: x_g {tuple(x_g.shape)}, y_real {tuple(y_real.shape)}, "
            f"y_fake {tuple(y_fake.shape)}"
        )
    if x_g.dim() < 1:
        raise ValueError("sfd_generator_loss: inputs need a batch dimension, got 0-d tensors")
    for name, t in (("x_g", x_g), ("y_real", y_real), ("y_fake", y_fake)):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"sfd_generator_loss: {name} has dtype {t.dtype}; supported: fp32, fp16, bf16")
        if t.device != x_g.device:
            raise ValueError(f"sfd_generator_loss: {name} is on {t.device}, x_g on {x_g.device}")


def _check_device(device: torch.device) -> None:
    if not _HAS_TRITON:
        raise ImportError(f"sfd_generator_loss (Triton kernel) was requested but {TRITON_INSTALL_HINT}")
    if device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError(
            f"sfd_generator_loss: Triton kernels need CUDA tensors, got {device.type}. On CPU use "
            "sfd_fast.losses.generator_loss, or set TRITON_INTERPRET=1 before importing triton (tests only)."
        )


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).contiguous()


def _device_ctx(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    import contextlib

    return contextlib.nullcontext()


def _forward_impl(x_g, y_real, y_fake, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_device(x_g.device)
    xg, yr, yf = _rows(x_g), _rows(y_real), _rows(y_fake)
    B, D = xg.shape
    loss = torch.empty(B, dtype=torch.float32, device=xg.device)
    omega = torch.empty(B, dtype=torch.float32, device=xg.device)
    if B == 0:
        return loss, omega
    if D == 0:  # mean over nothing is NaN in the reference, and so is the loss
        return loss.fill_(float("nan")), omega.fill_(float("nan"))
    block, chunk, n_chunks, num_warps = _launch_config(B, D, xg.device, split_rows=True)
    single = n_chunks == 1
    if single:
        abs_part = dot_part = loss  # placeholders, never touched
    else:
        abs_part = torch.empty(B, n_chunks, dtype=torch.float32, device=xg.device)
        dot_part = torch.empty(B, n_chunks, dtype=torch.float32, device=xg.device)
    with _device_ctx(xg.device):
        _sfd_loss_fwd_kernel[(B, n_chunks)](
            xg, yr, yf, abs_part, dot_part, loss, omega, D, n_chunks, float(D), float(alpha),
            CHUNK=chunk, BLOCK=block, SINGLE_CHUNK=single, num_warps=num_warps,
        )
        if not single:
            _sfd_loss_finalize_kernel[(B,)](
                abs_part, dot_part, loss, omega, n_chunks, float(D), BLOCK_C=_next_pow2(n_chunks),
            )
    return loss, omega


def _backward_impl(grad_loss, x_g, y_real, y_fake, omega, alpha: float):
    _check_device(x_g.device)
    xg, yr, yf = _rows(x_g), _rows(y_real), _rows(y_fake)
    B, D = xg.shape
    dxg, dyr, dyf = torch.empty_like(xg), torch.empty_like(yr), torch.empty_like(yf)
    if B > 0 and D > 0:
        # The upstream gradient is often an expanded (stride-0) view, e.g. from .sum().
        grad = grad_loss.to(torch.float32).contiguous()
        omega = omega.to(torch.float32).contiguous()
        block, chunk, n_chunks, num_warps = _launch_config(B, D, xg.device, split_rows=False)
        with _device_ctx(xg.device):
            _sfd_loss_bwd_kernel[(B, n_chunks)](
                xg, yr, yf, grad, omega, dxg, dyr, dyf, D, float(alpha),
                CHUNK=chunk, BLOCK=block, num_warps=num_warps,
            )
    return dxg.view(x_g.shape), dyr.view(y_real.shape), dyf.view(y_fake.shape)


# --------------------------------------------------------------------------------------------------
# torch.library registration (opaque to torch.compile; composes with fullgraph=True)
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_OP_NAMESPACE}::{_OP_NAME}", mutates_args=())
def _sfd_generator_loss_op(
    x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(x_g, y_real, y_fake, alpha)


@_sfd_generator_loss_op.register_fake
def _(x_g, y_real, y_fake, alpha):
    B = x_g.shape[0]
    return x_g.new_empty(B, dtype=torch.float32), x_g.new_empty(B, dtype=torch.float32)


@torch.library.custom_op(f"{_OP_NAMESPACE}::{_OP_BWD_NAME}", mutates_args=())
def _sfd_generator_loss_bwd_op(
    grad_loss: torch.Tensor, x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor,
    omega: torch.Tensor, alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(grad_loss, x_g, y_real, y_fake, omega, alpha)


@_sfd_generator_loss_bwd_op.register_fake
def _(grad_loss, x_g, y_real, y_fake, omega, alpha):
    return torch.empty_like(x_g), torch.empty_like(y_real), torch.empty_like(y_fake)


def _setup_context(ctx, inputs, output):
    x_g, y_real, y_fake, alpha = inputs
    _, omega = output
    ctx.save_for_backward(x_g, y_real, y_fake, omega)
    ctx.alpha = alpha
    ctx.mark_non_differentiable(omega)


def _backward(ctx, grad_loss, grad_omega):
    # grad_omega is ignored: omega is a constant weight (no gradient), as in the reference.
    x_g, y_real, y_fake, omega = ctx.saved_tensors
    dxg, dyr, dyf = torch.ops.sfd_fast.sfd_generator_loss_backward(
        grad_loss, x_g, y_real, y_fake, omega, ctx.alpha
    )
    return dxg, dyr, dyf, None


_sfd_generator_loss_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def sfd_generator_loss(
    x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Fused SiD generator loss per sample, (B,) float32; same math and gradients as
    ``sfd_fast.losses.generator_loss``. Raises ImportError (with the install hint) without Triton,
    and RuntimeError for CPU tensors unless Triton runs in interpreter mode."""
    _check_inputs(x_g, y_real, y_fake)
    _check_device(x_g.device)
    loss, _ = torch.ops.sfd_fast.sfd_generator_loss(x_g, y_real, y_fake, float(alpha))
    return loss


def kernel_interpreted() -> bool:
    """True when the Triton kernels were built in interpreter mode (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETED
