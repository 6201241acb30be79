"""Triton kernels for sfd_fast, installed as the subpackage ``sfd_fast.kernels``.

This package imports nothing heavy and never touches CUDA at import time (ARCHITECTURE.md,
property 6). Triton itself is optional: ``triton_available()`` says whether it can be imported, and
the kernel modules raise an ImportError with the install hint when a kernel is explicitly requested
without it (property 5). Kernel modules are loaded lazily on first attribute access, e.g.
``sfd_fast.kernels.sfd_generator_loss``.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["triton_available", "require_triton", "TRITON_INSTALL_HINT", "sfd_generator_loss", "sfd_loss_ref"]

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


# Lazy attributes: name -> submodule that defines it.
_LAZY = {"sfd_generator_loss": "sfd_loss", "sfd_loss_ref": "sfd_loss"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
