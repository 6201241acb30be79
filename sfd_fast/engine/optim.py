"""Optimizer construction for both backends: torch Adam or bitsandbytes 8-bit Adam.

`make_optimizer(cfg_role, engine_cfg, params, device)` is what the trainer calls for each trained
network. Every optimizer it returns honours the trainer's skip protocol: the caller sets
`opt.found_inf` (a 0/1 device tensor) before `step()`, and a set flag leaves weights and optimizer
state exactly unchanged.

  adam      torch.optim.Adam(fused=True): the flag is consumed inside the fused kernel (no host sync).
  adam8bit  bitsandbytes Adam8bit: bnb has no found_inf input, so the skip is applied per tensor on
            the device: the tensor and its state are copied, bnb updates them, and a set flag
            selects the copies back (torch.where: no host read). The extra traffic is one copy of
            the largest tensor's weights and state at a time. bnb's own step() also calls
            torch.cuda.synchronize() after every tensor (bitsandbytes 0.50, for paged optimizers);
            the loop here leaves that out for the non-paged Adam8bit it builds. One difference from
            the fused path: bnb keeps the step count (bias correction) as a host int, so a skipped
            update still counts as a step there; weights and both moments are exactly unchanged.

With `guard=NonfiniteGuard(...)` (the DeepSpeed backend) the optimizer computes the flag itself, at
the top of `step()`, from the gradients it owns. Under ZeRO those are the averaged fp32 gradients
of this rank's flat partition, which is the only place all stages expose them; the flag is
all-reduced (MAX) so every rank skips together, and `clip_value` (clip_grad_value_) is applied
there too: elementwise clipping commutes with the partitioning.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

log = logging.getLogger("sfd_fast")

BNB_HINT = ("engine.optimizer='adam8bit' needs bitsandbytes, which cannot be imported here ({err}). "
            "Install it with `pip install bitsandbytes` (tested: bitsandbytes==0.50.2), "
            "or set engine.optimizer='adam'")


def require_bitsandbytes():
    """Import bitsandbytes or fail with the install hint (called before any model is built)."""
    try:
        import bitsandbytes as bnb  # noqa: F401
    except Exception as e:  # ImportError, or a broken native library
        raise RuntimeError(BNB_HINT.format(err=f"{type(e).__name__}: {e}")) from None
    return bnb


@dataclass
class NonfiniteGuard:
    """Self-check mode for DeepSpeed: compute the non-finite flag over the optimizer's own grads."""
    counter: torch.Tensor            # the trainer's skipped-update counter (device tensor)
    index: int                       # 0 fake_score, 1 generator
    clip_value: Optional[float] = None
    distributed: bool = True


def nonfinite_flag(grads: list[torch.Tensor], device) -> torch.Tensor:
    """1.0 on the device if any gradient has a NaN/inf, else 0.0: one foreach norm, no host sync."""
    if not grads:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(grads)
    return (~torch.isfinite(torch.stack(norms).sum())).float()


def _nonfinite_flag_and_clean(grads: list[torch.Tensor], device) -> torch.Tensor:
    """nonfinite_flag, then non-finite entries zeroed (DeepSpeed keeps its gradient buffers)."""
    flag = nonfinite_flag(grads, device)
    for g in grads:
        g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return flag


class _SkipProtocol:
    """Mixin: implements the `found_inf` skip protocol (and the DeepSpeed self-check)."""
    _native_found_inf = False
    _guard: Optional[NonfiniteGuard] = None

    def _self_check(self):
        g = self._guard
        params = [p for grp in self.param_groups for p in grp["params"] if p.grad is not None]
        device = params[0].device if params else g.counter.device
        flag = _nonfinite_flag_and_clean([p.grad for p in params], device)
        if g.distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if g.clip_value is not None and params:
            torch._foreach_clamp_min_([p.grad for p in params], -g.clip_value)
            torch._foreach_clamp_max_([p.grad for p in params], g.clip_value)
        g.counter[g.index] += flag.to(g.counter.device)
        self.found_inf = flag
        self.grad_scale = None

    def step(self, closure=None):
        if self._guard is not None:
            self._self_check()
        found = getattr(self, "found_inf", None)
        if not self._native_found_inf and found is not None:
            return self._step_with_device_skip(found)
        return super().step(closure)


class _Bnb8bitDeviceSkip:
    """The skip protocol for bitsandbytes' Optimizer8bit without a host read (see the module doc)."""
    _STATE_TENSORS = ("state1", "state2", "absmax1", "absmax2", "unorm_vec")

    @torch.no_grad()
    def _step_with_device_skip(self, found: torch.Tensor):
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    self.init_state(group, p, gindex, pindex)
                keep = found.to(device=p.device, dtype=torch.bool)
                tensors = [p.data] + [state[k] for k in self._STATE_TENSORS if torch.is_tensor(state.get(k))]
                before = [t.clone() for t in tensors]
                self.update_step(group, p, gindex, pindex)
                # update_step may rebind p.data (to a contiguous copy): select into the live tensors
                live = [p.data] + [state[k] for k in self._STATE_TENSORS if torch.is_tensor(state.get(k))]
                for new, old in zip(live, before):
                    new.copy_(torch.where(keep, old, new))
        return None


class SkipAdam(_SkipProtocol, torch.optim.Adam):
    """torch.optim.Adam(fused=True); the fused kernel consumes `found_inf` on the device."""
    _native_found_inf = True

    def step(self, closure=None):
        if self._guard is not None:
            self._self_check()
            found = self.found_inf
            params = [p for grp in self.param_groups for p in grp["params"]]
            if params and found.device != params[0].device:
                self.found_inf = found.to(params[0].device)
        return torch.optim.Adam.step(self, closure)


_BNB_CLASS = None


def _bnb_adam8bit_class():
    global _BNB_CLASS
    if _BNB_CLASS is None:
        bnb = require_bitsandbytes()
        _BNB_CLASS = type("SkipAdam8bit", (_Bnb8bitDeviceSkip, _SkipProtocol, bnb.optim.Adam8bit), {})
    return _BNB_CLASS


def make_optimizer(cfg_role, engine_cfg, params, device: torch.device,
                   guard: Optional[NonfiniteGuard] = None) -> torch.optim.Optimizer:
    """The optimizer of one trained network (cfg_role: config.OptimizerConfig).

    engine.optimizer 'adam': fused torch Adam (one kernel per step; consumes found_inf on the device);
    'adam8bit': bitsandbytes Adam8bit (8-bit state for tensors >= 4096 elements; smaller ones,
    and under ZeRO a rank's flat partition below 4096 elements, keep fp32 state)."""
    params = list(params)
    kw = dict(lr=cfg_role.lr, betas=tuple(cfg_role.betas), eps=cfg_role.eps, weight_decay=cfg_role.weight_decay)
    if engine_cfg.optimizer == "adam8bit":
        opt = _bnb_adam8bit_class()(params, **kw)
    elif engine_cfg.optimizer == "adam":
        opt = SkipAdam(params, fused=True, **kw)
    else:
        raise ValueError(f"engine.optimizer must be 'adam' or 'adam8bit', got {engine_cfg.optimizer!r}")
    opt._guard = guard
    return opt
