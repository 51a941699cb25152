"""Read and write Stable Diffusion 1.x weights: the toy model, diffusers folders, original checkpoints.

minti's modules carry the diffusers / transformers state-dict key names, so a diffusers-format folder
(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) loads with no mapping. The one
other layout people download, the original CompVis/LDM single file (`v1-5-pruned-emaonly.safetensors`,
`sd-v1-4.ckpt`), goes through `ldm_key`: one small pure function from our key to its key, following
the index arithmetic of LDM's `openaimodel.py` / `model.py` (CompVis/stable-diffusion). Loading is
strict: every tensor is found exactly once, anything else in the file is an error, listed readably.
"""
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..clip import CLIPTextConfig, CLIPTextModel
from ..schedulers import DDPM
from ..unet import UNet, UNetConfig
from ..vae import VAE, VAEConfig
from .configs import OTHER_IN_CHANNELS, as_list, from_diffusers_config, to_diffusers_config
from .files import unreadable_torch_file, write_json
from .tokenizer_files import clip_tokenizer, read_clip_bpe, read_tokenizer_folder, write_tokenizer_folder

TOY_FOLDER = Path(__file__).resolve().parents[2] / "weights" / "toy"  # minti/io/ -> the repository
COMPONENTS = ("text_encoder", "unet", "vae")
MODEL_CLASSES = {  # component -> (config class, model class, its class name in a diffusers folder)
    "text_encoder": (CLIPTextConfig, CLIPTextModel, "CLIPTextModel"),
    "unet": (UNetConfig, UNet, "UNet2DConditionModel"),
    "vae": (VAEConfig, VAE, "AutoencoderKL"),
}
WEIGHT_NAMES = {"text_encoder": "model", "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}
# Where each component lives inside an LDM checkpoint (LatentDiffusion's attribute names).
LDM_PREFIX = {"text_encoder": "cond_stage_model.transformer.", "unet": "model.diffusion_model.",
              "vae": "first_stage_model."}
# Tensors an LDM checkpoint may hold that are not weights of the three models: the DDPM schedule
# buffers of LatentDiffusion (ddpm.py `register_schedule`), its learned-logvar stub, the EMA copy's
# bookkeeping, and the `position_ids` buffer that transformers < 4.31 saved with CLIP. `model_ema.*`
# weights are also allowed when the non-EMA weights are the ones loaded.
LDM_IGNORED = re.compile(
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod"
    r"|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2"
    r"|lvlb_weights|logvar|model_ema\.decay|model_ema\.num_updates"
    r"|cond_stage_model\.transformer\.text_model\.embeddings\.position_ids)")
FOLDER_IGNORED = re.compile(r"(text_model\.)?embeddings\.position_ids")  # the same buffer, in text_encoder/
SD1_PIPELINE = "StableDiffusionPipeline"
SHOW = 10  # how many keys of each kind a mismatch report lists


class WeightsError(ValueError):
    """The weights cannot be loaded as SD 1.x: another model family, a damaged file, a key mismatch."""


@dataclass
class StableDiffusion:
    """The five parts of an SD 1.x model, as `load` returns them."""

    tokenizer: object
    text_encoder: CLIPTextModel
    unet: UNet
    vae: VAE
    scheduler: DDPM
    latent_scale: float = 0.18215  # SD 1.x `scale_factor` (v1-inference.yaml); the VAE config's if given
    source: str = ""  # where it came from, in words


# ---------------------------------------------------------------------------------------------------
# The original (CompVis/LDM) layout

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}  # the VAE's ResNets otherwise keep their names
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _rename_head(rest, table):
    """Rename the leading module name of `rest` ("norm1.weight") through `table`."""
    for ours, theirs in table.items():
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    return rest


def ldm_key(component, key, config):
    """Our (diffusers) key -> the key of the same tensor in an original CompVis/LDM checkpoint.

    `config` is the component's diffusers config dict (`to_diffusers_config(model.config)`): the
    UNet's index arithmetic needs `layers_per_block` and which up blocks have attention, the VAE's
    needs the number of blocks. Pure; raises KeyError for a key that has no LDM counterpart.
    """
    if component == "text_encoder":  # the same transformers module, under LatentDiffusion's name
        return LDM_PREFIX[component] + key
    if component == "vae":
        return LDM_PREFIX[component] + _ldm_vae_key(key, len(config["block_out_channels"]))
    if component == "unet":
        return LDM_PREFIX[component] + _ldm_unet_key(key, config)
    raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")


