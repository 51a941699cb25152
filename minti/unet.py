"""The Stable Diffusion 1.x denoiser: a UNet that predicts the noise eps in a latent x_t, given t and text.

Read top-down as a build-up: timestep embedding, ResNet block, attention, spatial transformer,
down/upsampling, the three kinds of stage, and finally the UNet, built by one loop that pushes
skip-connection widths on a stack on the way down and pops them on the way up. The architecture is
LDM's (Rombach et al. 2022, CompVis `ldm/modules/diffusionmodules/openaimodel.py`); module names are
the keys of diffusers' `UNet2DConditionModel`, so a diffusers `unet/` folder loads with strict=True.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

RESNET_EPS = 1e-5  # GroupNorm eps of ResNet blocks and conv_norm_out (diffusers' norm_eps)
TRANSFORMER_EPS = 1e-6  # GroupNorm eps before proj_in (LDM's Normalize in SpatialTransformer)
LAYERNORM_EPS = 1e-5  # LayerNorm eps inside transformer blocks (PyTorch's default, as in LDM)
MAX_PERIOD = 10000  # longest wavelength of the sinusoidal timestep embedding (Transformer/DDPM)
FF_MULT = 4  # feed-forward inner width = 4 x channels (LDM's FeedForward mult=4)


# ---------------------------------------------------------------------------------------------------
# Time

def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps: t [B] -> [B, dim] in fp32.

    cos first, then sin, at frequencies MAX_PERIOD^(-i / half), i = 0 .. half-1: LDM's
    `timestep_embedding` (ldm/modules/diffusionmodules/util.py), which diffusers reproduces with
    flip_sin_to_cos=True, freq_shift=0. Always fp32: in fp16 a phase t * freq near 999 would be rounded
    to a multiple of 0.5 radian.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))  # an odd width gets one zero feature, as in LDM


class TimestepEmbedding(nn.Module):
    """The time MLP: sinusoidal features (width C) -> Linear -> SiLU -> Linear (width 4C)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.linear_1 = nn.Linear(c_in, c_out)
        self.linear_2 = nn.Linear(c_out, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# ---------------------------------------------------------------------------------------------------
# Layers

class ResnetBlock2D(nn.Module):
    """Two 3x3 convs with a residual; the time embedding is added as a per-channel bias in between."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=RESNET_EPS)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=RESNET_EPS)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # The residual needs c_out channels: a 1x1 conv when the width changes.
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))  # (SD's dropout here is 0)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nn.Module):
    """Multi-head attention of x [B, N, C] to itself, or to a context [B, L, D] (cross-attention)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # index 0: diffusers' to_out.1 is a dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (a.unflatten(-1, (self.heads, -1)).transpose(1, 2) for a in (q, k, v))  # (B, heads, N, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(hd)) v
        return self.to_out[0](out.transpose(1, 2).flatten(2))  # (B, N, C)


class GEGLU(nn.Module):
    """A GELU-gated linear unit (Shazeer 2020): one projection gives both the values and the gate."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)  # values first, then the gate (LDM's order)
        return x * F.gelu(gate)  # exact (erf) GELU


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # net.1 is diffusers' dropout (p=0 in SD): an Identity keeps the Linear at key net.2.
        self.net = nn.Sequential(GEGLU(dim, FF_MULT * dim), nn.Identity(), nn.Linear(FF_MULT * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer layer: self-attention, cross-attention to the text, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)  # the only place the text enters the UNet
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """LDM's SpatialTransformer (diffusers' Transformer2DModel): pixels become tokens that attend.
    SD 1.x projects in and out with 1x1 convs (SD 2.x uses linear layers: use_linear_projection)."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=TRANSFORMER_EPS)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, context_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.layer = 0  # its place among the UNet's cross-attention layers, in forward order (set by UNet)

    def forward(self, x: torch.Tensor, context) -> torch.Tensor:
        B, C, H, W = x.shape
        if not torch.is_tensor(context):  # one context per cross-attention layer: take this layer's
            context = context[self.layer]
        h = self.proj_in(self.norm(x))
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C): one token per pixel
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample2D(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv (padding 1: an odd side n becomes (n + 1) / 2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    """Enlarge to `size` (nearest neighbour), then a 3x3 conv. `size` is that of the skip this output
    meets: 2x the input, except where a side was odd on the way down (5 -> 3 must come back as 5)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


# ---------------------------------------------------------------------------------------------------
# Stages. Each is a list of ResNet blocks, each optionally followed by a spatial transformer.

class DownBlock(nn.Module):
    """diffusers' CrossAttnDownBlock2D (attention=True) or DownBlock2D: n layers, then a downsampler.

    Returns the output and the skips: every layer's output, and the downsampler's.
    """

    def __init__(self, c_in, c_out, n, attention, downsample, *, temb_dim, groups, heads, context_dim):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c_in if j == 0 else c_out, c_out, temb_dim, groups)
                                      for j in range(n)])
        self.attentions = nn.ModuleList([SpatialTransformer(c_out, heads, context_dim, groups)
                                         for _ in range(n)]) if attention else None
        self.downsamplers = nn.ModuleList([Downsample2D(c_out)]) if downsample else None

    def forward(self, h, temb, context):
        skips = []
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions is not None:
                h = self.attentions[j](h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """diffusers' UNetMidBlock2DCrossAttn at the lowest resolution: ResNet, transformer, ResNet."""

    def __init__(self, c, *, temb_dim, groups, heads, context_dim):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, temb_dim, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialTransformer(c, heads, context_dim, groups)])

    def forward(self, h, temb, context):
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context)
        return self.resnets[1](h, temb)


