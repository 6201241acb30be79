"""`sfd-fast` command line: train, and tools that work on a run directory.

    sfd-fast train --config FILE [--set k=v ...] [--run-dir DIR] [--resume DIR]
"""
from __future__ import annotations

import sys

COMMANDS = {}


def command(name):
    def deco(fn):
        COMMANDS[name] = fn
        return fn
    return deco


@command("train")
def _train(argv):
    from sfd_fast.train import main as train_main
    train_main(argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    _load_optional_commands()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = ", ".join(sorted(COMMANDS))
        print(f"usage: sfd-fast {{{names}}} ...\n\n{__doc__}", file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    COMMANDS[argv[0]](argv[1:])
    return 0  # a command's return value is not an exit status (sys.exit(path) would exit 1)


def _load_optional_commands():
    """Sub-commands defined in other modules register themselves here on import."""
    try:
        import sfd_fast.sd_cli  # noqa: F401  (sample, export)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
