"""Closed-form schedules against diffusers' DDPMScheduler on the same betas."""
import pytest
import torch

from sfd_fast.schedules import VPSchedule, edm_precond, edm_sigmas_from_u

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("kind,start,end", [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012)])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_x0_matches_ddpm_scheduler_step(kind, start, end, prediction):
    ours = VPSchedule.from_betas(kind, start, end, 1000, prediction)
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=kind, beta_start=start,
                                  beta_end=end, clip_sample=False, prediction_type=prediction)
    # alphas_cumprod: diffusers builds float32 betas; ours are float64 -> agree to float32 rounding
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod, rtol=2e-6, atol=2e-7)
    g = torch.Generator().manual_seed(0)
    for t in (0, 20, 440, 625, 980, 999):
        x_t = torch.randn(2, 4, 8, 8, generator=g)
        out = torch.randn(2, 4, 8, 8, generator=g)
        expected = ref.step(out, t, x_t).pred_original_sample
        got = ours.x0_from_output(x_t, out, torch.full((2,), t))
        # tolerance: float32 coefficients; at t=0 eps-pred divides by a_0 ~ 1 (no amplification),
        # at t=999 b/a ~ 157 (linear) amplifies float32 rounding of the table entries
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_add_noise_matches_diffusers():
    ours = VPSchedule.from_betas("scaled_linear", 0.00085, 0.012, 1000)
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, n = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([20, 500, 979])
    torch.testing.assert_close(ours.add_noise(x0, n, t), ref.add_noise(x0, n, t), rtol=1e-5, atol=1e-5)


def test_sigma_init_matches_spec():
    """spec §0: t_init 440 (DDPM linear) and 625 (SD scaled-linear) both give sigma ~ 2.50."""
    assert abs(VPSchedule.from_betas("linear").sigma(440) - 2.5023) < 1e-3
    assert abs(VPSchedule.from_betas("scaled_linear", 0.00085, 0.012).sigma(625) - 2.5017) < 1e-3


def test_v_target_roundtrip():
    s = VPSchedule.from_betas("scaled_linear", 0.00085, 0.012, 1000, "v_prediction")
    x0, n = torch.randn(4, 4, 4, 4), torch.randn(4, 4, 4, 4)
    t = torch.tensor([10, 300, 600, 990])
    x_t = s.add_noise(x0, n, t)
    torch.testing.assert_close(s.x0_from_output(x_t, s.target(x0, n, t), t), x0, rtol=1e-4, atol=1e-4)


def test_edm_sigmas():
    u = torch.tensor([0.0, 0.8, 1.0])
    sig = edm_sigmas_from_u(u)
    assert abs(sig[0].item() - 0.002) < 1e-6 and abs(sig[2].item() - 80.0) < 1e-3
    assert abs(sig[1].item() - 24.4) < 0.2  # spec §1c: u = 0.8 gives sigma ~ 24.4
    c_skip, c_out, c_in, _ = edm_precond(torch.tensor(0.5))
    assert abs(c_skip.item() - 0.5) < 1e-6 and abs(c_in.item() - 1 / (0.5 * 2**0.5)) < 1e-5


def test_bad_schedule_names():
    with pytest.raises(ValueError, match="beta schedule"):
        VPSchedule.from_betas("cosine")
    with pytest.raises(ValueError, match="prediction"):
        VPSchedule.from_betas(prediction="x0")