class UpBlock(nn.Module):
    """diffusers' CrossAttnUpBlock2D (attention=True) or UpBlock2D: n + 1 layers, then an upsampler.

    Layer j first concatenates skip j to its input along channels: `skip_widths` are their widths.
    """

    def __init__(self, c_in, c_out, skip_widths, attention, upsample, *, temb_dim, groups, heads, context_dim):
        super().__init__()
        ins = [(c_in if j == 0 else c_out) + skip for j, skip in enumerate(skip_widths)]  # h + skip
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c_out, temb_dim, groups) for c in ins])
        self.attentions = nn.ModuleList([SpatialTransformer(c_out, heads, context_dim, groups)
                                         for _ in skip_widths]) if attention else None
        self.upsamplers = nn.ModuleList([Upsample2D(c_out)]) if upsample else None

    def forward(self, h, skips, temb, context, size=None):
        for j, (resnet, skip) in enumerate(zip(self.resnets, skips)):
            h = resnet(torch.cat([h, skip], dim=1), temb)
            if self.attentions is not None:
                h = self.attentions[j](h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, size)
        return h


# ---------------------------------------------------------------------------------------------------
# The UNet. SD 1.x at 512x512 px = a 64x64 latent, widths 320/640/1280/1280. On the way down every
# layer's output (and every downsampler's) is pushed on a stack of skips; on the way up each ResNet
# block pops one and concatenates it to its input along channels:
#
#   stage           width  attn  side   skips pushed
#   conv_in           320          64   320
#   down_blocks.0     320   yes    64   320, 320, then downsample -> 320 at 32
#   down_blocks.1     640   yes    32   640, 640, then downsample -> 640 at 16
#   down_blocks.2    1280   yes    16   1280, 1280, then downsample -> 1280 at 8
#   down_blocks.3    1280   no      8   1280, 1280
#   mid_block        1280   yes     8   (ResNet, transformer, ResNet)
#
#   stage           width  attn  side   ResNet inputs: h + popped skip      then
#   up_blocks.0      1280   no      8   1280+1280, 1280+1280, 1280+1280     upsample to 16
#   up_blocks.1      1280   yes    16   1280+1280, 1280+1280, 1280+640      upsample to 32
#   up_blocks.2       640   yes    32   1280+640,  640+640,   640+320       upsample to 64
#   up_blocks.3       320   yes    64   640+320,   320+320,   320+320       norm, SiLU, conv_out -> 4
#
# The time embedding (width 1280) reaches every ResNet block, the text (77 x 768) every transformer.


