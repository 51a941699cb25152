"""minti.vae against diffusers' AutoencoderKL: same weights (strict=True), same outputs in fp32.

Errors: max |ours - ref| / std(ref). Without the mid-block attention minti runs diffusers' kernels in
diffusers' order, and the outputs are bit-identical (asserted with torch.equal). With it, two kernels
differ: diffusers calls scaled_dot_product_attention on [B, heads=1, HW, C] (torch's fused CPU
kernel), minti on [B, HW, C] (the math kernel); and diffusers' residual sum (attention output first)
takes the attention output's channels-last layout, so its next ResNet runs channels-last convolutions.
Measured: at most 2.3e-5 (SD 1.5 architecture, 4 seeds of weights and inputs; small configs 1e-5,
512 px 7.5e-6). TOL is 5e-5; a mistake such as GroupNorm's eps 1e-5 for 1e-6 gives 5e-5 to 1e-4 and is
also caught directly (test_config_round_trip compares every eps).
"""
import copy

import pytest
import torch
from diffusers import AutoencoderKL
from torch import nn


from minti.io.configs import from_diffusers_config, to_diffusers_config
from minti.vae import VAE, VAEConfig

TOL = 5e-5

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest; the 512 px test is no slower on one

SMALL = dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=16, sample_size=32)


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.std()).item()


def randomize(model, seed=0):
    """Seeded random weights everywhere (incl. norm scales and biases, which init to 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "group_norm.weight", "conv_norm_out.weight")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5 * (1 if p.ndim > 1 else 0.1))
    return model


def build_pair(cfg: VAEConfig, seed=0):
    ref = randomize(AutoencoderKL(**to_diffusers_config(cfg)), seed).eval()
    ours = VAE(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def check_parity(ours, ref, x, z):
    """Encode x and decode z with both; bit-identical without the mid-block attention, else within TOL."""
    with torch.no_grad():
        mean, logvar = ours.encode(x)
        dist = ref.encode(x).latent_dist
        out, ref_out = ours.decode(z), ref.decode(z).sample
    pairs = dict(mean=(mean, dist.mean), logvar=(logvar, dist.logvar), decode=(out, ref_out))
    errs = {k: rel_err(a, b) for k, (a, b) in pairs.items()}
    print({k: f"{v:.2e}" for k, v in errs.items()})
    assert mean.shape == dist.mean.shape and out.shape == ref_out.shape == x.shape
    if ours.config.mid_block_add_attention:
        assert max(errs.values()) <= TOL, errs
    else:
        assert all(torch.equal(a, b) for a, b in pairs.values()), errs
    return mean, logvar, out


@pytest.mark.parametrize("mid_attention", [True, False])
def test_small_matches_diffusers(mid_attention):
    cfg = VAEConfig(**SMALL, mid_block_add_attention=mid_attention)
    ours, ref = build_pair(cfg)
    if not mid_attention:
        assert not any("attentions" in k for k in ours.state_dict())
    x = torch.rand(2, 3, 24, 40) * 2 - 1  # batch 2, non-square; 24x40 pixels -> 6x10 latents
    z = torch.randn(2, 4, 6, 10)
    x_before, z_before = x.clone(), z.clone()
    check_parity(ours, ref, x, z)
    assert torch.equal(x, x_before) and torch.equal(z, z_before)  # inputs not modified


def test_sd15_matches_diffusers():
    cfg = VAEConfig()  # the SD 1.x defaults
    assert to_diffusers_config(cfg)["block_out_channels"] == [128, 256, 512, 512]
    ours, ref = build_pair(cfg)
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863  # SD 1.5's vae/ has 83.65M parameters
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    z = torch.randn(2, 4, 4, 6)
    check_parity(ours, ref, x, z)


def test_sd15_at_512_pixels_matches_diffusers():
    """The SD 1.5 VAE at SD 1.5's resolution: one 512 x 512 image encoded and one 64 x 64 latent
    decoded, the mid-block attention running over all 4,096 positions (a bug that cuts the attention
    into windows, or breaks past some length, shows only here). About a minute of CPU, both models."""
    cfg = VAEConfig()
    with torch.device("meta"):  # skip torch's init: randomize fills every tensor once
        ref = AutoencoderKL(**to_diffusers_config(cfg))
        ours = VAE(cfg)
    ref = randomize(ref.to_empty(device="cpu"), seed=5).eval()
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)  # shared tensors, no second copy
    ours.eval()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(1, 3, 512, 512, generator=g) * 2 - 1
    z = torch.randn(1, 4, 64, 64, generator=g)
    mean, _, _ = check_parity(ours, ref, x, z)
    assert mean.shape == (1, 4, 64, 64)


def test_gradients_flow_to_inputs():
    ours = VAE(VAEConfig(**SMALL))
    x = (torch.rand(1, 3, 16, 24) * 2 - 1).requires_grad_()
    z = torch.randn(1, 4, 4, 6, requires_grad=True)
    mean, logvar = ours.encode(x)
    (mean.square().sum() + logvar.sum() + ours.decode(z).square().sum()).backward()
    assert x.grad.abs().sum() > 0 and z.grad.abs().sum() > 0
    assert torch.isfinite(x.grad).all() and torch.isfinite(z.grad).all()


def test_downsample_pads_right_and_bottom():
    """The encoder's stride-2 conv must see pixels 2i..2i+2 (LDM), not 2i-1..2i+1 (symmetric padding)."""
    ours = VAE(VAEConfig(**SMALL))
    down = ours.encoder.down_blocks[0].downsamplers[0]
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.bias.zero_()
        down.conv.weight[:, :, 0, 0] = torch.eye(32)  # output (i, j) copies input (2i, 2j) under LDM padding
    x = torch.randn(1, 32, 8, 12)
    with torch.no_grad():
        assert torch.equal(down(x), x[:, :, ::2, ::2])


