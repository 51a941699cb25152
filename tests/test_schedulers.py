"""minti.schedulers against diffusers' DDPMScheduler / DDIMScheduler configured as SD 1.x.

Every comparison is within 1e-6 relative (fp32), for 10, 50 and 1000 steps. Each step is fed the same
inputs on both sides (x from the reference trajectory, the same eps), so an error cannot hide by
compounding or cancelling along the chain.
"""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from minti.io.configs import from_diffusers_config, to_diffusers_config
from minti.schedulers import DDIM, DDPM, leading_timesteps

# SD 1.x's scheduler_config.json (e.g. runwayml/stable-diffusion-v1-5/scheduler), as the pipeline uses it.
SD15_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD_KW = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
             steps_offset=1, clip_sample=False, timestep_spacing="leading", prediction_type="epsilon")
RTOL = 1e-6


def ref_ddim(steps_offset=1):
    return DDIMScheduler(**{**SD_KW, "steps_offset": steps_offset}, set_alpha_to_one=False)


def ref_ddpm(steps_offset=1):
    return DDPMScheduler(**{**SD_KW, "steps_offset": steps_offset}, variance_type="fixed_small")


def assert_rel(actual, expected, what):
    """Max elementwise error relative to the reference's scale is below RTOL."""
    err = ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()
    assert err <= RTOL, f"{what}: relative error {err:.3g} > {RTOL}"
    return err


def test_schedule_equals_diffusers():
    ours, ref = DDPM(), ref_ddpm()
    assert ours.betas.dtype == ref.betas.dtype == torch.float32
    assert_rel(ours.betas, ref.betas, "betas")
    assert_rel(ours.alphas_cumprod, ref.alphas_cumprod, "alphas_cumprod")
    assert torch.equal(ours.timesteps, ref.timesteps)  # the full chain 999..0 before set_timesteps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_noise(dtype):
    ours, ref = DDPM(), ref_ddpm()
    x0 = torch.randn(6, 4, 5, 7, dtype=dtype)
    noise = torch.randn(6, 4, 5, 7, dtype=dtype)
    t = torch.tensor([0, 1, 17, 500, 998, 999])  # one timestep per sample, both ends included
    out = ours.add_noise(x0, noise, t)
    assert out.dtype == dtype
    assert_rel(out, ref.add_noise(x0, noise, t), f"add_noise {dtype}")
    # An int timestep is accepted and broadcast over the batch.
    assert_rel(ours.add_noise(x0, noise, 500), ref.add_noise(x0, noise, torch.full((6,), 500)), "int t")


def test_add_noise_half_precision_matches():
    ours, ref = DDPM(), ref_ddpm()
    x0, noise = torch.randn(3, 4, 4, 4).half(), torch.randn(3, 4, 4, 4).half()
    t = torch.tensor([3, 400, 999])
    out = ours.add_noise(x0, noise, t)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, ref.add_noise(x0, noise, t), rtol=0, atol=0)


@pytest.mark.parametrize("num_steps", [1, 7, 10, 50, 333, 999, 1000])
def test_timestep_lists(num_steps):
    ref = ref_ddim()
    ref.set_timesteps(num_steps)
    assert torch.equal(leading_timesteps(1000, num_steps, 1), ref.timesteps)
    ref_p = ref_ddpm()
    ref_p.set_timesteps(num_steps)
    assert torch.equal(leading_timesteps(1000, num_steps, 1), ref_p.timesteps)
    if num_steps < 1000:
        assert torch.equal(DDIM(DDPM(), num_steps).timesteps, ref.timesteps)
        ours_p = DDPM()
        ours_p.set_timesteps(num_steps)
        assert torch.equal(ours_p.timesteps, ref_p.timesteps)


def test_1000_steps_with_offset_is_refused_like_diffusers():
    # Leading spacing + steps_offset 1 puts the first of 1000 steps at t=1000, past the schedule's end.
    ref = ref_ddim()
    ref.set_timesteps(1000)
    assert int(ref.timesteps[0]) == 1000
    with pytest.raises(IndexError):
        ref.step(torch.zeros(1, 4, 2, 2), ref.timesteps[0], torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="at most 999 steps"):
        DDIM(DDPM(), 1000)
    with pytest.raises(ValueError, match="at most 999 steps"):
        DDPM().set_timesteps(1000)