@dataclass
class UNetConfig:
    """Hyperparameters, named as in diffusers' unet/config.json; the defaults are SD 1.x's (v1-5)."""

    in_channels: int = 4  # latent channels of SD 1.x's VAE
    out_channels: int = 4  # the predicted noise has the latent's shape
    block_out_channels: tuple = (320, 640, 1280, 1280)  # width of each resolution stage
    layers_per_block: int = 2  # ResNet(+attention) layers per down stage; up stages have one more
    # A misnomer kept for compatibility: diffusers passes "attention_head_dim" on as the NUMBER of
    # heads (see diffusers issue #2011), so SD 1.x has 8 heads everywhere, of 40/80/160 channels.
    attention_head_dim: int = 8
    cross_attention_dim: int = 768  # width of the text context: CLIP ViT-L/14's hidden size
    norm_num_groups: int = 32  # GroupNorm groups everywhere
    # One per stage; the "CrossAttn" stages have a spatial transformer after each ResNet block.
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    sample_size: int | None = 64  # latent side at the training resolution (512 px / 8): sampling's default

    def __post_init__(self):  # tuples, so that a config read from JSON (lists) equals one written here
        self.block_out_channels, self.down_block_types, self.up_block_types = (
            tuple(v) for v in (self.block_out_channels, self.down_block_types, self.up_block_types))
        widths, down, up = self.block_out_channels, self.down_block_types, self.up_block_types
        if not widths or not len(down) == len(up) == len(widths):
            raise ValueError(f"UNetConfig: need one down and one up block type per block_out_channels entry; "
                             f"got {len(widths)} widths, {len(down)} down and {len(up)} up types")
        if any(w % self.norm_num_groups or w % self.attention_head_dim for w in widths):
            raise ValueError(f"UNetConfig: widths {widths} must be divisible by norm_num_groups "
                             f"({self.norm_num_groups}) and by the head count ({self.attention_head_dim}, "
                             f"called attention_head_dim)")


