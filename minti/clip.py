"""CLIP's text transformer: the text encoder of Stable Diffusion 1.x.

OpenAI's CLIP ViT-L/14 text tower (Radford et al. 2021, github.com/openai/CLIP, clip/model.py) as
SD 1.x uses it: token + position embeddings, 12 pre-LayerNorm causal self-attention blocks with a
QuickGELU MLP, and a final LayerNorm whose output, all 77 positions of it, is the UNet's context.
Module names equal the keys of transformers' CLIPTextModel checkpoints ("text_model.encoder.layers.3
.mlp.fc1"), so SD 1.x `text_encoder/` weights load with `strict=True` and no mapping.
The `inputs_embeds` argument is the door that textual inversion comes through.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x):
    """GELU's sigmoid approximation x * sigmoid(1.702 x) (Hendrycks & Gimpel 2016, section 2).

    OpenAI trained CLIP with it (clip/model.py `QuickGELU`), so its weights expect it, not exact GELU.
    """
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # by `hidden_act`; exact GELU: OpenCLIP (SD 2.x)


class CLIPTextEmbeddings(nn.Module):
    """Token lookup plus a learned absolute position embedding."""

    def __init__(self, config):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, inputs_embeds):
        length, limit = inputs_embeds.shape[1], self.position_embedding.num_embeddings
        if length > limit:
            raise ValueError(f"The sequence has {length} tokens but the encoder has {limit} positions; "
                             f"truncate the prompt (the tokenizer's tok(texts, length={limit}) does it).")
        # Positions are always 0..L-1; checkpoints that store a `position_ids` tensor hold exactly that.
        positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
        return inputs_embeds + self.position_embedding(positions)


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention: each position sees itself and the positions before it."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        width = config.hidden_size
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        B, L, D = x.shape
        # (B, L, D) -> (B, heads, L, D / heads)
        q, k, v = (proj(x).view(B, L, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        # Scaled by 1/sqrt(head width), the default; causal as CLIP was trained (a GPT-style mask).
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = out.transpose(1, 2).reshape(B, L, D)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    """Position-wise feed-forward: width -> 4 x width -> width."""

    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """A pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The stack of blocks (a container, so that the keys read `encoder.layers.N`)."""

    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextTransformer(nn.Module):
    """Embeddings, blocks, final LayerNorm."""

    def __init__(self, config):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, inputs_embeds):
        return self.final_layer_norm(self.encoder(self.embeddings(inputs_embeds)))


@dataclass
class CLIPTextConfig:
    """Hyperparameters of the text transformer; the defaults are CLIP ViT-L/14, SD 1.x's encoder."""

    vocab_size: int = 49408  # CLIP's BPE: 512 byte tokens + 48,894 merges + start + end
    hidden_size: int = 768  # ViT-L/14's text width
    intermediate_size: int = 3072  # 4 x width
    num_hidden_layers: int = 12
    num_attention_heads: int = 12  # 64 channels per head
    max_position_embeddings: int = 77  # CLIP's context length; SD 1.x pads every prompt to it
    hidden_act: str = "quick_gelu"  # a key of ACTIVATIONS
    layer_norm_eps: float = 1e-5  # PyTorch's LayerNorm default, which CLIP was trained with
    # Not used by the forward pass; written to config.json so that transformers' pooled output (the
    # hidden state at the end token) points at the right position.
    bos_token_id: int = 49406  # <|startoftext|>
    eos_token_id: int = 49407  # <|endoftext|>, also SD 1.x's padding token


class CLIPTextModel(nn.Module):
    """SD 1.x's text encoder: token ids [B, L] -> final-layer-normed hidden states [B, L, D].

    `model(None, inputs_embeds=E)` runs on token vectors E [B, L, D] given by the caller instead of
    the table lookup (positions are still added): textual inversion splices its learned vectors
    into E, and gradients flow back to them.
    """

    def __init__(self, config: CLIPTextConfig = None):
        super().__init__()
        self.config = config or CLIPTextConfig()
        # The wrapper exists only for the `text_model.` prefix of the checkpoint keys.
        self.text_model = CLIPTextTransformer(self.config)

    def embed_tokens(self, ids):
        """The rows of the token table for ids [B, L] -> [B, L, D] (no positions)."""
        vocab = self.config.vocab_size
        if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab}) but range over [{ids.min().item()}, "
                             f"{ids.max().item()}]: a token added to the tokenizer has no row in this table; "
                             "pass its vector through inputs_embeds.")
        return self.text_model.embeddings.token_embedding(ids)

    def forward(self, ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            if ids is None:
                raise ValueError("Pass token ids [B, L] or inputs_embeds [B, L, D] (or both).")
            if ids.dim() != 2:
                raise ValueError(f"token ids must be [batch, length], got shape {tuple(ids.shape)}.")
            inputs_embeds = self.embed_tokens(ids)
        shape, width = tuple(inputs_embeds.shape), self.config.hidden_size
        if len(shape) != 3 or shape[-1] != width:
            raise ValueError(f"inputs_embeds must be [batch, length, {width}], got shape {shape}.")
        if ids is not None and tuple(ids.shape) != shape[:2]:
            raise ValueError(f"ids {tuple(ids.shape)} and inputs_embeds {shape} disagree on [batch, "
                             "length]; inputs_embeds replaces the lookup of ids: their shapes must match.")
        # Learned vectors stay fp32 while the frozen model may be fp16/bf16: cast (differentiably).
        return self.text_model(inputs_embeds.to(self.text_model.final_layer_norm.weight.dtype))

