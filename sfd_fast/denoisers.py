"""The denoiser protocol: everything SFD needs from a network.

    denoiser.x0(x_t, t, cond, uncond=None, guidance=1.0) -> x0-estimate
    denoiser.output(...)                                  -> raw (CFG-combined) network output

`cond` is whatever the backbone takes as its per-sample condition: class labels (B,) long for
class-conditional networks, text embeddings (B, L, D) for Stable Diffusion. `uncond` is the
matching "unconditional" condition per row (the null class, the empty-prompt or a negative-prompt
embedding). With guidance != 1 the cond and uncond rows run as ONE batched call of 2B rows and are
combined as out_u + kappa * (out_c - out_u) (the SD/SiD-LSG convention; DDPM's (1+s)c - s u is
kappa = 1 + s). CFG is linear in the output, so combining eps, v or x0 gives the same x0.

Adapters only implement `forward_raw(x_t, t, cond)`; the algorithm never branches on backbone type.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .schedules import VPSchedule


class Denoiser(nn.Module):
    """Base adapter: wraps a backbone `net` and a VP schedule."""

    def __init__(self, net: nn.Module, schedule: VPSchedule):
        super().__init__()
        self.net = net
        self.schedule = schedule

    @property
    def prediction(self) -> str:
        return self.schedule.prediction

    def forward_raw(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def output(self, x_t, t, cond, uncond=None, guidance: float = 1.0) -> torch.Tensor:
        """Raw network output (eps / v), classifier-free guided when guidance != 1 (one 2B call)."""
        if guidance == 1.0 or uncond is None:
            if guidance != 1.0:
                raise ValueError("guidance != 1 needs an unconditional condition (uncond)")
            return self.forward_raw(x_t, t, cond).float()
        out = self.forward_raw(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond])).float()
        out_c, out_u = out.chunk(2)
        return out_u + guidance * (out_c - out_u)

    def x0(self, x_t, t, cond, uncond=None, guidance: float = 1.0) -> torch.Tensor:
        """x0-estimate in closed form from the (guided) raw output, in float32."""
        out = self.output(x_t, t, cond, uncond, guidance)
        return self.schedule.x0_from_output(x_t.float(), out, t)

    def forward(self, x_t, t, cond, uncond=None, guidance: float = 1.0) -> torch.Tensor:
        return self.x0(x_t, t, cond, uncond, guidance)


class ClassCondDenoiser(Denoiser):
    """Class-conditional network called as net(x_t, t, labels); the null class is index num_classes."""

    def __init__(self, net: nn.Module, schedule: VPSchedule, num_classes: int):
        super().__init__(net, schedule)
        self.num_classes = num_classes

    def null_condition(self, batch: int, device) -> torch.Tensor:
        return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)

    def forward_raw(self, x_t, t, cond):
        return self.net(x_t, t, cond)


class DiffusersClassUNetDenoiser(ClassCondDenoiser):
    """diffusers UNet2DModel with `num_class_embeds` = num_classes + 1 (the last is the null class)."""

    def forward_raw(self, x_t, t, cond):
        return self.net(x_t, t, class_labels=cond).sample


class TextUNetDenoiser(Denoiser):
    """diffusers UNet2DConditionModel; cond is the text-encoder hidden states (B, 77, D)."""

    def forward_raw(self, x_t, t, cond):
        dtype = next(self.net.parameters()).dtype
        return self.net(x_t.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample


class FrozenView(nn.Module):
    """Calls a trained denoiser with *detached* parameters.

    In the generator update the fake score must pass gradients to its input x_t but accumulate no
    weight gradients. The reference toggles requires_grad on every parameter twice per step; here
    the module is called functionally with detached weights (same tensors, no copy), so the
    backward through it is input-only (~1F instead of ~2F) and nothing recompiles under
    torch.compile.
    """

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.inner = [denoiser]  # a list so the wrapped module is not registered twice

    def _params(self):
        d = self.inner[0]
        named = dict(d.named_parameters())
        named.update(dict(d.named_buffers()))
        return {k: v.detach() for k, v in named.items()}

    def x0(self, x_t, t, cond, uncond=None, guidance: float = 1.0):
        d = self.inner[0]
        return torch.func.functional_call(d, self._params(), (x_t, t, cond, uncond, guidance))


@contextlib.contextmanager
def frozen_parameters(module: nn.Module):
    """requires_grad off on `module`'s parameters for the block, restored after (even on error).

    The alternative to FrozenView where functional_call cannot be used (FrozenFakeScore chooses):
    ZeRO-3 (partitioned weights) and diffusers' activation checkpointing, whose backward
    recomputation runs outside functional_call and so would see the real (grad-requiring) weights
    instead of the detached ones (torch.utils.checkpoint then raises a metadata-mismatch
    CheckpointError). The backward must run inside the block too, as the trainer's generator update
    does."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class FrozenFakeScore:
    """The fake score inside the generator update, with no gradient into its weights: the one
    mechanism, decided once per run by the acceleration plan (engine/plan.py).

      `view`      what the generator phase calls (`view.x0(...)`);
      `during()`  the context around the whole generator update, its backward included.

    Detached weights (FrozenView) wherever functional_call sees the weights the forward and backward
    use: nothing is toggled, so nothing recompiles under torch.compile, and the backward is input-only.
    A requires_grad toggle (frozen_parameters) where it cannot: diffusers' activation checkpointing
    (its recomputation runs outside functional_call) and DeepSpeed ZeRO-3 (partitioned weights)."""

    def __init__(self, fake_score: Denoiser, toggle_reason: str | None = None):
        self.fake_score, self.toggle_reason = fake_score, toggle_reason
        self.view = fake_score if toggle_reason else FrozenView(fake_score)

    @classmethod
    def for_run(cls, fake_score: Denoiser, zero3: bool = False) -> "FrozenFakeScore":
        if zero3:
            return cls(fake_score, "DeepSpeed ZeRO-3 partitions the weights")
        if getattr(fake_score.net, "is_gradient_checkpointing", False):
            return cls(fake_score, "diffusers activation checkpointing recomputes outside functional_call")
        return cls(fake_score)

    def during(self):
        return frozen_parameters(self.fake_score) if self.toggle_reason else contextlib.nullcontext()

    def describe(self) -> str:
        if self.toggle_reason:
            return f"requires_grad off during the generator update ({self.toggle_reason})"
        return "detached weights (FrozenView: functional_call, input-only backward)"