class UNet(nn.Module):
    """unet(x [B, C, h, w], t, context [B, L, D]) -> eps [B, C, h, w]; the SD 1.x UNet by default."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = c = config or UNetConfig()
        widths, n = c.block_out_channels, c.layers_per_block
        temb_dim = 4 * widths[0]  # 1280 in SD 1.x (LDM: time_embed_dim = model_channels * 4)
        kw = dict(temb_dim=temb_dim, groups=c.norm_num_groups, heads=c.attention_head_dim,
                  context_dim=c.cross_attention_dim)

        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(widths[0], temb_dim)

        # Way down: push the width of every tensor kept for a skip connection.
        stack, ch = [widths[0]], widths[0]  # conv_in's output is the first skip
        self.down_blocks = nn.ModuleList()
        for i, (kind, width) in enumerate(zip(c.down_block_types, widths)):
            last = i == len(widths) - 1
            attention = kind == "CrossAttnDownBlock2D"
            self.down_blocks.append(DownBlock(ch, width, n, attention, downsample=not last, **kw))
            stack += [width] * (n + (not last))  # n layer outputs, then the downsampler's
            ch = width

        self.mid_block = MidBlock(ch, **kw)

        # Way up: each stage has n + 1 layers and pops one skip for each.
        self.up_blocks = nn.ModuleList()
        for i, (kind, width) in enumerate(zip(c.up_block_types, reversed(widths))):
            last = i == len(widths) - 1
            skip_widths = [stack.pop() for _ in range(n + 1)]
            attention = kind == "CrossAttnUpBlock2D"
            self.up_blocks.append(UpBlock(ch, width, skip_widths, attention, upsample=not last, **kw))
            ch = width
        assert not stack, "every skip pushed on the way down is used on the way up"

        # Number the cross-attention layers in forward order (registration order is down, mid, up):
        # a per-layer context (P+, NeTI) gives layer i its own text features.
        for i, name in enumerate(cross_attention_layers(self)):
            self.get_submodule(name).layer = i

        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch, eps=RESNET_EPS)
        self.conv_out = nn.Conv2d(ch, c.out_channels, 3, padding=1)
        # When True and gradients are on, each stage keeps only its inputs and is recomputed in
        # backward: much less activation memory for one more forward pass (training on small GPUs).
        self.gradient_checkpointing = False

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def forward(self, x: torch.Tensor, t, context) -> torch.Tensor:
        """x [B, in_channels, h, w] noisy latents; t an int, a 0-d or [B] tensor of timesteps (one per
        sample); context [B, L, cross_attention_dim] text features, or one such tensor per
        cross-attention layer (a list in forward order, see cross_attention_layers, or a function of
        the layer index): P+ and NeTI words. x and context are cast to the weights' dtype; the result
        (predicted noise) has x's shape and the weights' dtype."""
        B, C, D = x.shape[0], self.config.in_channels, self.config.cross_attention_dim
        if x.ndim != 4 or x.shape[1] != C:
            raise ValueError(f"UNet: x must be [B, {C}, h, w] latents, got shape {tuple(x.shape)}")
        if callable(context):
            context = [context(i) for i in range(len(cross_attention_layers(self)))]
        contexts = [context] if torch.is_tensor(context) else list(context)
        if not torch.is_tensor(context) and len(contexts) != (layers := len(cross_attention_layers(self))):
            raise ValueError(f"UNet: a per-layer context needs one tensor per cross-attention layer "
                             f"({layers}: cross_attention_layers(unet)), got {len(contexts)}")
        for one in contexts:
            if one.ndim != 3 or one.shape[0] != B or one.shape[2] != D:
                raise ValueError(f"UNet: context must be [B={B}, L, {D}] text features, got shape "
                                 f"{tuple(one.shape)} (a text encoder of another width, or another "
                                 "batch size?)")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0 or tuple(t.shape) == (1,):
            t = t.reshape(1).expand(B)  # one timestep for the whole batch: t is [B], one per sample
        if tuple(t.shape) != (B,):
            raise ValueError(f"UNet: t has shape {tuple(t.shape)}; give an int, a 0-d tensor or one timestep "
                             f"per sample, shape ({B},)")
        # The sinusoid is computed in fp32 and only then cast (as diffusers does).
        temb = self.time_embedding(timestep_embedding(t, self.conv_in.out_channels).to(self.dtype))
        context = context.to(self.dtype) if torch.is_tensor(context) else [c.to(self.dtype) for c in contexts]

        h = self.conv_in(x.to(self.dtype))
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = self._run(block, h, temb, context)
            skips += block_skips
        h = self._run(self.mid_block, h, temb, context)
        for block in self.up_blocks:
            block_skips = [skips.pop() for _ in block.resnets]
            size = skips[-1].shape[-2:] if skips else None  # upsample to the size of the next skip
            h = self._run(block, h, block_skips, temb, context, size)
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    def _run(self, block: nn.Module, *args):
        """Call one stage, through torch.utils.checkpoint when gradient checkpointing is on."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def cross_attention_layers(unet: nn.Module) -> list:
    """The names of the UNet's cross-attention layers (its spatial transformers) in forward order, as
    diffusers' module paths: "down_blocks.0.attentions.0", ..., "mid_block.attentions.0", ...,
    "up_blocks.3.attentions.2" (16 in SD 1.x: 6 down, 1 mid, 9 up). Index i of this list is the layer
    a per-layer context's entry i goes to."""
    return [name for name, m in unet.named_modules() if isinstance(m, SpatialTransformer)]