def _ldm_vae_key(key, n):
    """A VAE key (of n resolution levels) under LDM's names, without the `first_stage_model.` prefix."""
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_rename_head(m[3], _VAE_RESNET)}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    # LDM stores the decoder's up blocks from the lowest resolution's index down: reversed.
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{_rename_head(m[3], _VAE_RESNET)}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename_head(m[3], _VAE_RESNET)}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{_rename_head(m[2], _VAE_ATTENTION)}"
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if re.fullmatch(r"(encoder\.conv_in|encoder\.conv_out|decoder\.conv_in|decoder\.conv_out"
                    r"|quant_conv|post_quant_conv)\.(weight|bias)", key):
        return key  # the same name in both
    raise KeyError(f"no LDM name for VAE key {key!r}")


def _ldm_unet_key(key, config):
    """A UNet key under LDM's names, without the `model.diffusion_model.` prefix."""
    # LDM numbers the UNet's layers consecutively: per resolution, its ResNet(+attention)
    # layers and then its down/upsampler, so one level spans layers_per_block + 1 indices.
    n = config["layers_per_block"] + 1
    head = next((h for h in _UNET_FIXED if key.startswith(h + ".")), None)
    if head:
        return _UNET_FIXED[head] + key[len(head):]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        return f"input_blocks.{n * int(m[1]) + int(m[3]) + 1}.{_in_layer(m[2], m[4])}"  # +1: conv_in is 0
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        return f"output_blocks.{n * int(m[1]) + int(m[3])}.{_in_layer(m[2], m[4])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{n * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        i = int(m[1])
        # The upsampler sits in the level's last layer, after its ResNet and its attention if any.
        slot = 2 if config["up_block_types"][i] == "CrossAttnUpBlock2D" else 1
        return f"output_blocks.{n * i + n - 1}.{slot}.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename_head(m[2], _RESNET)}"  # ResNet, attention, ResNet
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    raise KeyError(f"no LDM name for UNet key {key!r}")


def _in_layer(kind, rest):
    """The rest of a key inside one of LDM's UNet layers: its ResNet is slot 0, its attention slot 1."""
    return f"0.{_rename_head(rest, _RESNET)}" if kind == "resnets" else f"1.{rest}"


def ema_key(key):
    """LDM's name for the EMA copy of a UNet tensor: LitEma drops the dots (ldm/modules/ema.py)."""
    return "model_ema." + key[len("model."):].replace(".", "")


def _fit(tensor, shape):
    """`tensor` reshaped to `shape` when they differ only by trailing 1s (LDM's 1x1-conv attention
    projections in the VAE, [C, C, 1, 1], against diffusers' linear [C, C]); None if they differ more."""
    if tuple(tensor.shape[:len(shape)]) == tuple(shape) and all(s == 1 for s in tensor.shape[len(shape):]):
        return tensor.reshape(shape)  # the tensor itself, viewed, when the shapes are equal
    return None


def ldm_state_dict(sd):
    """The tensors of `sd` under their original LDM names (the inverse of loading a single file)."""
    out = {}
    for component in COMPONENTS:
        model = getattr(sd, component)
        config = to_diffusers_config(model.config)
        for key, tensor in model.state_dict().items():
            theirs = ldm_key(component, key, config)
            if component == "vae" and ".mid.attn_1." in theirs and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]  # LDM's AttnBlock uses 1x1 convolutions
            out[theirs] = tensor
    return out


