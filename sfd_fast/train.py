"""Entry point: `python|torchrun|deepspeed sfd_fast/train.py --config FILE [--set k=v ...]`.

    --config FILE        JSON run config (configs/*.json)
    --set a.b=value ...  override config keys (value parsed as JSON, else a string)
    --run-dir DIR        where this run writes (default: <run.root>/<run.name>)
    --resume DIR         continue the run in DIR exactly from its newest usable checkpoint (its
                         config.json; --set may change only rundir.RESUMABLE keys: length, cadences,
                         evaluation, logging)
    --dry-run            build everything, run one step, print parameter counts, memory and the
                         resolved config; writes nothing to the run directory

Exit status: 0 done; 2 bad input (one paragraph naming the key or file, nothing written); 3 the run
cannot train (checkpoint written); 128+N stopped by signal N after a checkpoint (docs/reliability.md).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: import the package, not its sibling modules
    import importlib.util
    _here = os.path.dirname(os.path.abspath(__file__))
    # `python sfd_fast/train.py` puts sfd_fast/ first on sys.path, which would make config.py, sd/,
    # engine/ ... importable as top-level `config`, `sd`, `engine`: drop it, and add the repository
    # root only when sfd_fast is not installed (nothing at the root shadows an installed package:
    # tests/test_install.py).
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
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
    if args.resume and (args.config or args.run_dir):
        p.error("--resume RUN_DIR continues that run with its stored config.json; it cannot be combined with "
                "--config or --run-dir (change the keys that may change on resume with --set)")
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
        return fh
    return None


def build_parts(cfg):
    """The family's RunParts (families.py maps model.kind to its builder)."""
    from sfd_fast.errors import UserError
    from sfd_fast.families import family, resolve
    try:
        return resolve(family(cfg.model.kind).build)(cfg)
    except (FileNotFoundError, ValueError, UnicodeDecodeError) as e:  # bad model / prompt inputs
        raise UserError(str(e)) from None


