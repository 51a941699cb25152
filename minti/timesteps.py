"""Which timesteps textual inversion trains on (uniform, an interval, one t, adaptive), and g(t).

Wang & Kalogeiton, "Conditional Gradient-based Textual Inversion" (ECCV workshop 2024): train where
g(t), how strongly the conditioning c is pulled at timestep t, is high. The paper reads g three ways,
and so does this file (READINGS): the gradient of the MSE training minimises, the gradient of the
error's plain norm (its eq. 4 as written) and the Jacobian norm || d eps_theta / d c || (the sentence
before eq. 4). No public code exists; this is ours. The training loop asks a sampler for timesteps
(`sample`); the adaptive one also learns g from the backward pass training does anyway (`update`).
`python -m minti.run.measure_g --help` measures the curves on a model and images.
"""
import math
import re

import torch

from .schedulers import NUM_TRAIN_TIMESTEPS

READINGS = ("mse", "error-norm", "jacobian")
SPEC_HELP = ("'uniform', 'adaptive' (MSE reading), 'adaptive:error-norm', an interval 'A-B' (t = A .. B-1, "
             "e.g. '350-450') or a single timestep 'T' (e.g. '400')")


# ----------------------------------------------------------------------------------------------
# Samplers: sample(batch_size, generator) -> LongTensor[B] on the CPU, randomness only from the
# generator (so a resumed run draws what the uninterrupted one would); state_dict / load_state_dict.

class FixedSetTimesteps:
    """t ~ Uniform{start, ..., stop-1}: uniform (0-T), the paper's high-grad interval, or one t."""

    wants_grad_norms = False

    def __init__(self, start, stop, num_train_timesteps=NUM_TRAIN_TIMESTEPS, spec=None):
        if not 0 <= start < stop <= num_train_timesteps:
            raise ValueError(f"The timesteps {start}-{stop} are empty or out of range: A-B means t = A .. B-1, "
                             f"with 0 <= A < B <= {num_train_timesteps}. Example: 350-450.")
        self.start, self.stop, self.num_train_timesteps = start, stop, num_train_timesteps
        self.spec = spec or f"{start}-{stop}"

    def sample(self, batch_size, generator=None):
        return torch.randint(self.start, self.stop, (batch_size,), generator=generator)

    def update(self, t, g):
        pass  # only the adaptive sampler learns from the gradients

    def describe(self):
        return f"{self.spec}: t in {self.start}..{self.stop - 1}"

    def state_dict(self):
        return {"spec": self.spec, "num_train_timesteps": self.num_train_timesteps}

    def load_state_dict(self, state):
        if (state["spec"], state["num_train_timesteps"]) != (self.spec, self.num_train_timesteps):
            raise ValueError(f"This checkpoint was trained on timesteps {state['spec']!r}, this run uses "
                             f"{self.spec!r}. Resume with the same timesteps, or start a new run.")