def save_ldm(sd, path):
    """Write `sd` as one original-layout checkpoint (.safetensors), as the CompVis scripts name it."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in ldm_state_dict(sd).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------
# Reading tensor files


class _Tensors(Mapping):
    """Tensors under the names minti looks them up by, each read only when asked for (so the EMA half of
    a 7 GB checkpoint, or the parts of a model that are not needed, never sit in memory)."""

    def __init__(self, names, read):
        self._names, self._read = names, read  # {name: its name in the file}, file name -> tensor

    def __getitem__(self, key):
        return self._read(self._names[key])

    def __contains__(self, key):  # without this, Mapping would read the tensor to answer
        return key in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


def _safetensors_tensor(path, key):
    # The file is memory-mapped while it is open, and every page read stays in this process's resident
    # memory until it is closed: opened for each tensor, a 3.4 GB fp32 UNet never adds 3.4 GB to it.
    with safe_open(path, framework="pt", device="cpu") as file:
        return file.get_tensor(key)


def read_tensors(path):
    """The tensors in one weights file (.safetensors, or .ckpt/.bin/.pt read with weights_only=True).

    A `state_dict` entry (Lightning checkpoints nest the weights there, sometimes twice) is unwrapped
    and the other, non-tensor entries (epoch, global_step, ...) are dropped. Never runs pickled code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No weights file at {path}.")
    if path.suffix == ".safetensors":
        try:
            keys = sorted(safe_open(str(path), framework="pt", device="cpu").keys())
        except Exception as e:  # safetensors raises its own SafetensorError for a damaged header
            raise WeightsError(f"{path} is not a readable .safetensors file ({e}). It is probably truncated "
                               f"or corrupt (an interrupted download?): download it again.") from None
        return _Tensors(dict(zip(keys, keys)), lambda key: _safetensors_tensor(str(path), key))
    try:
        with warnings.catch_warnings():  # torch's note on a pickle protocol it does not expect: said below
            warnings.simplefilter("ignore", UserWarning)
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # pre-2020 (non-zip) format
    except Exception as e:  # our words, never torch's advice to retry with weights_only=False
        why = unreadable_torch_file(path, e)
        advice = ("minti reads .ckpt files with torch.load(weights_only=True), which never runs code; use "
                  "the .safetensors version of this model." if "refused" in why
                  else "Download it again, or use its .safetensors version.")
        raise WeightsError(f"{why}. {advice}") from None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a dictionary of tensors.")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _new_clip_names(tensors):
    """A checkpoint's tensors, with CLIP keys of old exports (cond_stage_model.transformer.encoder...,
    from before transformers wrapped the text model in `text_model`) given their current names."""
    old, new = LDM_PREFIX["text_encoder"], LDM_PREFIX["text_encoder"] + "text_model."
    names = {(new + k[len(old):] if k.startswith(old) and not k.startswith(new) else k): k for k in tensors}
    return _Tensors(names, tensors.__getitem__)


# ---------------------------------------------------------------------------------------------------
# Recognising other model families


def _refuse(what, evidence):
    raise WeightsError(f"This is {what}, not Stable Diffusion 1.x ({evidence}). minti implements SD 1.x only "
                       f"(a 768-wide CLIP ViT-L/14 text encoder, a 4-channel text-to-image UNet); use an "
                       f"SD 1.x model such as stable-diffusion-v1-5.")


def _check_ldm_family(tensors, name):
    """Refuse checkpoints of other families, naming what they are (the keys that give them away)."""
    keys = list(tensors)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        _refuse("an SDXL checkpoint", "its text encoders live under conditioner.embedders.*")
    if "model.diffusion_model.label_emb.0.0.weight" in tensors:
        _refuse("an SDXL-style checkpoint", "its UNet has an extra label/size embedding (label_emb)")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        _refuse("an SD 2.x checkpoint", "its text encoder is OpenCLIP ViT-H, cond_stage_model.model.*")
    unet = [k for k in keys if k.startswith(LDM_PREFIX["unet"])]
    if not unet:
        if any("lora" in k for k in keys):
            raise WeightsError(f"{name} is a LoRA, not a whole model: load an SD 1.x checkpoint instead.")
        if any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.")) for k in keys):
            raise WeightsError(f"{name} holds one diffusers component (diffusers key names), not an original "
                               f"checkpoint: pass the whole diffusers folder (with model_index.json).")
        raise WeightsError(f"{name} has no UNet weights (no model.diffusion_model.* keys), so it is not an "
                           f"original Stable Diffusion checkpoint (a standalone VAE, an embedding, another "
                           f"model?). Its first keys: {keys[:5]}")
    to_k = next((k for k in unet if k.endswith("attn2.to_k.weight")), None)
    if to_k is not None and tensors[to_k].shape[-1] == 1024:
        _refuse("an SD 2.x checkpoint", f"its cross-attention reads 1024-wide text: {to_k} is "
                f"{list(tensors[to_k].shape)}")
    conv_in = LDM_PREFIX["unet"] + "input_blocks.0.0.weight"
    if conv_in in tensors and tensors[conv_in].shape[1] != 4:
        channels = tensors[conv_in].shape[1]
        what = OTHER_IN_CHANNELS.get(channels, "a checkpoint of another UNet family")
        _refuse(what, f"its UNet takes {channels} input channels, SD 1.x text-to-image takes 4")
    proj_in = next((k for k in unet if k.endswith(".proj_in.weight")), None)
    if proj_in is not None and tensors[proj_in].ndim == 2:
        _refuse("an SD 2.x-style checkpoint", f"its transformers use linear proj_in ({proj_in})")


