"""minti.vae against diffusers' AutoencoderKL: same weights (strict=True), same outputs in fp32."""
import pytest
import torch
from diffusers import AutoencoderKL

from minti.configs import from_diffusers_config, to_diffusers_config
from minti.vae import VAE, VAEConfig

# Max abs error relative to the output's std. fp32 rounding through ~30 convs stays near 1e-6;
# any real mistake (padding side, eps, a missing block) is orders of magnitude larger.
TOL = 1e-4

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
    with torch.no_grad():
        mean, logvar = ours.encode(x)
        dist = ref.encode(x).latent_dist
        out, ref_out = ours.decode(z), ref.decode(z).sample
    errs = dict(mean=rel_err(mean, dist.mean), logvar=rel_err(logvar, dist.logvar),
                decode=rel_err(out, ref_out))
    print({k: f"{v:.2e}" for k, v in errs.items()})
    assert mean.shape == dist.mean.shape and out.shape == ref_out.shape == x.shape
    assert max(errs.values()) < TOL, errs
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(dtype):
    ours = randomize(VAE(VAEConfig(**SMALL)))
    x, z = torch.rand(1, 3, 16, 24) * 2 - 1, torch.randn(1, 4, 4, 6)
    with torch.no_grad():
        mean32, out32 = ours.encode(x)[0], ours.decode(z)
        ours.to(dtype)
        mean, logvar = ours.encode(x.to(dtype))
        out = ours.decode(z.to(dtype))
    assert mean.dtype == logvar.dtype == out.dtype == dtype
    # Loose on purpose: this checks that half weights run and give the same picture, not parity.
    # (bf16 keeps 8 bits of mantissa, so ~1e-2 relative error per op is expected.)
    assert rel_err(mean.float(), mean32) < 0.1 and rel_err(out.float(), out32) < 0.1


def test_config_round_trip():
    for cfg in [VAEConfig(), VAEConfig(**SMALL, mid_block_add_attention=False)]:
        d = to_diffusers_config(cfg)
        ref = AutoencoderKL(**d)
        assert from_diffusers_config(VAEConfig, dict(ref.config)) == cfg
        assert from_diffusers_config(VAEConfig, d) == cfg
        with torch.device("meta"):
            names = set(VAE(cfg).state_dict())
        assert names == set(ref.state_dict())
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
