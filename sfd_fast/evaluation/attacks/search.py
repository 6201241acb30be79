"""Gradient searches with a stated budget, family-agnostic (plain torch, no I/O).

Both searches ascend a differentiable surrogate objective with normalised steps and project onto
their budget after every step, so the budget holds exactly at every iterate:

- noise_search: per-sample input noise z of a one-step generator. Each z stays on its own
  Gaussian shell (||z|| = ||z0||: a Gaussian draw in d dimensions has norm sqrt(d) +- O(1), so a
  point off the shell is one the generator never saw) and within a chord ||z - z0|| <= radius ||z0||
  of its start; on a sphere of radius R the chord bound is an angle bound theta <= 2 asin(r/2), and
  the projection slerps back along the great circle to that angle.
- embedding_search: one free vector e (e.g. a class embedding) in the ball
  ||e - e0|| <= radius_abs, projected radially onto the ball.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def _flat_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def project_shell_chord(z: torch.Tensor, z0: torch.Tensor, radius: float) -> torch.Tensor:
    """The point of {||z|| = ||z0||, ||z - z0|| <= radius ||z0||} on the great circle through z0 and
    z nearest z (per sample). radius >= 2 leaves the whole shell."""
    r0 = _flat_norm(z0)
    u0 = z0 / r0
    u = z / _flat_norm(z).clamp_min(1e-12)
    cos = (u * u0).flatten(1).sum(1).view_as(r0)
    tangent = u - cos * u0                       # the component of u orthogonal to u0
    sin = _flat_norm(tangent)
    theta = torch.atan2(sin, cos)                # accurate at small angles, where acos(cos) is not
    theta_max = 2.0 * math.asin(min(radius, 2.0) / 2.0)
    boundary = r0 * (math.cos(theta_max) * u0 + math.sin(theta_max) * tangent / sin.clamp_min(1e-12))
    # inside the bound: z itself, put back on its shell; outside: the boundary point towards z
    return torch.where(theta <= theta_max, r0 * u, boundary)


def noise_search(objective: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, steps: int,
                 step_size: float, radius: float) -> torch.Tensor:
    """Ascend objective(z) -> per-sample scores (B,) for `steps` steps from z0; returns z (detached).

    Step: z += step_size * ||z0|| * g / ||g|| per sample (the gradient's direction; its size says
    nothing across samples), then project_shell_chord."""
    z0 = z0.detach()
    z = z0.clone()
    scale = step_size * _flat_norm(z0)
    for _ in range(steps):
        z.requires_grad_(True)
        with torch.enable_grad():   # also when called under no_grad (the evaluation during training)
            score = objective(z)
            (grad,) = torch.autograd.grad(score.sum(), z)
        with torch.no_grad():
            z = z + scale * grad / _flat_norm(grad).clamp_min(1e-12)
            z = project_shell_chord(z, z0, radius)
    return z.detach()


def project_ball(e: torch.Tensor, e0: torch.Tensor, radius_abs: float) -> torch.Tensor:
    d = e - e0
    n = d.norm()
    return e0 + d * min(1.0, radius_abs / max(float(n), 1e-12))


def embedding_search(objective: Callable[[torch.Tensor], torch.Tensor], e0: torch.Tensor, steps: int,
                     step_size_abs: float, radius_abs: float) -> torch.Tensor:
    """Ascend objective(e) -> scalar for `steps` normalised steps of length step_size_abs inside
    the ball ||e - e0|| <= radius_abs; returns e (detached)."""
    e0 = e0.detach()
    e = e0.clone()
    for _ in range(steps):
        e.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(objective(e), e)
        with torch.no_grad():
            e = project_ball(e + step_size_abs * grad / grad.norm().clamp_min(1e-12), e0, radius_abs)
    return e.detach()
