"""diffusers / transformers config.json files <-> minti's configs, and what SD 1.x is not.

A diffusers model folder describes each part in a config.json (unet/, vae/, text_encoder/) and
scheduler/scheduler_config.json. minti's model files keep only the hyperparameters their
architecture uses; this file translates both ways, and refuses, by name and with what it means,
every setting SD 1.x does not have (SD 2.x, SDXL, inpainting, LCM, GLIGEN...). Used by weights.py
when loading and saving, and by the tests that build diffusers' reference models.
"""
from dataclasses import asdict, fields

from ..clip import ACTIVATIONS, CLIPTextConfig
from ..schedulers import DDPM
from ..unet import RESNET_EPS, UNetConfig
from ..vae import VAEConfig


def from_diffusers_config(cls, d: dict):
    """`cls` (CLIPTextConfig, UNetConfig, VAEConfig or DDPM) from a diffusers / transformers config
    dict. Raises ValueError, saying what the model is, for anything SD 1.x does not have."""
    return READERS[cls](dict(d))


def to_diffusers_config(config) -> dict:
    """The config.json dict of a minti config (or of a DDPM) that diffusers / transformers read:
    `diffusers.UNet2DConditionModel(**d)` and the like accept it."""
    return WRITERS[type(config)](config)


def as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value  # as JSON has them


# ---------------------------------------------------------------------------------------------------
# The text encoder: transformers' CLIPTextModel config.json


def _clip_from(d: dict) -> CLIPTextConfig:
    if "text_config" in d:
        raise ValueError("This is the config of a whole CLIPModel (text and vision towers); "
                         "pass its d['text_config'] instead.")
    if d.get("model_type", "clip_text_model") != "clip_text_model":
        raise ValueError(f"model_type is {d['model_type']!r}, not 'clip_text_model': this config.json does "
                         "not describe a CLIP text encoder.")
    # transformers' own defaults for these are ViT-B/32's, not ours: insist on seeing them.
    shape_keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "max_position_embeddings"]
    missing = [k for k in shape_keys if k not in d]
    if missing:
        raise ValueError(f"config.json of the text encoder lacks {missing}; add them (see CLIPTextConfig).")
    if d.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
        raise ValueError(f"hidden_act={d['hidden_act']!r} is not supported: minti's CLIP knows "
                         f"{tuple(ACTIVATIONS)} (quick_gelu for OpenAI CLIP / SD 1.x, gelu for OpenCLIP / "
                         "SD 2.x).")
    if d.get("attention_dropout", 0.0) != 0.0:
        raise ValueError(f"attention_dropout={d['attention_dropout']}: minti's CLIP has no dropout (SD 1.x "
                         "uses 0.0); set it to 0.0 in config.json to use these weights.")
    if d["hidden_size"] % d["num_attention_heads"]:
        raise ValueError(f"hidden_size={d['hidden_size']} is not divisible by num_attention_heads="
                         f"{d['num_attention_heads']}; pick a head count that divides the width.")
    known = {k: d[k] for k in shape_keys + ["hidden_act", "layer_norm_eps"] if k in d}
    # Old SD 1.x configs carry the pre-2023 transformers ids (bos 0, eos 2); keep what is written.
    for k in ("bos_token_id", "eos_token_id"):
        if isinstance(d.get(k), int):
            known[k] = d[k]
    return CLIPTextConfig(**known)


def _clip_to(config: CLIPTextConfig) -> dict:
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **asdict(config),
            "attention_dropout": 0.0}


# ---------------------------------------------------------------------------------------------------
# The UNet: diffusers' UNet2DConditionModel config.json