def run_chain(ours_step, ref_step, timesteps, shape=(2, 4, 6, 5), seed=0):
    """Step both samplers along the reference trajectory; compare every step. Returns the max error."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(shape, generator=g)
    eps_seq = [torch.randn(shape, generator=g) for _ in timesteps]
    g_ours, g_ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    worst = 0.0
    for t, eps in zip(timesteps, eps_seq):
        expected = ref_step(eps, t, x, g_ref)
        worst = max(worst, assert_rel(ours_step(eps, t, x, g_ours), expected, f"step at t={int(t)}"))
        x = expected
    return worst


@pytest.mark.parametrize("num_steps", [10, 50, 999])
def test_ddpm_steps(num_steps):
    ours, ref = DDPM(), ref_ddpm()
    ours.set_timesteps(num_steps)
    ref.set_timesteps(num_steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    run_chain(ours.step, lambda e, t, x, g: ref.step(e, t, x, generator=g).prev_sample, ref.timesteps)


def test_ddpm_full_1000_step_chain():
    # Without set_timesteps both walk all 1000 training timesteps, 999..0: the textbook DDPM sampler.
    ours, ref = DDPM(), ref_ddpm()
    run_chain(ours.step, lambda e, t, x, g: ref.step(e, t, x, generator=g).prev_sample, ref.timesteps,
              shape=(2, 4, 3, 3))


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("num_steps", [10, 50, 999])
def test_ddim_steps(num_steps, eta):
    ours, ref = DDIM(DDPM(), num_steps, eta=eta), ref_ddim()
    ref.set_timesteps(num_steps)
    run_chain(ours.step, lambda e, t, x, g: ref.step(e, t, x, eta=eta, generator=g).prev_sample,
              ref.timesteps)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_1000_steps_without_offset(eta):
    # All 1000 timesteps 999..0 are reachable with steps_offset 0; both libraries then agree.
    ours, ref = DDIM(DDPM(steps_offset=0), 1000, eta=eta), ref_ddim(steps_offset=0)
    ref.set_timesteps(1000)
    assert torch.equal(ours.timesteps, ref.timesteps)
    run_chain(ours.step, lambda e, t, x, g: ref.step(e, t, x, eta=eta, generator=g).prev_sample,
              ref.timesteps, shape=(2, 4, 3, 3))


def test_ddpm_noise_comes_from_the_generator():
    ours = DDPM()
    ours.set_timesteps(10)
    x, eps = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    a = ours.step(eps, 901, x, torch.Generator().manual_seed(5))
    b = ours.step(eps, 901, x, torch.Generator().manual_seed(5))
    c = ours.step(eps, 901, x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="not one of this sampler's timesteps"):
        ours.step(eps, 900, x)


def test_from_diffusers_config():
    ours = from_diffusers_config(DDPM, SD15_CONFIG)
    assert (ours.steps_offset, ours.set_alpha_to_one) == (1, False)
    assert_rel(ours.alphas_cumprod, ref_ddpm().alphas_cumprod, "alphas_cumprod")
    # What we write, diffusers reads back into the same scheduler.
    ref = DDIMScheduler.from_config(to_diffusers_config(ours))
    assert torch.equal(ref.alphas_cumprod, ours.alphas_cumprod)
    assert ref.config.set_alpha_to_one is False and ref.config.steps_offset == 1
    ref.set_timesteps(50)
    assert torch.equal(ref.timesteps, DDIM(ours, 50).timesteps)
    assert to_diffusers_config(from_diffusers_config(DDPM, to_diffusers_config(ours))) == \
        to_diffusers_config(ours)


@pytest.mark.parametrize("change, message", [
    ({"prediction_type": "v_prediction"}, "SD 2"),
    ({"beta_schedule": "linear"}, "scaled_linear"),
    ({"trained_betas": [0.1] * 1000}, "trained_betas"),
    ({"timestep_spacing": "trailing"}, "leading"),
    ({"clip_sample": True}, "clip_sample"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
])
def test_from_diffusers_config_refuses_other_models(change, message):
    with pytest.raises(ValueError, match=message):
        from_diffusers_config(DDPM, {**SD15_CONFIG, **change})
