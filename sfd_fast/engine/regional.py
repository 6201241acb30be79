"""Regional compilation (engine.compile_regions): torch.compile the repeated blocks of a network
instead of the whole network.

Why: a cold Inductor compile of a whole SD1.5 UNet is one huge graph per (network, grad mode, batch
shape), 60-200 s each on an H100's host (issue 19), and the SFD step has about five of them. The
UNet is mostly the same few blocks repeated (ResnetBlock2D, BasicTransformerBlock); compiled per
block, with Dynamo's inlined nn.Modules (parameters are graph inputs, the default since torch 2.5)
every instance of a block class at the same input shape reuses ONE compiled graph, so the cold cost
is paid per distinct (block class, shape, grad mode) instead of per whole network: far less code to
trace and generate. The glue between blocks (embeddings, up/down sampling, norms) stays eager.

Each block is compiled in place (`nn.Module.compile`: module objects and parameter names unchanged,
as for engine.compile) with fullgraph=True and dynamic=False.

Recompile limit: all instances of a block class share one code object, so Dynamo counts every
(shape, grad mode) variant of, e.g., ResnetBlock2D.forward against one recompile limit (8 by
default); the tiny SD UNet alone has more (found by the device-check rehearsal: "recompile_limit
(8) ... size mismatch at index 2. expected 16, actual 8"). The number of variants is bounded by the
network's structure: at most one per region instance and call variant (generator with and without
grad, fake score trained and frozen, teacher: 5). compile_regions raises the limit to that bound
(never lowers it); beyond it a recompile is still an error (fullgraph=True), so a storm is not
hidden. After step 1 every variant is cached: no compile later.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# The repeated blocks of the families' networks, by class name (diffusers' UNet2DConditionModel,
# the ddpm family's DDPMUNet, the digits MLP). A network without any of them is compiled whole.
REGION_CLASSES = ("ResnetBlock2D", "BasicTransformerBlock", "ResnetBlock", "AttnBlock", "ResidualBlock")
CALL_VARIANTS = 5   # generator (grad, no grad), fake score (trained, frozen view), teacher


def region_modules(net: torch.nn.Module, classes=REGION_CLASSES) -> list[torch.nn.Module]:
    """The outermost submodules of `net` whose class name is in `classes` (a region inside another
    region is left to its parent's graph)."""
    found, inside = [], set()
    for name, mod in net.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if type(mod).__name__ in classes and mod is not net:
            found.append(mod)
            inside.add(name)
    return found


def raise_recompile_limit(bound: int) -> None:
    """Dynamo's per-code-object recompile limit to at least `bound` (and the accumulated limit with
    it); never lowered. Several networks add their bounds (each call adds its own)."""
    import torch._dynamo.config as dc

    want = max(dc.recompile_limit, int(bound))
    if hasattr(dc, "accumulated_recompile_limit"):
        dc.accumulated_recompile_limit = max(dc.accumulated_recompile_limit, want)
    dc.recompile_limit = want


def compile_regions(net: torch.nn.Module, backend: str, **kwargs) -> int:
    """Compile each region of `net` in place; the whole net when it has none. Returns the number of
    modules compiled."""
    regions = region_modules(net)
    if not regions:
        net.compile(backend=backend, dynamic=False, fullgraph=True, **kwargs)
        return 1
    raise_recompile_limit(len(regions) * CALL_VARIANTS)
    for mod in regions:
        mod.compile(backend=backend, dynamic=False, fullgraph=True, **kwargs)
    kinds = sorted({type(m).__name__ for m in regions})
    log.info("engine.compile_regions: %d blocks of %s compiled in %s", len(regions), kinds, type(net).__name__)
    return len(regions)
