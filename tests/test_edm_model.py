"""sfd_fast.edm networks against a plain restatement of EDM's forward (tests/edm_reference_net.py).

Random weights, tiny sizes, three architectures (DDPM++, NCSN++ with the residual and the skip
encoder/decoder, ADM) under the three preconditioners; outputs D(x, sigma) and input gradients.

Tolerance. Both sides are measured against the restatement in float64 (the exact value up to 1e-16):
ours (fp32) must satisfy  max|ours - exact| <= 4 * max|restated_fp32 - exact| + 1e-5 * max|exact|,
i.e. our network is no less accurate than a few times EDM's own fp32 arithmetic, plus a floor. The
floor: the two differ only in operation order (SDPA vs einsum softmax, F.linear vs matmul, mul+add
vs addcmul), a few ulps (1.2e-7) per op through ~25 layers with reductions of <= 576 terms, about
25 * sqrt(576) * 1.2e-7 ~ 7e-5 in the worst case and ~1e-6 typically; 1e-5 catches any wrong formula
(those give O(1) errors). The first term matters where fp32 itself is poor: NCSN++'s Fourier
embedding of VP's c_noise (up to 999 * t) takes cos of arguments ~1e5, where one fp32 ulp is ~0.008,
so EDM's own fp32 forward is ~1e-4 off the exact value there. Several seeds; batches 1 and 3.
"""
import math

import pytest
import torch

from sfd_fast.edm import UnsupportedNetworkError, build_network
from sfd_fast.edm.precond import vp_sigma, vp_sigma_inv
from tests import edm_reference_net as ref
from tests.edm_helpers import ADM, DDPMPP, NCSNPP, NCSNPP_SKIP, randomize

ARCHS = {"ddpmpp": DDPMPP, "ncsnpp": NCSNPP, "ncsnpp_skip": NCSNPP_SKIP, "adm": ADM}
PRECONDS = ["VPPrecond", "VEPrecond", "EDMPrecond"]


class RecordingDict(dict):
    """A state dict that records which keys the restatement read."""
    def __init__(self, *a):
        super().__init__(*a)
        self.read = set()

    def __getitem__(self, k):
        self.read.add(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        if k in self:
            self.read.add(k)
        return super().get(k, default)


def _close(ours, exact, restated32, floor=1e-5):
    err = (ours.double() - exact).abs().max().item()
    own = (restated32.double() - exact).abs().max().item()
    bound = 4 * own + floor * exact.abs().max().item()
    assert err <= bound, f"max abs error {err:.3g} > bound {bound:.3g} (EDM's own fp32 error {own:.3g})"


def _build(kind, arch, seed, res=8, label_dim=10):
    torch.manual_seed(seed)
    kw = dict(img_resolution=res, img_channels=3, label_dim=label_dim, use_fp16=False, **arch)
    return randomize(build_network(f"training.networks.{kind}", **kw), seed).eval(), kw


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("kind", PRECONDS)
@pytest.mark.parametrize("seed,batch", [(0, 3), (1, 1)])
def test_precond_matches_restated_edm_forward(arch, kind, seed, batch):
    net, kw = _build(kind, ARCHS[arch], seed)
    p = {k: v.detach().clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(batch, 3, 8, 8, generator=g) * 2
    sigma = torch.exp(torch.randn(batch, generator=g) * 1.2 - 0.5)  # sigmas across 0.05 .. 10
    labels = torch.nn.functional.one_hot(torch.randint(0, 10, (batch,), generator=g), 10).float()
    aug = torch.randn(batch, 9, generator=g) * 0.5
    x1 = x.clone().requires_grad_(True)
    ours = net(x1, sigma, labels, augment_labels=aug)
    w = torch.randn(ours.shape, generator=g)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), x1)
    outs, grads = {}, {}
    for dt in (torch.float32, torch.float64):
        pd = RecordingDict({k: v.to(dt) for k, v in p.items()})
        xd = x.to(dt).requires_grad_(True)
        outs[dt] = ref.precond(kind, pd, kw, xd, sigma.to(dt), labels.to(dt), aug.to(dt))
        (grads[dt],) = torch.autograd.grad((outs[dt] * w.to(dt)).sum(), xd)
        # every weight of ours is read by the restatement: no parameter is unused or misnamed
        assert pd.read == set(pd), f"unused by the restatement: {sorted(set(pd) - pd.read)[:5]}"
    _close(ours, outs[torch.float64].detach(), outs[torch.float32].detach())
    _close(g_ours, grads[torch.float64], grads[torch.float32])

def test_class_labels_none_is_the_zero_label_row():
    net, _ = _build("VPPrecond", DDPMPP, 3)
    x, s = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.0])
    torch.testing.assert_close(net(x, s), net(x, s, torch.zeros(2, 10)), rtol=0, atol=0)


