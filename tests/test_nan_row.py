"""One non-finite row in the generator phase contributes exactly zero gradient (issue #20 item 3).

"The same update as the batch without it" means what the reference does with a NaN row: it drops
the row by boolean indexing and keeps the per-step denominator (batch_gpu_total; here `denom`), so
the comparison is generator_phase on the batch with the poisoned row against generator_phase on the
batch with that row sliced out, the same `denom`, the same networks.

Tolerance: the two sides run the same rows through batched matmuls of n and n - 1 rows, so only the
fp32 summation order of the weight-gradient reductions differs (at most a few hundred terms: 64-pixel
rows, 32-wide hidden layers, 8 rows); the worst-case reordering bound k * eps32 for k ~ 600 is
~7e-5 relative, hence rtol 1e-4 and an absolute floor of 1e-6 x the largest gradient entry.
"""
import pytest
import torch

from sfd_fast.config import load_config
from sfd_fast.denoisers import FrozenView

from sfd_fast.trainer import SFDTrainer
from sfd_fast.train import build_parts
from tests.helpers import tiny_digits_config
from tests.test_step import _draws, _nets, _slice
from tests.helpers import gen_phase

pytestmark = pytest.mark.usefixtures("one_thread")


class BlowsUpOnRow:
    """A teacher that overflows on one row INSIDE its forward: that row's input is scaled by inf, so
    its activations, its x0 estimate and its backward are NaN (the case a masked loss alone misses:
    0 * NaN on the way back). `where='output'` instead overwrites the row's x0 estimate with NaN."""

    def __init__(self, teacher, row: int, where: str = "inside"):
        self.teacher, self.row, self.where = teacher, row, where
        self.schedule = teacher.schedule

    def x0(self, x_t, t, cond, uncond=None, guidance=1.0):
        rows = torch.arange(x_t.shape[0]).reshape(-1, *([1] * (x_t.dim() - 1)))
        if self.where == "inside":
            scale = torch.where(rows == self.row, float("inf"), 1.0)
            return self.teacher.x0(x_t * scale, t, cond, uncond, guidance)
        y = self.teacher.x0(x_t, t, cond, uncond, guidance)
        return torch.where(rows == self.row, float("nan"), y)


def _generator_grads(gen, fake, teacher, draws, denom):
    gen.zero_grad(set_to_none=True)
    loss, stats = gen_phase(gen, FrozenView(fake), teacher, fake.schedule, draws, 1.2, 1.0, 1.0, denom)
    loss.backward()
    return [p.grad.clone() for p in gen.parameters()], loss.detach(), stats


def _assert_grads_close(got, want):
    scale = max(w.abs().max().item() for w in want)
    assert scale > 0
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("seed,row,where", [(0, 2, "inside"), (1, 6, "inside"), (2, 0, "output"),
                                             (3, 7, "inside")])
def test_one_nan_row_gives_the_update_without_it(seed, row, where):
    teacher, fake, gen = _nets(seed)
    draws = _draws(5, 3, seed)          # rows 0-4 remain, 5-7 forget
    denom = 5.0
    keep = [i for i in range(8) if i != row]
    got, loss, stats = _generator_grads(gen, fake, BlowsUpOnRow(teacher, row, where), draws, denom)
    want, loss_without, _ = _generator_grads(gen, fake, teacher, _slice(draws, keep), denom)
    assert stats[:, 2].sum().item() == 1.0           # the row is counted as non-finite
    torch.testing.assert_close(loss, loss_without, rtol=1e-5, atol=1e-6)
    _assert_grads_close(got, want)


def test_mask_is_needed_without_it_the_gradient_is_nan(monkeypatch):
    """The planted row does poison the gradient when the row gate is off (so the test above can fail)."""
    from sfd_fast import step as step_module
    monkeypatch.setattr(step_module, "zero_rows_of_grad", lambda x, keep: None)
    teacher, fake, gen = _nets(0)
    got, _, _ = _generator_grads(gen, fake, BlowsUpOnRow(teacher, 2), _draws(5, 3, 0), 5.0)
    assert not all(torch.isfinite(g).all() for g in got)


def test_batch_of_one_nan_row_gives_zero_gradient():
    teacher, fake, gen = _nets(4)
    draws = _slice(_draws(1, 0, 4), [0])
    got, loss, _ = _generator_grads(gen, fake, BlowsUpOnRow(teacher, 0), draws, 1.0)
    assert loss.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in got)


def _trainer(tmp_path, name):
    cfg = load_config(tiny_digits_config(tmp_path / name))
    return SFDTrainer(cfg, build_parts(cfg), tmp_path / name / "run", torch.device("cpu"))


def _record_generator_grads(trainer):
    seen, update = [], trainer.backend.update

    def recording_update(role):
        if role == "generator":
            seen.append([p.grad.clone() for p in trainer.backend.params["generator"]])
        update(role)
    trainer.backend.update = recording_update
    return seen


def test_trainer_applies_the_update_of_the_other_rows(tmp_path):
    """Through the plain backend: the generator update is not skipped and its gradient is that of
    the batch without the row (same denom)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    poisoned, dropped = _trainer(tmp_path, "a"), _trainer(tmp_path, "b")
    row = 3
    poisoned.phase_ctx.teacher = BlowsUpOnRow(poisoned.teacher, row)   # what the phases call
    draw = dropped.backend.draw
    keep = [i for i in range(dropped.backend.micro * 2) if i != row]
    dropped.backend.draw = lambda phase, *a: _slice(draw(phase, *a), keep) if phase == "generator" else draw(phase, *a)
    before = [p.detach().clone() for p in poisoned.generator.parameters()]
    got, want = _record_generator_grads(poisoned), _record_generator_grads(dropped)
    poisoned.train_step()
    dropped.train_step()
    assert poisoned.skipped.tolist() == [0.0, 0.0]
    _assert_grads_close(got[0], want[0])
    after = list(poisoned.generator.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_compiled_phase_keeps_the_row_gate(monkeypatch):
    """engine.compile_phase: the generator phase compiled (sample, then the rest, joined by the row
    gate in eager code, accelerate.compile_phases) gives the update without the NaN row, as eager does.
    aot_eager runs the same aten ops as eager (tolerance as above)."""
    from types import SimpleNamespace

    from sfd_fast import engine
    from sfd_fast.engine.accelerate import compile_phases
    from sfd_fast.losses import generator_loss
    from sfd_fast.step import PhaseContext, fake_score_phase, generator_phase

    monkeypatch.setenv(engine.COMPILE_BACKEND_ENV, "aot_eager")
    _, compiled = compile_phases(fake_score_phase, generator_phase,
                                 SimpleNamespace(compile_phase=True, compile_mode="default"))
    assert compiled is not generator_phase
    teacher, fake, gen = _nets(1)
    draws, row, denom = _draws(5, 3, 1), 6, 5.0
    ctx = PhaseContext(gen, None, FrozenView(fake), BlowsUpOnRow(teacher, row), fake.schedule, 1.2, 1.0, 1.0,
                       1.0, denom, generator_loss, 1)
    gen.zero_grad(set_to_none=True)
    loss, stats = compiled(ctx, draws)
    loss.backward()
    got = [p.grad.clone() for p in gen.parameters()]
    want, loss_without, _ = _generator_grads(gen, fake, teacher, _slice(draws, [i for i in range(8) if i != row]),
                                             denom)
    assert stats[:, 2].sum().item() == 1.0
    torch.testing.assert_close(loss, loss_without, rtol=1e-5, atol=1e-6)
    _assert_grads_close(got, want)
