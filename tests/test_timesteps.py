"""Timestep samplers and the g(t) measurement (minti/timesteps.py, Wang & Kalogeiton 2024).

1. The norm training gets from one backward of the batch-mean loss (hook on the context) equals each
   sample's own gradient norm computed alone, on a tiny random minti UNet + CLIP (1e-5 relative), and the
   adaptive sampler's bin estimates are the EMA of exactly those numbers.
2. Adaptive sampling follows a planted g: a fake loss f(t) * <c, w> has ||d loss / d c|| = f(t) ||w||.
3. The fixed samplers draw only, and all, their allowed values; spec parsing and its errors.
4. A resumed sampler (state_dict + the generator's state) draws exactly what the uninterrupted one does.
5. measure_g recovers a planted curve; suggest finds its peak; the CLI runs.
6. The readings: the error-norm gradient is the MSE gradient times N / (2 ||e||) per sample (fp32 and
   fp64), in measurement and in training's one backward; the Jacobian by projections approaches the exact
   Frobenius norm.
"""
import io
import math

import pytest
import torch
import torch.nn.functional as F

import minti
from minti.clip import CLIPTextConfig, CLIPTextModel
from minti.schedulers import DDPM
from minti.run.measure_g import main, measure_g, suggest
from minti.textual_inversion import LearnedWord, train_step
from minti.timesteps import (AdaptiveTimesteps, FixedTimestep, IntervalTimesteps, UniformTimesteps, error_norm_from_mse,
                             g_readings, make_timestep_sampler, per_sample_grad_norms, training_reading)
from minti.unet import UNet, UNetConfig
from minti.vae import VAE, VAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest)

REL_TOL = 1e-5  # fp32: batched vs one-sample-at-a-time computation of the same gradient norm
TEXT = dict(vocab_size=64, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=10, bos_token_id=62, eos_token_id=63)
UNET = UNetConfig(block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=2,
                  cross_attention_dim=24, norm_num_groups=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), sample_size=8)
PLACEHOLDER = 5  # token id whose embedding is the trained vector v* in the training simulation


def tiny_models(vocab_size=TEXT["vocab_size"]):
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**TEXT, "vocab_size": vocab_size}))
    text_encoder.eval().requires_grad_(False)
    unet = UNet(UNET).eval().requires_grad_(False)
    return text_encoder, unet


def rel_err(a, b):
    return ((a - b).abs() / b.abs()).max().item()


# ----------------------------------------------------------------------------------------------
# 1. training's per-sample norms == direct per-sample gradients; the running estimate holds them

