"""The noise schedule of Stable Diffusion 1.x, and two samplers that run it backwards.

DDPM: Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models" (2020, arXiv:2006.11239).
DDIM: Song, Meng & Ermon, "Denoising Diffusion Implicit Models" (2020, arXiv:2010.02502).
Equation numbers below refer to those two papers. The numerics (float32 schedule, order of
operations, where the random noise is drawn) follow diffusers' DDPMScheduler / DDIMScheduler under
SD 1.x's scheduler_config.json, so one `step` here equals one `step` there.
"""
import torch

NUM_TRAIN_TIMESTEPS = 1000  # SD 1.x's DDPM: timesteps 0 .. 999


def leading_timesteps(num_train_timesteps, num_steps, steps_offset):
    """The sampling timesteps of SD 1.x, largest first: "leading" spacing plus an offset.

    Every (1000 // num_steps)-th training timestep counted from 0, shifted by steps_offset (1 for
    SD 1.x, so sampling ends at t=1 and begins at e.g. 981 for 50 steps).
    """
    step_ratio = num_train_timesteps // num_steps
    return torch.arange(num_steps - 1, -1, -1, dtype=torch.long) * step_ratio + steps_offset


def sampling_timesteps(num_train_timesteps, num_steps, steps_offset):
    """leading_timesteps, refusing a number of steps whose first timestep the model was not trained on."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be between 1 and {num_train_timesteps}, got {num_steps}.")
    timesteps = leading_timesteps(num_train_timesteps, num_steps, steps_offset)
    if (first := int(timesteps[0])) >= num_train_timesteps:
        raise ValueError(f"{num_steps} steps with SD 1.x's spacing (leading, steps_offset {steps_offset}) "
                         f"would start at timestep {first}, but the model was trained on timesteps 0.."
                         f"{num_train_timesteps - 1} (diffusers fails here too). Use at most "
                         f"{num_train_timesteps - 1} steps.")
    return timesteps


def _randn(x, generator):
    """Gaussian noise shaped like x, drawn where diffusers draws it (on the generator's device)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


class DDPM:
    """SD 1.x's training noise schedule, forward noising, and ancestral (DDPM) sampling.

    `steps_offset` (both samplers) and `set_alpha_to_one` (DDIM's last step) belong to the model's
    scheduler configuration and only matter for sampling; their defaults are SD 1.x's.
    """

    def __init__(self, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, steps_offset=1,
                 set_alpha_to_one=False):
        self.num_train_timesteps = num_train_timesteps
        self.beta_start, self.beta_end = beta_start, beta_end
        self.steps_offset = steps_offset
        self.set_alpha_to_one = set_alpha_to_one
        # "scaled_linear": linear in sqrt(beta), LDM's "linear" schedule (0.00085 / 0.012: SD 1.x's
        # linear_start / linear_end). Computed in float32 as diffusers does (LDM used float64).
        self.betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps,
                                    dtype=torch.float32) ** 2
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # alpha-bar_t, DDPM eq. 4
        # Ancestral sampling walks every training timestep until set_timesteps picks fewer.
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.long)
        self.init_noise_sigma = 1.0  # x_T ~ N(0, I): nothing to rescale

    # -- training: the forward process -----------------------------------------------------------

    def add_noise(self, x0, noise, t):
        """x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps   (DDPM eq. 4, reparametrised).

        x0, noise: [B, ...] of any float dtype and device; t: LongTensor[B] (or an int).
        """
        alphas_cumprod = self.alphas_cumprod_on(x0.device, x0.dtype)
        t = torch.as_tensor(t, device=x0.device).reshape(-1)
        a = alphas_cumprod[t].reshape(-1, *([1] * (x0.dim() - 1)))  # broadcast over C, H, W
        return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise

    def alphas_cumprod_on(self, device, dtype):
        """alphas_cumprod on a device, in a dtype: copied once, not at every training step (an upload to
        an accelerator makes the host wait for it)."""
        key = (torch.device(device), dtype)
        cache = self.__dict__.setdefault("_alphas_cumprod_on", {})
        if key not in cache or cache[key][0] is not self.alphas_cumprod:  # (a replaced schedule: copy again)
            cache[key] = (self.alphas_cumprod, self.alphas_cumprod.to(device=device, dtype=dtype))
        return cache[key][1]

    # -- sampling: ancestral steps ---------------------------------------------------------------

    def set_timesteps(self, num_steps):
        """Sample with num_steps steps instead of all of them, spaced as SD 1.x (leading, offset)."""
        self.timesteps = sampling_timesteps(self.num_train_timesteps, num_steps, self.steps_offset)

    def _previous_timestep(self, t):
        """The timestep after t in self.timesteps, or -1 (meaning x_0) after the last one."""
        where = (self.timesteps == t).nonzero()
        if len(where) == 0:
            raise ValueError(f"timestep {t} is not one of this sampler's timesteps; call set_timesteps "
                             f"and step through .timesteps in order.")
        i = int(where[0, 0])
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def step(self, eps, t, x, generator=None):
        """One ancestral step x_t -> x_{t_prev}, sampling the posterior q(x_prev | x_t, x_0 = x0_hat).

        eps: the model's noise prediction for x at timestep t (an int or a 0-d tensor), same shape as x.
        With fewer steps than training timesteps, "t-1" is the previous timestep in self.timesteps
        and beta_t is the beta of that whole jump: 1 - alpha-bar_t / alpha-bar_prev.
        """
        t = int(t)
        t_prev = self._previous_timestep(t)
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else torch.tensor(1.0)
        beta_prod_t, beta_prod_prev = 1 - a_t, 1 - a_prev
        alpha_t = a_t / a_prev
        beta_t = 1 - alpha_t

        x0 = (x - beta_prod_t ** 0.5 * eps) / a_t ** 0.5  # predicted x_0: DDPM eq. 15
        # Posterior mean mu-tilde(x_t, x0), DDPM eq. 7 (with x0 from eq. 15 this is eq. 11's mean).
        # SD 1.x does not clip x0 (clip_sample False): latents are not confined to [-1, 1].
        x0_coef = a_prev ** 0.5 * beta_t / beta_prod_t
        x_coef = alpha_t ** 0.5 * beta_prod_prev / beta_prod_t
        mean = x0_coef * x0 + x_coef * x
        if t == 0:
            return mean
        # sigma_t^2 = beta-tilde_t (DDPM eq. 7; "fixed_small"). At the last step beta-tilde is 0; the
        # 1e-20 floor (as diffusers) still draws noise there, so a seeded generator advances the same.
        variance = torch.clamp(beta_prod_prev / beta_prod_t * beta_t, min=1e-20)
        return mean + variance ** 0.5 * _randn(eps, generator)