def load_run_config(args):
    """(cfg, run_dir, resume changes) from --config/--set or --resume, checked before anything is built."""
    from sfd_fast.checkpoint import checkpoint_folders
    from sfd_fast.config import ConfigError, load_config
    from sfd_fast.engine import preflight
    from sfd_fast.errors import UserError
    from sfd_fast.rundir import check_run_dir_usable, resolve_paths, resume_config
    changes = None
    if args.resume:
        run_dir = Path(args.resume).absolute()
        cfg, changes = resume_config(run_dir, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
        resolve_paths(cfg)     # stored absolute: a resume works from any working directory
        run_dir = Path(args.run_dir) if args.run_dir else Path(cfg.run.root) / cfg.run.name
        if not args.dry_run:
            check_run_dir_usable(run_dir)
            if checkpoint_folders(run_dir) or (run_dir / "checkpoints" / "latest").exists():
                raise ConfigError(f"run directory {run_dir} already holds a run; use --resume {run_dir} to "
                                  "continue it, or --run-dir / --set run.name=... for a new one")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and cfg.engine.backend == "plain":
        raise ConfigError(f"launched with WORLD_SIZE={world}, but engine.backend is 'plain' (one process); "
                          "run with a single process")
    try:
        preflight(cfg)  # explicit requests (deepspeed, adam8bit, xformers, world/batch) fail here
    except RuntimeError as e:
        raise UserError(str(e)) from None
    from sfd_fast.trackers import check_installed
    check_installed(cfg.log.trackers)   # log.trackers asks for a package that is missing: stop here
    return cfg, run_dir, changes


def main(argv=None) -> dict:
    """Train (or resume) one run; user errors exit with status 2 and one paragraph (errors.py)."""
    from sfd_fast.errors import user_error_boundary
    with user_error_boundary():
        return _main(argv)


def _main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    cfg, run_dir, changes = load_run_config(args)
    import torch

    from sfd_fast.engine import resolve_device
    from sfd_fast.engine.memory import check_memory
    from sfd_fast.families import family, resolve

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
    world = torch.distributed.get_world_size() if distributed else 1
    if cfg.train.micro_batch != "auto" and not args.dry_run:
        check_memory(cfg, parts, device, world)   # a micro-batch that cannot fit: refused with the estimate
    # 3. the trainer, before anything is written: train.micro_batch "auto" estimates and probes here
    #    (engine/autobatch.py) and refuses, with what to do, when not even a micro-batch of 1 fits
    from sfd_fast.trainer import SFDTrainer
    held = HeldRecords()     # what the trainer logs now (auto choice, acceleration) goes to log.txt too
    log.addHandler(held)
    try:
        trainer = SFDTrainer(cfg, parts, None, device)
    finally:
        log.removeHandler(held)
    if cfg.train.adversarial.share > 0:   # forget-row noise from a short search (docs/robustness.md)
        from sfd_fast.evaluation.attacks.adversarial import install_adversarial_noise
        install_adversarial_noise(trainer, resolve(fam.surrogate)(cfg)[0], cfg.train.adversarial)
    if args.dry_run:
        return dry_run(cfg, trainer, device)
    # 4. the run directory, locked for the run's life (rank 0 writes)
    from sfd_fast.rundir import RunLock
    lock = open_run_dir(run_dir, held.records) if rank0 else None
    try:
        trainer.attach_run_dir(run_dir)
        return train_run(args, cfg, trainer, run_dir, device, rank0, changes)
    finally:
        if isinstance(lock, RunLock):
            lock.release()
            # this run's log.txt handler goes with it (in-process callers run several runs)
            own_log = str((run_dir / "log.txt").absolute())
            for h in [h for h in log.handlers if getattr(h, "baseFilename", None) == own_log]:
                log.removeHandler(h)
                h.close()


class HeldRecords(logging.Handler):
    """Keeps log records emitted before the run directory exists, for its log.txt."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def open_run_dir(run_dir: Path, held: list = ()):
    """Create and lock the run directory, remove leftovers of interrupted writes, log into it
    (first the `held` records, logged while the trainer was built)."""
    from sfd_fast.checkpoint import remove_stale_temporaries
    from sfd_fast.errors import UserError
    from sfd_fast.rundir import RunLock
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir).acquire()
    except OSError as e:
        raise UserError(f"run directory {run_dir} cannot be created or locked ({e.strerror or e}); choose "
                        "another --run-dir (or run.root)") from None
    fh = setup_logging(run_dir)
    for record in held:
        fh.handle(record)
    for path in remove_stale_temporaries(run_dir):
        log.info("removed %s (left by an interrupted write)", path)
    return lock


def train_run(args, cfg, trainer, run_dir: Path, device, rank0: bool, changes) -> dict:
    """Train under the lock: a new run writes config.json (train.micro_batch "auto" resolved to the
    chosen int, so a resume reuses it); a resume loads the newest usable checkpoint, drops stats
    past it and records its config changes; environment.json gets this start; the trackers open.
    Then training and the family's evaluation (rank 0)."""
    from sfd_fast.checkpoint import atomic_write_json
    from sfd_fast.environment import record_environment
    from sfd_fast.errors import UserError
    from sfd_fast.rundir import record_resume, trim_stats
    from sfd_fast.trackers import open_trackers
    if not args.resume and rank0:
        trim_stats(run_dir, 0)   # a run that died before its first checkpoint left stats behind
        atomic_write_json(run_dir / "config.json", cfg.to_dict())
    if args.resume:
        trainer.resume(run_dir)
        if trainer.step >= cfg.train.total_steps:
            raise UserError(f"--resume {run_dir}: the run is complete (step {trainer.step}, train.total_steps="
                            f"{cfg.train.total_steps}); to train further pass --set train.total_steps=N")
        if trainer.clock.over_limit():
            raise UserError(f"--resume {run_dir}: the run used its train.time_limit_s={cfg.train.time_limit_s:g} "
                            f"({trainer.clock.total:.1f} s of SFD); to train further pass a larger "
                            "--set train.time_limit_s=S (or 0 for none)")
        if rank0:
            trim_stats(run_dir, trainer.step)
            record_resume(run_dir, cfg, changes, trainer.step)
    log.info("run dir %s: %d steps%s, batch %d remain + %d forget per step", run_dir, cfg.train.total_steps,
             f" or {cfg.train.time_limit_s:g} s of SFD" if cfg.train.time_limit_s > 0 else "",
             cfg.train.batch_size, cfg.train.batch_size)
    if rank0:
        record_environment(run_dir, device, trainer.backend.world, trainer.step)
    # TensorBoard / W&B (log.trackers): a resume continues the same TensorBoard folder and W&B run id
    trainer.trackers = open_trackers(cfg.log, run_dir, trainer.step, cfg.to_dict(), rank0, trainer.plan.as_dict())
    try:
        result = _train_and_evaluate(cfg, trainer, run_dir, device, rank0)
    except BaseException:
        trainer.trackers.close(failed=True)
        raise
    trainer.trackers.close()
    return result


def _train_and_evaluate(cfg, trainer, run_dir: Path, device, rank0: bool) -> dict:
    import torch

    from sfd_fast.errors import UserError
    from sfd_fast.families import family, resolve
    trainer.guard.install_signals()
    try:
        trainer.train()
    except torch.OutOfMemoryError:
        raise UserError(f"out of memory on {device} at step {trainer.step + 1} with a micro-batch of "
                        f"{cfg.train.batch_size // cfg.train.grad_accum} rows; raise train.grad_accum or lower "
                        f"train.batch_size, then --resume {run_dir}") from None
    except Exception as e:   # a multi-node run whose peer died: one paragraph and exit 4 (engine/peers.py)
        from sfd_fast.engine.peers import is_peer_loss, peer_loss_error
        if is_peer_loss(e):
            raise peer_loss_error(e, trainer.step, run_dir) from None
        raise
    finally:
        trainer.guard.restore_signals()
    result = {"run_dir": str(run_dir)}
    fam = family(cfg.model.kind)
    if fam.evaluate and cfg.eval.enabled and rank0:
        result.update(resolve(fam.evaluate)(cfg, trainer.parts, trainer, run_dir))
        trainer.trackers.final_eval(run_dir / "eval.json", trainer.step)
    if cfg.eval.enabled and cfg.eval.attacks.enabled and rank0:   # worst-case forgetting (docs/robustness.md)
        from sfd_fast.evaluation.attacks.run import attack_finished_run
        result["attacks"] = attack_finished_run(cfg, run_dir, device)
    if cfg.eval.report and rank0:
        from sfd_fast.evaluation.report import write_report
        result["report"] = str(write_report(run_dir))
        log.info("report: %s", result["report"])
    return result


def dry_run(cfg, trainer, device) -> dict:
    """One step of a trainer that writes nothing; prints parameter counts, the micro-batch (with
    the auto choice's record), memory and the config."""
    import time

    from sfd_fast.engine.memory import peak_memory, reset_peak_memory
    counts = {role: sum(p.numel() for p in net.parameters())
              for role, net in (("teacher", trainer.teacher), ("fake_score", trainer.fake_score),
                                ("generator", trainer.generator))}
    choice = trainer.micro_batch_choice
    micro = {"micro_batch": cfg.train.batch_size // cfg.train.grad_accum, "grad_accum": cfg.train.grad_accum,
             "auto": None if choice is None else {k: v for k, v in choice.items() if k != "tried"}}
    reset_peak_memory(device)
    t0 = time.time()
    trainer.train_step()
    seconds = time.time() - t0
    report = {"dry_run": True, "device": str(device), "parameters": counts, "micro_batch": micro,
              "step_seconds": seconds, **peak_memory(device), "acceleration_plan": trainer.plan.as_dict(),
              "config": cfg.to_dict()}
    if trainer.backend.is_rank0:
        print(json.dumps(report, indent=1))
    return report


def cli(argv=None) -> dict:
    """`python sfd_fast/train.py`, `deepspeed sfd_fast/train.py`, `sfd-fast train`: a run, then
    (DeepSpeed) the process group closed on every rank. A failed run leaves it to the exit: a
    barrier there could wait for a rank that already died."""
    result = main(argv)
    from sfd_fast.engine.distributed import shutdown_distributed
    shutdown_distributed()
    return result


if __name__ == "__main__":
    cli()