def test_training_hook_norms_equal_direct_per_sample_gradients_and_feed_the_estimate():
    text_encoder, unet = tiny_models()
    scheduler = DDPM()
    t = torch.tensor([5, 30, 470, 480, 999, 40])  # bins of 50: 0, 0, 9, 9, 19, 0
    B = len(t)
    # Different prompts (several padded with EOS), the placeholder in some of them.
    ids = torch.full((B, 10), 63)
    ids[:, 0] = 62
    for i in range(B):
        n = 2 + i
        ids[i, 1:n] = torch.randint(6, 60, (n - 1,))
        ids[i, n] = 63
        if i % 2 == 0:
            ids[i, 1 + i % 3] = PLACEHOLDER
    x0 = torch.randn(B, 4, 8, 6)  # non-square latent
    noise = torch.randn(B, 4, 8, 6)
    x_t = scheduler.add_noise(x0, noise, t)

    # As training does it: v* spliced into the embeddings, one backward of the batch-mean loss.
    v = torch.nn.Parameter(0.3 * torch.randn(24))
    table = text_encoder.embed_tokens(ids)
    embeds = torch.where((ids == PLACEHOLDER)[..., None], v.expand_as(table), table)
    context = text_encoder(inputs_embeds=embeds)
    grads = []
    context.register_hook(grads.append)
    loss = F.mse_loss(unet(x_t, t, context).float(), noise.float())
    loss.backward()
    g_train = per_sample_grad_norms(grads[0])
    assert v.grad.abs().max() > 0  # the trained vector really got a gradient through the same graph

    # Directly: each sample alone, its own loss, autograd to its own context.
    g_direct = []
    for i in range(B):
        c_i = context[i:i + 1].detach().requires_grad_(True)
        loss_i = F.mse_loss(unet(x_t[i:i + 1], t[i:i + 1], c_i), noise[i:i + 1])
        (grad_i,) = torch.autograd.grad(loss_i, c_i)
        g_direct.append(grad_i.norm())
    g_direct = torch.stack(g_direct)
    assert g_direct.min() > 0 and g_direct.max() / g_direct.min() > 1.05  # distinct, non-trivial values
    assert rel_err(g_train, g_direct) < REL_TOL
    # The measurement's inner step computes the same quantity.
    assert rel_err(g_readings(unet, scheduler, x0, context, t, noise, projections=0)["mse"], g_direct) < REL_TOL
    # A scaled or summed batch loss, undone by the helper's arguments.
    grads.clear()
    embeds = torch.where((ids == PLACEHOLDER)[..., None], v.expand_as(table), table)  # a fresh graph
    context = text_encoder(inputs_embeds=embeds)
    context.register_hook(grads.append)
    (0.25 * F.mse_loss(unet(x_t, t, context), noise, reduction="none").flatten(1).mean(1).sum()).backward()
    assert rel_err(per_sample_grad_norms(grads[0], "sum", loss_scale=0.25), g_direct) < REL_TOL

    # The running estimate: bins 0, 9, 19 get EMAs (decay d) of their samples in order, starting at the
    # first; the 17 unvisited bins stand at the mean of the three.
    sampler = AdaptiveTimesteps(decay=0.8)
    sampler.update(t, g_train)
    g, d = g_direct.double(), 0.8
    bin0 = d * (d * g[0] + (1 - d) * g[1]) + (1 - d) * g[5]
    bin9 = d * g[2] + (1 - d) * g[3]
    bin19 = g[4]
    est = sampler.bin_estimates()
    assert rel_err(est[[0, 9, 19]], torch.stack([bin0, bin9, bin19])) < REL_TOL
    others = [b for b in range(20) if b not in (0, 9, 19)]
    assert rel_err(est[others], torch.stack([bin0, bin9, bin19]).mean().expand(17)) < REL_TOL
    assert sampler.count.tolist() == [3] + [0] * 8 + [2] + [0] * 9 + [1]
    # p(t) = 0.9 g(bin(t)) / sum + 0.1 / 1000
    p = sampler.probabilities()
    g_t = est[torch.arange(1000) // 50]
    assert torch.allclose(p, 0.9 * g_t / g_t.sum() + 0.1 / 1000, rtol=1e-12, atol=0)
    assert abs(p.sum().item() - 1) < 1e-12


def test_measure_on_real_models_is_the_training_quantity_and_ignores_batch_size():
    text_encoder, unet = tiny_models()
    scheduler = DDPM()
    ids = torch.tensor([[62, 10, 11, PLACEHOLDER, 63, 63, 63, 63, 63, 63]])
    latents = [torch.randn(4, 8, 6), torch.randn(4, 6, 8)]  # two images of different shapes
    ts, repeats = [5, 470, 999], 2
    context = text_encoder(ids)
    t, g_mean, g_std = measure_g(unet, scheduler, latents, context.expand(2, -1, -1), ts, repeats,
                                 torch.Generator().manual_seed(3), batch_size=4, projections=0)["mse"]
    # Direct: noise drawn one sample at a time (for each image, each t, each repeat), each sample alone.
    gen = torch.Generator().manual_seed(3)
    torch.randint(2 ** 62, (1,), generator=gen)  # measure_g's first draw: the seed of its projections
    direct = torch.zeros(len(ts), len(latents) * repeats)
    for n, x0 in enumerate(latents):
        for k, tk in enumerate(ts):
            for r in range(repeats):
                noise = torch.randn(x0.shape, generator=gen)[None]
                c = context.detach().requires_grad_(True)
                tt = torch.tensor([tk])
                loss = F.mse_loss(unet(scheduler.add_noise(x0[None], noise, tt), tt, c), noise)
                direct[k, n * repeats + r] = torch.autograd.grad(loss, c)[0].norm()
    assert t.tolist() == ts
    assert rel_err(g_mean, direct.double().mean(1)) < REL_TOL
    assert rel_err(g_std, direct.double().std(1)) < 1e-4  # a difference of near-equal numbers
    # Another batch size, and the Jacobian measured too: the same noise, the same numbers.
    again = measure_g(unet, scheduler, latents, context.expand(2, -1, -1), ts, repeats,
                      torch.Generator().manual_seed(3), batch_size=1, projections=2)
    assert rel_err(again["mse"][1], g_mean) < REL_TOL and set(again) == {"mse", "error-norm", "jacobian"}


# ----------------------------------------------------------------------------------------------
# 2. adaptive sampling follows a planted g

CENTERS = torch.arange(20, dtype=torch.float64) * 50 + 25
PLANTED_BIN_G = 0.2 + torch.exp(-((CENTERS - 420) / 150) ** 2)  # constant within each bin of 50
CHI2_19_P1E6 = 63.68  # scipy.stats.chi2.isf(1e-6, 19): chi-square, 20 bins, P(exceed | correct) = 1e-6
CHI2_49_P1E6 = 111.14  # scipy.stats.chi2.isf(1e-6, 49)


def planted_step(sampler, generator, w, batch_size=8):
    """One training step of a fake model: loss_i = f(t_i) <c_i, w>, so ||d loss_i / d c_i|| = f(t_i) ||w||."""
    t = sampler.sample(batch_size, generator)
    embeds = torch.randn(batch_size, *w.shape, requires_grad=True)
    context = embeds * 1.0  # a non-leaf "text encoder output", as in training
    grads = []
    context.register_hook(grads.append)
    f = PLANTED_BIN_G[t // 50].float()
    (f * (context * w).sum((1, 2))).mean().backward()
    if sampler.wants_grad_norms:
        sampler.update(t, per_sample_grad_norms(grads[0]))
    return t


def chi_square(counts, p):
    expected = p * counts.sum()
    return (((counts - expected) ** 2) / expected).sum().item()


def test_adaptive_sampling_follows_a_planted_gradient_norm():
    w = torch.randn(10, 24)
    sampler, gen = AdaptiveTimesteps(), torch.Generator().manual_seed(1)
    for _ in range(300):  # warm up until every bin has been visited (the uniform share guarantees it)
        planted_step(sampler, gen, w)
        if (sampler.count > 0).all():
            break
    assert (sampler.count > 0).all()
    # Every bin's estimate is the planted value: an EMA of a constant, fed through the training path.
    assert rel_err(sampler.bin_estimates(), PLANTED_BIN_G * w.norm().double()) < REL_TOL

    draws = torch.cat([planted_step(sampler, gen, w) for _ in range(400)])  # 3,200 timesteps
    # From here on p is fixed, so the draws are multinomial(p): a chi-square test with 19 degrees of
    # freedom at P = 1e-6 (smallest expected count 3200 * 0.005 = 16, well above the usual 5).
    expected = 0.9 * PLANTED_BIN_G / PLANTED_BIN_G.sum() + 0.1 / 20
    counts = torch.bincount(draws // 50, minlength=20).double()
    assert chi_square(counts, expected) < CHI2_19_P1E6
    uniform = torch.full((20,), 1 / 20.0, dtype=torch.float64)
    assert chi_square(counts, uniform) > 10 * CHI2_19_P1E6  # the test can tell: far from uniform
    # Uniform within bins: t mod 50 is uniform over 50 values whatever the bin probabilities are.
    within = torch.bincount(draws % 50, minlength=50).double()
    assert chi_square(within, torch.full((50,), 1 / 50.0, dtype=torch.float64)) < CHI2_49_P1E6
    assert draws.dtype == torch.long and draws.min() >= 0 and draws.max() < 1000


# ----------------------------------------------------------------------------------------------
# 3. fixed samplers and specs

@pytest.mark.parametrize("spec, allowed", [("uniform", range(1000)), ("350-450", range(350, 450)),
                                           ("900-1000", range(900, 1000)), ("0-1", [0]), ("400", [400]),
                                           (" Uniform ", range(1000)), ("350 - 450", range(350, 450))])
def test_fixed_samplers_draw_only_and_all_allowed_values(spec, allowed):
    sampler = make_timestep_sampler(spec)
    assert not sampler.wants_grad_norms
    gen = torch.Generator().manual_seed(0)
    # 20 draws per allowed value: P(a value never drawn) <= 1000 * exp(-20) = 2e-6.
    draws = torch.cat([sampler.sample(100, gen) for _ in range(20 * len(allowed) // 100 + 1)])
    assert draws.dtype == torch.long and draws.shape == ((20 * len(allowed) // 100 + 1) * 100,)
    assert set(draws.tolist()) == set(allowed)
    again = make_timestep_sampler(spec).sample(7, torch.Generator().manual_seed(0))
    assert torch.equal(again, draws[:7])  # all randomness comes from the generator
    assert sampler.describe()


def test_spec_kinds_and_options():
    assert isinstance(make_timestep_sampler("uniform"), UniformTimesteps)
    assert isinstance(make_timestep_sampler("350-450"), IntervalTimesteps)
    assert isinstance(make_timestep_sampler("400"), FixedTimestep)
    adaptive = make_timestep_sampler("adaptive", bin_width=100, uniform_share=0.2, decay=0.5)
    assert isinstance(adaptive, AdaptiveTimesteps) and adaptive.wants_grad_norms and adaptive.num_bins == 10
    assert make_timestep_sampler(adaptive) is adaptive
    assert make_timestep_sampler("adaptive", bin_width=300).num_bins == 4  # widths 300, 300, 300, 100
    assert make_timestep_sampler("450-500", num_train_timesteps=500).stop == 500
    # Uneven last bin: with nothing learned, p is uniform over timesteps, not over bins.
    p = AdaptiveTimesteps(bin_width=300).probabilities()
    assert torch.allclose(p, torch.full((1000,), 1e-3, dtype=torch.float64))


@pytest.mark.parametrize("spec, message", [
    ("", "not a timestep spec"), ("abc", "not a timestep spec"), ("3.5", "not a timestep spec"),
    ("-5", "not a timestep spec"), ("350-450-500", "not a timestep spec"), ("350:450", "not a timestep spec"),
    ("450-350", "empty"), ("350-350", "empty"), ("900-1001", "out of range"), ("1000", "out of range"),
])
def test_bad_specs_say_what_to_do(spec, message):
    with pytest.raises(ValueError, match=message) as e:
        make_timestep_sampler(spec)
    assert "350-450" in str(e.value) or "0..999" in str(e.value)  # a valid example or the valid range


def test_bad_options_and_updates():
    with pytest.raises(ValueError, match="only apply to the adaptive sampler"):
        make_timestep_sampler("uniform", bin_width=50)
    with pytest.raises(ValueError, match="bin_width"):
        AdaptiveTimesteps(bin_width=0)
    with pytest.raises(ValueError, match="decay"):
        AdaptiveTimesteps(decay=1.0)
    with pytest.raises(ValueError, match="uniform_share"):
        AdaptiveTimesteps(uniform_share=1.5)
    sampler = AdaptiveTimesteps()
    with pytest.raises(ValueError, match="one norm per timestep"):
        sampler.update(torch.tensor([1, 2]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="diverged"):
        sampler.update(torch.tensor([1]), torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="outside"):
        sampler.update(torch.tensor([1000]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="loss_reduction"):
        per_sample_grad_norms(torch.zeros(2, 3, 4), "max")
    # All-zero gradients: nothing to prefer, so uniform rather than a division by zero.
    sampler.update(torch.arange(0, 1000, 50), torch.zeros(20))
    assert torch.allclose(sampler.probabilities(), torch.full((1000,), 1e-3, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# 4. resume

def test_resume_continues_exactly():
    w = torch.randn(10, 24)
    sampler, gen = AdaptiveTimesteps(uniform_share=0.05), torch.Generator().manual_seed(7)
    for _ in range(30):
        planted_step(sampler, gen, w)
    buffer = io.BytesIO()
    torch.save({"sampler": sampler.state_dict(), "rng": gen.get_state()}, buffer)  # as a checkpoint would
    torch.manual_seed(11)  # planted_step's own random context values: the same in both runs
    straight = [planted_step(sampler, gen, w) for _ in range(20)]

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, gen2 = AdaptiveTimesteps(uniform_share=0.05), torch.Generator()
    resumed.load_state_dict(saved["sampler"])
    gen2.set_state(saved["rng"])
    torch.manual_seed(11)
    again = [planted_step(resumed, gen2, w) for _ in range(20)]
    assert all(torch.equal(a, b) for a, b in zip(straight, again))
    assert torch.equal(resumed.estimate, sampler.estimate) and torch.equal(resumed.count, sampler.count)

    with pytest.raises(ValueError, match="Resume with the same"):
        AdaptiveTimesteps(uniform_share=0.1).load_state_dict(saved["sampler"])
    with pytest.raises(ValueError, match="Resume with the same"):
        make_timestep_sampler("350-450").load_state_dict(saved["sampler"])
    interval = make_timestep_sampler("350-450")
    interval.load_state_dict(make_timestep_sampler("350-450").state_dict())
    with pytest.raises(ValueError, match="Resume with the same"):
        interval.load_state_dict(make_timestep_sampler("uniform").state_dict())


# ----------------------------------------------------------------------------------------------
# 5. the measurement recovers a planted curve

def planted_f(t):
    return 0.1 + torch.exp(-((t.double() - 420) / 50) ** 2)  # peak at 420


class PlantedUNet(torch.nn.Module):
    """eps_theta = f(t) <c, w> at every element, so loss = mean_k (f(t) <c, w> - eps_k)^2 and
    d loss / d c = 2 f(t) (f(t) <c, w> - mean_k eps_k) w. At <c, w> = 0: g = 2 f(t) ||w|| |mean(eps)|, with
    mean(eps) ~ N(0, 1/M) for a latent of M elements: E g = 2 f(t) ||w|| sqrt(2 / (pi M)) and
    Var g = (2 f(t) ||w||)^2 (1 - 2/pi) / M. (The norm of the mean gradient would be ~0: E||.|| is tested.)"""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w, requires_grad=False)

    def forward(self, x, t, context):
        s = (context * self.w).sum((1, 2)) * planted_f(t).float()
        return s[:, None, None, None] * torch.ones_like(x)


def test_measure_recovers_a_planted_curve_and_suggests_its_peak():
    c0, w = torch.randn(10, 24), torch.randn(10, 24)
    w = w - (w * c0).sum() / (c0 * c0).sum() * c0  # <c0, w> = 0
    latents = [torch.randn(4, 2, 3), torch.randn(4, 4, 4)]  # M = 24 and 64 elements
    M = torch.tensor([24.0, 64.0], dtype=torch.float64)
    R = 200
    t, g_mean, g_std = measure_g(PlantedUNet(w), DDPM(), latents, c0.expand(2, -1, -1), repeats=R,
                                 generator=torch.Generator().manual_seed(0), batch_size=100, projections=0)["mse"]
    assert t.tolist() == list(range(0, 1000, 20))
    scale = 2 * planted_f(t) * w.norm().double()  # [K]
    mu_n = scale[:, None] * math.sqrt(2 / math.pi) / M.sqrt()  # [K, N] mean of each image's g
    var_n = scale[:, None] ** 2 * (1 - 2 / math.pi) / M  # [K, N]
    expected = mu_n.mean(1)  # images weigh equally (same number of draws each)
    standard_error = (var_n.sum(1) / R).sqrt() / len(M)
    # 50 timesteps at 5 standard errors (the mean of 200 half-normal draws is close to normal).
    assert ((g_mean - expected).abs() / standard_error).max() < 5
    # The spread over the 400 (image, noise) pairs: the mixture's std. Pooled over the 50 timesteps, the
    # ratio is within 0.03 (5 x its standard error sqrt((kurtosis - 1) / (4 * 400)) / sqrt(50) ~ 0.006).
    expected_std = ((var_n + mu_n ** 2).mean(1) - expected ** 2).sqrt()
    assert abs((g_std / expected_std).mean().item() - 1) < 0.03

    assert suggest(t, planted_f(t), 100) == ((380, 480), 420)  # mean over 380..460, symmetric about 420
    assert int(t[planted_f(t).argmax()]) == 420
    assert suggest(t, g_mean, 100)[0] == (380, 480)  # ~10 standard errors ahead of 360-460 / 400-500
    assert abs(int(t[g_mean.argmax()]) - 420) <= 20


def test_suggest_edges_and_errors():
    t = torch.arange(0, 1000, 20)
    late = (t >= 900).double()
    assert suggest(t, late, 100)[0] == (900, 1000)
    assert suggest(t, (t < 100).double(), 100) == ((0, 100), 0)
    assert suggest(t, late, 150)[0] == (850, 1000)  # T - width is always a candidate
    assert suggest([0, 500], [1.0, 2.0], 1000)[0] == (0, 1000)
    with pytest.raises(ValueError, match="width"):
        suggest(t, late, 1001)
    with pytest.raises(ValueError, match="equal length"):
        suggest(t, late[:-1], 100)


def test_measure_rejects_bad_input():
    unet = PlantedUNet(torch.randn(10, 24))
    with pytest.raises(ValueError, match="within 0..999"):
        measure_g(unet, DDPM(), torch.zeros(1, 4, 2, 2), torch.zeros(1, 10, 24), timesteps=[1000])
    with pytest.raises(ValueError, match="one context per latent"):
        measure_g(unet, DDPM(), torch.zeros(3, 4, 2, 2), torch.zeros(2, 10, 24))


def test_cli_writes_csv_plot_and_suggestion(tmp_path, monkeypatch, capsys, clip_bpe_path):
    from PIL import Image

    from minti.io.tokenizer_files import read_clip_bpe
    from minti.io.weights import StableDiffusion

    text_encoder, unet = tiny_models(vocab_size=49408)
    vae = VAE(VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)).eval()
    sd = StableDiffusion(read_clip_bpe(clip_bpe_path), text_encoder, unet, vae, DDPM(), 0.5, "tiny")
    monkeypatch.setattr(minti, "load", lambda *a, **k: sd)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        pixels = torch.randint(0, 256, (20, 16, 3), dtype=torch.uint8).numpy()  # non-square: centre-cropped
        Image.fromarray(pixels).save(images / f"{i}.png")
    out = tmp_path / "out"
    main(["--images", str(images), "--out", str(out), "--step", "100", "--repeats", "2", "--token", "cat",
          "--device", "cpu", "--projections", "2"])
    lines = (out / "g.csv").read_text().splitlines()
    assert lines[0] == "reading,t,g_mean,g_std,n" and len(lines) == 31 and lines[1].startswith("mse,0,")
    assert {line.split(",")[0] for line in lines[1:]} == {"mse", "error-norm", "jacobian"}
    assert (out / "g.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert printed.count("--timesteps") == 6 and "a photo of a cat" in printed


# ----------------------------------------------------------------------------------------------
# 6. the three readings

def direct_readings(unet, scheduler, x0, context, t, noise, jacobian=True):
    """Sample by sample, by autograd: || d mse_i / dc ||, || d ||e_i|| / dc || and the exact || J_i ||_F."""
    rows = []
    for i in range(len(t)):
        c = context[i:i + 1].detach().requires_grad_(True)
        pred = unet(scheduler.add_noise(x0[i:i + 1], noise[i:i + 1], t[i:i + 1]), t[i:i + 1], c)
        e = pred - noise[i:i + 1]
        (g_mse,) = torch.autograd.grad(e.pow(2).mean(), c, retain_graph=True)
        (g_norm,) = torch.autograd.grad(e.norm(), c, retain_graph=True)
        jac = torch.autograd.functional.jacobian(
            lambda cc: unet(scheduler.add_noise(x0[i:i + 1], noise[i:i + 1], t[i:i + 1]), t[i:i + 1], cc),
            c) if jacobian else torch.zeros(1)
        rows.append(torch.stack([g_mse.norm(), g_norm.norm(), jac.norm().to(g_mse.dtype)]))
    return torch.stack(rows).T  # [3, B]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_error_norm_gradient_is_mse_gradient_times_n_over_two_error_norms(dtype, tol):
    text_encoder, unet = tiny_models()
    unet = unet.to(dtype)
    scheduler = DDPM()
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(dtype)
    t = torch.tensor([3, 250, 990])
    x0, noise = torch.randn(3, 4, 8, 8, dtype=dtype), torch.randn(3, 4, 8, 8, dtype=dtype)
    context = text_encoder(torch.randint(6, 60, (3, 10))).to(dtype)
    exact = dtype == torch.float64
    direct_mse, direct_norm, direct_jac = direct_readings(unet, scheduler, x0, context, t, noise, exact)
    got = g_readings(unet, scheduler, x0, context, t, noise, projections="exact" if exact else 0)
    assert got["mse"].dtype == got["error-norm"].dtype
    assert rel_err(got["mse"].to(dtype), direct_mse) < tol
    assert rel_err(got["error-norm"].to(dtype), direct_norm) < tol
    # The identity itself, from the direct gradients: || d||e||/dc || = || d mse/dc || * N / (2 ||e||).
    e = unet(scheduler.add_noise(x0, noise, t), t, context) - noise
    N = e[0].numel()
    assert rel_err(direct_mse * N / (2 * e.flatten(1).norm(dim=1)), direct_norm) < tol
    assert rel_err(error_norm_from_mse(direct_mse, e.flatten(1).pow(2).mean(1), N), direct_norm) < tol
    if dtype == torch.float64:  # exact Jacobian: N backward passes, one per element of eps
        assert rel_err(got["jacobian"].to(dtype), direct_jac) < 1e-8


def test_jacobian_by_random_projections_approaches_the_exact_norm():
    text_encoder, unet = tiny_models()
    scheduler, t = DDPM(), torch.tensor([10, 500])
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    context = text_encoder(torch.randint(6, 60, (2, 10)))
    exact = g_readings(unet, scheduler, x0, context, t, noise, projections="exact")["jacobian"]
    K = 1000  # E ||J^T v||^2 = ||J||_F^2; the squared estimate's relative std is at most sqrt(2 / K) = 0.045
    estimate = g_readings(unet, scheduler, x0, context, t, noise, K, torch.Generator().manual_seed(0))["jacobian"]
    assert rel_err(estimate, exact) < 0.1  # the norm's relative std is about half that: 0.1 is > 4 std


class ReadingRecorder(UniformTimesteps):
    wants_grad_norms = True

    def __init__(self, reading):
        super().__init__()
        self.reading, self.updates = reading, []

    def update(self, t, g):
        self.updates.append((t, g))


@pytest.mark.parametrize("reading", ["mse", "error-norm"])
def test_training_gives_the_sampler_its_reading_from_the_one_backward(reading):
    text_encoder, unet = tiny_models()
    scheduler = DDPM()
    ids = torch.full((3, 10), 63)
    ids[:, 0], ids[:, 1], ids[:, 2], ids[:, 3] = 62, 7, PLACEHOLDER, 9
    word = LearnedWord(0.3 * torch.randn(1, 24), [PLACEHOLDER])
    latents, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([5, 400, 900])
    table = text_encoder.text_model.embeddings.token_embedding.weight
    context = text_encoder(ids, inputs_embeds=word(ids, table, t)).detach()
    expected = direct_readings(unet, scheduler, latents, context, t, noise, False)[0 if reading == "mse" else 1]
    sampler = ReadingRecorder(reading)
    optimizer = torch.optim.SGD([word.vectors], lr=0.0)
    # Two micro-batches (gradient accumulation): the factors of the loop are divided out.
    train_step(text_encoder, unet, scheduler, word, optimizer,
               [(ids[:2], latents[:2], t[:2], noise[:2]), (ids[2:], latents[2:], t[2:], noise[2:])], sampler)
    got = torch.cat([g for _, g in sampler.updates])
    assert rel_err(got, expected) < REL_TOL
    # training_reading alone, from a batch-mean loss and each sample's MSE
    c = context.clone().requires_grad_(True)
    per = F.mse_loss(unet(scheduler.add_noise(latents, noise, t), t, c), noise, reduction="none").flatten(1).mean(1)
    (grad,) = torch.autograd.grad(per.mean(), c)
    assert rel_err(training_reading(reading, grad, per, 256), expected) < REL_TOL


def test_adaptive_reading_specs():
    assert make_timestep_sampler("adaptive").reading == "mse"
    sampler = make_timestep_sampler("adaptive:error-norm")
    assert sampler.reading == "error-norm" and sampler.spec == "adaptive:error-norm" and "error-norm" in sampler.describe()
    with pytest.raises(ValueError, match="extra backward"):
        AdaptiveTimesteps(reading="jacobian")
    with pytest.raises(ValueError, match="Resume with the same"):
        sampler.load_state_dict(AdaptiveTimesteps().state_dict())
    old = AdaptiveTimesteps().state_dict()
    del old["reading"]  # a checkpoint from before the readings: it was the mse reading
    AdaptiveTimesteps().load_state_dict(old)
