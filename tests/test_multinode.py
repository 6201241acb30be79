"""Two "nodes" on this machine: two torchrun agents (one rank each) that meet through a c10d
rendezvous on 127.0.0.1 and train over gloo, as `torchrun --nnodes 2 --rdzv_backend c10d` does on a
cluster (docs/multinode.md). The DeepSpeed backend is the one that spans processes (the plain
backend is one process by design and refuses WORLD_SIZE > 1: tests/test_deepspeed.py).

  - a digits run through its evaluation: both agents exit 0, rank 0 wrote the ticks, the
    evaluations during training and eval.json, and every loss equals the one-process run's (the
    draws are the same by construction, engine.rng_mode 'global_slice'; tolerance as in
    tests/test_deepspeed.py, reduction order only)
  - node loss: node 1's agent and worker are killed (SIGKILL, the whole process group) mid-run;
    node 0 ends within a bounded time with the peer-loss error (exit 4, what to do), not a hang;
    `--resume` on two fresh agents then finishes the run from the last checkpoint
  - DeepSpeed's own launcher with a two-host hostfile, one launcher per node (--no_ssh --node_rank)
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sfd_fast import train
from sfd_fast.engine.peers import PEER_LOST_EXIT

from .fault_tools import subprocess_env
from .helpers import tiny_digits_config

pytestmark = [pytest.mark.slow]   # seven launches; ~2 min on 2 busy cores once DeepSpeed's CPU comm op is built
pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -e '.[dist]'); the test extra has it")

ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-4, 1e-5          # tests/test_deepspeed.py: reduction order only, measured 5e-6 rel
NODE_LOSS_BOUND_S = 90           # node 0 must be gone this long after node 1 died (gloo sees the closed
                                 # sockets at once; the rest is the agent's shutdown on a loaded machine)


STARTED: list[subprocess.Popen] = []   # every agent this module started; killed with its workers at the end


def _descendants(pid: int) -> list[int]:
    """pid's children, grandchildren, ... from /proc (torchrun starts its workers in their own sessions,
    so killing the agent's process group would leave them running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL an agent and all its workers at once: the node is gone."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module", autouse=True)
