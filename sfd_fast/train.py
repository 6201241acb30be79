"""Entry point: `python|torchrun|deepspeed sfd_fast/train.py --config FILE [--set k=v ...]`.

    --config FILE        JSON run config (configs/*.json)
    --set a.b=value ...  override config keys (value parsed as JSON, else a string)
    --run-dir DIR        where this run writes (default: <run.root>/<run.name>)
    --resume DIR         continue the run in DIR exactly (its config.json; --set may extend steps)
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
    if cfg.model.kind == "digits":
        from sfd_fast.digits_run import build_digits_parts
        return build_digits_parts(cfg)
    if cfg.model.kind == "stable_diffusion":
        try:
            from sfd_fast.sd_run import build_sd_parts
        except ImportError as e:
            raise SystemExit(f"model.kind 'stable_diffusion' is not available in this build ({e})")
        try:
            return build_sd_parts(cfg)
        except (FileNotFoundError, ValueError) as e:  # bad model / prompt inputs: a message, not a traceback
            raise SystemExit(f"error: {e}") from None
    if cfg.model.kind == "ddpm":
        from sfd_fast.ddpm.build import build_parts as build_ddpm_parts
        from sfd_fast.ddpm.checkpoints import ReferenceCheckpointError
        try:
            return build_ddpm_parts(cfg)
        except ReferenceCheckpointError as e:  # wrong architecture / unreadable file: a message
            raise SystemExit(f"error: {e}") from None
    raise SystemExit(f"unknown model.kind {cfg.model.kind!r}")


def main(argv=None) -> dict:
    from sfd_fast.config import ConfigError, load_config
    args = parse_args(argv)
    setup_logging()
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
            if (run_dir / "checkpoints" / "latest").exists():
                raise ConfigError(f"run directory {run_dir} already holds a run; use --resume {run_dir} to "
                                  "continue it, or --run-dir / --set run.name=... for a new one")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and cfg.engine.backend == "plain":
            raise ConfigError(f"launched with WORLD_SIZE={world}, but engine.backend is 'plain' (one process); "
                              "run with a single process")
        distributed = cfg.engine.backend == "deepspeed"
        from sfd_fast.distributed import preflight
        preflight(cfg)  # explicit requests (deepspeed, adam8bit, xformers, world/batch) fail here
    except (ConfigError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None

    from sfd_fast.engine import resolve_device
    from sfd_fast.trainer import SFDTrainer
    import torch

    rank0 = True
    if distributed:  # DeepSpeed: process group first (gloo on CPU, nccl on CUDA); rank-0-only writes
        from sfd_fast.distributed import DeepSpeedTrainer, barrier, init_distributed
        device = init_distributed(cfg)
        rank0 = torch.distributed.get_rank() == 0
        if not rank0:
            logging.getLogger("sfd_fast").setLevel(logging.WARNING)
    else:
        device = resolve_device(cfg.run.device)
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(run_dir)
    torch.manual_seed(cfg.run.seed)
    if distributed and not rank0:
        barrier()  # rank 0 pretrains/caches the teacher first; the others then load it
    parts = build_parts(cfg)  # may pretrain/cache the digits teacher (errors here name the file)
    if distributed and rank0:
        barrier()
    if not args.resume and rank0:
        from sfd_fast.checkpoint import atomic_write_text
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=1))
    trainer = (DeepSpeedTrainer if distributed else SFDTrainer)(cfg, parts, run_dir, device)
    if args.resume:
        trainer.resume(run_dir)
    log.info("run dir %s: %d steps, batch %d remain + %d forget per step", run_dir, cfg.train.total_steps,
             cfg.train.batch_size, cfg.train.batch_size)
    trainer.train()
    result = {"run_dir": str(run_dir)}
    if cfg.model.kind == "digits" and cfg.eval.enabled and rank0:
        result.update(evaluate_digits_run(cfg, parts, trainer, run_dir))
    return result


def evaluate_digits_run(cfg, parts, trainer, run_dir: Path) -> dict:
    from sfd_fast.checkpoint import atomic_write_text
    from sfd_fast.denoisers import ClassCondDenoiser
    from sfd_fast.digits_run import load_generator_init, make_schedule
    from sfd_fast.evaluation.digits_eval import evaluate_digits
    from sfd_fast.generator import OneStepGenerator
    from sfd_fast.pretrain import get_digits_classifier

    clf, clf_meta = get_digits_classifier(cfg)
    device = trainer.device
    init_net = load_generator_init(cfg, parts.teacher.net).to(device)
    init_gen = OneStepGenerator(ClassCondDenoiser(init_net, make_schedule(cfg).to(device), cfg.sfd.num_classes),
                                cfg.sfd.t_init)
    metrics = evaluate_digits(clf, trainer.generator_ema, init_gen, trainer.teacher, cfg.sfd.forget_class,
                              cfg.sfd.num_classes, cfg.eval.samples_per_class, cfg.eval.teacher_steps)
    metrics["classifier_accuracy"] = clf_meta["heldout_accuracy"]
    metrics["step"] = trainer.step
    atomic_write_text(run_dir / "eval.json", json.dumps(metrics, indent=1))
    grid = run_dir / "samples_final.png"
    parts.save_grid(trainer.generator_ema, grid)
    log.info("eval: %s", json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}))
    log.info("eval.json: %s  grid (one row per digit 0-9): %s", run_dir / "eval.json", grid)
    return {"eval": metrics, "grid": str(grid)}


if __name__ == "__main__":
    main()