# diffusers config keys whose value is fixed in SD 1.x, and what another value means.
SD1_FIXED = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn", "another mid block type"),
    "use_linear_projection": (False, "proj_in/proj_out are linear layers, as in SD 2.x"),
    "upcast_attention": (False, "attention upcast to fp32, as in SD 2.1"),
    "addition_embed_type": (None, "extra text/size embeddings, as in SDXL"),
    "addition_time_embed_dim": (None, "size-conditioning embeddings, as in SDXL"),
    "transformer_layers_per_block": (1, "several transformer layers per block, as in SDXL"),
    "reverse_transformer_layers_per_block": (None, "several transformer layers per block, as in SDXL"),
    "class_embed_type": (None, "a class / noise-level embedding (e.g. SD x4 upscaler, unCLIP)"),
    "num_class_embeds": (None, "a class embedding (e.g. SD x4 upscaler)"),
    "projection_class_embeddings_input_dim": (None, "a projected class embedding (SDXL, unCLIP)"),
    "class_embeddings_concat": (False, "a class embedding concatenated to the time embedding"),
    "encoder_hid_dim": (None, "a projection of the text features (Kandinsky, DeepFloyd IF)"),
    "encoder_hid_dim_type": (None, "a projection of the text features (Kandinsky, DeepFloyd IF)"),
    "time_cond_proj_dim": (None, "a guidance-scale embedding, as in LCM-distilled models"),
    "num_attention_heads": (None, "an explicit head count (diffusers itself refuses it)"),
    "dual_cross_attention": (False, "two text encoders' attention, as in Versatile Diffusion"),
    "only_cross_attention": (False, "cross-attention in place of self-attention"),
    "mid_block_only_cross_attention": (None, "cross-attention in place of self-attention"),
    "cross_attention_norm": (None, "a norm on the text context (unCLIP-style)"),
    "attention_type": ("default", "gated attention, as in GLIGEN"),
    "resnet_time_scale_shift": ("default", "scale-shift time conditioning, as in DeepFloyd IF / unCLIP"),
    "resnet_skip_time_act": (False, "no SiLU before time_emb_proj"),
    "resnet_out_scale_factor": (1.0, "rescaled ResNet outputs"),
    "time_embedding_type": ("positional", "a Fourier time embedding (score-SDE models)"),
    "time_embedding_dim": (None, "a time embedding wider than 4 x block_out_channels[0]"),
    "time_embedding_act_fn": (None, "an extra activation on the time embedding"),
    "timestep_post_act": (None, "an extra activation in the time MLP"),
    "conv_in_kernel": (3, "another conv_in kernel"),
    "conv_out_kernel": (3, "another conv_out kernel"),
    "center_input_sample": (False, "inputs rescaled to [-1, 1] first"),
    "flip_sin_to_cos": (True, "sin-first timestep embedding"),
    "freq_shift": (0, "shifted timestep frequencies"),
    "downsample_padding": (1, "another downsampling padding"),
    "mid_block_scale_factor": (1, "a rescaled mid block"),
    "act_fn": ("silu", "another activation than SiLU"),
    "norm_eps": (RESNET_EPS, "another GroupNorm eps"),
    "dropout": (0.0, "dropout in the ResNet blocks"),
}
# to_diffusers_config writes these SD 1.x values out (diffusers' defaults agree, but a config.json
# that states them reads better); the rest stay at diffusers' defaults.
WRITTEN = ("mid_block_type", "flip_sin_to_cos", "freq_shift", "act_fn", "norm_eps", "downsample_padding",
           "mid_block_scale_factor", "center_input_sample", "use_linear_projection", "upcast_attention",
           "dropout")
IGNORED = ("addition_embed_type_num_heads",)  # only read when addition_embed_type is set
OTHER_IN_CHANNELS = {
    9: "an inpainting model (latent + mask + masked-image latent)",
    8: "InstructPix2Pix (latent + source-image latent)",
    5: "SD 2 depth-to-image (latent + depth map)",
    7: "the SD x4 upscaler (latent + low-resolution image)",
}
DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")  # with / without spatial transformers
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


def _unet_from(d: dict) -> UNetConfig:
    if d.get("time_embedding_dim") == 4 * list(d.get("block_out_channels", UNetConfig.block_out_channels))[0]:
        d["time_embedding_dim"] = None  # states the default width explicitly
    for key, (sd1_value, meaning) in SD1_FIXED.items():
        if key in d and d[key] != sd1_value:
            raise ValueError(f"This UNet config has {key}={d[key]!r} (SD 1.x: {sd1_value!r}): {meaning}. "
                             "minti implements the SD 1.x UNet only.")
    if d.get("in_channels") in OTHER_IN_CHANNELS:
        raise ValueError(f"This UNet has in_channels={d['in_channels']}: it is "
                         f"{OTHER_IN_CHANNELS[d['in_channels']]}. minti runs text-to-image models "
                         "(in_channels=4) only.")
    for key in ("attention_head_dim", "layers_per_block", "cross_attention_dim"):
        if isinstance(d.get(key), (list, tuple)):  # diffusers allows one value per block
            if len(set(d[key])) != 1:
                raise ValueError(f"This UNet config has a per-block {key}={d[key]!r} (SD 2.x / SDXL "
                                 "style); SD 1.x uses one value for every block.")
            d[key] = d[key][0]
    names = {f.name for f in fields(UNetConfig)}
    unknown = [k for k in d if not k.startswith("_") and k not in names and k not in SD1_FIXED
               and k not in IGNORED and d[k] is not None and d[k] is not False]
    if unknown:
        raise ValueError(f"Unknown UNet config keys {unknown}: minti does not implement them "
                         "(SD 1.x has none of them).")
    for kind, allowed in [*((k, DOWN_TYPES) for k in d.get("down_block_types", ())),
                          *((k, UP_TYPES) for k in d.get("up_block_types", ()))]:
        if kind not in allowed:
            raise ValueError(f"UNetConfig: block type {kind!r} is not one SD 1.x has; use one of {allowed}")
    if d.get("layers_per_block", 1) < 1:
        raise ValueError(f"UNetConfig: layers_per_block must be >= 1, got {d['layers_per_block']}")
    # A key missing from config.json means diffusers' default; only these two differ from SD 1.x's.
    kwargs = {"cross_attention_dim": 1280, "sample_size": None}
    kwargs.update({k: d[k] for k in names if k in d})
    return UNetConfig(**kwargs)


