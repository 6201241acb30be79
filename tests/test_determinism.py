"""engine.deterministic (issue #20 item 2): the flag sets what it says, `off` keeps cudnn autotuning,
and a CPU run with the flag on still resumes bit for bit. That a CUDA run resumes bit for bit with the
flag is the GPU tier's to show; no GPU has run it yet (README says so)."""
import os
from types import SimpleNamespace

import pytest
import torch

from sfd_fast.engine.accelerate import CUBLAS_WORKSPACE, set_device_flags
from tests.helpers import tiny_digits_config
from tests.test_trainer import assert_split_run_resumes_bit_exact


@pytest.fixture
def restore_global_flags(monkeypatch):
    """The flags are process-global: put them back for the other tests."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
    torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def _engine(**kw):
    return SimpleNamespace(channels_last=False, **kw)


def test_deterministic_sets_every_switch(restore_global_flags):
    torch.backends.cudnn.benchmark = True
    done = set_device_flags([], _engine(deterministic=True), torch.device("cuda"))   # no CUDA call is made
    assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
    assert done == {"deterministic": True, "cublas_workspace": CUBLAS_WORKSPACE}


def test_off_autotunes_convolutions_on_cuda(restore_global_flags):
    torch.backends.cudnn.benchmark = False
    done = set_device_flags([], _engine(deterministic=False), torch.device("cuda"))
    assert torch.backends.cudnn.benchmark is True and done == {"cudnn_benchmark": True}
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_deterministic_run_resumes_bit_exact_on_cpu(tmp_path, restore_global_flags):
    cfg_path = tiny_digits_config(tmp_path, train={"total_steps": 4, "ema": {"halflife_kimg": 0.01}},
                                  engine={"deterministic": True})
    assert_split_run_resumes_bit_exact(tmp_path, cfg_path, 4, 2)
    assert torch.are_deterministic_algorithms_enabled()     # the runs did switch it on
