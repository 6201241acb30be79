"""The acceleration plan (issue #20 item 6): one module decides, in one documented order, and every run
logs the plan and writes it into its run directory."""
import json
import logging
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sfd_fast import train
from sfd_fast.denoisers import FrozenFakeScore, FrozenView
from sfd_fast.engine.plan import PLAN_FILE
from tests.helpers import tiny_digits_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sfd_fast"

# what deciding looks like in code: the plan's helpers (only engine/plan.py calls them) ...
DECISIONS = ["apply_attention_and_checkpointing(", "compile_networks(", "compile_phases(", "select_generator_loss(",
             "resolve_auto_micro_batch(", "make_backend(", "set_device_flags(", "FrozenFakeScore.for_run("]
# ... and the primitives underneath (only engine/accelerate.py, the helpers' home, calls them)
PRIMITIVES = ["set_attn_processor(", "enable_xformers_memory_efficient_attention(", "enable_gradient_checkpointing(",
              "torch.compile(", ".compile(backend", "cudnn.benchmark = True"]
# documented exceptions, each with its reason
ALLOWED = {
    "engine/plan.py": "the plan",
    "engine/accelerate.py": "the helpers the plan calls",
    "engine/regional.py": "engine.compile_regions: the per-block compile that accelerate.compile_networks calls",
    "engine/__init__.py": "defines make_backend",
    "engine/autobatch.py": "defines resolve_auto_micro_batch",
    "denoisers.py": "defines FrozenFakeScore",
    "engine/memory_model.py": "the memory estimate switches checkpointing off and on around a trace "
                              "(restored) and traces the generator phase with the plan's own rule",
    "sd/loading.py": "loads for sampling / export / the compat API; training passes attention=None",
    "compat/sd.py": "the reference's load_sd15(enable_xformers=, gradient_checkpointing=) drop-in signature",
}


def _code_lines(path: Path):
    for i, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split("#", 1)[0]
        if code.strip() and not code.lstrip().startswith(("def ", "class ")):
            yield i, code


def test_no_other_module_selects_acceleration():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ALLOWED:
            continue
        in_docstring = False
        for i, code in _code_lines(path):
            if code.count('"""') % 2:
                in_docstring = not in_docstring
                continue
            if in_docstring:
                continue
            for needle in DECISIONS + PRIMITIVES:
                if needle in code:
                    offenders.append(f"sfd_fast/{rel}:{i}: {needle}")
    assert not offenders, "acceleration decided outside engine/plan.py:\n" + "\n".join(offenders)


def test_the_grep_can_fail(tmp_path, monkeypatch):
    """A planted decision in another module is found (so the test above means something)."""
    fake_pkg = tmp_path / "sfd_fast"
    (fake_pkg / "engine").mkdir(parents=True)
    (fake_pkg / "trainer.py").write_text("x = 1\nloss_fn = select_generator_loss(cfg.engine, device)\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake_pkg)
    with pytest.raises(AssertionError, match=r"trainer.py:2: select_generator_loss\("):
        test_no_other_module_selects_acceleration()


def test_plan_runs_in_the_documented_order(tmp_path, monkeypatch):
    import sfd_fast.engine as engine
    import sfd_fast.engine.accelerate as acc
    import sfd_fast.engine.autobatch as autobatch
    calls = []

    def spy(module, name):
        real = getattr(module, name)

        def wrapper(*a, **k):
            calls.append(name)
            return real(*a, **k)
        monkeypatch.setattr(module, name, wrapper)
    for name in ("set_device_flags", "apply_attention_and_checkpointing", "select_generator_loss",
                 "compile_networks", "compile_phases"):
        spy(acc, name)
    spy(autobatch, "resolve_auto_micro_batch")
    spy(engine, "make_backend")
    cfg = tiny_digits_config(tmp_path, train={"micro_batch": "auto", "total_steps": 1},
                             engine={"memory_limit_gib": 0.05})
    train.main(["--config", str(cfg), "--run-dir", str(tmp_path / "run")])
    assert calls == ["set_device_flags", "apply_attention_and_checkpointing", "select_generator_loss",
                     "compile_networks", "compile_phases", "resolve_auto_micro_batch", "make_backend"]


def test_run_logs_and_saves_the_plan(tmp_path, caplog):
    cfg = tiny_digits_config(tmp_path, train={"total_steps": 2}, engine={"activation_checkpointing": True})
    with caplog.at_level(logging.INFO, logger="sfd_fast"):
        train.main(["--config", str(cfg), "--run-dir", str(tmp_path / "run")])
    plan = json.loads((tmp_path / "run" / PLAN_FILE).read_text())
    assert list(plan) == ["precision", "attention", "checkpointing", "fake_score_in_generator_phase",
                          "loss_kernel", "compile", "micro_batch", "backend"]
    assert plan["precision"]["autocast"] == "fp32" and plan["backend"]["name"] == "plain"
    assert plan["checkpointing"]["generator"] == ["checkpointing(1 blocks)"]
    assert plan["loss_kernel"] == "sfd_fast.losses.generator_loss"
    assert plan["fake_score_in_generator_phase"].startswith("detached weights")
    block = caplog.text[caplog.text.index("acceleration plan"):]
    assert re.search(r"1\. precision.*\n.*2\. attention.*\n.*3\. checkpointing", block)
    assert "7. backend" in block


def test_one_fake_score_freeze_decided_by_the_rule():
    net = torch.nn.Linear(2, 2)
    fake = SimpleNamespace(net=net, parameters=net.parameters)
    detached = FrozenFakeScore.for_run(fake)
    assert isinstance(detached.view, FrozenView) and detached.toggle_reason is None
    zero3 = FrozenFakeScore.for_run(fake, zero3=True)
    assert zero3.view is fake and "ZeRO-3" in zero3.toggle_reason
    net.is_gradient_checkpointing = True
    ckpt = FrozenFakeScore.for_run(fake)
    assert ckpt.view is fake and "checkpointing" in ckpt.toggle_reason
    with ckpt.during():
        assert not any(p.requires_grad for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())