def _check_folder_family(index, configs):
    """The same refusal for a diffusers folder, from model_index.json and the component configs."""
    kind = index.get("_class_name", "")
    if kind != SD1_PIPELINE:
        if "XL" in kind:
            _refuse(f"a diffusers folder of an SDXL pipeline ({kind})", "model_index.json says so")
        if "Inpaint" in kind:
            _refuse(f"a diffusers folder of an inpainting pipeline ({kind})", "model_index.json says so")
        raise WeightsError(f"This diffusers folder holds a {kind or 'pipeline of unknown class'}, not a "
                           f"{SD1_PIPELINE}; minti loads SD 1.x text-to-image pipelines only.")
    unet, text = configs["unet"], configs["text_encoder"]
    if unet.get("addition_embed_type") is not None or "text_encoder_2" in index:
        _refuse("an SDXL model", "its UNet has addition_embed_type / a second text encoder")
    if unet.get("cross_attention_dim") == 1024 or text.get("hidden_size") == 1024:
        _refuse("an SD 2.x model", "its text encoder / cross-attention is 1024 wide")
    # Inpainting UNets (in_channels 9) and v-prediction schedulers: configs.py refuses them by name.


# ---------------------------------------------------------------------------------------------------
# What an LDM checkpoint's tensors reveal about its architecture


def _revealed_config(tensors, component):
    """The config fields (diffusers names) that the shapes in an LDM checkpoint give away cheaply.

    Head counts and GroupNorm groups cannot be read from weights: those come from SD 1.x or `config=`.
    """
    p = LDM_PREFIX[component]

    def shape(key):
        return tuple(tensors[p + key].shape)

    def found(pattern):  # the distinct values of the pattern's group over the component's keys
        return {m[1] for k in tensors if (m := re.match(re.escape(p) + pattern, k))}

    if component == "text_encoder":
        vocab, width = shape("text_model.embeddings.token_embedding.weight")
        layers = len(found(r"text_model\.encoder\.layers\.(\d+)\."))
        return {"vocab_size": vocab, "hidden_size": width, "num_hidden_layers": layers,
                "intermediate_size": shape("text_model.encoder.layers.0.mlp.fc1.weight")[0],
                "max_position_embeddings": shape("text_model.embeddings.position_embedding.weight")[0]}
    if component == "vae":
        levels = len(found(r"encoder\.down\.(\d+)\."))
        layers = len(found(r"encoder\.down\.0\.block\.(\d+)\."))
        widths = [shape(f"encoder.down.{i}.block.0.conv2.weight")[0] for i in range(levels)]
        return {"in_channels": shape("encoder.conv_in.weight")[1],
                "out_channels": shape("decoder.conv_out.weight")[0],
                "latent_channels": shape("post_quant_conv.weight")[0], "layers_per_block": layers,
                "block_out_channels": widths}
    # UNet: LDM's input blocks are conv_in, then per level `layers` ResNets and a downsampler
    # (none after the last level), so levels * (layers + 1) of them in all.
    levels = len(found(r"input_blocks\.(\d+)\.0\.op\.weight")) + 1
    n = (max(int(i) for i in found(r"input_blocks\.(\d+)\.")) + 1) // levels

    def attention(where, i):  # a spatial transformer in the layer's second slot
        return f"{p}{where}.{i}.1.proj_in.weight" in tensors

    firsts = [n * i + 1 for i in range(levels)]  # each level's first ResNet
    return {"in_channels": shape("input_blocks.0.0.weight")[1], "out_channels": shape("out.2.weight")[0],
            "layers_per_block": n - 1,
            "block_out_channels": [shape(f"input_blocks.{j}.0.out_layers.3.weight")[0] for j in firsts],
            "down_block_types": ["CrossAttnDownBlock2D" if attention("input_blocks", j) else "DownBlock2D"
                                 for j in firsts],
            "up_block_types": ["CrossAttnUpBlock2D" if attention("output_blocks", j - 1) else "UpBlock2D"
                               for j in firsts],
            "cross_attention_dim": shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]}