def _unet_to(config: UNetConfig) -> dict:
    d = {k: as_list(v) for k, v in asdict(config).items()}
    d.update({k: v for k, (v, _) in SD1_FIXED.items() if k in WRITTEN})
    return d


# ---------------------------------------------------------------------------------------------------
# The VAE: diffusers' AutoencoderKL config.json


def _vae_from(d: dict) -> VAEConfig:
    n = len(d.get("block_out_channels", VAEConfig.block_out_channels))
    unsupported = {  # key: (the value SD 1.x has, what it would mean otherwise)
        "down_block_types": (["DownEncoderBlock2D"] * n, "other encoder block types"),
        "up_block_types": (["UpDecoderBlock2D"] * n, "other decoder block types"),
        "act_fn": ("silu", "another activation"),
        "use_quant_conv": (True, "a VAE without quant_conv"),
        "use_post_quant_conv": (True, "a VAE without post_quant_conv"),
        "shift_factor": (None, "a latent shift (SD 3 / Flux VAEs)"),
        "latents_mean": (None, "per-channel latent statistics (SDXL-style VAEs)"),
        "latents_std": (None, "per-channel latent statistics (SDXL-style VAEs)"),
    }
    for key, (want, meaning) in unsupported.items():
        got = d.get(key, want)
        if as_list(got) != want:
            raise ValueError(f"VAE config has {key}={got!r}: {meaning}, which minti's SD 1.x VAE does not "
                             f"implement. Use an SD 1.x VAE (e.g. the vae/ folder of SD 1.5).")
    # Everything else (_class_name, force_upcast, ...) does not change the computation.
    names = {f.name for f in fields(VAEConfig)}
    return VAEConfig(**{k: v for k, v in d.items() if k in names and v is not None})


def _vae_to(config: VAEConfig) -> dict:
    n = len(config.block_out_channels)
    return {**asdict(config), "block_out_channels": list(config.block_out_channels),
            "_class_name": "AutoencoderKL", "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "act_fn": "silu"}


# ---------------------------------------------------------------------------------------------------
# The noise schedule: diffusers' scheduler_config.json (DDPM, DDIM and PNDM read the same keys)


def _ddpm_from(d: dict) -> DDPM:
    def refuse(what, fix):
        raise ValueError(f"This scheduler config uses {what}, which minti does not implement. {fix}")

    if d.get("prediction_type", "epsilon") != "epsilon":
        refuse(f"prediction_type={d['prediction_type']!r}",
               "SD 2.x (768 px) models predict v ('v_prediction'); minti supports SD 1.x, which "
               "predicts the noise epsilon. Use an SD 1.x model.")
    if d.get("beta_schedule", "scaled_linear") != "scaled_linear":
        refuse(f"beta_schedule={d['beta_schedule']!r}", "SD 1.x uses 'scaled_linear'.")
    if d.get("trained_betas") is not None:
        refuse("trained_betas", "SD 1.x computes its betas from beta_start and beta_end.")
    if d.get("timestep_spacing", "leading") != "leading":
        refuse(f"timestep_spacing={d['timestep_spacing']!r}", "SD 1.x uses 'leading'.")
    if d.get("variance_type", "fixed_small") != "fixed_small":
        refuse(f"variance_type={d['variance_type']!r}", "SD 1.x uses 'fixed_small'.")
    for flag in ("clip_sample", "thresholding", "rescale_betas_zero_snr"):
        if d.get(flag, False):
            refuse(f"{flag}=True", f"SD 1.x sets {flag} to false; edit the config if this is SD 1.x.")
    return DDPM(num_train_timesteps=d.get("num_train_timesteps", 1000),
                beta_start=d.get("beta_start", 0.00085), beta_end=d.get("beta_end", 0.012),
                # Missing in some early SD 1.x configs; diffusers' SD pipeline forces it to 1 then.
                steps_offset=d.get("steps_offset", 1), set_alpha_to_one=d.get("set_alpha_to_one", False))


def _ddpm_to(ddpm: DDPM) -> dict:
    """A DDIMScheduler's: a diffusers pipeline loaded from a folder minti wrote then samples the way
    `sample.py` does by default."""
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": ddpm.num_train_timesteps,
            "beta_start": ddpm.beta_start, "beta_end": ddpm.beta_end, "beta_schedule": "scaled_linear",
            "trained_betas": None, "prediction_type": "epsilon", "clip_sample": False,
            "set_alpha_to_one": ddpm.set_alpha_to_one, "steps_offset": ddpm.steps_offset,
            "timestep_spacing": "leading"}


READERS = {CLIPTextConfig: _clip_from, UNetConfig: _unet_from, VAEConfig: _vae_from, DDPM: _ddpm_from}
WRITERS = {CLIPTextConfig: _clip_to, UNetConfig: _unet_to, VAEConfig: _vae_to, DDPM: _ddpm_to}
