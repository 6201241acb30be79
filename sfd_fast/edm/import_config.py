"""`sfd-fast import-config sid-edm ...`: a SiD EDM command line (SiD:sid_train.py flags) -> JSON config.

    sfd-fast import-config --out my.json sid-edm --edm_model edm-cifar10-32x32-cond-vp.pkl --cond 1 \\
        --alpha 1.2 --tmax 800 --init_sigma 2.5 --batch 256 --lr 1e-5 --glr 1e-5 --duration 20.48 \\
        --augment 0 --label_to_forget 0 --label_to_override 1

sid_train.py's own defaults fill the flags not given. SFD's additions (not SiD options): the class to
forget (--label_to_forget, the name of the SFD DDPM reference's flag), its override
(--label_to_override) and the four loss weights (--sg_remain_coef ... , SFD defaults 1 / 0.01).
Not implemented, so they stop the import: --augment > 0 (SiD's AugmentPipe on the fake score's
inputs; pass --augment 0), --cond 0 (class forgetting needs labels), --resume (use `sfd-fast train
--resume`). Architecture flags (--arch, --cbase, --cres) must describe the snapshot: the network is
the snapshot's own (its recorded class and arguments). Loss scaling (--ls, --lsg) multiplies each
network's whole loss, which Adam's update does not see (up to its eps term); it is noted, not applied.
"""
from __future__ import annotations

import shlex

from ..ddpm.import_config import _bool, _require, parse_flags

EDM_MODELS = {"cifar10-uncond": "edm-cifar10-32x32-uncond-vp.pkl", "cifar10-cond": "edm-cifar10-32x32-cond-vp.pkl",
              "ffhq64": "edm-ffhq-64x64-uncond-vp.pkl", "afhq64-v2": "edm-afhqv2-64x64-uncond-vp.pkl",
              "imagenet64-cond": "edm-imagenet-64x64-cond-adm.pkl"}

SID_FLAGS = {"outdir": str, "data": str, "cond": _bool, "arch": str, "precond": str, "duration": float,
             "batch": int, "batch-gpu": int, "cbase": int, "cres": str, "ema": float, "dropout": float,
             "augment": float, "xflip": _bool, "bench": _bool, "cache": _bool, "workers": int, "desc": str,
             "tick": int, "snap": int, "dump": int, "seed": int, "transfer": str, "resume": str, "metrics": str,
             "edm_model": str, "init_sigma": float, "fp16": _bool, "ls": float, "lsg": float, "alpha": float,
             "tmax": int, "lr": float, "glr": float, "g_beta1": float, "data_stat": str,
             # SFD's additions
             "label_to_forget": int, "label_to_override": int, "num_classes": int, "sg_remain_coef": float,
             "sg_forget_coef": float, "g_remain_coef": float, "g_forget_coef": float}
SID_DEFAULTS = {"outdir": "runs", "cond": False, "arch": "ddpmpp", "precond": "edm", "duration": 200.0, "batch": 512,
                "ema": 0.5, "dropout": 0.13, "augment": 0.12, "tick": 50, "snap": 50, "init_sigma": 2.5,
                "fp16": False, "ls": 1.0, "lsg": 100.0, "alpha": 1.2, "tmax": 800, "lr": 1e-5, "glr": 1e-5,
                "g_beta1": 0.0, "label_to_forget": 0, "label_to_override": 1, "num_classes": 10,
                "sg_remain_coef": 1.0, "sg_forget_coef": 0.01, "g_remain_coef": 1.0, "g_forget_coef": 0.01}
SID_NO_EFFECT = ("data", "xflip", "bench", "cache", "workers", "desc", "dump", "transfer", "metrics", "data_stat",
                 "outdir", "arch", "cbase", "cres", "precond")