def _check_revealed(tensors, configs, given):
    """Compare the checkpoint's shapes with the configs it will be loaded with; say what differs."""
    lines = []
    for component in COMPONENTS:
        try:
            revealed = _revealed_config(tensors, component)
        except (KeyError, ValueError, IndexError):
            continue  # a layout too far off to read; the key-by-key comparison will list it
        want = configs[component]
        for field, value in revealed.items():
            said = as_list(want.get(field, value))
            if said != value:
                lines.append(f"  {component}.{field}: the file has {value}, the config says {said}")
    if lines and given:
        raise WeightsError("The checkpoint does not match the configs of config=:\n" + "\n".join(lines))
    if lines:
        raise WeightsError("This checkpoint is not SD 1.x-sized:\n" + "\n".join(lines) + "\nHead counts and "
                           "GroupNorm groups cannot be read from the weights, so minti will not guess them: "
                           "pass config=FOLDER, a diffusers folder (unet/, vae/, text_encoder/ config.json) "
                           "describing this model.")


# ---------------------------------------------------------------------------------------------------
# Building models and filling them


def _config(cls, config_dict, what):
    try:
        return from_diffusers_config(cls, config_dict)
    except ValueError as e:
        raise WeightsError(f"The {what} config is not SD 1.x's: {e}") from None


def _build(component, config_dict):
    """The component's model from a diffusers config dict, on the meta device (no memory, no init)."""
    config_class, model_class, _ = MODEL_CLASSES[component]
    config = _config(config_class, config_dict, component)
    with torch.device("meta"):
        return model_class(config)


def _fill(models, tensors, file_key, ignored, where, device, dtype):
    """Fill `models` ({component: model on the meta device}) from `tensors`, each of their keys looked up
    exactly once, as `file_key(component, key)`; strict: one error lists every missing, unexpected (but
    not `ignored`) and wrong-shaped key. Each tensor is cast (if floating) and moved as it is read: no
    full-precision copy of a model is ever held, on the host or on the device."""
    report, seen, states = {"missing": [], "unexpected": [], "wrong shape": []}, {}, {}
    for component, model in models.items():
        state = states[component] = {}
        for key, ours in model.state_dict().items():
            theirs = file_key(component, key)
            if theirs in seen:  # the map must be one-to-one: a bug in ldm_key if this ever fires
                raise AssertionError(f"{component}: {key} and {seen[theirs]} both map to {theirs}")
            seen[theirs] = key
            if theirs not in tensors:
                report["missing"].append(f"{component}.{key}" + (f" (file key {theirs})" * (theirs != key)))
                continue
            tensor = _fit(tensors[theirs], ours.shape)
            if tensor is None:
                shapes = f"file {list(tensors[theirs].shape)}, {component} expects {list(ours.shape)}"
                report["wrong shape"].append(f"{theirs}: {shapes}")
            else:
                cast = dtype[component] if tensor.is_floating_point() else None
                state[key] = tensor.to(dtype=cast).to(device)
    report["unexpected"] = [k for k in tensors if k not in seen and not ignored(k)]
    parts = [f"  {len(keys)} {kind}:\n    " + "\n    ".join(keys[:SHOW])
             + (f"\n    ... and {len(keys) - SHOW} more" if len(keys) > SHOW else "")
             for kind, keys in report.items() if keys]
    if parts:
        raise WeightsError(f"The weights in {where} do not fit SD 1.x's models:\n" + "\n".join(parts) +
                           "\nIs this an SD 1.x model, complete, and in the layout its name suggests?")
    for component, model in models.items():
        model.load_state_dict(states[component], strict=True, assign=True)
        left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:  # a non-persistent buffer would stay on the meta device: compute it in the module instead
            raise WeightsError(f"{component}: {left[:3]} were not filled by the weights (non-persistent?)")
    return {c: m.to(device=device, dtype=dtype[c]).eval() for c, m in models.items()}


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _dtypes(dtype):
    """{component: torch dtype} from one dtype (or name) for all, or a {component: dtype} mapping; None and
    components not named: float32."""
    named = dtype if isinstance(dtype, Mapping) else dict.fromkeys(COMPONENTS, dtype)
    if set(named) - set(COMPONENTS):
        raise ValueError(f"dtype names unknown components {sorted(set(named) - set(COMPONENTS))}; "
                         f"expected {COMPONENTS}")
    for d in named.values():
        if isinstance(d, str) and d not in DTYPES:
            raise ValueError(f"dtype {d!r} is not one of {sorted(DTYPES)}")
    return {c: DTYPES.get(named.get(c), named.get(c)) or torch.float32 for c in COMPONENTS}


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: not a complete diffusers folder.") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON ({e}).") from None


