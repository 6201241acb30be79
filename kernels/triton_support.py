"""Whether Triton can be used, and the install hint when it cannot.

The top-level folder ``kernels/`` holds the Triton kernels; it is importable only as
``sfd_fast.kernels`` (``sfd_fast/kernels`` is a link to it, and it has no ``__init__.py``), never as
a top-level ``kernels``: that name belongs to Hugging Face's package, which transformers >= 5.25
imports, and a root-level package of ours would shadow it whenever the repository root is on
``sys.path`` (docs/install.md).

This module imports nothing heavy and never touches CUDA at import time (ARCHITECTURE.md,
property 6). Triton itself is optional: ``triton_available()`` says whether it can be imported, and
the kernel modules raise an ImportError with the install hint when a kernel is explicitly requested
without it (property 5).
"""
from __future__ import annotations

__all__ = ["triton_available", "require_triton", "TRITON_INSTALL_HINT"]

TRITON_INSTALL_HINT = (
    "Triton is not installed: `pip install triton` (Linux + CUDA; on CPU run with TRITON_INTERPRET=1 "
    "for tests only), or select the plain torch path (kernels: \"torch\", or \"auto\" to fall back)."
)

_TRITON_OK: bool | None = None


def triton_available() -> bool:
    """True if ``import triton`` succeeds. Cached; imports triton on first call, never touches CUDA."""
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_OK = True
        except Exception:  # ImportError, or a broken install raising something else on import
            _TRITON_OK = False
    return _TRITON_OK


def require_triton(what: str = "this kernel") -> None:
    """Raise ImportError with the install hint when Triton is missing."""
    if not triton_available():
        raise ImportError(f"{what} was requested but {TRITON_INSTALL_HINT}")

