"""The 8-bit Adam skip without a host read (engine/optim.py): a set flag leaves the weights and both
8-bit moments (and their block maxima) bit-identical, a clear flag is bnb's own update bit for bit.
Tensors of 4096+ elements get bnb's 8-bit blockwise state, smaller ones fp32 state: both are used."""
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from sfd_fast.engine.optim import make_optimizer  # noqa: E402

STATE = ("state1", "state2", "absmax1", "absmax2")


class _Cfg:
    lr, betas, eps, weight_decay = 1e-3, (0.9, 0.999), 1e-8, 0.0


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(64, 80, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]


def _grads(params, seed, poison=False):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    if poison:
        params[0].grad[3, 5] = float("nan")


def _snapshot(opt, params):
    out = [p.detach().clone() for p in params]
    for p in params:
        out += [opt.state[p][k].clone() for k in STATE if torch.is_tensor(opt.state[p].get(k))]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_skip_is_exact_and_a_clear_flag_is_bnb(seed):
    engine = type("E", (), {"optimizer": "adam8bit"})()
    ours_p, ref_p = _params(seed), _params(seed)
    ours = make_optimizer(_Cfg, engine, ours_p, torch.device("cpu"))
    ref = bnb.optim.Adam8bit(ref_p, lr=_Cfg.lr, betas=_Cfg.betas, eps=_Cfg.eps)
    for step in range(3):                 # clear flag: bnb's update, bit for bit
        _grads(ours_p, seed * 10 + step)
        _grads(ref_p, seed * 10 + step)
        ours.found_inf = torch.zeros(())
        ours.step()
        ref.step()
        for a, b in zip(_snapshot(ours, ours_p), _snapshot(ref, ref_p)):
            assert torch.equal(a, b)
    assert ours.state[ours_p[0]]["state1"].dtype == torch.uint8          # the 8-bit path ran
    before = _snapshot(ours, ours_p)
    _grads(ours_p, 99, poison=True)
    ours.found_inf = torch.ones(())       # set flag: nothing changes
    ours.step()
    for a, b in zip(_snapshot(ours, ours_p), before):
        assert torch.equal(a, b)
