"""CUDA-time code paths exercised on CPU as far as they go (issue 19): bitsandbytes 8-bit Adam against
fp32 Adam on a few hundred steps of the digits objective, through the product's make_optimizer; and
the nccl branch of process-group init run through its gloo twin."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sfd_fast.config import EngineConfig, OptimizerConfig

ROOT = Path(__file__).resolve().parents[1]


def _installed(name):
    try:
        __import__(name)
        return True
    except Exception:
        return False


def _digits_run(optimizer: str, steps: int = 300, seed: int = 0):
    """DDPM epsilon loss of a small DigitsEpsMLP on the 1797 digits, `steps` Adam steps with the same
    draws for both optimizers. Returns (per-step losses, held-out loss after training, optimizer)."""
    from sfd_fast.digits.data import load_digits_tensors
    from sfd_fast.digits.model import DigitsEpsMLP
    from sfd_fast.engine.optim import make_optimizer
    from sfd_fast.schedules import VPSchedule

    x, y = load_digits_tensors()
    sched = VPSchedule.from_betas("linear", 1e-4, 0.02, 1000, "epsilon")
    torch.manual_seed(seed)
    net = DigitsEpsMLP(10, hidden=128, blocks=2)
    role = OptimizerConfig()
    role.lr, role.betas, role.eps = 1e-3, [0.9, 0.999], 1e-8
    opt = make_optimizer(role, EngineConfig(optimizer=optimizer), net.parameters(), torch.device("cpu"))
    g = torch.Generator().manual_seed(seed + 1)

    def batch(n, gen):
        idx = torch.randint(0, x.shape[0], (n,), generator=gen)
        t = torch.randint(0, 1000, (n,), generator=gen)
        noise = torch.randn(x[idx].shape, generator=gen)
        return sched.add_noise(x[idx], noise, t), t, y[idx], noise

    losses = []
    for _ in range(steps):
        xt, t, lab, noise = batch(64, g)
        loss = (net(xt, t, lab) - noise).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        xt, t, lab, noise = batch(1024, torch.Generator().manual_seed(12345))
        held_out = (net(xt, t, lab) - noise).square().mean().item()
    return losses, held_out, opt


@pytest.mark.skipif(not _installed("bitsandbytes"), reason="bitsandbytes is not installed (pip install bitsandbytes)")
@pytest.mark.parametrize("seed", [0, 1])
def test_adam8bit_tracks_fp32_adam_on_digits(seed):
    """Tolerance: 8-bit Adam stores both moments block-wise quantised (blocks of 256, dynamic 8-bit
    code: ~1% relative error per entry), so the two runs take different paths; what must agree is
    the loss they reach. The held-out loss is a mean over 1024 fixed draws (its sampling error is
    ~3% of its value: per-sample DDPM losses have a coefficient of variation ~1), so the two
    optimizers' held-out losses must agree within 15% (5 standard errors of a difference), the
    mean of the last 50 training losses within 15%, and both must have learned (held-out below 60%
    of the first 10 steps' mean)."""
    ref_losses, ref_held, _ = _digits_run("adam", seed=seed)
    q_losses, q_held, opt = _digits_run("adam8bit", seed=seed)
    big = [p for grp in opt.param_groups for p in grp["params"] if p.numel() >= 4096]
    assert big and all(opt.state[p]["state1"].dtype == torch.uint8 for p in big), "8-bit state expected"
    start = sum(ref_losses[:10]) / 10
    assert ref_held < 0.6 * start and q_held < 0.6 * start
    assert abs(q_held - ref_held) <= 0.15 * ref_held, (q_held, ref_held)
    tail_ref, tail_q = sum(ref_losses[-50:]) / 50, sum(q_losses[-50:]) / 50
    assert abs(tail_q - tail_ref) <= 0.15 * tail_ref, (tail_q, tail_ref)


NCCL_TWIN = textwrap.dedent("""
    import os, sys, types, torch
    sys.path.insert(0, sys.argv[1])
    from sfd_fast.config import Config
    from sfd_fast.engine import device as device_mod
    from sfd_fast.engine.distributed import init_distributed, shutdown_distributed
    calls = {}
    device_mod.resolve_device = lambda spec: torch.device("cuda")      # the CUDA branch is taken ...
    torch.cuda.set_device = lambda i: calls.setdefault("set_device", i)
    # ... and deepspeed.init_distributed (imported by init_distributed AFTER it set DS_ACCELERATOR)
    # is a twin that records what it was asked and starts gloo where nccl was asked for
    twin = types.ModuleType("deepspeed")
    def init(dist_backend=None, auto_mpi_discovery=True, timeout=None):
        calls.update(backend=dist_backend, mpi=auto_mpi_discovery, accelerator_at_import=os.environ.get("DS_ACCELERATOR"))
        torch.distributed.init_process_group("gloo" if dist_backend == "nccl" else dist_backend, timeout=timeout)
    twin.init_distributed = init
    sys.modules["deepspeed"] = twin
    dev = init_distributed(Config())
    print("device", dev, "set_device", calls.get("set_device"), "asked", calls.get("backend"),
          "got", torch.distributed.get_backend(), "world", torch.distributed.get_world_size(),
          "accelerator", calls.get("accelerator_at_import"), "rank", os.environ.get("RANK"), "mpi", calls.get("mpi"))
    shutdown_distributed()
    print("initialized after shutdown", torch.distributed.is_initialized())
""")


def test_nccl_branch_of_process_group_init_through_gloo(tmp_path):
    """init_distributed on a CUDA device: sets the device of LOCAL_RANK, DS_ACCELERATOR=cuda before
    deepspeed is imported, asks for nccl (no MPI discovery) and a world of one from a plain launch;
    the process group itself is gloo's (no GPU). What stays CUDA-only: NCCL itself."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")}
    r = subprocess.run([sys.executable, "-c", NCCL_TWIN, str(ROOT)], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith(("device", "initialized"))]
    assert lines[0].split() == ["device", "cuda:0", "set_device", "0", "asked", "nccl", "got", "gloo",
                                "world", "1", "accelerator", "cuda", "rank", "0", "mpi", "False"], r.stdout
    assert lines[1] == "initialized after shutdown False"
