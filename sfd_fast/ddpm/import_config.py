"""`sfd-fast import-config`: a reference SFD setup -> an sfd-fast JSON config.

    sfd-fast import-config [--out FILE.json] [--force] DDPM_YAML [--init_ckpt P] [--label_to_forget N] [--seed S] ...
    sfd-fast import-config [--out FILE.json] [--force] sd-train [SD/train.py flags, as in SD/run_sfd.sh]
    sfd-fast import-config [--out FILE.json] [--force] sid-edm [SiD sid_train.py flags] (sfd_fast/edm/import_config.py)

The first form reads a reference DDPM YAML (SFD:DDPM/configs/*.yml) plus the SFD:DDPM/train.py
flags; the second the SFD:SD/train.py flags (reference defaults for the ones not given, spec
§2.3). Options that change training but that sfd-fast does not implement stop the import with a
message naming them; options without effect on data-free training (data loading, sampling,
logging paths) are listed in the output's "_imported_from" note. Nothing is written on error.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path


class ImportError_(ValueError):
    """A reference option sfd-fast cannot honour (the message names it)."""


# ---------------------------------------------------------------------------------------------------
# reference flags
# ---------------------------------------------------------------------------------------------------

def parse_flags(tokens: list[str], known: dict, switches: tuple = (), source: str = "flags") -> dict:
    """`--name value` / `--name=value` tokens -> {name: value}; unknown names stop with all of them listed."""
    out, unknown, i = {}, [], 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("-"):
            raise ImportError_(f"{source}: unexpected argument {tok!r} (expected --name value)")
        name, _, value = tok.lstrip("-").partition("=")
        if name in switches:
            out[name], i = True, i + 1
            continue
        if not value and "=" not in tok:
            if i + 1 >= len(tokens):
                raise ImportError_(f"{source}: option --{name} needs a value")
            value, i = tokens[i + 1], i + 2
        else:
            i += 1
        if name not in known:
            unknown.append(f"--{name}")
        else:
            out[name] = known[name](value)
    if unknown:
        raise ImportError_(f"{source}: unknown or unsupported reference option(s) {', '.join(unknown)}; "
                           f"supported: {', '.join('--' + k for k in sorted(known))}")
    return out


def _bool(v) -> bool:
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "y"):
        return True
    if s in ("0", "false", "no", "n", ""):
        return False
    raise ImportError_(f"expected a boolean (0/1/true/false), got {v!r}")


# ---------------------------------------------------------------------------------------------------
# DDPM: YAML + train.py flags
# ---------------------------------------------------------------------------------------------------

UA_SAMPLES = {"CIFAR10": 5000, "STL10": 1300}
DDPM_FLAGS = {"init_ckpt": str, "label_to_forget": int, "seed": int, "config": str, "mode": str,
              "sample_type": str, "cond_scale": float, "init_ckpt_0": str}
# option -> required value (or None: any value) for options that do not affect data-free SFD training
DDPM_IGNORED = {
    "data": {"path": None, "logit_transform": False, "uniform_dequantization": False,
             "gaussian_dequantization": False, "random_flip": None, "rescaled": True, "num_workers": None},
    "model": {"var_type": None, "cond_drop_prob": None},
    "training": {"early_stage_n_intervals": None},
    "sampling": {"batch_size": None, "last_only": None},
}
DDPM_USED = {
    "data": ("dataset", "image_size", "channels", "n_classes"),
    "model": ("type", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks", "attn_resolutions",
              "dropout", "ema_rate", "ema", "resamp_with_conv"),
    "diffusion": ("beta_schedule", "beta_start", "beta_end", "num_diffusion_timesteps"),
    "training": ("batch_size", "n_iters", "snapshot_freq", "log_freq", "visualization_samples"),
    "sg_optim": ("weight_decay", "optimizer", "lr", "beta1", "beta2", "amsgrad", "eps", "grad_clip"),
    "g_optim": ("weight_decay", "optimizer", "lr", "beta1", "beta2", "amsgrad", "eps", "grad_clip"),
    "distill": ("alpha", "t_min", "t_init", "t_max", "sg_remain_coef", "sg_forget_coef", "g_remain_coef",
                "g_forget_coef", "label_to_override", "pseudo_label_type", "use_clf", "clf_path",
                "init_from_ema", "cond_scale", "cond_drop_prob", "forget_warmup", "use_diffinst"),
}


def _check_known(y: dict, source: str) -> list[str]:
    """Every YAML key is used or knowingly ignored; returns the ignored ones (for the note)."""
    unknown, ignored = [], []
    for section, body in y.items():
        if section == "comments":
            continue
        if section not in DDPM_USED and section not in DDPM_IGNORED:
            unknown.append(section)
            continue
        for key, value in (body or {}).items():
            if key in DDPM_USED.get(section, ()):
                continue
            if key in DDPM_IGNORED.get(section, {}):
                need = DDPM_IGNORED[section][key]
                if need is not None and value != need:
                    unknown.append(f"{section}.{key}: {value!r} (only {need!r} is supported)")
                else:
                    ignored.append(f"{section}.{key}")
                continue
            unknown.append(f"{section}.{key}")
    if unknown:
        raise ImportError_(f"{source}: unsupported reference option(s): {', '.join(unknown)}")
    return ignored


def _require(cond: bool, source: str, what: str):
    if not cond:
        raise ImportError_(f"{source}: unsupported reference setting {what}")


def _optimizer(o: dict, source: str, name: str) -> dict:
    _require(str(o.get("optimizer", "Adam")).lower() == "adam", source, f"{name}.optimizer {o.get('optimizer')!r} (Adam only)")
    _require(not o.get("amsgrad", False), source, f"{name}.amsgrad true")
    return {"lr": float(o["lr"]), "betas": [float(o.get("beta1", 0.9)), float(o.get("beta2", 0.999))],
            "eps": float(o.get("eps", 1e-8)), "weight_decay": float(o.get("weight_decay", 0.0)),
            "grad_clip_value": None if o.get("grad_clip") is None else float(o["grad_clip"])}


def ddpm_yaml_to_config(yaml_path: str | Path, flag_tokens: list[str]) -> dict:
    """A reference DDPM YAML + train.py flags -> the sfd-fast config dict (model.kind 'ddpm')."""
    import yaml
    src = str(yaml_path)
    try:
        y = yaml.safe_load(Path(yaml_path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ImportError_(f"{src}: cannot read the reference YAML ({e})") from None
    if not isinstance(y, dict):
        raise ImportError_(f"{src}: not a reference DDPM config (expected sections data, model, ...)")
    flags = parse_flags(flag_tokens, DDPM_FLAGS, source=f"{src} flags")
    _require(flags.get("mode", "sfd") == "sfd", src, f"--mode {flags.get('mode')!r} (sfd only)")
    _require(flags.get("sample_type", "one_step") == "one_step", src, "--sample_type (one_step only)")
    ignored = _check_known(y, src)
    ignored += [f"--{k}" for k in ("config", "cond_scale", "init_ckpt_0") if k in flags]
    d, m, df, tr, ds = (y.get(k) or {} for k in ("data", "model", "diffusion", "training", "distill"))
    _require(m.get("type") == "sid", src, f"model.type {m.get('type')!r} (the SFD trainer is type 'sid')")
    _require(df.get("beta_schedule") == "linear", src, f"diffusion.beta_schedule {df.get('beta_schedule')!r} (linear only)")
    _require(m.get("out_ch", 3) == m.get("in_channels", 3) == d.get("channels", 3), src,
             "in_channels / out_ch / data.channels that differ")
    _require(not ds.get("use_clf", False), src, "distill.use_clf true (classifier pseudo labels)")
    _require(not ds.get("use_diffinst", False), src, "distill.use_diffinst true")
    _require(float(ds.get("cond_scale", 0.0)) == 0.0 and float(ds.get("cond_drop_prob", 0.0)) == 0.0, src,
             "distill.cond_scale / cond_drop_prob other than 0")
    _require(float(ds.get("forget_warmup", 0)) == 0, src, "distill.forget_warmup other than 0")
    label = flags.get("label_to_forget", 0)
    no_forget = float(ds.get("sg_forget_coef", 0)) == 0 and float(ds.get("g_forget_coef", 0)) == 0
    _require(label >= 0 or (label == -1 and no_forget), src,
             f"--label_to_forget {label} (only -1 with zero forget coefficients: stage-1 SiD)")
    override = ds.get("label_to_override")
    if override is None:
        _require(ds.get("pseudo_label_type") == "rand", src,
                 f"distill.pseudo_label_type {ds.get('pseudo_label_type')!r} without label_to_override (needs a classifier)")
    n_classes = int(d.get("n_classes", 10))
    vis = int(tr.get("visualization_samples", 100))
    ema_on = bool(m.get("ema", True))
    return {
        "_imported_from": (f"reference DDPM config {Path(src).name} with flags {shlex.join(flag_tokens) or '(none)'}; "
                           f"ignored (no effect on data-free SFD training): {', '.join(ignored) or 'none'}"),
        "_comment": ("ddpm.checkpoint is the reference checkpoint (--init_ckpt): a base DDPM ckpt.pth, or a "
                     "6-entry SiD/SFD ckpt-*.pth for the two-stage start; point it at your file with "
                     "--set ddpm.checkpoint=PATH. Dropout is on in the fake score's and the generator's own "
                     "updates, as the reference's train-mode networks (ddpm.train_mode_dropout)."),
        "run": {"name": f"{Path(src).stem}_forget{label}" if label >= 0 else f"{Path(src).stem}_all_classes", "root": "runs", "seed": int(flags.get("seed", 1234)),
                "device": "auto"},
        "model": {"kind": "ddpm"},
        "schedule": {"beta_schedule": "linear", "beta_start": float(df["beta_start"]), "beta_end": float(df["beta_end"]),
                     "num_timesteps": int(df["num_diffusion_timesteps"]), "prediction": "epsilon"},
        "sfd": {"alpha": float(ds["alpha"]), "t_init": int(ds["t_init"]), "t_min": int(ds["t_min"]),
                "t_max": int(ds["t_max"]), "num_classes": n_classes, "forget_class": int(label),
                "override": "random" if override is None else "fixed",
                "override_class": 1 if override is None else int(override),
                **{k: float(ds[k]) for k in ("sg_remain_coef", "sg_forget_coef", "g_remain_coef", "g_forget_coef")}},
        "optim": {"fake_score": _optimizer(y["sg_optim"], src, "sg_optim"),
                  "generator": _optimizer(y["g_optim"], src, "g_optim")},
        "train": {"batch_size": int(tr["batch_size"]), "grad_accum": 1, "total_steps": int(tr["n_iters"]),
                  "log_every": int(tr.get("log_freq", 50)), "checkpoint_every": int(tr["snapshot_freq"]),
                  "sample_every": int(tr["snapshot_freq"]),
                  "ema": {"decay": float(m.get("ema_rate", 0.9999)) if ema_on else None, "halflife_kimg": 0.0}},
        "engine": {"backend": "plain", "precision": "fp32", "compile": False},
        # UA sample count of the reference's ua_ddpm.py: 5000 (CIFAR-10), 1300 (STL-10)
        "eval": {"enabled": True, "samples_per_class": UA_SAMPLES.get(str(d.get("dataset")), 1000)},
        "ddpm": {"checkpoint": flags.get("init_ckpt", ""), "init_from_ema": bool(ds.get("init_from_ema", False)),
                 "image_size": int(d["image_size"]), "in_channels": int(m.get("in_channels", 3)),
                 "ch": int(m["ch"]), "ch_mult": [int(c) for c in m["ch_mult"]],
                 "num_res_blocks": int(m["num_res_blocks"]),
                 "attn_resolutions": [int(r) for r in m["attn_resolutions"]], "dropout": float(m["dropout"]),
                 "resamp_with_conv": bool(m.get("resamp_with_conv", True)), "train_mode_dropout": True,
                 "grid_per_class": max(vis // n_classes, 1), "classifier": "",
                 "fid_real_dir": "", "inception_weights": ""},
    }


# ---------------------------------------------------------------------------------------------------
# Stable Diffusion: SD/train.py flags (spec §2.3)
# ---------------------------------------------------------------------------------------------------

def _use_neg(v) -> list:
    parts = [p.strip() for p in str(v).split(",")]
    if len(parts) != 3:
        raise ImportError_(f"--use_neg {v!r}: expected three comma-separated 0/1 values")
    return [_bool(p) for p in parts]


SD_DEFAULTS = {"duration": 200.0, "batch": 512, "ema": 0.5, "tick": 2.0, "snap": 50, "dump": 100,
               "sd_model": "runwayml/stable-diffusion-v1-5", "resolution": 512, "init_timestep": 625,
               "fp16": False, "ls": 1.0, "lsg": 1.0, "alpha": 1.0, "tmax": 980, "tmin": 20, "lr": 1e-6,
               "glr": 1e-6, "cfg_train_fake": 1.0, "cfg_eval_fake": 1.0, "cfg_eval_real": 1.0,
               "optimizer": "adam", "num_steps": 1, "sg_remain_coef": 1.0, "sg_forget_coef": 0.01,
               "g_remain_coef": 1.0, "g_forget_coef": 0.01, "use_neg": [False, False, True],
               "sid_w_neg": False, "sg_w_override": False, "outdir": "runs"}
_S = str
SD_FLAGS = {
    "outdir": _S, "duration": float, "batch": int, "batch-gpu": int, "ema": float, "tick": float, "snap": int,
    "dump": int, "seed": int, "sd_model": _S, "resolution": int, "init_timestep": int, "fp16": _bool,
    "ls": float, "lsg": float, "alpha": float, "tmax": int, "tmin": int, "lr": float, "glr": float,
    "cfg_train_fake": float, "cfg_eval_fake": float, "cfg_eval_real": float, "data_prompt_text": _S,
    "optimizer": _S, "num_steps": int, "sg_remain_coef": float, "sg_forget_coef": float,
    "g_remain_coef": float, "g_forget_coef": float, "from_distill_ema": _S,
    "forget_data_prompt_text": _S, "forget_data_prompt_text_val": _S, "concept_to_forget": _S,
    "concept_to_override": _S, "override_data_prompt_text": _S, "pos_data_prompt_text": _S,
    "neg_data_prompt_text": _S, "sid_w_neg": _bool, "use_neg": _use_neg, "sg_w_override": _bool,
    # accepted, no effect on training here (listed in the note)
    "data": _S, "data_stat": _S, "xflip": float, "bench": _S, "cache": _S, "workers": int, "desc": _S,
    "nosubdir": _S, "transfer": _S, "enable_xformers": _S, "gradient_checkpointing": _S,
    "fake_score_use_lora": _S,
}
SD_NO_EFFECT = ("data", "data_stat", "xflip", "bench", "cache", "workers", "desc", "nosubdir", "transfer",
                "enable_xformers", "gradient_checkpointing", "fake_score_use_lora", "dump")


def sd_flags_to_config(flag_tokens: list[str]) -> dict:
    """SFD:SD/train.py flags -> the sfd-fast config dict (model.kind 'stable_diffusion')."""
    src = "SD/train.py flags"
    given = parse_flags(flag_tokens, SD_FLAGS, source=src)
    f = {**SD_DEFAULTS, **given}
    _require(f["num_steps"] == 1, src, f"--num_steps {f['num_steps']} (one-step generator only)")
    _require(f["ls"] == 1.0 and f["lsg"] == 1.0, src, "--ls / --lsg other than 1")
    _require(f["optimizer"] in ("adam", "adamw"), src, f"--optimizer {f['optimizer']!r}")
    _require("data_prompt_text" in f, src, "without --data_prompt_text (the remain prompt folder)")
    batch = f["batch"]
    batch_gpu = f.get("batch-gpu", batch)
    _require(batch % batch_gpu == 0, src, f"--batch {batch} not a multiple of --batch-gpu {batch_gpu}")
    steps_per_tick = max(round(f["tick"] * 1000 / batch), 1)
    wd = 0.01 if f["optimizer"] == "adamw" else 0.0
    opt = {"betas": [0.0, 0.999], "eps": 1e-8, "weight_decay": wd}
    used = sorted(k for k in given if k in SD_NO_EFFECT)
    gen_init = f.get("from_distill_ema", "teacher")
    return {
        "_imported_from": (f"reference SD/train.py flags {shlex.join(flag_tokens)}; precision: --fp16 "
                           f"{int(f['fp16'])} -> {'bf16 autocast with fp32 master weights' if f['fp16'] else 'fp32'}"
                           f"; ignored (no effect on training here): {', '.join(used) or 'none'}"
                           + ("; the SiD-LSG generator is a pickle: set model.trust_pickle to true only if you "
                              "trust its source" if gen_init != "teacher" else "")),
        "run": {"name": "sd_sfd", "root": f["outdir"], "seed": int(f.get("seed", 0)), "device": "auto"},
        "model": {"kind": "stable_diffusion", "pretrained": f["sd_model"], "generator_init": gen_init,
                  "trust_pickle": False},
        "schedule": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                     "num_timesteps": 1000, "prediction": "epsilon"},
        "sfd": {"alpha": f["alpha"], "t_init": f["init_timestep"], "t_min": f["tmin"], "t_max": f["tmax"],
                **{k: f[k] for k in ("sg_remain_coef", "sg_forget_coef", "g_remain_coef", "g_forget_coef",
                                     "cfg_train_fake", "cfg_eval_fake", "cfg_eval_real")}},
        "optim": {"fake_score": {"lr": f["lr"], **opt}, "generator": {"lr": f["glr"], **opt}},
        "train": {"batch_size": batch, "grad_accum": batch // batch_gpu,
                  "total_steps": max(round(f["duration"] * 1e6 / batch), 1), "log_every": steps_per_tick,
                  "checkpoint_every": steps_per_tick * f["snap"], "sample_every": steps_per_tick * f["snap"],
                  "ema": {"halflife_kimg": f["ema"] * 1000}},
        "engine": {"backend": "plain", "precision": "bf16" if f["fp16"] else "fp32", "compile": False},
        "prompts": {"remain_file": f["data_prompt_text"],
                    "forget_file": f.get("forget_data_prompt_text", ""),
                    "val_file": f.get("forget_data_prompt_text_val", ""),
                    "concept_to_forget": f.get("concept_to_forget", ""),
                    "concept_to_override": f.get("concept_to_override", ""),
                    "override_file": f.get("override_data_prompt_text", ""),
                    "pos_file": f.get("pos_data_prompt_text", ""), "neg_file": f.get("neg_data_prompt_text", ""),
                    "use_neg": f["use_neg"], "sid_w_neg": f["sid_w_neg"], "sg_w_override": f["sg_w_override"],
                    "resolution": f["resolution"]},
        "eval": {"enabled": False},
    }


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------

USAGE = __doc__


def convert(source: str, flag_tokens: list[str]) -> dict:
    """Dispatch: 'sd-train' -> SD flags, else a DDPM YAML path; checks the result's keys and types.
    ('sid-edm' is sfd_fast/edm/import_config.py's, reached through families.import_config_main.)"""
    data = sd_flags_to_config(flag_tokens) if source == "sd-train" else ddpm_yaml_to_config(source, flag_tokens)
    return type_checked(data, source)


def type_checked(data: dict, source: str) -> dict:
    """`data` after checking its keys and types against the Config (a failure here is our bug)."""
    from ..config import ConfigError, Config, _build
    try:
        _build(Config, data, "", f"import of {source}")  # keys and types (values are checked by train)
    except ConfigError as e:  # a bug here, not the user's: say so
        raise ImportError_(f"internal: the imported config does not type-check ({e})") from None
    return data


def main(argv=None, convert_fn=None) -> int:
    """sfd-fast import-config [--out FILE] [--force] SOURCE [reference flags...]; `convert_fn(source,
    flags)` replaces `convert` (another family's importer sharing this command line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out, force = None, False
    while argv and argv[0] in ("--out", "--force", "-h", "--help"):
        opt = argv.pop(0)
        if opt in ("-h", "--help"):
            print(USAGE)
            return 0
        if opt == "--force":
            force = True
        elif not argv:
            raise SystemExit("error: --out needs a file name")
        else:
            out = Path(argv.pop(0))
    if not argv:
        raise SystemExit(f"error: give a reference DDPM YAML, or 'sd-train' / 'sid-edm' and its flags\n{USAGE}")
    source, flags = argv[0], argv[1:]
    if out is not None and out.exists() and not force:
        raise SystemExit(f"error: {out} exists; pass --force to replace it")
    try:
        data = (convert_fn or convert)(source, flags)
    except ImportError_ as e:
        raise SystemExit(f"error: {e}") from None
    text = json.dumps(data, indent=1) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        from ..checkpoint import atomic_write_text
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text)
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
