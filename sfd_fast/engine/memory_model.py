"""Memory model of one SFD training rank, computed from the BUILT objects (issue #10, "memory, true").

    estimate(cfg, parts, device, world=1, rows_per_branch=None) -> {term: bytes, ..., "total": peak}

Nothing is a restated constant: every term walks the networks the run actually holds, at their
actual dtypes, and the configuration that decides what the backend allocates around them.

  weights      every parameter and buffer reachable from the parts (teacher, fake score, generator,
               and frozen helpers such as a text encoder or VAE kept in parts.extra_state), each
               storage once, at its dtype (frozen networks are bf16 when the family stored them so).
               DeepSpeed casts the two trained networks to bf16 under engine.precision=bf16 (2 B).
  ema          a second copy of the generator (fp32) when train.ema is on; without EMA the DeepSpeed
               backend materialises one only while a grid/evaluation runs ("sampling_copy", reported,
               not in the training peak).
  optimizer    Adam: fp32 m and v, 8 B per trained parameter; bitsandbytes 8-bit Adam: 1 B each for
               tensors of >= 4096 elements plus one fp32 absmax per 256-element block per state (smaller
               tensors keep 32-bit state); under ZeRO >= 1 one flat partition of P / world per rank.
  masters      DeepSpeed ZeRO >= 1 or bf16: an fp32 master partition, 4 B x P / world.
  gradients    only the network being updated holds gradients (the other's were freed at its step):
               plain, the parameter dtype; DeepSpeed, a partition in the module dtype (/ world from
               ZeRO-2), its reduce bucket during the backward, and at the optimizer step an fp32 copy
               of the partition (stage_1_and_2.py: `flat_grad_partition.to(fp32)`).
  activations  MEASURED, not assumed: the real phases of step.py (fake-score phase, generator phase)
               run once at 1 and at 2 rows per branch under torch.autograd.graph.saved_tensors_hooks;
               every tensor autograd saves for the backward is counted once per storage, excluding
               the storages of weights (already counted). Two points give fixed + per-row bytes (the
               fixed part: e.g. bf16 casts of weights that autocast saves), extrapolated to the rows.
               Activation checkpointing is modelled from the same trace: saved tensors outside the
               checkpoint units + every unit's input + the largest unit (recomputed during the backward).

    peak = static (weights + ema + optimizer + masters) + max over phases of what the phase adds:
           backward (activations + gradients [+ bucket]) and, under DeepSpeed, the optimizer step.

Not modelled (say so wherever the numbers are quoted): the CUDA context and library workspaces,
allocator fragmentation / caching, temporaries that live between two saved tensors (the largest
transient output), sampling and VAE decoding, DeepSpeed's ZeRO-3 prefetch buffers. On CPU the
model is checked against a measured peak (tests/test_memory_peak.py).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

GIB = 2**30
ROLES = ("fake_score", "generator")


# ------------------------------------------------------------------------------------ the networks

def networks(parts) -> dict[str, nn.Module]:
    """Every network the run holds: the three roles, then any nn.Module found in parts.extra_state
    (a value, or an attribute of a value: a family's frozen helpers), by name."""
    nets = {"teacher": parts.teacher.net, "fake_score": parts.fake_score.net, "generator": parts.generator.net}
    found = [(key, value) for key, value in (getattr(parts, "extra_state", None) or {}).items()]
    found += [(attr, v) for _, value in found if hasattr(value, "__dict__") for attr, v in vars(value).items()]
    for name, value in found:
        if isinstance(value, nn.Module) and all(value is not n for n in nets.values()):
            nets.setdefault(name, value)
    return nets


def _tensors(net: nn.Module):
    yield from net.parameters()
    yield from net.buffers()


def weight_bytes(nets: dict[str, nn.Module]) -> dict[str, int]:
    """Bytes per network at the dtypes they hold, each tensor counted once (the first network wins)."""
    seen, out = set(), {}
    for name, net in nets.items():
        total = 0
        for t in _tensors(net):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        out[name] = total
    return out


def trained_parameters(net: nn.Module) -> list[torch.Tensor]:
    return [p for p in net.parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------ optimizer terms

def adam_state_bytes(params: list[torch.Tensor], optimizer: str, shard: int = 1) -> int:
    """Optimizer state of `params` (one rank). `shard` > 1: ZeRO's flat partition of numel / shard."""
    if shard > 1 or len(params) == 0:
        sizes = [math.ceil(sum(p.numel() for p in params) / shard)]
    else:
        sizes = [p.numel() for p in params]
    if optimizer != "adam8bit":
        return sum(8 * n for n in sizes)                        # fp32 exp_avg + exp_avg_sq
    # bitsandbytes Adam8bit: uint8 state1, state2 + fp32 absmax per 256-element block each (blockwise
    # quantisation); tensors under min_8bit_size = 4096 elements keep fp32 state
    return sum(2 * n + 2 * 4 * math.ceil(n / 256) if n >= 4096 else 8 * n for n in sizes)


def static_terms(cfg, parts, world: int = 1) -> dict:
    """Weights, EMA copy, optimizer state and fp32 masters: what lives for the whole run (bytes)."""
    e = cfg.engine
    ds = e.backend == "deepspeed"
    zero = e.zero_stage if ds else 0
    nets = networks(parts)
    per_net = weight_bytes(nets)
    trained = {r: trained_parameters(nets[r]) for r in ROLES}
    n_trained = {r: sum(p.numel() for p in trained[r]) for r in ROLES}
    if ds and e.precision == "bf16":   # DeepSpeed holds the trained modules in bf16 (fp32 masters apart)
        for r in ROLES:
            per_net[r] -= sum(p.numel() * (p.element_size() - 2) for p in trained[r])
    shard = world if zero >= 1 else 1
    ema_on = cfg.train.ema.decay is not None or cfg.train.ema.halflife_kimg > 0
    gen_fp32 = sum(4 * t.numel() if t.is_floating_point() else t.numel() * t.element_size()
                   for t in _tensors(parts.generator.net))
    masters = sum(4 * math.ceil(n_trained[r] / shard) for r in ROLES) if ds and (zero >= 1 or e.precision == "bf16") else 0
    return {
        "weights": sum(per_net.values()),
        "weights_by_network": per_net,
        "ema": gen_fp32 if ema_on else 0,
        "optimizer": sum(adam_state_bytes(trained[r], e.optimizer, shard) for r in ROLES),
        "masters": masters,
        "sampling_copy": gen_fp32 if (ds and not ema_on) else 0,
        "trained_parameters": n_trained,
    }


def phase_terms(cfg, parts, world: int, role: str) -> dict:
    """What updating `role` adds besides activations: gradients during the backward, plus the
    DeepSpeed reduce bucket; under DeepSpeed also the optimizer step's fp32 gradient partition."""
    e = cfg.engine
    params = trained_parameters(getattr(parts, role).net)
    n = sum(p.numel() for p in params)
    if e.backend != "deepspeed":
        return {"gradients": sum(p.numel() * p.element_size() for p in params), "step": 0}
    zero = e.zero_stage
    module_bytes = 2 if e.precision == "bf16" else 4
    grads = module_bytes * math.ceil(n / (world if zero >= 2 else 1))
    bucket = module_bytes * min(n, 200_000_000) if zero >= 1 else 0   # reduce_bucket_size (distributed.py)
    fp32_partition = 4 * math.ceil(n / (world if zero >= 1 else 1))
    return {"gradients": grads + bucket, "step": grads + fp32_partition}


# ------------------------------------------------------------------------------------ activations

def checkpoint_units(net: nn.Module) -> list[nn.Module]:
    """The modules activation checkpointing wraps (engine/accelerate.py): diffusers' ResNet and
    transformer blocks, or a `blocks` ModuleList (the digits MLP)."""
    if hasattr(net, "enable_gradient_checkpointing"):
        return [m for m in net.modules() if type(m).__name__ in ("ResnetBlock2D", "Transformer2DModel")]
    blocks = getattr(net, "blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


@contextlib.contextmanager
def _checkpointing_off(nets):
    """Trace without checkpointing (the model derives the checkpointed size from the full trace)."""
    undo = []
    for net in nets:
        if getattr(net, "is_gradient_checkpointing", False):
            net.disable_gradient_checkpointing()
            undo.append(net.enable_gradient_checkpointing)
        for b in checkpoint_units(net):
            if getattr(type(b), "_sfd_checkpointed", False) and not getattr(b, "_sfd_recompute", False):
                b._sfd_recompute = True       # the checkpointed block's forward then runs plainly
                undo.append(lambda b=b: setattr(b, "_sfd_recompute", False))
    try:
        yield
    finally:
        for f in undo:
            f()


@contextlib.contextmanager
def _trained_in(nets, dtype):
    """The trained parameters temporarily held in `dtype` (DeepSpeed bf16 holds its modules so: no
    autocast weight casts get saved then), the original tensors restored afterwards."""
    if dtype is None:
        yield
        return
    saved = [(p, p.data) for net in nets for p in trained_parameters(net)]
    try:
        for p, data in saved:
            p.data = data.to(dtype)
        yield
    finally:
        for p, data in saved:
            p.data = data


def trace_saved(fn, units: list[nn.Module], exclude: set[int]) -> dict:
    """Run fn() under saved_tensors_hooks; bytes autograd saves, each storage once (storages in
    `exclude`, the weights, skipped), split into: outside every unit, per unit call, unit inputs."""
    seen, per_unit, inputs, current = set(), {}, [0], [None]
    alive = []   # keeps every counted storage alive during fn(): no address (or id) is reused

    def key_size(t):
        if t.device.type == "meta":      # no storage to compare: tensor identity (memory_report's trace)
            return id(t), t.numel() * t.element_size(), t
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes(), s

    def pack(t):
        k, size, ref = key_size(t)
        if k and k not in exclude and k not in seen:
            seen.add(k)
            alive.append(ref)
            per_unit[current[0]] = per_unit.get(current[0], 0) + size
        # fn() is never differentiated: the graph keeps the key, not the tensor (a graph holding its
        # own outputs through a hook is a reference cycle through C++ nodes that gc cannot free)
        return k

    def pre(mod, args, kwargs):
        current[0] = id(mod)
        x = args[0] if args else next(iter(kwargs.values()))
        inputs[0] += x.numel() * x.element_size()

    def post(mod, args, out):
        current[0] = None

    hooks = [u.register_forward_pre_hook(pre, with_kwargs=True) for u in units]
    hooks += [u.register_forward_hook(post) for u in units]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    finally:
        for h in hooks:
            h.remove()
        alive.clear()
    units_saved = [v for k, v in per_unit.items() if k is not None]
    return {"full": sum(per_unit.values()), "outside": per_unit.get(None, 0),
            "unit_inputs": inputs[0], "largest_unit": max(units_saved, default=0)}


def measure_activations(cfg, parts, device, rows=(1, 2)) -> dict:
    """Saved-for-backward bytes of each real phase at `rows` rows per branch (remain = forget = r).

    Draws come from a private generator and the task's own RNG state is restored, so the run's
    random and prompt streams do not move (as engine/memory.py's probe)."""
    from ..denoisers import FrozenFakeScore
    from ..losses import generator_loss
    from ..step import PhaseContext, draw_phase, fake_score_phase, generator_phase
    from .device import autocast_context
    s, e = cfg.sfd, cfg.engine
    nets = networks(parts)
    exclude = {t.untyped_storage().data_ptr() for n in nets.values() for t in _tensors(n) if t.device.type != "meta"}
    units = [u for r in ("teacher",) + ROLES for u in checkpoint_units(nets[r])]
    schedule = parts.teacher.schedule
    task_state = parts.task.rng_state() if hasattr(parts.task, "rng_state") else None
    out = {"fake_score": {}, "generator": {}}
    try:
        ds_bf16 = torch.bfloat16 if e.backend == "deepspeed" and e.precision == "bf16" else None
        with _checkpointing_off([nets[r] for r in ("teacher",) + ROLES]), _trained_in([nets[r] for r in ROLES], ds_bf16):
            for n in rows:
                rng = torch.Generator(device=device).manual_seed(0)
                view = FrozenFakeScore.for_run(parts.fake_score).view   # checkpointing is off here
                ctx = PhaseContext(parts.generator, parts.fake_score, view, parts.teacher, schedule, s.alpha,
                                   s.cfg_train_fake, s.cfg_eval_fake, s.cfg_eval_real, 2 * n, generator_loss)
                for phase in ROLES:
                    d = draw_phase(parts.task, rng, n, n, parts.sample_shape, s.t_min, s.t_max, 1.0, 1.0,
                                   device, phase)
                    phase_fn = fake_score_phase if phase == "fake_score" else generator_phase
                    fn = lambda: phase_fn(ctx, d)  # noqa: E731
                    with torch.enable_grad(), autocast_context(e.precision, device):
                        out[phase][n] = trace_saved(fn, units, exclude)
    finally:
        if task_state is not None:
            parts.task.set_rng_state(task_state)
    return out


def activation_bytes(trace: dict, rows_per_branch: int, checkpointing: bool) -> int:
    """Linear in the rows from the two traced points: fixed + per_row x rows."""
    def value(t):
        return t["outside"] + t["unit_inputs"] + t["largest_unit"] if checkpointing else t["full"]
    (r1, t1), (r2, t2) = sorted(trace.items())[:2]
    per_row = (value(t2) - value(t1)) / (r2 - r1)
    return int(round(value(t1) + per_row * (rows_per_branch - r1)))


# ------------------------------------------------------------------------------------ the estimate

def combine(static: dict, phases: dict, activations: dict) -> dict:
    """The peak: static + the largest of each phase's backward and (DeepSpeed) optimizer step."""
    base = static["weights"] + static["ema"] + static["optimizer"] + static["masters"]
    peaks = {}
    for r in ROLES:
        peaks[f"{r}_backward"] = activations[r] + phases[r]["gradients"]
        peaks[f"{r}_step"] = phases[r]["step"]
    worst = max(peaks, key=peaks.get)
    role = worst.rsplit("_", 1)[0]
    return {**static, "activations": activations[role], "gradients": phases[role]["gradients"],
            "activations_by_phase": activations, "phase_peaks": peaks, "peak_phase": worst,
            "total": base + peaks[worst]}


def estimate(cfg, parts, device, world: int = 1, rows_per_branch: int | None = None) -> dict:
    """Peak bytes of one training rank, by term (module docstring).

    cfg, parts: the run's Config and RunParts, BUILT (after the family's build_parts; before or after
        the trainer: nothing here depends on it). Must not be called inside a step.
    device: where the parts live and the probe phases run.
    world: DeepSpeed ranks (ZeRO sharding); 1 for the plain backend.
    rows_per_branch: remain rows (= forget rows) per micro-batch on this rank; default: the config's
        batch_size / grad_accum / world.
    Returns bytes per term ("weights", "ema", "optimizer", "masters", "gradients", "activations"), the
    per-phase breakdown, "peak_phase" and "total" (the modelled peak). Runs the two phases four times
    (1 and 2 rows per branch, forward only): cheap next to a step, and no RNG stream of the run moves."""
    t = cfg.train
    n = rows_per_branch or max(1, t.batch_size // t.grad_accum // world)
    static = static_terms(cfg, parts, world)
    phases = {r: phase_terms(cfg, parts, world, r) for r in ROLES}
    traced = measure_activations(cfg, parts, device)
    acts = {r: activation_bytes(traced[r], n, cfg.engine.activation_checkpointing) for r in ROLES}
    return {**combine(static, phases, acts), "rows_per_branch": n}


def micro_batch_estimator(cfg, parts, device, world: int = 1):
    """For train.micro_batch "auto" (engine/autobatch.py): a function micro -> the estimate at
    `micro` rows per branch on this rank, with the keys the chooser reads ("need" = the modelled
    peak; "weights" = what is resident before any step; "adam"; "gradients_and_adam"; "activations").
    The phases are traced once, here; each call after that is arithmetic."""
    static = static_terms(cfg, parts, world)
    phases = {r: phase_terms(cfg, parts, world, r) for r in ROLES}
    traced = measure_activations(cfg, parts, device)

    def estimate_at(micro: int) -> dict:
        n = max(1, micro)
        acts = {r: activation_bytes(traced[r], n, cfg.engine.activation_checkpointing) for r in ROLES}
        est = combine(static, phases, acts)
        return {**est, "rows_per_branch": n, "need": est["total"], "weights": static["weights"] + static["ema"],
                "adam": static["optimizer"],
                "gradients_and_adam": static["optimizer"] + static["masters"] + est["gradients"]}
    return estimate_at


def describe(est: dict) -> str:
    """One line per term in GiB, for logs and reports."""
    keys = ("weights", "ema", "optimizer", "masters", "gradients", "activations", "total")
    return ", ".join(f"{k} {est[k] / GIB:.2f} GiB" for k in keys)
