"""minti's UNet against diffusers' UNet2DConditionModel: seeded random weights, fp32, strict loading.

minti runs the same kernels on the same tensors in the same order as diffusers, so outputs and
gradients are bit-identical (torch.equal; measured on every config here and SD 1.5's, with 1 and 2
torch threads, with and without gradient checkpointing; in bf16 too). Errors in messages are
relative to the reference's scale: max |ours - ref| / std(ref).
"""
import copy
import functools
import json

import pytest
import torch
from torch import nn
from diffusers import UNet2DConditionModel

from minti.io.configs import from_diffusers_config, to_diffusers_config
from minti.unet import UNet, UNetConfig


# Small configs that together use every block type SD 1.x uses, in mixed orders, with widths that
# change between stages (1x1 shortcuts, uneven skip concatenations) and a text width unlike any
# channel width (catches to_k/to_v built on the wrong side).
CONFIGS = {
    # 4 stages = 3 downsamples, like SD: a 10x14 latent has odd sides at 5x7 and 3x4.
    "four": UNetConfig(block_out_channels=(32, 64, 96, 64), layers_per_block=2, attention_head_dim=4,
                       cross_attention_dim=48, norm_num_groups=8,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D") * 2,
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D") * 2,
                       sample_size=16),
    "two": UNetConfig(block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=2,
                      cross_attention_dim=24, norm_num_groups=4,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), sample_size=8),
    # One stage: no down- or upsampler at all; other in/out channel counts.
    "one": UNetConfig(in_channels=3, out_channels=6, block_out_channels=(32,), layers_per_block=1,
                      attention_head_dim=2, cross_attention_dim=16, norm_num_groups=8,
                      down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                      sample_size=8),
}

# unet/config.json of runwayml/stable-diffusion-v1-5, as published.
SD15_CONFIG_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random weights that keep activations O(1) but make every parameter matter.

    Norm weights and all biases are random too (default init sets them to 1 and 0, which would hide
    a swapped or missing affine). Fills every tensor, so it also initialises a model made on `meta`.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:  # Linear / Conv weight: variance 1 / fan_in
                p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
            elif name.endswith("weight"):  # GroupNorm / LayerNorm scale
                p.normal_(1.0, 0.2, generator=g)
            else:
                p.normal_(0.0, 0.2, generator=g)
    assert not list(model.buffers()), "every tensor of the UNet is a parameter"
    return model


@functools.lru_cache(maxsize=None)
def pair(name: str):
    """(ours, reference) for a small config: reference built by diffusers, weights copied strictly."""
    cfg = CONFIGS[name]
    ref = randomize_(UNet2DConditionModel(**to_diffusers_config(cfg)), seed=1).eval()
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    # frozen, as in textual inversion: gradients flow to the inputs only
    return ours.requires_grad_(False), ref.requires_grad_(False)


def inputs(cfg: UNetConfig, batch: int, h: int, w: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    context = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)
    return x, context


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).abs().max() / ref.double().std()).item()


# --- forward ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, size", [("four", (16, 24)), ("four", (10, 14)), ("two", (9, 13)),
                                        ("one", (6, 10))])
def test_matches_diffusers(name, size):
    ours, ref = pair(name)
    x, context = inputs(ours.config, 3, *size)
    t = torch.tensor([0, 999, 500])  # a different timestep per sample
    with torch.no_grad():
        expected = ref(x, t, context).sample
        got = ours(x, t, context)
    assert got.shape == expected.shape == (3, ours.config.out_channels, *size)
    assert expected.std() > 0.1  # the reference output is not degenerate
    assert torch.equal(got, expected), f"max error {rel_err(got, expected):.2e} x std (expected: 0)"


def test_one_timestep_for_the_batch():
    ours, ref = pair("four")
    x, context = inputs(ours.config, 2, 8, 16)
    with torch.no_grad():
        expected = ref(x, 500, context).sample
        for t in (500, torch.tensor(500), torch.tensor([500]), torch.tensor([500, 500])):
            assert torch.equal(ours(x, t, context), expected), t
        # and per-sample timesteps really differ from a shared one
        assert rel_err(ours(x, torch.tensor([500, 20]), context), expected) > 1e-2


def test_sd15_matches_diffusers():
    """The real SD 1.5 architecture (860M parameters, random weights): one reference, shared tensors."""
    cfg = UNetConfig()
    with torch.device("meta"):  # skip torch.nn.init: randomize_ fills every tensor once
        ref = UNet2DConditionModel(**to_diffusers_config(cfg))
        ours = UNet(cfg)
    ref = randomize_(ref.to_empty(device="cpu"), seed=3).eval()
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)  # same tensors, no second copy
    ours.eval()
    x, context = inputs(cfg, 2, 16, 24)
    t = torch.tensor([37, 814])
    with torch.no_grad():
        expected = ref(x, t, context).sample
        got = ours(x, t, context)
    del ref, ours
    assert got.shape == (2, 4, 16, 24)
    assert expected.std() > 0.1
    assert torch.equal(got, expected), f"max error {rel_err(got, expected):.2e} x std (expected: 0)"


# --- gradients -----------------------------------------------------------------------------------------


def context_grad(model, x, t, context, w, diffusers=False):
    context = context.detach().requires_grad_(True)  # shares storage: in-place edits would show
    out = model(x, t, context)
    out = out.sample if diffusers else out
    (out * w).sum().backward()
    return context.grad