def sid_flags_to_config(flag_tokens: list[str]) -> dict:
    """SiD:sid_train.py flags (+ SFD's forgetting flags) -> the sfd-fast config dict (model.kind 'edm')."""
    src = "SiD sid_train.py flags"
    given = parse_flags(flag_tokens, SID_FLAGS, switches=("nosubdir", "dry-run"), source=src)
    f = {**SID_DEFAULTS, **given}
    _require("edm_model" in f, src, "without --edm_model (the pretrained EDM snapshot)")
    _require(f["cond"], src, "--cond 0 (class forgetting needs a class-conditional network; pass --cond 1)")
    _require(f["augment"] == 0, src, f"--augment {f['augment']} (SiD's AugmentPipe on the fake score's inputs is "
             "not implemented; pass --augment 0 to train without it)")
    _require("resume" not in f, src, "--resume (continue an sfd-fast run with `sfd-fast train --resume RUN_DIR`)")
    _require(f["tmax"] <= 1000, src, f"--tmax {f['tmax']} (must be <= 1000)")
    batch = f["batch"]
    batch_gpu = f.get("batch-gpu", batch)
    _require(batch % batch_gpu == 0, src, f"--batch {batch} not a multiple of --batch-gpu {batch_gpu}")
    steps_per_tick = max(round(f["tick"] * 1000 / batch), 1)
    eps = 1e-6 if f["fp16"] else 1e-8
    model = f["edm_model"]
    used = sorted(k for k in given if k in SID_NO_EFFECT)
    note = (f"reference SiD sid_train.py flags {shlex.join(flag_tokens)}; precision: --fp16 {int(f['fp16'])} -> "
            f"{'bf16 autocast with fp32 master weights' if f['fp16'] else 'fp32'}; loss scaling --ls {f['ls']:g} "
            f"--lsg {f['lsg']:g} not applied (a constant factor on a loss: Adam's step is invariant to it up to "
            f"eps); network: the snapshot's own class and arguments (SiD rebuilds it as EDMPrecond: set "
            f"edm.precond to 'EDMPrecond' for that, see docs/edm.md); ignored (no effect on training here): {', '.join(used) or 'none'}")
    return {
        "_imported_from": note,
        "run": {"name": "edm_sfd", "root": f["outdir"], "seed": int(f.get("seed", 0)), "device": "auto"},
        "model": {"kind": "edm"},
        "schedule": {"num_timesteps": 1000},
        "sfd": {"alpha": f["alpha"], "t_min": 0, "t_max": f["tmax"], "num_classes": f["num_classes"],
                "forget_class": f["label_to_forget"], "override": "fixed", "override_class": f["label_to_override"],
                **{k: f[k] for k in ("sg_remain_coef", "sg_forget_coef", "g_remain_coef", "g_forget_coef")}},
        "optim": {"fake_score": {"lr": f["lr"], "betas": [0.0, 0.999], "eps": eps, "weight_decay": 0.0},
                  "generator": {"lr": f["glr"], "betas": [f["g_beta1"], 0.999], "eps": eps, "weight_decay": 0.0}},
        "train": {"batch_size": batch, "grad_accum": batch // batch_gpu,
                  "total_steps": max(round(f["duration"] * 1e6 / batch), 1), "log_every": steps_per_tick,
                  "checkpoint_every": steps_per_tick * f["snap"], "sample_every": steps_per_tick * f["snap"],
                  "ema": {"halflife_kimg": f["ema"] * 1000, "rampup_ratio": 0.05}},
        "engine": {"backend": "plain", "precision": "bf16" if f["fp16"] else "fp32", "compile": False},
        "eval": {"enabled": True},
        "edm": {"snapshot": EDM_MODELS.get(model, model), "entry": "ema", "sigma_init": f["init_sigma"],
                "dropout": f["dropout"], "train_mode_dropout": True},
    }


def convert(source: str, flag_tokens: list[str]) -> dict:
    """'sid-edm' -> SiD EDM flags; any other source is the ddpm importer's (DDPM YAML, 'sd-train')."""
    from ..ddpm.import_config import convert as reference_convert, type_checked
    if source != "sid-edm":
        return reference_convert(source, flag_tokens)
    return type_checked(sid_flags_to_config(flag_tokens), "SiD sid_train.py flags")


def main(argv=None) -> int:
    """sfd-fast import-config [--out FILE] [--force] SOURCE [flags...]: the ddpm importer's command line,
    with the 'sid-edm' source added."""
    from ..ddpm.import_config import main as reference_main
    return reference_main(argv, convert_fn=convert)
