"""The ddpm network against an independent plain-torch transcription of the reference network,
and the dropout switch."""
import pytest
import torch

from .ddpm_helpers import tiny_arch
from .ddpm_reference_net import RefConditionalModel
from sfd_fast.ddpm.model import DDPMArch, DDPMUNet
from sfd_fast.denoisers import ClassCondDenoiser, FrozenView
from sfd_fast.schedules import VPSchedule

# fp32, the same weights and inputs: the two differ only in summation order (SDPA vs explicit bmm
# attention, F.silu vs x*sigmoid(x)); measured ~6e-7 relative. 1e-5 is the bar for the
# external check (about 80 float32 ulps), with >10x margin over the observed error.
REL_TOL = 1e-5


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("size,mult,batch", [(32, (1, 2, 2, 2), 3), (64, (1, 2, 2, 2, 4), 1)])
def test_matches_reference_transcription(size, mult, batch):
    torch.manual_seed(0)
    ref = RefConditionalModel(ch_mult=mult, res=size).eval()
    net = DDPMUNet(DDPMArch.for_image_size(size)).eval()
    net.load_state_dict(ref.state_dict())  # the same names and shapes: no renaming
    x = torch.randn(batch, 3, size, size)
    t = torch.randint(0, 1000, (batch,))
    y = torch.randint(0, 10, (batch,))
    with torch.no_grad():
        assert rel_err(net(x, t, y), ref(x, t, y)) < REL_TOL
        if batch > 1:  # the null class (label 10) = the reference's dropped-condition rows
            drop = torch.zeros(batch, dtype=torch.bool)
            drop[0] = True
            y_null = torch.where(drop, torch.full_like(y, 10), y)
            assert rel_err(net(x, t, y_null), ref(x, t, y, drop_mask=drop)) < REL_TOL


def test_train_mode_dropout_matches_reference():
    """In train mode both draw the same dropout masks in the same order from the global RNG."""
    torch.manual_seed(1)
    ref = RefConditionalModel().train()
    net = DDPMUNet(DDPMArch.for_image_size(32)).train()
    net.load_state_dict(ref.state_dict())
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([38, 711]), torch.tensor([0, 9])
    with torch.no_grad():
        torch.manual_seed(5)
        a = ref(x, t, y)
        torch.manual_seed(5)
        b = net(x, t, y)
        torch.manual_seed(6)
        c = net(x, t, y)
    assert rel_err(b, a) < REL_TOL
    assert rel_err(c, a) > 1e-3  # another seed: other masks (p = 0.1 on ~1e5 units)


def _pair(net, x, t, y):
    return net(x, t, y), net(x, t, y)


def test_update_dropout_only_while_own_weights_train():
    torch.manual_seed(0)
    net = DDPMUNet(tiny_arch()).eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([100, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        ref = net(x, t, y)
    a, b = _pair(net, x, t, y)
    assert torch.equal(a, ref) and torch.equal(b, ref)  # switch off: deterministic
    net.update_dropout = True
    a, b = _pair(net, x, t, y)
    assert not torch.equal(a, b)  # its own update: dropout on
    with torch.no_grad():  # sampling (e.g. generator output for the fake-score phase): off
        assert torch.equal(net(x, t, y), ref)
    den = ClassCondDenoiser(net, VPSchedule.from_betas(), 10)
    view = FrozenView(den)  # the fake score inside the generator update: detached weights, off
    xr = x.clone().requires_grad_(True)
    assert torch.equal(view.x0(xr, t, y), view.x0(xr, t, y))
    net.requires_grad_(False)  # a frozen teacher: off
    assert torch.equal(net(xr, t, y), ref)


def test_rejects_wrong_resolution_and_picks_reference_sizes():
    net = DDPMUNet(tiny_arch())
    with pytest.raises(ValueError, match="16x16"):
        net(torch.randn(1, 3, 32, 32), torch.tensor([1]), torch.tensor([0]))
    assert DDPMArch.for_image_size(64).ch_mult == [1, 2, 2, 2, 4]
    with pytest.raises(ValueError, match="32 .*64"):
        DDPMArch.for_image_size(48)