@pytest.mark.parametrize("sigma", [0.002, 0.02, 0.5, 2.5, 80.0])
def test_preconditioner_coefficients_follow_edm_formulas(sigma):
    """c_skip, c_out, c_in, c_noise (float64 closed forms of EDM's formulas)."""
    s = torch.tensor([sigma], dtype=torch.float64)
    vp, _ = _build("VPPrecond", DDPMPP, 0)
    c_skip, c_out, c_in, c_noise = vp.coefficients(s)
    t = (math.sqrt(0.1 ** 2 + 2 * 19.9 * math.log(1 + sigma ** 2)) - 0.1) / 19.9
    assert c_skip == 1 and float(c_out) == pytest.approx(-sigma)
    assert float(c_in) == pytest.approx(1 / math.sqrt(sigma ** 2 + 1), rel=1e-12)
    assert float(c_noise) == pytest.approx(999 * t, rel=1e-12)
    edm, _ = _build("EDMPrecond", ADM, 0)
    c_skip, c_out, c_in, c_noise = edm.coefficients(s)
    assert float(c_skip) == pytest.approx(0.25 / (sigma ** 2 + 0.25), rel=1e-12)
    assert float(c_out) == pytest.approx(sigma * 0.5 / math.sqrt(sigma ** 2 + 0.25), rel=1e-12)
    assert float(c_in) == pytest.approx(1 / math.sqrt(sigma ** 2 + 0.25), rel=1e-12)
    assert float(c_noise) == pytest.approx(math.log(sigma) / 4, rel=1e-12, abs=1e-15)
    ve, _ = _build("VEPrecond", NCSNPP, 0)
    c_skip, c_out, c_in, c_noise = ve.coefficients(s)
    assert (c_skip, c_in) == (1, 1) and float(c_out) == sigma
    assert float(c_noise) == pytest.approx(math.log(sigma / 2), rel=1e-12, abs=1e-15)


def test_vp_schedule_and_sigma_range():
    """EDM's VP defaults: beta_d 19.9, beta_min 0.1, M 1000, epsilon_t 1e-5; sigma_inv inverts sigma."""
    t = torch.linspace(1e-3, 1, 50, dtype=torch.float64)
    torch.testing.assert_close(vp_sigma_inv(vp_sigma(t)), t, rtol=1e-9, atol=1e-12)
    vp, _ = _build("VPPrecond", DDPMPP, 0)
    assert (vp.beta_d, vp.beta_min, vp.M, vp.epsilon_t) == (19.9, 0.1, 1000, 1e-5)
    assert vp.sigma_max == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1), rel=1e-6)
    # EDM evaluates sigma(1e-5) in fp32 (exp(1e-6) - 1): about 1e-3, within fp32 rounding of exp
    assert vp.sigma_min == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9e-10 + 1e-6)), rel=0.05)


def test_cifar10_cond_vp_state_dict_layout():
    """EDM's CIFAR-10 conditional VP network (train.py --cond=1 --arch=ddpmpp --precond=vp)."""
    net = build_network("training.networks.VPPrecond", img_resolution=32, img_channels=3, label_dim=10,
                        use_fp16=False, model_type="SongUNet", embedding_type="positional",
                        encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
                        resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2], augment_dim=9,
                        dropout=0.13)
    sd = net.state_dict()
    assert sum(v.numel() for v in sd.values()) == 55_735_331
    assert sd["model.map_label.weight"].shape == (128, 10)
    assert sd["model.map_augment.weight"].shape == (128, 9) and "model.map_augment.bias" not in sd
    assert sd["model.enc.32x32_conv.weight"].shape == (128, 3, 3, 3)
    assert sd["model.enc.16x16_down.conv0.resample_filter"].shape == (1, 1, 2, 2)
    assert sd["model.enc.16x16_block0.qkv.weight"].shape == (768, 256, 1, 1)
    assert sd["model.dec.32x32_aux_conv.weight"].shape == (3, 256, 3, 3)
    assert "model.enc.32x32_block0.qkv.weight" not in sd     # attention at 16x16 only
    assert list(sd)[0] == "model.map_label.weight" and list(sd)[-1] == "model.dec.32x32_aux_conv.bias"


def test_build_network_errors_name_the_problem():
    with pytest.raises(UnsupportedNetworkError, match="iDDPMPrecond"):
        build_network("training.networks.iDDPMPrecond", img_resolution=8, img_channels=3)
    with pytest.raises(UnsupportedNetworkError, match="os.system"):
        build_network("os.system", "echo hi")
    with pytest.raises(UnsupportedNetworkError, match="'bogus'"):
        build_network("training.networks.VPPrecond", img_resolution=8, img_channels=3, bogus=1)
    with pytest.raises(UnsupportedNetworkError, match="model_type 'UNet2D'"):
        build_network("training.networks.VPPrecond", img_resolution=8, img_channels=3, model_type="UNet2D")
    with pytest.raises(UnsupportedNetworkError, match="embedding_type"):
        build_network("training.networks.SongUNet", img_resolution=8, in_channels=3, out_channels=3,
                      embedding_type="sinusoid")


def test_backbones_by_name_have_edm_signatures():
    import inspect
    song = build_network("training.networks.SongUNet", img_resolution=8, in_channels=3, out_channels=3,
                         model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    assert list(inspect.signature(song.forward).parameters) == ["x", "noise_labels", "class_labels", "augment_labels"]
    vp, _ = _build("VPPrecond", DDPMPP, 0)
    assert list(inspect.signature(vp.forward).parameters) == ["x", "sigma", "class_labels", "force_fp32", "model_kwargs"]
    out = song(torch.randn(2, 3, 8, 8), torch.randn(2), None)
    assert out.shape == (2, 3, 8, 8)


def test_bf16_autocast_runs_and_returns_fp32():
    """engine.precision bf16 wraps the networks in autocast: D comes back in fp32 and close to the fp32
    forward (bf16 keeps 8 mantissa bits, ~4e-3 per op through ~25 layers: 0.1 of the scale is loose)."""
    net, _ = _build("VPPrecond", DDPMPP, 2)
    x, s, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 5.0]), torch.eye(10)[:2]
    full = net(x, s, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = net(x, s, labels)
    assert half.dtype == torch.float32 and bool(half.isfinite().all())
    assert (half - full).abs().max().item() < 0.1 * full.abs().max().item()