def test_logvar_is_clamped():
    ours = VAE(VAEConfig(**SMALL, mid_block_add_attention=False))
    with torch.no_grad():
        ours.quant_conv.bias[4:] = 1e4  # the logvar half of the moments
        ours.quant_conv.bias[4] = -1e4
        _, logvar = ours.encode(torch.zeros(1, 3, 16, 16))
    assert logvar[:, 0].eq(-30).all() and logvar[:, 1:].eq(20).all()


def rms_err(ours, ref):
    return ((ours.double() - ref.double()).square().mean().sqrt() / ref.double().std()).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_lose_no_more_than_diffusers(dtype):
    """fp16 / bf16 weights, each output against the fp32 reference: the worst element's error at most
    2x diffusers' own in the same dtype (measured over 5 seeds: 0.9-1.1x in fp16, 0.7-1.2x in bf16),
    and the RMS error at most 1.3x diffusers' (measured 0.96-1.03x). The second bound is the sharp
    one: the max is a noisy tail, and an implementation that doubles the rounding error (one
    intermediate per ResNet rounded to bf16 in fp16, measured 1.7-2.8x) can pass 2x on it."""
    ours, ref = build_pair(VAEConfig(**SMALL))
    x, z = torch.rand(2, 3, 24, 40) * 2 - 1, torch.randn(2, 4, 6, 10)
    with torch.no_grad():
        dist32 = ref.encode(x).latent_dist
        exact = dict(mean=dist32.mean, logvar=dist32.logvar, decode=ref.decode(z).sample)
        ref_low = copy.deepcopy(ref).to(dtype)
        dist = ref_low.encode(x.to(dtype)).latent_dist
        theirs = dict(mean=dist.mean, logvar=dist.logvar, decode=ref_low.decode(z.to(dtype)).sample)
        ours.to(dtype)
        mean, logvar = ours.encode(x.to(dtype))
        got = dict(mean=mean, logvar=logvar, decode=ours.decode(z.to(dtype)))
    for key in exact:
        assert got[key].dtype == dtype, key
        reference_error = rel_err(theirs[key].float(), exact[key])
        assert 0 < reference_error < 0.3, key  # the low precision really ran, and the reference is sane
        error = rel_err(got[key].float(), exact[key])
        assert error <= 2 * reference_error, f"{key}: max {error:.2e} > 2 x diffusers' {reference_error:.2e}"
        error, reference_error = rms_err(got[key].float(), exact[key]), rms_err(theirs[key].float(), exact[key])
        assert error <= 1.3 * reference_error, f"{key}: RMS {error:.2e} > 1.3 x diffusers' {reference_error:.2e}"


def test_config_round_trip():
    for cfg in [VAEConfig(), VAEConfig(**SMALL, mid_block_add_attention=False)]:
        d = to_diffusers_config(cfg)
        ref = AutoencoderKL(**d)
        assert from_diffusers_config(VAEConfig, dict(ref.config)) == cfg
        assert from_diffusers_config(VAEConfig, d) == cfg
        with torch.device("meta"):
            ours = VAE(cfg)
        assert set(ours.state_dict()) == set(ref.state_dict())
        # GroupNorm eps (1e-6 in LDM's VAE) is below what the output comparison reliably sees
        norms = {k: m.eps for k, m in ours.named_modules() if isinstance(m, nn.GroupNorm)}
        assert norms == {k: ref.get_submodule(k).eps for k in norms}
        assert len(norms) == sum(isinstance(m, nn.GroupNorm) for m in ref.modules()) > 0
    # SD 1.5's own vae/config.json (written by diffusers 0.6: no scaling_factor, no mid attention flag).
    sd15 = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
            "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4}
    assert from_diffusers_config(VAEConfig, sd15) == VAEConfig()


def test_clear_errors():
    with pytest.raises(ValueError, match="shift_factor"):
        from_diffusers_config(VAEConfig, {**to_diffusers_config(VAEConfig()), "shift_factor": 0.1159})
    with pytest.raises(ValueError, match="down_block_types"):
        from_diffusers_config(VAEConfig, {"down_block_types": ["DownBlock2D"] * 4})
    with pytest.raises(ValueError, match="norm_num_groups"):
        VAEConfig(block_out_channels=(24, 48), norm_num_groups=32)
    vae = VAE(VAEConfig(**SMALL, mid_block_add_attention=False))
    with pytest.raises(ValueError, match="multiples of 4"):
        vae.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, 3, 16, 16))