class DDIM:
    """DDIM sampling (DDIM eq. 12) on a DDPM's schedule: deterministic at eta=0, DDPM-like at eta=1."""

    def __init__(self, ddpm, num_steps=50, eta=0.0):
        assert eta >= 0, f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like noise), got {eta}."
        self.timesteps = sampling_timesteps(ddpm.num_train_timesteps, num_steps, ddpm.steps_offset)
        self.alphas_cumprod = ddpm.alphas_cumprod
        self.num_steps, self.eta = num_steps, eta
        self.step_ratio = ddpm.num_train_timesteps // num_steps
        # The step after the last one lands "before" t=0. SD 1.x (set_alpha_to_one False) then uses
        # alpha-bar_0 rather than 1, so the final sample keeps a trace of beta_0's noise level.
        self.final_alpha_cumprod = torch.tensor(1.0) if ddpm.set_alpha_to_one else ddpm.alphas_cumprod[0]
        self.init_noise_sigma = 1.0

    def step(self, eps, t, x, generator=None):
        """One step x_t -> x_{t - step_ratio}; generator only matters when eta > 0."""
        t = int(t)
        t_prev = t - self.step_ratio
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        beta_prod_t, beta_prod_prev = 1 - a_t, 1 - a_prev

        x0 = (x - beta_prod_t ** 0.5 * eps) / a_t ** 0.5  # "predicted x_0", DDIM eq. 12
        # sigma_t(eta) = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev), DDIM eq. 16.
        sigma = self.eta * ((beta_prod_prev / beta_prod_t) * (1 - a_t / a_prev)) ** 0.5
        direction = (1 - a_prev - sigma ** 2) ** 0.5 * eps  # "direction pointing to x_t", DDIM eq. 12
        x_prev = a_prev ** 0.5 * x0 + direction  # DDIM eq. 12
        if self.eta > 0:
            x_prev = x_prev + sigma * _randn(eps, generator)  # "random noise" sigma_t eps_t, DDIM eq. 12
        return x_prev
