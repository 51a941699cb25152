"""The SD 1.x autoencoder (AutoencoderKL): images in [-1, 1] <-> latents 8x smaller with 4 channels.

A convolutional encoder maps an image to the mean and log-variance of a diagonal Gaussian over
latents; a mirrored decoder maps a latent back to an image. From the latent diffusion paper (Rombach
et al. 2022) and its code, CompVis/latent-diffusion ldm/modules/diffusionmodules/model.py (Encoder,
Decoder); module names are diffusers' `AutoencoderKL` keys, so its weights load with strict=True.
"""
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

NORM_EPS = 1e-6  # GroupNorm eps everywhere: LDM's Normalize (model.py), not PyTorch's default 1e-5
# SD's VAE holds ~0.75 GiB of fp32 activations per 512 px image, encoding or decoding: callers give it at
# most this many pixels per call (images_per_call), as diffusers' "VAE slicing" gives it one image.
PIXELS_PER_CALL = 512 * 512


def images_per_call(height, width):
    """How many images of height x width pixels to encode or decode at once: 1 at 512 px, 4 at 256 px."""
    return max(1, PIXELS_PER_CALL // (height * width))


class VAEResnetBlock(nn.Module):
    """(GroupNorm, SiLU, 3x3 conv) twice, plus the input; a 1x1 conv matches widths when they differ."""

    def __init__(self, in_channels, out_channels, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # LDM has dropout here, 0 for SD
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class VAEAttention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # a list only for the key `to_out.0`

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1 head, H*W, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # 4-D, as the fused kernels want it
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class VAEMidBlock(nn.Module):
    """ResNet, attention, ResNet at the lowest resolution (the attention can be left out)."""

    def __init__(self, channels, groups, add_attention):
        super().__init__()
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)] if add_attention else [])
        self.resnets = nn.ModuleList([VAEResnetBlock(channels, channels, groups) for _ in range(2)])

    def forward(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class VAEDownsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        # Pad right and bottom only, as LDM's Downsample does: output pixel i then sees input pixels
        # 2i..2i+2. Symmetric padding 1 gives the same size but sees 2i-1..2i+1, a one-pixel shift
        # of the sampling grid that the pretrained weights were not trained with.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class VAEUpsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EncoderBlock(nn.Module):
    """One encoder resolution (diffusers' DownEncoderBlock2D): ResNet blocks, then a 2x downsampler."""

    def __init__(self, in_channels, out_channels, num_layers, groups, downsample):
        super().__init__()
        widths = [in_channels] + [out_channels] * (num_layers - 1)
        self.resnets = nn.ModuleList([VAEResnetBlock(w, out_channels, groups) for w in widths])
        self.downsamplers = nn.ModuleList([VAEDownsample(out_channels)] if downsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class DecoderBlock(nn.Module):
    """One decoder resolution (diffusers' UpDecoderBlock2D): ResNet blocks, then a 2x upsampler."""

    def __init__(self, in_channels, out_channels, num_layers, groups, upsample):
        super().__init__()
        widths = [in_channels] + [out_channels] * (num_layers - 1)
        self.resnets = nn.ModuleList([VAEResnetBlock(w, out_channels, groups) for w in widths])
        self.upsamplers = nn.ModuleList([VAEUpsample(out_channels)] if upsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    """Image -> 2 * latent_channels maps (mean, log-variance), halving the size in all stages but the
    last. SD 1.x widths (sizes): 3 -> 128 (512) -> 256 (256) -> 512 (128) -> 512 (64, mid block) -> 8."""

    def __init__(self, cfg):
        super().__init__()
        ch, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, downsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.mid_block = VAEMidBlock(ch[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent -> image, the encoder mirrored: widths reversed, one more ResNet per stage, x2 upsampling.
    SD 1.x widths (sizes): 4 -> 512 (64: mid block, stage 0) -> 512 (128) -> 256 (256) -> 128 (512) -> 3."""

    def __init__(self, cfg):
        super().__init__()
        ch, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = VAEMidBlock(ch[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            DecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups, upsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


@dataclass
class VAEConfig:
    """Hyperparameters, named as in diffusers' vae/config.json; the defaults are SD 1.x's."""

    in_channels: int = 3  # RGB
    out_channels: int = 3
    latent_channels: int = 4  # the latent SD 1.x's UNet denoises: [4, H/8, W/8]
    block_out_channels: tuple = (128, 256, 512, 512)  # one entry per resolution; all but the last halve
    layers_per_block: int = 2  # ResNet blocks per encoder stage (the decoder uses one more)
    norm_num_groups: int = 32  # GroupNorm groups everywhere
    sample_size: int = 512  # the image size SD 1.x was trained at; informational only
    # 1 / std of the first-stage latents over a batch of training images, fixed once by LDM:
    # `scale_factor: 0.18215` in configs/stable-diffusion/v1-inference.yaml. Applied by the caller.
    scaling_factor: float = 0.18215
    mid_block_add_attention: bool = True  # SD 1.x has one self-attention at the lowest resolution

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)  # lists from JSON compare equal
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"block_out_channels {self.block_out_channels} must all be multiples of "
                             f"norm_num_groups={self.norm_num_groups} (GroupNorm splits channels evenly)")

    @property
    def downsample_factor(self):
        return 2 ** (len(self.block_out_channels) - 1)  # 8 for SD 1.x: three 2x downsamplings


class VAE(nn.Module):
    """AutoencoderKL: `encode(x) -> (mean, logvar)`, `decode(z) -> x`; the caller applies latent_scale."""

    def __init__(self, config: VAEConfig = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # 1x1 convs on the latent side (LDM's quant_conv / post_quant_conv, kept from its VQ sibling).
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode(self, x):
        """x [B, in_channels, H, W] in [-1, 1], H and W multiples of downsample_factor (8 for SD 1.x).

        Returns the mean and log-variance [B, latent_channels, H/8, W/8] of the latent Gaussian; sample a
        latent as `mean + (0.5 * logvar).exp() * noise` (use `mean` alone for a deterministic one).
        """
        c, f = self.config, self.config.downsample_factor
        if x.ndim != 4 or x.shape[1] != c.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"VAE.encode expects images [B, {c.in_channels}, H, W] with H and W "
                             f"multiples of {f}; got {tuple(x.shape)}. Resize or crop the images first.")
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        # Clamped as LDM's DiagonalGaussianDistribution (ldm/modules/distributions/distributions.py),
        # so that exp(logvar) can neither underflow to 0 nor overflow.
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        """z [B, latent_channels, h, w] (already divided by latent_scale) -> image [B, 3, 8h, 8w]."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"VAE.decode expects latents [B, {self.config.latent_channels}, h, w]; got "
                             f"{tuple(z.shape)}. Pass latents (e.g. from encode), not images.")
        return self.decoder(self.post_quant_conv(z))
