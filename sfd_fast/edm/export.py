"""Export an edm run's generator (EMA unless --raw) for other tools.

    sfd-fast export --run D --format edm-safetensors --out G.safetensors
        weights + EDM class name and constructor kwargs in the metadata; read back by
        sfd_fast.edm.load_snapshot (and so usable as another run's edm.snapshot)
    sfd-fast export --run D --format edm-snapshot --template TEACHER.pkl --out network-snapshot.pkl
        {"ema": generator} in the torch_utils.persistence record form that EDM's and SiD's own code
        load with pickle.load (e.g. SiD's generator: G(sigma_init z, sigma_init, labels)). Each record
        carries the module source the official loader executes; that source is copied from the
        template (your own EDM / SiD snapshot of the same network), never written by sfd-fast, and the
        file references no sfd-fast code. Without a template no such file can be written.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .snapshot import SnapshotError, read_snapshot_object
from .unpickle import PersistentRecord


def template_source(path: Path, entry: str = "ema") -> tuple[str, str]:
    """(module source, class name) of the template snapshot's `entry` record."""
    top = read_snapshot_object(path)
    rec = top.get(entry) if isinstance(top, dict) else None
    if not isinstance(rec, PersistentRecord) or not isinstance(rec.module_src, str):
        raise SnapshotError(f"--template {path}: entry {entry!r} is not a torch_utils.persistence network record")
    return rec.module_src, rec.class_name


def write_edm_snapshot(net, init_kwargs: dict, template: Path, out: Path, entry: str = "ema") -> Path:
    """{"ema": net} as persistence records with the template's module source, written atomically."""
    from .record_pickle import dump_records, records_of
    src, class_name = template_source(template, entry)
    if class_name != type(net).__name__:
        raise SnapshotError(f"--template {template}: its {entry!r} is a {class_name}, the run's generator a "
                            f"{type(net).__name__}; use a snapshot of the same network class")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        dump_records({"ema": records_of(net.eval(), src, init_kwargs)}, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(out)
    return out


def main(argv=None) -> int:
    from ..engine import resolve_device
    from .build import run_network
    from .sample import load_run_generator, run_config
    from .snapshot import write_safetensors
    p = argparse.ArgumentParser(prog="sfd-fast export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=["edm-safetensors", "edm-snapshot"])
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--template", help="edm-snapshot: your EDM / SiD snapshot whose module source to reuse")
    p.add_argument("--raw", action="store_true", help="the raw generator instead of its EMA")
    p.add_argument("--checkpoint")
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists() and not a.force:
        raise SystemExit(f"error: {out} exists; pass --force to replace it")
    if a.format == "edm-snapshot" and not a.template:
        raise SystemExit("error: --format edm-snapshot needs --template: an EDM / SiD snapshot of the same network "
                         "(e.g. the teacher's edm-cifar10-32x32-cond-vp.pkl); its module source goes into the file")
    cfg = run_config(Path(a.run))
    _, gen, desc = load_run_generator(Path(a.run), resolve_device("cpu"), a.checkpoint, a.raw)
    class_name, kwargs = run_network(cfg)
    try:
        if a.format == "edm-safetensors":
            write_safetensors(gen.net, class_name, kwargs, out)
        else:
            write_edm_snapshot(gen.net, kwargs, Path(a.template), out)
    except SnapshotError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out} ({a.format}: generator {desc}, sigma_init {cfg.edm.sigma_init})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