# ---------------------------------------------------------------------------------------------------
# Tokenizers


def _tokenizer_from(source):
    if not isinstance(source, (str, os.PathLike)):
        return source, "the tokenizer passed in"
    source = Path(source)
    if source.is_dir():
        return read_tokenizer_folder(source), f"the tokenizer folder {source}"
    if source.name.endswith(".txt.gz"):
        return read_clip_bpe(source), f"the BPE vocabulary {source}"
    raise FileNotFoundError(f"tokenizer={str(source)!r} is neither a folder (vocab.json + merges.txt) nor a "
                            f"CLIP bpe_simple_vocab_16e6.txt.gz file.")


def _single_file_tokenizer(tokenizer, path, config):
    """A single checkpoint has no tokenizer: the argument, a config folder's, one beside it, or CLIP's."""
    if tokenizer is not None:
        return _tokenizer_from(tokenizer)
    for folder in ([Path(config) / "tokenizer"] if config else []) + [path.parent / "tokenizer"]:
        if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
            return _tokenizer_from(folder)
    try:
        return clip_tokenizer(), "CLIP's standard vocabulary (from an installed open_clip / clip package)"
    except Exception as e:
        raise WeightsError(f"A single checkpoint file holds no tokenizer, and none was found: no tokenizer= "
                           f"argument, no tokenizer/ folder beside {path.name}, and CLIP's standard "
                           f"vocabulary is not available ({e}). Pass tokenizer=FOLDER (vocab.json + "
                           f"merges.txt, e.g. the tokenizer/ folder of stable-diffusion-v1-5) or install "
                           f"open-clip-torch.") from None


# ---------------------------------------------------------------------------------------------------
# Loading


def load(source="toy", device="cpu", dtype=None, tokenizer=None, config=None, ema=False):
    """Load an SD 1.x model: "toy", a diffusers-format folder, or one original checkpoint file.

    source: "toy" (weights/toy/ of this repository), a diffusers folder (model_index.json, unet/, vae/,
        text_encoder/, tokenizer/, scheduler/), or an original CompVis/LDM `.safetensors` / `.ckpt`.
    dtype: None means float32; float16 / bfloat16 (or "fp16", "bf16") cast every model; a mapping
        {"unet": ..., "text_encoder": ..., "vae": ...} casts each its own (float32 where not named).
        Weights are read on the CPU and cast and moved one tensor at a time.
    tokenizer: a Tokenizer or a folder for a single file (default: a tokenizer/ folder beside the
        file, else CLIP's standard vocabulary); it replaces a folder's own tokenizer if given.
    config: for a single file, a diffusers folder whose unet/vae/text_encoder/scheduler configs
        describe it (default: SD 1.x's, checked against the shapes in the file).
    ema: for a single file holding both, load the EMA UNet weights (`model_ema.*`) instead of the
        plain ones. Off by default, as diffusers' single-file loader (`extract_ema=False`) and
        AUTOMATIC1111 do; released "-emaonly" files already hold the EMA weights as the plain ones.
    Returns a StableDiffusion with models in eval mode on `device`.
    """
    dtype = _dtypes(dtype)
    if isinstance(source, str) and source == "toy":
        if not (TOY_FOLDER / "model_index.json").is_file():
            raise FileNotFoundError(f"The toy model is not built/committed yet: {TOY_FOLDER} has no "
                                    f"model_index.json. Build it with `python -m minti.toy.model`, or pass "
                                    f"a diffusers folder or an SD 1.x checkpoint file as the source.")
        return _load_folder(TOY_FOLDER, device, dtype, tokenizer, what="the toy model")
    path = Path(source)
    if path.is_dir():
        return _load_folder(path, device, dtype, tokenizer, what=f"the diffusers folder {path}")
    if path.is_file():
        return _load_single_file(path, device, dtype, tokenizer, config, ema)
    raise FileNotFoundError(f"No model at {str(source)!r}: give 'toy', a diffusers folder (with "
                            f"model_index.json) or a checkpoint file (.safetensors / .ckpt).")


