"""A lost peer in a multi-process run (a node died, its network went away): a clear error, not a hang.

When one rank dies, the others find out at their next collective: gloo and NCCL see the closed
connection and raise (torch.distributed.DistError and its subclasses, or a RuntimeError naming the
transport). `peer_loss_error` turns that into one paragraph: the step, the newest checkpoint, and
the command that continues the run once every node is back. Exit status 4 (PEER_LOST_EXIT), so a
job script can tell it from bad input (2) and a run that cannot train (3), and requeue.

A peer that hangs instead of dying (alive, but never reaching the collective) is bounded by the
process group's timeout: SFD_DIST_TIMEOUT_MIN minutes (default 120, engine/distributed.py).
The state at the failure is not saved: a rank may have finished half a step, and under ZeRO a
checkpoint is itself a collective. The newest checkpoint is the resume point.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError

PEER_LOST_EXIT = 4
# what gloo / NCCL / the TCP store say when the other side went away
TRANSPORT_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
                   "NCCL communicator was aborted", "ProcessGroupGloo", "ProcessGroupNCCL", "gloo/transport")


class PeerLost(UserError):
    exit_code = PEER_LOST_EXIT


def is_peer_loss(exc: BaseException) -> bool:
    """A failure of the process group's transport (not an error of our own code)."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in TRANSPORT_SIGNS)


def peer_loss_error(exc: BaseException, step: int, run_dir: Path) -> PeerLost:
    from ..checkpoint import checkpoint_folders
    import torch.distributed as dist
    folders = checkpoint_folders(run_dir)
    newest = folders[0].name if folders else "none yet"   # newest first
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return PeerLost(
        f"rank {dist.get_rank()} of {dist.get_world_size()} lost a peer rank during step {step + 1} "
        f"({type(exc).__name__}: {first_line}). Another node or process of this run has died or lost its "
        f"network; this rank stops instead of waiting. The newest checkpoint is {newest} in {run_dir}/checkpoints. "
        f"When every node is back, start the same launch command on every node with `--resume {run_dir}` "
        f"(in place of --config/--run-dir) to continue from it.")