def _no_stray_processes():
    yield
    for p in STARTED:
        if p.poll() is None:
            _kill_node(p)
        p.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agents(tmp: Path, argv: list[str], tag: str) -> list[subprocess.Popen]:
    """Two torchrun agents, node ranks 0 and 1, one worker each, rendezvous c10d on loopback."""
    port = _free_port()
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = subprocess_env(DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", SFD_DIST_TIMEOUT_MIN="5")
    procs = []
    for node in (0, 1):
        cmd = [*launcher, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"sfd-{tag}",
               "--local_addr", "127.0.0.1", "--max_restarts", "0",
               str(ROOT / "sfd_fast" / "train.py"), *argv]
        log = open(tmp / f"{tag}_node{node}.log", "w")
        procs.append(subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
        STARTED.append(procs[-1])
        if node == 0:   # node 0 hosts the rendezvous store, as the head node of a cluster job does
            _wait_for_listener(port, procs[0], tmp, tag)
    return procs


def _wait_for_listener(port: int, proc: subprocess.Popen, tmp: Path, tag: str, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    _kill_node(proc)
    pytest.fail(f"{tag}: node 0's rendezvous store never listened on {port}:\n{_log(tmp, tag, 0)}")


def _wait_all(procs, tmp: Path, tag: str, timeout: float = 300) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for node, p in enumerate(procs):
        try:
            codes.append(p.wait(timeout=max(deadline - time.time(), 1)))
        except subprocess.TimeoutExpired:
            for q in procs:
                _kill_node(q)
            pytest.fail(f"{tag}: node {node} still running after {timeout} s:\n{_log(tmp, tag, node)}")
    return codes


def _log(tmp: Path, tag: str, node: int) -> str:
    return (tmp / f"{tag}_node{node}.log").read_text()[-5000:]


def _records(run: Path) -> tuple[dict, dict]:
    ticks, evals = {}, {}
    for line in (run / "stats.jsonl").read_text().splitlines():
        r = json.loads(line)
        (evals if any(k.startswith("eval/") for k in r) else ticks)[r["step"]] = r
    return ticks, evals


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    cfg = tiny_digits_config(tmp, train={"total_steps": 24, "batch_size": 8, "log_every": 4, "checkpoint_every": 8,
                                         "sample_every": 12},
                             pretrain={"classifier_epochs": 3},
                             eval={"enabled": True, "every": 12, "during_samples_per_class": 4,
                                   "samples_per_class": 4, "teacher_steps": 2})
    return tmp, cfg


@pytest.fixture(scope="module")
def two_node_run(setup):
    tmp, cfg = setup
    train.main(["--config", str(cfg), "--run-dir", str(tmp / "one_process")])   # also caches the classifier
    run = tmp / "two_nodes"
    procs = _agents(tmp, ["--config", str(cfg), "--run-dir", str(run), "--set", "engine.backend=deepspeed"], "run")
    codes = _wait_all(procs, tmp, "run")
    assert codes == [0, 0], (_log(tmp, "run", 0), _log(tmp, "run", 1))
    return tmp, run


def test_two_nodes_train_to_the_evaluation(two_node_run):
    tmp, run = two_node_run
    assert "deepspeed: world 2" in (run / "log.txt").read_text()
    ticks, evals = _records(run)
    assert sorted(ticks) == [4, 8, 12, 16, 20, 24]
    assert sorted(evals) == [0, 12, 24]
    assert {"eval/ua/0", "eval/retained_accuracy", "eval/fd"} <= set(evals[24])
    ev = json.loads((run / "eval.json").read_text())
    assert 0 <= ev["ua"] <= 1 and ev["fd_final"] > 0
    assert (run / "report.html").is_file()
    starts = json.loads((run / "environment.json").read_text())["starts"]
    assert [s["world_size"] for s in starts] == [2]


def test_two_nodes_equal_the_one_process_run(two_node_run):
    tmp, run = two_node_run
    ticks, _ = _records(run)
    ref, _ = _records(tmp / "one_process")
    keys = [k for k in ref[4] if k.endswith(("loss/remain", "loss/forget"))]
    assert len(keys) == 4
    for step in ticks:
        for k in keys:
            assert ticks[step][k] == pytest.approx(ref[step][k], rel=RTOL, abs=ATOL), (step, k)


def test_node_loss_ends_the_other_node_then_resume_finishes(setup):
    tmp, cfg = setup
    run = tmp / "node_loss"
    # long enough that node 1 dies mid-run; checkpoints every 4 steps
    procs = _agents(tmp, ["--config", str(cfg), "--run-dir", str(run), "--set", "engine.backend=deepspeed",
                          "train.total_steps=100000", "train.checkpoint_every=4", "eval.every=0",
                          "eval.enabled=false"], "loss")
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step-00000008").is_dir():
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                if p.poll() is None:
                    _kill_node(p)
            pytest.fail(f"no checkpoint at step 8:\n{_log(tmp, 'loss', 0)}\n{_log(tmp, 'loss', 1)}")
        time.sleep(0.2)
    _kill_node(procs[1])          # node 1 is lost: its agent and its worker
    killed_at = time.time()
    try:
        code = procs[0].wait(timeout=NODE_LOSS_BOUND_S)
    except subprocess.TimeoutExpired:
        _kill_node(procs[0])
        pytest.fail(f"node 0 still running {NODE_LOSS_BOUND_S} s after node 1 died:\n{_log(tmp, 'loss', 0)}")
    procs[1].wait()
    ended_after = time.time() - killed_at
    out = _log(tmp, "loss", 0)
    assert code != 0 and ended_after < NODE_LOSS_BOUND_S
    # the worker's one paragraph (engine/peers.py), and its exit status in torchrun's failure summary
    assert "lost a peer rank" in out and f"--resume {run}" in out, out
    assert re.search(rf"exitcode\s*:\s*{PEER_LOST_EXIT}\b", out), out
    # resume on two fresh agents, a few steps past the newest checkpoint
    newest = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    total = newest + 6
    procs = _agents(tmp, ["--resume", str(run), "--set", f"train.total_steps={total}"], "resume")
    codes = _wait_all(procs, tmp, "resume")
    assert codes == [0, 0], (_log(tmp, "resume", 0), _log(tmp, "resume", 1))
    ticks, _ = _records(run)
    assert max(ticks) == total
    assert (run / "checkpoints" / f"step-{total:08d}").is_dir()
    assert "resumed from" in (run / "log.txt").read_text()


def test_deepspeed_launcher_with_a_hostfile_on_two_nodes(two_node_run):
    """DeepSpeed's own launcher, a two-host hostfile, one launcher per node (`--no_ssh --node_rank N`,
    what a scheduler without passwordless ssh runs on each node); the master on loopback."""
    tmp, _ = two_node_run
    launcher = Path(sys.executable).with_name("deepspeed")
    if not launcher.exists():
        pytest.fail(f"the deepspeed launcher is not beside {sys.executable}")
    hostfile = tmp / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    run, port = tmp / "ds_launcher", _free_port()
    env = subprocess_env(DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", SFD_DIST_TIMEOUT_MIN="5")
    env.pop("MASTER_PORT", None)
    procs = []
    for node in (0, 1):
        log = open(tmp / f"dsl_node{node}.log", "w")
        procs.append(subprocess.Popen(
            [str(launcher), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
             "--master_addr", "127.0.0.1", "--master_port", str(port), str(ROOT / "sfd_fast" / "train.py"),
             "--config", str(tmp / "tiny.json"), "--run-dir", str(run), "--set", "engine.backend=deepspeed",
             "train.total_steps=8", "eval.enabled=false"],
            cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True))
        STARTED.append(procs[-1])
    assert _wait_all(procs, tmp, "dsl") == [0, 0], (_log(tmp, "dsl", 0), _log(tmp, "dsl", 1))
    assert "deepspeed: world 2" in (run / "log.txt").read_text()
    ticks, _ = _records(run)
    ref, _ = _records(tmp / "one_process")
    assert sorted(ticks) == [4, 8]
    for step in ticks:
        for k in ("fake_score_loss/remain", "generator_loss/forget"):
            assert ticks[step][k] == pytest.approx(ref[step][k], rel=RTOL, abs=ATOL), (step, k)


FAKE_SRUN = r'''#!/usr/bin/env bash
# stand-in for srun on one machine: `srun ... hostname --ip-address` answers 127.0.0.1; any other command
# runs once per "node" (SLURM_NNODES), node 0 first until its rendezvous store listens, then the rest
while [[ $# -gt 0 ]]; do case "$1" in --*=*) shift;; -w) shift 2;; *) break;; esac; done
if [ "$1" = hostname ]; then echo 127.0.0.1; exit 0; fi
pids=()
for i in $(seq 0 $((SLURM_NNODES - 1))); do
  SLURM_NODEID=$i SLURM_PROCID=$i setsid "$@" > "$FAKE_SLURM_LOGS/node$i.log" 2>&1 &
  pids+=($!)
  if [ "$i" = 0 ]; then
    for _ in $(seq 600); do (exec 3<>"/dev/tcp/127.0.0.1/$MASTER_PORT") 2>/dev/null && break; sleep 0.2; done
  fi
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
'''
FAKE_SCONTROL = r'''#!/usr/bin/env bash
if [ "$1 $2" = "show hostnames" ]; then printf 'node-a\nnode-b\n'; else echo "$@" >> "$FAKE_SLURM_LOGS/scontrol"; fi
'''


def test_slurm_script_runs_two_nodes_under_a_stand_in_srun(two_node_run):
    """examples/slurm/sd15_multinode.sbatch itself, with srun/scontrol replaced by stand-ins that run
    both "nodes" here: its rendezvous address, world arithmetic and arguments start a 2-node DeepSpeed
    ZeRO-2 run (the digits config instead of SD1.5, one GPU-less rank per node), which finishes."""
    tmp, _ = two_node_run
    fake = tmp / "fake_slurm"
    (fake / "bin").mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake / "bin" / name).write_text(text)
        (fake / "bin" / name).chmod(0o755)
    run = tmp / "slurm_run"
    env = subprocess_env(DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", PATH=f"{fake / 'bin'}:{os.environ['PATH']}",
                         FAKE_SLURM_LOGS=str(fake), SLURM_NNODES="2", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node-[a-b]",
                         MASTER_PORT=str(_free_port()), LOCAL_ADDR="127.0.0.1", SD15="/nonexistent/sd15",
                         CONFIG=str(tmp / "tiny.json"), GPUS_PER_NODE="1", ROWS_PER_GPU="4", RUN_DIR=str(run),
                         PYTHON=sys.executable, EXTRA_SET="train.total_steps=8 eval.enabled=false")
    proc = subprocess.Popen(["bash", str(ROOT / "examples" / "slurm" / "sd15_multinode.sbatch")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    STARTED.append(proc)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        _kill_node(proc)
        pytest.fail("the SLURM script did not finish in 300 s")
    logs = "\n".join((fake / f"node{i}.log").read_text()[-3000:] for i in (0, 1) if (fake / f"node{i}.log").exists())
    assert proc.returncode == 0, out + logs
    assert "2 nodes x 1 GPUs, global batch 8, rendezvous 127.0.0.1:" in out
    assert "deepspeed: world 2, ZeRO-2" in (run / "log.txt").read_text()
    assert sorted(_records(run)[0]) == [4, 8]
    assert not (fake / "scontrol").exists()          # a finished run is not requeued