def _weights_file(folder, base):
    """The weights file of a diffusers component folder: plain safetensors, plain .bin, then fp16."""
    names = [f"{base}.safetensors", f"{base}.bin", f"{base}.fp16.safetensors", f"{base}.fp16.bin"]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.glob("*") if p.suffix in (".safetensors", ".bin"))
    raise FileNotFoundError(f"No weights in {folder}: expected one of {names}; found {found or 'none'}")


def _folder_file_key(component, key, file_keys):
    """Our key -> its key in a diffusers folder: the same, but for two older spellings."""
    if component == "text_encoder" and key not in file_keys and key.startswith("text_model."):
        return key[len("text_model."):]  # transformers >= 5 saves CLIPTextModel without the prefix
    if component == "vae" and key not in file_keys:
        # diffusers < 0.14 named the VAE's mid-block attention query/key/value/proj_attn
        old = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
        for new, was in old.items():
            if f".attentions.0.{new}" in key:
                return key.replace(new, was)
    return key


def _read_configs(folder):
    """The config dicts of a diffusers folder: {component: its config.json, "scheduler": ...}."""
    configs = {c: _read_json(folder / c / "config.json") for c in COMPONENTS}
    return {**configs, "scheduler": _read_json(folder / "scheduler" / "scheduler_config.json")}


def _load_folder(folder, device, dtype, tokenizer, what):
    index = _read_json(folder / "model_index.json")
    configs = _read_configs(folder)
    _check_folder_family(index, configs)
    scheduler = _config(DDPM, configs["scheduler"], "scheduler")
    models = {c: _build(c, configs[c]) for c in COMPONENTS}  # every config checked before weights are read
    for component in COMPONENTS:
        file = _weights_file(folder / component, WEIGHT_NAMES[component])
        tensors = read_tensors(file)
        file_key = lambda c, k: _folder_file_key(c, k, tensors)  # noqa: E731
        models.update(_fill({component: models[component]}, tensors, file_key, FOLDER_IGNORED.fullmatch,
                            file, device, dtype))
    tok, said = _tokenizer_from(folder / "tokenizer" if tokenizer is None else tokenizer)
    latent_scale = models["vae"].config.scaling_factor
    return StableDiffusion(tok, **models, scheduler=scheduler, latent_scale=latent_scale,
                           source=f"{what}; tokenizer: {said}")


