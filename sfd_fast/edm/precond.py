"""EDM's preconditioners D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) and `build_network`.

    VPPrecond   c_skip 1, c_out -sigma, c_in 1/sqrt(sigma^2+1), c_noise (M-1) t(sigma)
                with the VP schedule sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)
    VEPrecond   c_skip 1, c_out sigma,  c_in 1,                 c_noise ln(sigma/2)
    EDMPrecond  c_skip sd^2/(sigma^2+sd^2), c_out sigma sd/sqrt(sigma^2+sd^2),
                c_in 1/sqrt(sigma^2+sd^2), c_noise ln(sigma)/4          (sd = sigma_data)

Each is called as EDM's: forward(x, sigma, class_labels=None, force_fp32=False, **model_kwargs) with
one-hot (float) class labels (B, label_dim); the backbone is `self.model` (state dict keys
"model.*"), so weights map one to one onto an EDM snapshot's `ema`. The output is D(x) in fp32.
"""
from __future__ import annotations

import torch
from torch import nn

from .unets import DhariwalUNet, SongUNet

BACKBONES = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


def vp_sigma(t, beta_d: float = 19.9, beta_min: float = 0.1):
    """sigma(t) of EDM's VP formulation (t in (0, 1]). exp(.) - 1 rather than expm1, and log(1 + .)
    below rather than log1p, as EDM computes them: in fp32 they differ by up to ~1% at sigma ~ 0.002,
    and the network was trained with EDM's rounding."""
    t = torch.as_tensor(t)
    return torch.sqrt(torch.exp(0.5 * beta_d * t ** 2 + beta_min * t) - 1)


def vp_sigma_inv(sigma, beta_d: float = 19.9, beta_min: float = 0.1):
    """t(sigma), the inverse of vp_sigma: the positive root of beta_d t^2/2 + beta_min t = ln(1+sigma^2)."""
    sigma = torch.as_tensor(sigma)
    return (torch.sqrt(beta_min ** 2 + 2 * beta_d * torch.log(1 + sigma ** 2)) - beta_min) / beta_d


class Precond(nn.Module):
    """Shared preconditioner: casting, label handling and D = c_skip x + c_out F(c_in x, c_noise)."""

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs):
        super().__init__()
        if model_type not in BACKBONES:
            raise ValueError(f"{type(self).__name__}: model_type {model_type!r} is not supported; "
                             f"supported: {', '.join(BACKBONES)}")
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.label_dim, self.use_fp16 = label_dim, use_fp16
        self.model = BACKBONES[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                           out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def coefficients(self, sigma: torch.Tensor):  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            labels = None
        elif class_labels is None:   # EDM: an all-zero label row (the "no class" input)
            labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        half = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        dtype = torch.float16 if half else torch.float32
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        # EDM asserts F's dtype is `dtype`; under the engine's bf16 autocast the backbone returns bf16,
        # so the output is cast to fp32 instead (D is formed in fp32 either way)
        f = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=labels, **model_kwargs)
        return c_skip * x + c_out * f.to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


class VPPrecond(Precond):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1,
                 M=1000, epsilon_t=1e-5, model_type="SongUNet", **model_kwargs):  # noqa: N803 (EDM's name)
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))

    def sigma(self, t):
        return vp_sigma(t, self.beta_d, self.beta_min)

    def sigma_inv(self, sigma):
        return vp_sigma_inv(sigma, self.beta_d, self.beta_min)

    def coefficients(self, sigma):
        return 1, -sigma, 1 / torch.sqrt(sigma * sigma + 1), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(Precond):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100,
                 model_type="SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma):
        return 1, sigma, 1, torch.log(0.5 * sigma)


class EDMPrecond(Precond):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float("inf"), sigma_data=0.5, model_type="DhariwalUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def coefficients(self, sigma):
        d2 = self.sigma_data ** 2
        norm = torch.sqrt(sigma * sigma + d2)
        return d2 / (sigma * sigma + d2), sigma * self.sigma_data / norm, 1 / norm, torch.log(sigma) / 4


PRECONDITIONERS = {"VPPrecond": VPPrecond, "VEPrecond": VEPrecond, "EDMPrecond": EDMPrecond}
CLASSES = {**PRECONDITIONERS, **BACKBONES}
MODULE = "training.networks"


class UnsupportedNetworkError(ValueError):
    """A class name or constructor argument that this package does not implement."""


def _accepted(cls, init_kwargs: dict) -> set:
    """Constructor argument names `cls` accepts; a preconditioner also passes its backbone's on."""
    import inspect

    def params(klass):
        return {p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "model_kwargs")}
    if cls not in PRECONDITIONERS.values():
        return params(cls)
    default = "DhariwalUNet" if cls is EDMPrecond else "SongUNet"
    backbone = BACKBONES.get(init_kwargs.get("model_type", default))
    if backbone is None:
        raise UnsupportedNetworkError(f"{cls.__name__}: model_type {init_kwargs['model_type']!r} is not "
                                      f"supported; supported: {', '.join(BACKBONES)}")
    # the preconditioner sets the backbone's resolution, channels and label_dim itself
    return params(cls) | (params(backbone) - {"img_resolution", "in_channels", "out_channels", "label_dim"})


def build_network(class_name: str, *init_args, **init_kwargs) -> nn.Module:
    """EDM's network for its dotted class name ("training.networks.VPPrecond", ... or the bare name)
    and constructor arguments; an unknown class or argument is an UnsupportedNetworkError naming it."""
    module, _, name = class_name.rpartition(".")
    if module not in ("", MODULE) or name not in CLASSES:
        raise UnsupportedNetworkError(
            f"network class {class_name!r} is not supported; supported: "
            + ", ".join(f"{MODULE}.{n}" for n in CLASSES))
    cls = CLASSES[name]
    unknown = sorted(set(init_kwargs) - _accepted(cls, init_kwargs))
    if unknown:
        raise UnsupportedNetworkError(f"{name}: constructor argument {unknown[0]!r} is not supported "
                                      f"(unknown: {', '.join(unknown)})")
    try:
        return cls(*init_args, **init_kwargs)
    except (TypeError, ValueError) as e:
        raise UnsupportedNetworkError(f"{name}({', '.join(map(repr, init_args))}{', ' if init_args else ''}"
                                      f"{', '.join(f'{k}={v!r}' for k, v in init_kwargs.items())}): {e}") from None