@pytest.mark.parametrize("checkpointing", [False, True])
def test_context_gradient_matches_diffusers(checkpointing):
    ours, ref = pair("four")
    x, context = inputs(ours.config, 3, 10, 14)
    t = torch.tensor([0, 999, 500])
    w = torch.randn(3, 4, 10, 14, generator=torch.Generator().manual_seed(4))
    x0, context0 = x.clone(), context.clone()
    expected = context_grad(ref, x, t, context, w, diffusers=True)

    calls = []  # count stage forwards: with checkpointing each one is run again in backward
    stages = [*ours.down_blocks, ours.mid_block, *ours.up_blocks]
    hooks = [b.register_forward_pre_hook(lambda *_: calls.append(1)) for b in stages]
    ours.gradient_checkpointing = checkpointing
    try:
        got = context_grad(ours, x, t, context, w)
    finally:
        ours.gradient_checkpointing = False
        for h in hooks:
            h.remove()
    assert len(calls) == (2 if checkpointing else 1) * len(stages)
    assert expected.abs().max() > 0
    assert torch.equal(got, expected), f"max error {rel_err(got, expected):.2e} x std (expected: 0)"
    assert torch.equal(x, x0) and torch.equal(context, context0)  # inputs untouched


def test_checkpointing_off_without_grad():
    ours, _ = pair("two")
    x, context = inputs(ours.config, 2, 8, 8)
    calls = []
    hook = ours.mid_block.register_forward_pre_hook(lambda *_: calls.append(1))
    ours.gradient_checkpointing = True
    try:
        with torch.no_grad():
            ours(x, 3, context)
    finally:
        ours.gradient_checkpointing = False
        hook.remove()
    assert len(calls) == 1


# --- dtypes -------------------------------------------------------------------------------------------


def test_bfloat16_weights():
    """bf16 weights run (timestep sinusoid in fp32, then cast) and give diffusers' bf16 output bit for
    bit (measured on 4 inputs: identical), so ours loses exactly what diffusers loses."""
    ours, ref = pair("four")
    x, context = inputs(ours.config, 3, 16, 24)
    t = torch.tensor([0, 999, 500])
    with torch.no_grad():
        exact = ref(x, t, context).sample
        ref_bf16 = copy.deepcopy(ref).bfloat16()(x.bfloat16(), t, context.bfloat16()).sample
        ours_bf16 = copy.deepcopy(ours).bfloat16()(x, t, context)  # fp32 inputs: cast to the weights' dtype
    assert ours_bf16.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa (2^-8 = 0.4%); through ~40 layers the reference drifts ~1e-2.
    reference_error = rel_err(ref_bf16, exact)
    assert 1e-3 < reference_error < 0.2  # bf16 really ran
    assert torch.equal(ours_bf16, ref_bf16), \
        f"error {rel_err(ours_bf16, exact):.2e} vs diffusers' bf16 {reference_error:.2e} (expected: the same output)"


# --- config -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [UNetConfig(), *CONFIGS.values()], ids=["sd15", *CONFIGS])
def test_config_round_trip(cfg):
    d = to_diffusers_config(cfg)
    json.dumps(d)  # writable as config.json
    with torch.device("meta"):
        ref = UNet2DConditionModel(**d)
        ours = UNet(cfg)
    assert from_diffusers_config(UNetConfig, dict(ref.config)) == cfg
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(ref)
    # norm eps values are below what an O(1) output comparison can see: compare them directly
    norms = {k: m.eps for k, m in ours.named_modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))}
    assert norms == {k: ref.get_submodule(k).eps for k in norms}
    assert len(norms) == sum(isinstance(m, (nn.GroupNorm, nn.LayerNorm)) for m in ref.modules())


def test_sd15_config_json():
    assert from_diffusers_config(UNetConfig, SD15_CONFIG_JSON) == UNetConfig()


@pytest.mark.parametrize("change, words", [
    ({"use_linear_projection": True}, "SD 2"),
    ({"upcast_attention": True}, "SD 2.1"),
    ({"attention_head_dim": [5, 10, 20, 20]}, "per-block"),
    ({"addition_embed_type": "text_time"}, "SDXL"),
    ({"transformer_layers_per_block": [1, 2, 10]}, "SDXL"),
    ({"in_channels": 9}, "inpainting"),
    ({"in_channels": 8}, "InstructPix2Pix"),
    ({"class_embed_type": "timestep"}, "class"),
    ({"num_class_embeds": 1000}, "class"),
    ({"time_cond_proj_dim": 256}, "LCM"),
    ({"resnet_time_scale_shift": "scale_shift"}, "scale-shift"),
    ({"some_future_feature": 3}, "Unknown"),
    ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "block type"),
    ({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4}, "block type"),
])
def test_refuses_what_sd1_does_not_have(change, words):
    with pytest.raises(ValueError, match=words):
        from_diffusers_config(UNetConfig, {**SD15_CONFIG_JSON, **change})


def test_bad_config():
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(block_out_channels=(30, 60), norm_num_groups=8, down_block_types=("DownBlock2D",) * 2,
                   up_block_types=("UpBlock2D",) * 2)
    with pytest.raises(ValueError, match="one down and one up"):
        UNetConfig(block_out_channels=(32, 64))


def test_bad_inputs():
    ours, _ = pair("two")
    x, context = inputs(ours.config, 2, 8, 8)
    with pytest.raises(ValueError, match="latents"):
        ours(x[:, :3], 1, context)
    with pytest.raises(ValueError, match="text features"):
        ours(x, 1, context[..., :10])
    with pytest.raises(ValueError, match="one timestep per sample"):
        ours(x, torch.tensor([1, 2, 3]), context)