def _load_single_file(path, device, dtype, tokenizer, config, ema):
    tensors = _new_clip_names(read_tensors(path))
    _check_ldm_family(tensors, path.name)

    if config is not None:
        configs = _read_configs(Path(config))
    else:  # SD 1.x's own configs (the dataclass defaults)
        configs = {c: to_diffusers_config(MODEL_CLASSES[c][0]()) for c in COMPONENTS}
        configs["scheduler"] = to_diffusers_config(DDPM())
    _check_revealed(tensors, configs, given=config is not None)
    scheduler = _config(DDPM, configs["scheduler"], "scheduler")
    _check_schedule(tensors, scheduler, path.name)

    has_ema = any(k.startswith("model_ema.") and not LDM_IGNORED.fullmatch(k) for k in tensors)
    if ema and not has_ema:
        raise WeightsError(f"ema=True, but {path.name} holds no EMA weights (model_ema.* keys); its "
                           f"model.diffusion_model.* weights are its only UNet weights: load with ema=False.")
    models = {c: _build(c, configs[c]) for c in COMPONENTS}
    ldm_configs = {c: to_diffusers_config(m.config) for c, m in models.items()}  # every field ldm_key reads

    def file_key(component, key):
        theirs = ldm_key(component, key, ldm_configs[component])
        return ema_key(theirs) if ema and component == "unet" else theirs

    # The unused copy of the UNet (EMA or not) may stay in the file; nothing else may.
    spare = re.compile(r"model\.diffusion_model\." if ema else r"model_ema\.")
    models = _fill(models, tensors, file_key, lambda k: LDM_IGNORED.fullmatch(k) or spare.match(k), path,
                   device, dtype)

    tok, said = _single_file_tokenizer(tokenizer, path, config)
    if ema:
        unet = "its EMA UNet weights"
    else:
        unet = "its non-EMA UNet weights; ema=True loads the EMA copy" if has_ema else "no EMA copy in it"
    configs_from = config if config is not None else "SD 1.x"
    description = f"the checkpoint {path} ({unet}; configs from {configs_from}); tokenizer: {said}"
    print(f"minti.load: {description}")
    return StableDiffusion(tok, **models, scheduler=scheduler,
                           latent_scale=models["vae"].config.scaling_factor, source=description)


def _check_schedule(tensors, scheduler, name):
    """LDM checkpoints carry their training noise schedule; it must be the one we will sample with."""
    if "alphas_cumprod" not in tensors:
        return
    theirs = tensors["alphas_cumprod"].double()
    ours = scheduler.alphas_cumprod.double()
    # LDM computed the schedule in float64, diffusers (and minti) in float32: agree to ~1e-6.
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-4, atol=1e-6):
        raise WeightsError(f"{name} was trained with another noise schedule than SD 1.x's scaled-linear "
                           f"0.00085..0.012 over 1000 steps (its alphas_cumprod differ): not SD 1.x.")


# ---------------------------------------------------------------------------------------------------
# Writing a diffusers folder


def save_diffusers_folder(sd, folder):
    """Write `sd` as a diffusers-format folder that `minti.load` and diffusers' StableDiffusionPipeline
    .from_pretrained both read. Atomic: written beside `folder`, then renamed into place; an existing
    `folder` is replaced only if it is empty or itself a diffusers model folder."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not (folder / "model_index.json").is_file():
        raise FileExistsError(f"{folder} exists and is not a diffusers model folder; refusing to replace it.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    old = tmp.with_name(tmp.name + ".old")  # where the folder it replaces waits until the new one is in
    try:
        _write_diffusers(sd, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        if folder.exists():
            os.rename(folder, old)
        os.rename(tmp, folder)
    except BaseException:
        if old.exists() and not folder.exists():
            os.rename(old, folder)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_diffusers(sd, folder):
    # Components that SD 1.x pipelines may have and minti does not write are null, as diffusers writes them.
    index = {"_class_name": SD1_PIPELINE, "_diffusers_version": "0.30.0",  # any recent diffusers reads it
             "feature_extractor": [None, None], "image_encoder": [None, None], "safety_checker": [None, None],
             "requires_safety_checker": False, "scheduler": ["diffusers", "DDIMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    write_json(folder / "model_index.json", index, sort_keys=True)
    for component in COMPONENTS:
        model = getattr(sd, component)
        (folder / component).mkdir()
        config = to_diffusers_config(model.config)
        if component != "text_encoder":
            config.setdefault("_class_name", MODEL_CLASSES[component][2])
        if component == "vae":
            config["scaling_factor"] = sd.latent_scale  # the model's latent scale is the one that counts
        write_json(folder / component / "config.json", config, sort_keys=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(folder / component / f"{WEIGHT_NAMES[component]}.safetensors"),
                  metadata={"format": "pt"})
    (folder / "scheduler").mkdir()
    # DDIM: what minti samples with by default (SD 1.x's own folders name PNDM, with the same schedule)
    write_json(folder / "scheduler" / "scheduler_config.json", to_diffusers_config(sd.scheduler), sort_keys=True)
    write_tokenizer_folder(sd.tokenizer, folder / "tokenizer")

