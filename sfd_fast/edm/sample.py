"""Sampling for edm runs: the one-step generator, and the teacher with EDM's Heun sampler.

    sfd-fast sample --run D --classes 0-9 --n-per-class N --out-dir DIR [--heun-steps 18]
        -> DIR/{cls:03d}_{id:05d}.png (the naming `sfd-fast eval-ddpm` and the reference tools read);
           without --heun-steps: the run's one-step generator (EMA unless --raw); with it: the run's
           teacher sampled as EDM's generate.py does (deterministic Heun, EDM's default 18 steps)

EDM's sampler (generate.py edm_sampler, S_churn 0): sigmas t_i = (smax^(1/rho) + i/(N-1)
(smin^(1/rho) - smax^(1/rho)))^rho, i < N, then t_N = 0, with smin = max(0.002, net.sigma_min),
smax = min(80, net.sigma_max), rho 7; x_0 = t_0 z; an Euler step x' = x + (t_{i+1} - t_i) d(x, t_i),
d = (x - D(x, t)) / t, corrected by the mean slope (Heun) except into t_N = 0. In float64, as EDM.
"""
from __future__ import annotations

from pathlib import Path

import torch


def run_config(run_dir: Path):
    from ..config import ConfigError, read_run_config
    try:
        return read_run_config(run_dir, "edm")
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def heun_sigmas(num_steps: int, net_sigma_min: float, net_sigma_max: float, sigma_min=0.002, sigma_max=80.0,
                rho=7.0) -> torch.Tensor:
    lo, hi = max(sigma_min, net_sigma_min), min(sigma_max, net_sigma_max)
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (hi ** (1 / rho) + i / (num_steps - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def heun_sample(net, z: torch.Tensor, labels: torch.Tensor | None, num_steps: int = 18) -> torch.Tensor:
    """EDM's deterministic Heun sampler for a preconditioned network (one-hot float labels)."""
    if num_steps < 2:
        raise ValueError(f"heun_sample: num_steps must be >= 2, got {num_steps}")
    sig = heun_sigmas(num_steps, float(net.sigma_min), float(net.sigma_max)).to(z.device)

    def slope(x, t):
        return (x - net(x, t.expand(x.shape[0]), labels).to(torch.float64)) / t
    x = z.to(torch.float64) * sig[0]
    for i in range(num_steps):
        t, t_next = sig[i], sig[i + 1]
        d = slope(x, t)
        x_next = x + (t_next - t) * d
        if i < num_steps - 1:
            x_next = x + (t_next - t) * 0.5 * (d + slope(x_next, t_next))
        x = x_next
    return x.float()


class HeunTeacher(torch.nn.Module):
    """The teacher as a (z, class) -> image sampler, for sample_to_folder."""

    def __init__(self, net, num_classes: int, steps: int):
        super().__init__()
        self.net, self.num_classes, self.steps = net, num_classes, steps

    def forward(self, z, cond):
        labels = torch.nn.functional.one_hot(cond.long(), self.num_classes).float()
        return heun_sample(self.net, z, labels, self.steps)


def load_run_generator(run_dir: Path, device, checkpoint: str | None = None, raw: bool = False):
    """-> (cfg, one-step generator with the run's EMA (or raw) weights, description)."""
    from safetensors.torch import load_file

    from ..ddpm.sample import generator_weights_file
    from .build import build_network_for_run
    cfg = run_config(run_dir)
    ck, f = generator_weights_file(run_dir, checkpoint, raw)
    generator = build_network_for_run(cfg, load_file(str(f)))
    return cfg, generator.to(device).eval(), f"{ck.name}/{f.name}"


def main(argv=None) -> int:
    """sfd-fast sample for edm runs (see the module docstring)."""
    from ..ddpm.sample import checked_sample_args, class_sample_parser, sample_to_folder
    p = class_sample_parser("Class samples of an edm run, named {cls:03d}_{id:05d}.png: the one-step "
                            "generator, or the teacher (--heun-steps).")
    p.add_argument("--heun-steps", type=int, default=0,
                   help="sample the run's TEACHER with EDM's Heun sampler in this many steps (EDM default 18)")
    a = p.parse_args(argv)
    if a.heun_steps == 1 or a.heun_steps < 0:
        p.error("--heun-steps must be >= 2 (EDM's default is 18), or 0 for the one-step generator")
    cfg = run_config(Path(a.run))
    classes, out = checked_sample_args(p, a, cfg.sfd.num_classes)
    from ..engine import resolve_device
    device = resolve_device(a.device)
    if a.heun_steps:
        from .build import resolve_snapshot, snapshot_network
        teacher = snapshot_network(cfg, resolve_snapshot(cfg), cfg.edm.entry)
        sampler, desc = HeunTeacher(teacher, cfg.sfd.num_classes, a.heun_steps).to(device), \
            f"teacher {cfg.edm.snapshot} [{cfg.edm.entry}], Heun {a.heun_steps} steps"
        shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    else:
        _, sampler, desc = load_run_generator(Path(a.run), device, a.checkpoint, a.raw)
        net = sampler.net
        shape = (net.img_channels, net.img_resolution, net.img_resolution)
    n = sample_to_folder(sampler, classes, a.n_per_class, out, shape, a.batch_size, a.seed)
    print(f"{out}: {n} images ({len(classes)} classes x {a.n_per_class}), {desc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
