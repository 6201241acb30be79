"""The one error class for bad input, and the boundary that turns it into a message and an exit status.

A `UserError` is a problem the user can fix (a config key, a path, a file, a checkpoint, a device,
a resource): its message names the key or file and says what to do. Entry points (train.py, cli.py)
run under `user_error_boundary`, which prints that one paragraph to stderr and exits with the
error's status (2 for bad input, 3 for a run that cannot train). Every other exception is an internal
error and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import errno
import sys

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class UserError(Exception):
    """Bad input, reported as one paragraph and exit status `exit_code`, never with a traceback."""
    exit_code = 2
    prefix = "error: "


class RunCannotTrain(UserError):
    """The run stopped because it cannot train (e.g. every update skipped); a checkpoint was written."""
    exit_code = 3


class UserExit(SystemExit):
    """SystemExit carrying the message (str(e) is the message, e.code the exit status)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


@contextlib.contextmanager
def user_error_boundary():
    """Print a UserError (or a SystemExit carrying a message) as one paragraph; exit with its status."""
    try:
        yield
    except UserExit:    # already reported by an inner boundary (cli.main -> train.main)
        raise
    except UserError as e:
        message = str(e) if str(e).startswith(e.prefix) else f"{e.prefix}{e}"
        print(message, file=sys.stderr)
        raise UserExit(message, e.exit_code) from None
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        # any other write on a full device (a grid, stats.jsonl, a report): checkpoints have their own
        # message (checkpoint.DiskFullError, a UserError); nothing written before is damaged
        where = f" while writing {e.filename}" if e.filename else ""
        message = (f"error: no space left on the device{where} ({e.strerror}); free space and run the command "
                   "again (a training run continues with --resume RUN_DIR: checkpoints already written are intact)")
        print(message, file=sys.stderr)
        raise UserExit(message, 2) from None
    except KeyboardInterrupt:   # Ctrl-C outside the training loop (there guard.py checkpoints first)
        print("interrupted (Ctrl-C) outside the training loop; checkpoints already written are intact",
              file=sys.stderr)
        raise UserExit("interrupted", 130) from None
    except SystemExit as e:
        if isinstance(e.code, str):   # older `raise SystemExit("error: ...")` sites: same status as UserError
            print(e.code, file=sys.stderr)
            raise UserExit(e.code, 2) from None
        raise


def check_output_path(path, flag: str) -> None:
    """A UserError naming `flag` and the path when `path` cannot be created because something on the
    way to it is an existing file (`--out existing.png/grid.png`): checked before any work, so the
    command stops with exit 2 instead of a FileExistsError traceback after minutes of sampling."""
    from pathlib import Path
    path = Path(path)
    for parent in reversed(path.absolute().parents):
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{flag} {path}: {parent} is a file, not a folder, so {path} cannot be written "
                            f"below it; choose another {flag}")


def check_output_args(argv: list[str], flags=("--out", "--out-dir")) -> None:
    """check_output_path for each `--out X` / `--out=X` (and --out-dir) of a command line."""
    for i, a in enumerate(argv):
        for flag in flags:
            if a == flag and i + 1 < len(argv):
                check_output_path(argv[i + 1], flag)
            elif a.startswith(flag + "="):
                check_output_path(a.split("=", 1)[1], flag)
