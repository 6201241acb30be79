"""`sfd-fast` command line: one explicit table of commands.

    sfd-fast train  --config FILE [--set k=v ...] [--run-dir DIR] [--resume DIR] [--dry-run]
    sfd-fast sample --run RUN_DIR --prompt "..." [--n 8] [--out grid.png] [--steps 1|2|4]
    sfd-fast export --run RUN_DIR --out DIR [--force] [--raw] [--dtype fp32|fp16|bf16]
    sfd-fast sample --run DDPM_RUN --classes 0-9 --n-per-class N --out-dir DIR
    sfd-fast export --format reference-ddpm --run DDPM_RUN --out ckpt.pth
    sfd-fast import-config --out config.json cifar10.yml --init_ckpt ckpt.pth --label_to_forget 0
    sfd-fast import-config --out config.json sid-edm --edm_model edm-cifar10-32x32-cond-vp.pkl --cond 1 ...
    sfd-fast sample --run EDM_RUN --classes 0-9 --n-per-class N --out-dir DIR [--heun-steps 18]
    sfd-fast export --format edm-safetensors|edm-snapshot --run EDM_RUN --out FILE [--template TEACHER.pkl]
    sfd-fast report RUN_DIR [--out FILE]
    sfd-fast report RUN_A RUN_B ... [--out compare.html]
    sfd-fast attack RUN_DIR [--set eval.attacks.KEY=VALUE ...] [--device DEV]

`sfd-fast COMMAND --help` describes each. Also runnable as `python -m sfd_fast.cli COMMAND ...`.
"""
from __future__ import annotations

import importlib
import sys

# name -> ("module:function" taking argv, one-line summary); imported only when the command runs,
# so `sfd-fast train` on a digits run never imports diffusers.
COMMANDS = {
    "train": ("sfd_fast.train:cli", "train an SFD run (a JSON config) or resume one"),
    "sample": ("sfd_fast.families:sample_main", "samples of a run: SD prompt grids, ddpm / edm class folders"),
    "export": ("sfd_fast.families:export_main", "export a run: SD diffusers folder, ddpm reference checkpoint, edm snapshot"),
    "import-config": ("sfd_fast.edm.import_config:main",
                      "a reference SFD config (DDPM YAML / SD flags / SiD EDM flags) -> JSON"),
    "eval-ddpm": ("sfd_fast.ddpm.evaluate:main", "UA (reference classifier), FID / IS of ddpm samples"),
    "report": ("sfd_fast.evaluation.compare:main", "self-contained HTML report of a run, or comparing several runs"),
    "attack": ("sfd_fast.evaluation.attacks.run:main", "worst-case forgetting: attacks vs references that never knew"),
}


def _usage() -> str:
    rows = "\n".join(f"  {name:<8s} {summary}" for name, (_, summary) in COMMANDS.items())
    return f"usage: sfd-fast {{{','.join(COMMANDS)}}} ...\n\ncommands:\n{rows}\n\n{__doc__}"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"sfd-fast: unknown command {argv[0]!r}", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    target = COMMANDS[argv[0]][0]
    if callable(target):          # tests may register a function directly
        fn = target
    else:
        module, _, name = target.partition(":")
        fn = getattr(importlib.import_module(module), name)
    from .errors import user_error_boundary
    with user_error_boundary():   # bad input: one paragraph on stderr, exit status 2 (errors.py)
        fn(argv[1:])
    return 0  # a command's return value is not an exit status (sys.exit(path) would exit 1)


if __name__ == "__main__":
    main()