class UniformTimesteps(FixedSetTimesteps):
    """t ~ Uniform{0, ..., T-1}: the LDM loss as Ho et al. and every textual inversion code train it."""

    def __init__(self, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
        super().__init__(0, num_train_timesteps, num_train_timesteps, spec="uniform")


class IntervalTimesteps(FixedSetTimesteps):
    """Half-open as range(): "900-1000" is the last 100 timesteps; "0-100", "100-200" do not overlap."""


class FixedTimestep(FixedSetTimesteps):
    """Always the same t: the paper's "single high-grad timestep" experiment."""

    def __init__(self, t, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
        super().__init__(t, t + 1, num_train_timesteps, spec=str(t))


class AdaptiveTimesteps:
    """Draw t with probability proportional to a running estimate of g(t), plus a uniform share.

    p(t) = (1 - uniform_share) g(bin of t) / sum g + uniform_share / T. Each bin's g is an EMA of the
    norms of the samples that fell in it (from its first); an unvisited bin counts as the mean of the
    visited. Defaults: 20 bins of 50 (as fine as the paper's Fig. 1); decay 0.9 (the paper gives none:
    ~the last 10 samples of a bin, as the word and so g drift); 10% uniform keeps every bin visited.
    reading: which g training reports ("mse" or "error-norm", both from its one backward pass).
    """

    wants_grad_norms = True

    def __init__(self, num_train_timesteps=NUM_TRAIN_TIMESTEPS, bin_width=50, decay=0.9, uniform_share=0.1,
                 reading="mse"):
        if not (isinstance(bin_width, int) and 1 <= bin_width <= num_train_timesteps):
            raise ValueError(f"bin_width must be an integer in 1..{num_train_timesteps}, got {bin_width!r}.")
        if not (0.0 <= decay < 1.0 and 0.0 <= uniform_share <= 1.0):
            raise ValueError(f"decay must be in [0, 1) and uniform_share in [0, 1], got {decay}, {uniform_share}.")
        if reading not in ("mse", "error-norm"):
            raise ValueError(f"The adaptive sampler reads g as 'mse' or 'error-norm', not {reading!r}: the Jacobian "
                             f"reading needs extra backward passes that training does not make.")
        self.num_train_timesteps, self.bin_width, self.reading = num_train_timesteps, bin_width, reading
        self.decay, self.uniform_share = float(decay), float(uniform_share)
        self.spec = "adaptive" if reading == "mse" else f"adaptive:{reading}"
        self.num_bins = math.ceil(num_train_timesteps / bin_width)  # the last bin may be narrower
        self.estimate = torch.zeros(self.num_bins, dtype=torch.float64)  # EMA of g per bin
        self.count = torch.zeros(self.num_bins, dtype=torch.long)  # samples seen per bin

    def bin_estimates(self):  # [num_bins]
        visited = self.count > 0
        fill = self.estimate[visited].mean() if visited.any() else 1.0
        return torch.where(visited, self.estimate, fill)

    def probabilities(self):
        """p(t) for t = 0 .. T-1 [T], float64, summing to 1."""
        g = self.bin_estimates()[torch.arange(self.num_train_timesteps) // self.bin_width]
        uniform = torch.full_like(g, 1.0 / self.num_train_timesteps)
        return (1.0 - self.uniform_share) * (g / g.sum() if g.sum() > 0 else uniform) + self.uniform_share * uniform

    def sample(self, batch_size, generator=None):
        return torch.multinomial(self.probabilities(), batch_size, replacement=True, generator=generator)

    def update(self, t, g):
        """Fold in g[i], sample i's reading (training_reading), trained at t[i]."""
        t, g = torch.as_tensor(t).reshape(-1).tolist(), torch.as_tensor(g).reshape(-1).tolist()
        if len(t) != len(g):
            raise ValueError(f"update(t, g) needs one norm per timestep; got {len(t)} and {len(g)}.")
        for ti, gi in zip(t, g):
            if not 0 <= ti < self.num_train_timesteps:
                raise ValueError(f"Timestep {ti} is outside 0..{self.num_train_timesteps - 1}.")
            if not (math.isfinite(gi) and gi >= 0):
                raise ValueError(f"Gradient norm {gi} at t={ti} is not finite and >= 0: training diverged; lower "
                                 f"the learning rate or use fp32.")
            b = ti // self.bin_width
            self.estimate[b] = gi if self.count[b] == 0 else self.decay * self.estimate[b] + (1 - self.decay) * gi
            self.count[b] += 1

    def describe(self):
        return (f"adaptive ({self.reading} reading): {self.num_bins} bins of {self.bin_width} timesteps, "
                f"EMA decay {self.decay:g}, {100 * self.uniform_share:g}% uniform")

    def _options(self):
        return {"num_train_timesteps": self.num_train_timesteps, "bin_width": self.bin_width,
                "decay": self.decay, "uniform_share": self.uniform_share, "reading": self.reading}

    def state_dict(self):
        return {"spec": self.spec, **self._options(), "estimate": self.estimate.clone(), "count": self.count.clone()}

    def load_state_dict(self, state):
        theirs = {k: state.get(k, "mse" if k == "reading" else None) for k in self._options()}  # (older: mse)
        if state.get("spec") != self.spec or theirs != self._options():
            raise ValueError(f"This checkpoint's timestep sampler ({state.get('spec')!r}, {theirs}) differs from "
                             f"this run's ({self.spec!r}, {self._options()}). Resume with the same timesteps and "
                             f"adaptive options, or start a new run.")
        self.estimate = state["estimate"].to(torch.float64).clone()
        self.count = state["count"].to(torch.long).clone()


def make_timestep_sampler(spec="uniform", num_train_timesteps=NUM_TRAIN_TIMESTEPS, **options):
    """The sampler for a timestep spec (SPEC_HELP); options go to AdaptiveTimesteps; a sampler
    object (anything with .sample) is returned as it is."""
    if hasattr(spec, "sample"):
        return spec
    s = str(spec).strip().lower()
    if m := re.fullmatch(r"adaptive(?::(mse|error-norm))?", s):
        return AdaptiveTimesteps(num_train_timesteps, reading=m[1] or "mse", **options)
    if options:
        raise ValueError(f"Options {sorted(options)} only apply to the adaptive sampler, not {spec!r}.")
    if s == "uniform":
        return UniformTimesteps(num_train_timesteps)
    if m := re.fullmatch(r"(\d+)\s*-\s*(\d+)", s):
        return IntervalTimesteps(int(m[1]), int(m[2]), num_train_timesteps)
    if s.isdigit():
        return FixedTimestep(int(s), num_train_timesteps)
    raise ValueError(f"{spec!r} is not a timestep spec: use {SPEC_HELP}.")


# ----------------------------------------------------------------------------------------------
# g, per sample, three ways. With e_i = eps_theta(x_t, t_i, c_i) - eps_i (N elements) and J_i =
# d eps_theta / d c_i:
#   "mse"        || d/dc_i mse_i ||,    mse_i = ||e_i||^2 / N: what training minimises (J^T e 2/N)
#   "error-norm" || d/dc_i ||e_i|| || = || J_i^T e_i || / ||e_i|| = mse reading * N / (2 ||e_i||)
#   "jacobian"   || J_i ||_F, estimated as sqrt(mean_k ||J_i^T v_k||^2), v_k ~ N(0, I): unbiased in
#                the square, one extra backward per projection (exact: N backward passes, one per
#                element of e, i.e. 256 on the toy model, 16,384 on SD 1.x at 512 px).
# The error is largest at low noise, so the mse reading leans there (lesson 13).

def per_sample_grad_norms(context_grad, loss_reduction="mean", loss_scale=1.0):
    """The mse reading [B] from context_grad [B, L, D], the context's gradient of a batch loss L (a hook's).

    Samples never mix, so d L / d c_i = (d L / d mse_i) d mse_i / d c_i: 1/B for the batch "mean", 1 for
    the "sum". loss_scale: what the loop multiplied L by (1 / accumulation steps, fp16's loss scale)."""
    assert context_grad.dim() == 3, f"context_grad must be [batch, tokens, width], got {tuple(context_grad.shape)}"
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}.")
    factor = {"mean": context_grad.shape[0], "sum": 1}[loss_reduction]
    grad = context_grad.detach()
    return grad.to(torch.promote_types(grad.dtype, torch.float32)).flatten(1).norm(dim=1) * (factor / loss_scale)


def error_norm_from_mse(g_mse, sample_mse, n):
    """The error-norm reading from the mse reading: || d ||e|| / dc || = || d mse / dc || * N / (2 ||e||),
    with ||e|| = sqrt(N mse) (sample_mse [B], each sample's own mean squared error; n = N)."""
    return g_mse * n / (2 * (n * sample_mse.detach().to(g_mse.dtype)).sqrt())


def training_reading(reading, context_grad, sample_mse, n, loss_scale=1.0):
    """g [B] under `reading` from what a training step has: the context's gradient of the batch-mean
    loss (see per_sample_grad_norms), each sample's mean squared error [B] and its size n."""
    g = per_sample_grad_norms(context_grad, loss_scale=loss_scale)
    return g if reading == "mse" else error_norm_from_mse(g, sample_mse.float(), n)


FP16_LOSS_SCALE = 2.0 ** 16  # torch.amp.GradScaler's initial scale


def g_readings(unet, scheduler, latents, context, t, noise, projections=4, generator=None):
    """{reading: g [B]} for one batch, from scratch: one forward, one backward for mse and error-norm,
    `projections` more for the Jacobian (0: skip it; "exact": N, one per element of eps)."""
    c = context.detach().clone().requires_grad_(True)
    pred = unet(scheduler.add_noise(latents, noise, t), t, c)
    # fp16 weights: a loss scale, as training's GradScaler, lifts small gradients above fp16's smallest
    # normal; halved until the gradient is finite, and divided out again.
    scale = FP16_LOSS_SCALE if pred.dtype == torch.float16 else 1.0
    pred = pred.to(torch.promote_types(pred.dtype, torch.float32))  # fp16 models: the error in fp32
    e = (pred - noise.to(pred.dtype)).flatten(1)
    n = e.shape[1]
    while True:
        (grad,) = torch.autograd.grad(e.pow(2).mean(1).sum() * scale, c, retain_graph=bool(projections) or scale > 1)
        if scale <= 1.0 or torch.isfinite(grad).all():
            break
        scale /= 2.0
    g_mse = per_sample_grad_norms(grad, loss_reduction="sum", loss_scale=scale)
    out = {"mse": g_mse, "error-norm": error_norm_from_mse(g_mse, e.detach().pow(2).mean(1), n)}
    if projections:
        vs = (torch.eye(n).reshape(n, *pred.shape[1:]) if projections == "exact"
              else torch.randn(projections, *pred.shape[1:], generator=generator))
        sq = torch.zeros(len(t), dtype=pred.dtype)
        for i, v in enumerate(vs):
            (jv,) = torch.autograd.grad(pred, c, v.to(pred.device).expand_as(pred), retain_graph=i < len(vs) - 1)
            sq += jv.to(pred.dtype).flatten(1).pow(2).sum(1).cpu()
        out["jacobian"] = (sq if projections == "exact" else sq / len(vs)).sqrt()
    return out

