"""What a run ran on: RUN_DIR/environment.json, one entry per start (the first start and each resume).

Each entry: the step it started at, torch / CUDA / cuDNN versions, the device and its name, world
size, Python, the platform, the host, and the sfd-fast commit (with `-dirty` when the checkout had
uncommitted changes; "unknown" outside a git checkout). The report (evaluation/report.py) shows the
latest entry and how many starts there were. Written by rank 0; nothing here touches CUDA unless the
run's device is CUDA (it is already initialised then).
"""
from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch

from .checkpoint import atomic_write_text

FILE = "environment.json"


def source_commit() -> str:
    """The git commit of the sfd_fast sources, "-dirty" appended when tracked files differ; "unknown"
    when they are not a git checkout (an installed wheel) or git is missing."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def collect_environment(device: torch.device, world_size: int, step: int) -> dict:
    cuda = device.type == "cuda"
    return {
        "step": step,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none (CPU build)",
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "world_size": world_size,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "commit": source_commit(),
    }


def record_environment(run_dir: Path, device: torch.device, world_size: int, step: int) -> dict:
    """Append this start's entry to RUN_DIR/environment.json (atomically); returns the entry."""
    path = Path(run_dir) / FILE
    starts = read_environment(run_dir)
    entry = collect_environment(device, world_size, step)
    atomic_write_text(path, json.dumps({"starts": [*starts, entry]}, indent=1))
    return entry


def read_environment(run_dir: Path) -> list[dict]:
    """The recorded starts, oldest first ([] when none or unreadable)."""
    path = Path(run_dir) / FILE
    try:
        starts = json.loads(path.read_text()).get("starts", [])
    except (OSError, json.JSONDecodeError, AttributeError):
        return []
    return [s for s in starts if isinstance(s, dict)]
