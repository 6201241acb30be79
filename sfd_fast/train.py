"""Entry point: `python|torchrun|deepspeed sfd_fast/train.py --config FILE [--set k=v ...]`.

    --config FILE        JSON run config (configs/*.json)
    --set a.b=value ...  override config keys (value parsed as JSON, else a string)
    --run-dir DIR        where this run writes (default: <run.root>/<run.name>)
    --resume DIR         continue the run in DIR exactly (its config.json; --set may extend steps)
    --dry-run            build everything, run one step, print parameter counts, memory and the
                         resolved config; writes nothing to the run directory
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: import the package, not sibling modules
    import importlib.util
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    # Add the repository root only when sfd_fast is not installed: the root also holds `kernels/`
    # (installed as sfd_fast.kernels), which would shadow the unrelated PyPI package `kernels`
    # that bitsandbytes / transformers probe for.
    if importlib.util.find_spec("sfd_fast") is None:
        sys.path.insert(0, os.path.dirname(_here))

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger("sfd_fast")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="sfd_fast/train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON run config")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--run-dir", help="run directory (default <run.root>/<run.name>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="resume the run in RUN_DIR from its latest checkpoint")
    p.add_argument("--dry-run", action="store_true", help="build, run one step, report; write nothing")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args(argv)
    if not args.config and not args.resume:
        p.error("give --config FILE (or --resume RUN_DIR)")
    return args


def setup_logging(run_dir: Path | None = None):
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger("sfd_fast")
    root.setLevel(logging.INFO)
    if not root.handlers:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(fmt)
        root.addHandler(h)
    if run_dir is not None:
        fh = logging.FileHandler(run_dir / "log.txt")
        fh.setFormatter(fmt)
        root.addHandler(fh)


def build_parts(cfg):
    """The family's RunParts (families.py maps model.kind to its builder)."""
    from sfd_fast.families import family, resolve
    try:
        return resolve(family(cfg.model.kind).build)(cfg)
    except (FileNotFoundError, ValueError) as e:  # bad model / prompt inputs: a message, not a traceback
        raise SystemExit(f"error: {e}") from None


def load_run_config(args):
    """(cfg, run_dir) from --config/--set or --resume, all checks done before anything is built."""
    from sfd_fast.config import ConfigError, load_config
    from sfd_fast.engine import preflight
    try:
        if args.resume:
            run_dir = Path(args.resume)
            cfg_path = run_dir / "config.json"
            if not cfg_path.is_file():
                raise ConfigError(f"--resume {run_dir}: no config.json there; is it a run directory?")
            cfg = load_config(cfg_path, args.overrides)
        else:
            cfg = load_config(args.config, args.overrides)
            run_dir = Path(args.run_dir) if args.run_dir else Path(cfg.run.root) / cfg.run.name
            if (run_dir / "checkpoints" / "latest").exists() and not args.dry_run:
                raise ConfigError(f"run directory {run_dir} already holds a run; use --resume {run_dir} to "
                                  "continue it, or --run-dir / --set run.name=... for a new one")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and cfg.engine.backend == "plain":
            raise ConfigError(f"launched with WORLD_SIZE={world}, but engine.backend is 'plain' (one process); "
                              "run with a single process")
        preflight(cfg)  # explicit requests (deepspeed, adam8bit, xformers, world/batch) fail here
    except (ConfigError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    return cfg, run_dir


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    cfg, run_dir = load_run_config(args)
    import torch

    from sfd_fast.checkpoint import atomic_write_text
    from sfd_fast.engine import resolve_device
    from sfd_fast.families import family, resolve
    from sfd_fast.trainer import SFDTrainer

    # 1. device and ranks (DeepSpeed: process group first, gloo on CPU / nccl on CUDA; rank 0 writes)
    distributed = cfg.engine.backend == "deepspeed"
    if distributed:
        from sfd_fast.engine.distributed import barrier, init_distributed
        device = init_distributed(cfg)
        rank0 = torch.distributed.get_rank() == 0
        if not rank0:
            logging.getLogger("sfd_fast").setLevel(logging.WARNING)
    else:
        device, rank0 = resolve_device(cfg.run.device), True
    write = rank0 and not args.dry_run
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(run_dir)
    # 2. the family's parts (may pretrain and cache the digits teacher: rank 0 first, then the others)
    torch.manual_seed(cfg.run.seed)
    if distributed and not rank0:
        barrier()
    parts = build_parts(cfg)
    if distributed and rank0:
        barrier()
    fam = family(cfg.model.kind)
    if fam.evaluate_during and cfg.eval.enabled and cfg.eval.every > 0 and not args.dry_run:
        # every rank takes part in the collective sampling_generator(); only rank 0 evaluates
        parts.evaluate_during = resolve(fam.evaluate_during)(cfg, parts, device) if rank0 else (lambda gen: {})
    if args.dry_run:
        return dry_run(cfg, parts, device)
    if not args.resume and rank0:
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=1))
    # 3. train
    trainer = SFDTrainer(cfg, parts, run_dir, device)
    if args.resume:
        trainer.resume(run_dir)
    log.info("run dir %s: %d steps, batch %d remain + %d forget per step", run_dir, cfg.train.total_steps,
             cfg.train.batch_size, cfg.train.batch_size)
    trainer.train()
    # 4. the family's evaluation (rank 0)
    result = {"run_dir": str(run_dir)}
    if fam.evaluate and cfg.eval.enabled and rank0:
        result.update(resolve(fam.evaluate)(cfg, parts, trainer, run_dir))
    if cfg.eval.report and rank0:
        from sfd_fast.evaluation.report import write_report
        result["report"] = str(write_report(run_dir))
        log.info("report: %s", result["report"])
    return result


def dry_run(cfg, parts, device) -> dict:
    """One step of a trainer that writes nothing; prints parameter counts, memory and the config."""
    import time

    from sfd_fast.trainer import SFDTrainer, peak_memory, reset_peak_memory
    trainer = SFDTrainer(cfg, parts, None, device)
    counts = {role: sum(p.numel() for p in net.parameters())
              for role, net in (("teacher", trainer.teacher), ("fake_score", trainer.fake_score),
                                ("generator", trainer.generator))}
    reset_peak_memory(device)
    t0 = time.time()
    trainer.train_step()
    seconds = time.time() - t0
    report = {"dry_run": True, "device": str(device), "parameters": counts, "step_seconds": seconds,
              **peak_memory(device), "config": cfg.to_dict()}
    if trainer.backend.is_rank0:
        print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
