"""Denoiser adapters: the protocol's x0 and CFG for each backbone type."""
import pytest
import torch

from sfd_fast.denoisers import ClassCondDenoiser, DiffusersClassUNetDenoiser
from sfd_fast.generator import OneStepGenerator
from sfd_fast.digits.model import DigitsEpsMLP
from sfd_fast.schedules import VPSchedule

diffusers = pytest.importorskip("diffusers")


def test_diffusers_class_unet_adapter_matches_closed_form():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                 num_class_embeds=11).eval()
    sched = VPSchedule.from_betas("linear", 1e-4, 0.02, 1000)
    den = DiffusersClassUNetDenoiser(unet, sched, 10)
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([50, 400, 900])
    c = torch.tensor([0, 4, 9])
    with torch.no_grad():
        eps = unet(x, t, class_labels=c).sample
        x0 = den.x0(x, t, c)
        a, b = sched.coefs(t, x)
        torch.testing.assert_close(x0, (x - b * eps) / a, rtol=1e-5, atol=1e-5)
        # CFG: one batched call of cond + null rows equals the two separate calls combined
        null = den.null_condition(3, "cpu")
        guided = den.x0(x, t, c, null, 3.0)
        u = den.x0(x, t, null)
        torch.testing.assert_close(guided, u + 3.0 * (x0 - u), rtol=1e-4, atol=1e-4)


def test_one_step_generator_formula():
    """x_g = sigma_init (z - eps(b_init z, t_init, c)) for an epsilon network (spec §0)."""
    torch.manual_seed(1)
    net = DigitsEpsMLP(10, 32, 1)
    sched = VPSchedule.from_betas("linear", 1e-4, 0.02, 1000)
    gen = OneStepGenerator(ClassCondDenoiser(net, sched, 10), 440)
    z = torch.randn(4, 1, 8, 8)
    c = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        eps = net(sched.b(440) * z, torch.full((4,), 440), c)
        expected = sched.sigma(440) * (z - eps)
        torch.testing.assert_close(gen(z, c), expected, rtol=1e-5, atol=1e-5)


def test_guidance_without_uncond_is_an_error():
    den = ClassCondDenoiser(DigitsEpsMLP(10, 16, 1), VPSchedule.from_betas(), 10)
    with pytest.raises(ValueError, match="uncond"):
        den.x0(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]), None, 2.0)
