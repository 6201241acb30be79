"""Fast-path wiring: the Triton loss through the trainer, torch.compile of the networks, and the
engine.kernels errors (CPU tier).

Compile tests use backend "aot_eager" (via SFD_FAST_COMPILE_BACKEND): it runs dynamo's graph
capture, guards and AOTAutograd exactly as inductor does (graph breaks, recompiles, the
functional_call of FrozenView, the joint forward/backward graphs), without inductor's C++ code
generation, which costs ~30 s per graph on this 2-core CPU. Inductor itself is exercised by the GPU
tier (tests/test_gpu_tier.py).
"""

import pytest
import torch

from sfd_fast import engine
from sfd_fast.config import load_config
from sfd_fast.digits.build import build_parts as build_digits_parts
from sfd_fast.losses import generator_loss
from sfd_fast.trainer import SFDTrainer

from .helpers import tiny_digits_config


def _trainer(tmp_path, name, **engine_cfg):
    cfg = load_config(tiny_digits_config(tmp_path))
    for k, v in engine_cfg.items():
        setattr(cfg.engine, k, v)
    run_dir = tmp_path / name
    run_dir.mkdir()
    return SFDTrainer(cfg, build_digits_parts(cfg), run_dir, torch.device("cpu"))


def _assert_same_state(a, b, rtol, atol):
    for (k, va), vb in zip(a.generator.state_dict().items(), b.generator.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=rtol, atol=atol, msg=f"generator {k}")
    for (k, va), vb in zip(a.fake_score.state_dict().items(), b.fake_score.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=rtol, atol=atol, msg=f"fake_score {k}")
    torch.testing.assert_close(a.stats, b.stats, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# engine.kernels
# --------------------------------------------------------------------------------------------------
def test_select_generator_loss_choices(tmp_path):
    from sfd_fast.kernels import sfd_loss

    cfg = load_config(tiny_digits_config(tmp_path)).engine
    cfg.kernels = "torch"
    assert engine.select_generator_loss(cfg, torch.device("cpu")) is generator_loss
    cfg.kernels = "auto"  # CPU: auto never picks the interpreter
    assert engine.select_generator_loss(cfg, torch.device("cpu")) is generator_loss
    cfg.kernels = "triton"
    assert sfd_loss.kernel_interpreted()  # tests/conftest.py sets TRITON_INTERPRET=1
    assert engine.select_generator_loss(cfg, torch.device("cpu")) is sfd_loss.sfd_generator_loss
    cfg.kernels = "cuda-magic"
    with pytest.raises(ValueError, match="engine.kernels"):
        engine.select_generator_loss(cfg, torch.device("cpu"))


def test_triton_requested_without_triton_is_a_clear_error(tmp_path, monkeypatch):
    from sfd_fast.kernels import triton_support

    monkeypatch.setattr(triton_support, "_TRITON_OK", False)  # as if `import triton` failed
    cfg = load_config(tiny_digits_config(tmp_path)).engine
    cfg.kernels = "triton"
    with pytest.raises(ImportError, match="pip install triton"):
        engine.select_generator_loss(cfg, torch.device("cpu"))
    cfg.kernels = "auto"  # auto falls back, and only auto
    assert engine.select_generator_loss(cfg, torch.device("cuda")) is generator_loss


def test_triton_on_cpu_without_interpreter_says_so(tmp_path, monkeypatch):
    from sfd_fast.kernels import sfd_loss

    monkeypatch.setattr(sfd_loss, "kernel_interpreted", lambda: False)
    cfg = load_config(tiny_digits_config(tmp_path)).engine
    cfg.kernels = "triton"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        engine.select_generator_loss(cfg, torch.device("cpu"))


def test_triton_kernel_through_trainer_matches_reference(tmp_path):
    """Three full steps with the fused loss (interpreter) vs the torch reference, same seed."""
    from sfd_fast.kernels import sfd_loss

    ref = _trainer(tmp_path, "ref", kernels="torch")
    fused = _trainer(tmp_path, "fused", kernels="triton")
    assert fused.loss_fn is sfd_loss.sfd_generator_loss and ref.loss_fn is generator_loss
    for _ in range(3):
        ref.train_step()
        fused.train_step()
    # fp32; the kernel sums in a different order (blocked) than torch's reduction: rounding-level
    # differences, amplified by Adam's normalisation on near-zero gradients -> 1e-5 / 1e-6.
    _assert_same_state(ref, fused, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def aot_eager(monkeypatch):
    import torch._dynamo

    monkeypatch.setenv(engine.COMPILE_BACKEND_ENV, "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_off_leaves_networks_eager(tmp_path):
    tr = _trainer(tmp_path, "eager", compile=False)
    for net in (tr.teacher.net, tr.fake_score.net, tr.generator.net):
        assert getattr(net, "_compiled_call_impl", None) is None


def test_compiled_step_equals_eager_without_recompiles(tmp_path, aot_eager):
    from torch._dynamo.utils import counters

    eager = _trainer(tmp_path, "eager", compile=False)
    comp = _trainer(tmp_path, "comp", compile=True)
    nets = (comp.teacher.net, comp.fake_score.net, comp.generator.net)
    assert all(getattr(n, "_compiled_call_impl", None) is not None for n in nets)
    # in place: parameter names (checkpoints) are unchanged
    assert list(comp.generator.net.state_dict()) == list(eager.generator.net.state_dict())
    teacher_flags = [p.requires_grad for p in comp.teacher.parameters()]
    counters.clear()
    eager.train_step()
    comp.train_step()
    graphs_after_first = counters["stats"]["unique_graphs"]
    assert graphs_after_first > 0 and not counters["graph_break"]
    for _ in range(5):
        eager.train_step()
        comp.train_step()
    # no recompiles and no new graphs across 5 further steps
    assert counters["stats"]["unique_graphs"] == graphs_after_first
    assert not counters["recompiles"] and not counters["graph_break"]
    assert [p.requires_grad for p in comp.teacher.parameters()] == teacher_flags
    # aot_eager runs the same aten ops as eager, but AOTAutograd may reorder the backward's
    # accumulation: fp32 rounding-level differences after 6 Adam steps.
    _assert_same_state(eager, comp, rtol=1e-5, atol=1e-6)


def test_frozen_view_composes_with_compiled_net(tmp_path, aot_eager):
    """The generator phase through FrozenView (functional_call with detached weights) on a
    compiled fake score gives input gradients only, and does not recompile on later calls."""
    from torch._dynamo.utils import counters

    tr = _trainer(tmp_path, "fv", compile=True)
    x = torch.randn(4, *tr.parts.sample_shape, requires_grad=True)
    t = torch.full((4,), 300)
    c = torch.arange(4)
    counters.clear()
    for i in range(3):
        out = tr.backend.fake_score_view.x0(x, t, c)
        out.sum().backward()
        if i == 0:
            frames = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == frames and not counters["recompiles"]
    assert x.grad is not None and all(p.grad is None for p in tr.fake_score.parameters())
    eager = tr.fake_score.net._call_impl(x, t, c)  # the uncompiled module, same weights
    torch.testing.assert_close(tr.fake_score.output(x, t, c), eager.float())
