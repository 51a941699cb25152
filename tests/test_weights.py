"""minti.io.weights against diffusers / transformers: folders, original checkpoints, errors, writing.

The original-layout key map is checked against an independent authority, diffusers' own LDM
converters (diffusers.loaders.single_file_utils), at SD 1.5 size (names and shapes, on the meta
device) and at a small size with real values. Loaded models are compared with a tiny random
diffusers pipeline, weight for weight (bit-exact) and output for output (fp32, relative error
<= 1e-5 of the output's largest magnitude).
"""
import copy
import dataclasses
import json
import shutil
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import minti
from minti.io import weights as W
from minti.clip import CLIPTextConfig, CLIPTextModel
from minti.io.configs import to_diffusers_config
from minti.unet import UNet, UNetConfig
from minti.vae import VAE, VAEConfig
from minti.io.weights import WeightsError

import diffusers  # noqa: E402
import transformers  # noqa: E402
import diffusers.loaders.single_file_utils as su  # noqa: E402

TOL = 1e-5  # max |minti - reference| / max |reference|, fp32, same weights
PROMPTS = ["a photo of the cat", "the sky!", "cat " * 90]  # short, shorter, truncated at 77

# A small config that uses every block type SD 1.x uses, with layers_per_block=1 (SD 1.x: 2) and three
# levels so that the index arithmetic and the VAE's reversed up blocks are exercised off SD 1.x's numbers.
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
VAE_CFG = dict(in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1,
               down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
               latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=0.25)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)


# ---------------------------------------------------------------------------------------------------
# Fixtures: a tiny CLIP vocabulary and a tiny random diffusers pipeline saved with save_pretrained


def bytes_to_unicode():
    """GPT-2 / CLIP's table of printable stand-ins for the 256 bytes (the vocabulary's alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_tiny_vocab(folder):
    """vocab.json + merges.txt in CLIP's layout: bytes, bytes + </w>, a few merges, start, end."""
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("p", "h"), ("ph", "o"),
              ("pho", "t"), ("phot", "o</w>"), ("o", "f</w>"), ("s", "k"), ("sk", "y</w>")]
    chars = bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return len(tokens)


@torch.no_grad()
def perturb(model):
    """Make every tensor distinct (GroupNorm weights all 1, biases all 0 would hide a swapped key)."""
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A tiny random StableDiffusionPipeline, saved by diffusers itself."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("weights")
    vocab = root / "vocab"
    n_tokens = write_tiny_vocab(vocab)
    tokenizer = transformers.CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"),
                                           model_max_length=77)
    text_config = transformers.CLIPTextConfig(vocab_size=n_tokens, hidden_size=32, intermediate_size=37,
                                              num_hidden_layers=2, num_attention_heads=4,
                                              max_position_embeddings=77, bos_token_id=n_tokens - 2,
                                              eos_token_id=n_tokens - 1)
    pipe = diffusers.StableDiffusionPipeline(
        vae=perturb(diffusers.AutoencoderKL(**VAE_CFG)),
        text_encoder=perturb(transformers.CLIPTextModel(text_config)),
        tokenizer=tokenizer, unet=perturb(diffusers.UNet2DConditionModel(**UNET)),
        scheduler=diffusers.DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    folder = root / "pipe"
    pipe.save_pretrained(folder)
    return types.SimpleNamespace(root=root, folder=folder, pipe=pipe, vocab=vocab)


@pytest.fixture(scope="module")
def loaded(ref):
    return minti.load(ref.folder)


@pytest.fixture(scope="module")
def ldm_file(ref, loaded):
    """The tiny model written as one original-layout checkpoint by minti's own map."""
    path = ref.root / "single" / "tiny-ldm.safetensors"
    path.parent.mkdir()
    W.save_ldm(loaded, path)
    return path


def reference_state(ref, component):
    """The reference component's state dict under minti's names (transformers 5 drops `text_model.`)."""
    sd = getattr(ref.pipe, component).state_dict()
    if component == "text_encoder":
        sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}
    return sd


def assert_weights_equal(ref, sd, cast=None):
    """Every tensor of every component bit-identical to the reference (after `cast`, if given)."""
    for component in W.COMPONENTS:
        ours, theirs = getattr(sd, component).state_dict(), reference_state(ref, component)
        assert set(ours) == set(theirs), component
        for key, value in theirs.items():
            expected = value if cast is None else value.to(cast)
            assert ours[key].dtype == expected.dtype, f"{component}.{key}"
            assert torch.equal(ours[key], expected), f"{component}.{key}"


def rel_err(ours, theirs):
    return ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max()).item()


# ---------------------------------------------------------------------------------------------------
# (1) The LDM key map against diffusers' converters


def sd15_ldm_config():
    """configs/stable-diffusion/v1-inference.yaml (CompVis/stable-diffusion), the parts diffusers reads."""
    return {"model": {"params": {"scale_factor": 0.18215, "unet_config": {"params": {
        "in_channels": 4, "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1],
        "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8, "transformer_depth": 1,
        "context_dim": 768, "use_linear_in_transformer": False}},
        "first_stage_config": {"params": {"ddconfig": {
            "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
            "z_channels": 4}}}}}}


def converted_back(ldm, unet_config, vae_config):
    """diffusers' reading of an LDM state dict: {component: state dict under diffusers' names}."""
    return {"unet": su.convert_ldm_unet_checkpoint(ldm, unet_config),
            "vae": su.convert_ldm_vae_checkpoint(ldm, vae_config),
            "text_encoder": su.convert_ldm_clip_checkpoint(ldm)}


def test_ldm_key_map_sd15_size_matches_diffusers_converters():
    with torch.device("meta"):  # names and shapes only: 1.1 billion parameters cost no memory here
        sd = types.SimpleNamespace(unet=UNet(UNetConfig()), vae=VAE(VAEConfig()),
                                   text_encoder=CLIPTextModel(CLIPTextConfig()))
    ldm = W.ldm_state_dict(sd)
    # SD 1.5's own LDM config, read by diffusers' config builders, describes minti's default configs.
    original = sd15_ldm_config()
    unet_config = su.create_unet_diffusers_config_from_ldm(original, ldm)
    vae_config = su.create_vae_diffusers_config_from_ldm(original, ldm)
    plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    ours = to_diffusers_config(sd.unet.config)
    for key in ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
                "cross_attention_dim", "attention_head_dim", "down_block_types", "up_block_types"):
        assert plain(unet_config[key]) == plain(ours[key]), key
    ours = to_diffusers_config(sd.vae.config)
    for key in ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
                "scaling_factor", "down_block_types", "up_block_types"):
        assert plain(vae_config[key]) == plain(ours[key]), key
    assert su.infer_diffusers_model_type(ldm) == "v1"  # diffusers recognises the layout as SD 1.x
    back = converted_back(ldm, unet_config, vae_config)
    assert len(ldm) == sum(len(v) for v in back.values())  # nothing dropped, nothing used twice
    for component, state in back.items():
        ours = getattr(sd, component).state_dict()
        assert set(state) == set(ours), component
        for key, value in ours.items():
            assert state[key].shape == value.shape, f"{component}.{key}"


def test_ldm_key_map_small_config_gives_the_original_tensors_back(loaded):
    ldm = W.ldm_state_dict(loaded)
    unet_config = to_diffusers_config(loaded.unet.config)
    back = converted_back(ldm, unet_config, to_diffusers_config(loaded.vae.config))
    for component, state in back.items():
        ours = getattr(loaded, component).state_dict()
        assert set(state) == set(ours), component
        for key, value in ours.items():
            assert torch.equal(state[key], value), f"{component}.{key}"
    # The EMA naming too: diffusers' extract_ema reads model_ema.<key without dots>.
    unet_keys = [k for k in ldm if k.startswith("model.diffusion_model.")]
    assert len(unet_keys) > 100  # diffusers only looks for EMA weights above 100 of them
    with_ema = dict(ldm, **{W.ema_key(k): ldm[k] + 1 for k in unet_keys})
    ema = su.convert_ldm_unet_checkpoint(with_ema, unet_config, extract_ema=True)
    for key, value in loaded.unet.state_dict().items():
        assert torch.equal(ema[key], value + 1), key


@pytest.mark.parametrize("component, ours, theirs", [  # SD 1.x names, as in v1-5-pruned.safetensors
    ("unet", "down_blocks.1.resnets.0.conv_shortcut.weight", "input_blocks.4.0.skip_connection.weight"),
    ("unet", "down_blocks.2.downsamplers.0.conv.bias", "input_blocks.9.0.op.bias"),
    ("unet", "up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.1.conv.weight"),
    ("unet", "up_blocks.1.upsamplers.0.conv.weight", "output_blocks.5.2.conv.weight"),
    ("unet", "mid_block.resnets.1.time_emb_proj.weight", "middle_block.2.emb_layers.1.weight"),
    ("vae", "decoder.up_blocks.0.resnets.2.norm1.weight", "decoder.up.3.block.2.norm1.weight"),
    ("vae", "encoder.mid_block.attentions.0.to_out.0.weight", "encoder.mid.attn_1.proj_out.weight"),
])
def test_ldm_key_spot_checks(component, ours, theirs):
    config = to_diffusers_config({"unet": UNetConfig(), "vae": VAEConfig()}[component])
    assert W.ldm_key(component, ours, config) == W.LDM_PREFIX[component] + theirs


def test_ldm_key_refuses_keys_sd1_does_not_have():
    with pytest.raises(KeyError):
        W.ldm_key("unet", "add_embedding.linear_1.weight", to_diffusers_config(UNetConfig()))


# ---------------------------------------------------------------------------------------------------
# (2) Loading gives diffusers' models: folders and single files


def assert_outputs_equal(ref, sd):
    """Tokenizer ids, text features, UNet noise and VAE mean/logvar/decoding equal diffusers'."""
    pipe = ref.pipe
    ids = sd.tokenizer(PROMPTS, length=77)
    expected = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
    assert torch.equal(ids, expected)
    with torch.no_grad():
        context = sd.text_encoder(ids)
        assert rel_err(context, pipe.text_encoder(ids).last_hidden_state) <= TOL
        torch.manual_seed(1)
        x, t = torch.randn(3, 4, 8, 12), torch.tensor([1, 500, 999])  # non-square, one t per sample
        assert rel_err(sd.unet(x, t, context), pipe.unet(x, t, encoder_hidden_states=context).sample) <= TOL
        image = torch.rand(2, 3, 16, 24) * 2 - 1
        mean, logvar = sd.vae.encode(image)
        dist = pipe.vae.encode(image).latent_dist
        assert rel_err(mean, dist.mean) <= TOL and rel_err(logvar, dist.logvar) <= TOL
        assert rel_err(sd.vae.decode(mean), pipe.vae.decode(dist.mean).sample) <= TOL
    assert torch.equal(sd.scheduler.alphas_cumprod, pipe.scheduler.alphas_cumprod)


def test_load_diffusers_folder_equals_diffusers(ref, loaded):
    assert_weights_equal(ref, loaded)
    assert_outputs_equal(ref, loaded)
    assert loaded.latent_scale == 0.25  # the VAE config's scaling_factor
    assert all(not m.training for m in (loaded.text_encoder, loaded.unet, loaded.vae))


def copy_folder(ref, name):
    folder = ref.root / name
    shutil.copytree(ref.folder, folder)
    return folder


def rewrite(path, fn):
    save_file(fn(load_file(str(path))), str(path), metadata={"format": "pt"})


def test_load_folder_variants_bin_fp16_and_old_names(ref):
    # .bin weights (torch.save), read with weights_only=True
    folder = copy_folder(ref, "bin")
    for f in folder.glob("*/*.safetensors"):
        torch.save(load_file(str(f)), f.with_suffix(".bin"))
        f.unlink()
    assert_weights_equal(ref, minti.load(folder))
    # fp16 variant files only: taken; and loaded in fp16 when asked (fp32 by default)
    folder = copy_folder(ref, "fp16")
    for f in folder.glob("*/*.safetensors"):
        half = {k: v.half() for k, v in load_file(str(f)).items()}
        save_file(half, str(f.with_suffix(".fp16.safetensors")))
        f.unlink()
    assert_weights_equal(ref, minti.load(folder, dtype=torch.float16), cast=torch.float16)
    sd = minti.load(folder)
    assert sd.unet.conv_in.weight.dtype == torch.float32
    assert torch.equal(sd.unet.conv_in.weight, ref.pipe.unet.conv_in.weight.half().float())
    # plain and fp16 side by side: the plain (full-precision) file wins
    for f in ref.folder.glob("*/*.safetensors"):
        shutil.copy(f, folder / f.parent.name / f.name)
    assert_weights_equal(ref, minti.load(folder))
    # old diffusers VAE attention names, and CLIP keys with the `text_model.` prefix (transformers < 5)
    folder = copy_folder(ref, "old-names")
    old = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}

    def old_vae(sd):
        out = {}
        for k, v in sd.items():
            for new, was in old.items():
                k = k.replace(f"attentions.0.{new}", f"attentions.0.{was}")
            out[k] = v
        return out
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    rewrite(vae_file, old_vae)
    assert "decoder.mid_block.attentions.0.query.weight" in load_file(str(vae_file))
    position_ids = {"embeddings.position_ids": torch.arange(77)[None]}  # saved by transformers < 4.31
    rewrite(folder / "text_encoder" / "model.safetensors",
            lambda sd: {"text_model." + k: v for k, v in dict(sd, **position_ids).items()})
    assert_weights_equal(ref, minti.load(folder))


def test_load_bf16(ref):
    sd = minti.load(ref.folder, dtype="bf16")
    assert_weights_equal(ref, sd, cast=torch.bfloat16)
    theirs = copy.deepcopy(ref.pipe.unet).to(torch.bfloat16)  # diffusers' own UNet, cast as ours
    with torch.no_grad():
        torch.manual_seed(2)
        x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 32)
        out = sd.unet(x, t, ctx)  # fp32 inputs, cast by the UNet
        assert out.dtype == torch.bfloat16
        # the same bf16 network through diffusers: the same numbers (measured: identical)
        expected = theirs(x.bfloat16(), t, encoder_hidden_states=ctx.bfloat16()).sample
        assert torch.equal(out, expected), f"relative error {rel_err(out, expected):.2e}"
        # and bf16 (8 mantissa bits) really ran: off the fp32 output, coarsely (measured: 1.6e-2)
        error = rel_err(out, ref.pipe.unet(x, t, encoder_hidden_states=ctx).sample)
        assert 1e-4 < error < 4e-2, error


def test_load_single_file_equals_diffusers(ref, ldm_file, capsys):
    sd = minti.load(ldm_file, config=ref.folder)
    assert_weights_equal(ref, sd)
    assert_outputs_equal(ref, sd)
    out = capsys.readouterr().out
    assert "tokenizer: the tokenizer folder" in out and str(ref.folder) in out  # says which it used
    # diffusers reads the same file (offline, with the same configs) into the same models
    pipe = diffusers.StableDiffusionPipeline.from_single_file(str(ldm_file), config=str(ref.folder),
                                                              local_files_only=True)
    for component in W.COMPONENTS:
        theirs = getattr(pipe, component).state_dict()
        for key, value in reference_state(ref, component).items():
            key = key if key in theirs else key[len("text_model."):]
            assert torch.equal(theirs[key], value), f"{component}.{key}"


def ldm_tensors(ldm_file):
    return dict(load_file(str(ldm_file)))


def test_single_file_ckpt_nesting_fp16_old_clip_and_extras(ref, ldm_file):
    tensors = ldm_tensors(ldm_file)
    folder = ldm_file.parent
    # .ckpt, weights nested twice under state_dict, with Lightning's non-tensor entries beside them
    torch.save({"state_dict": {"state_dict": tensors}, "global_step": 470000, "epoch": 6}, folder / "a.ckpt")
    assert_weights_equal(ref, minti.load(folder / "a.ckpt", config=ref.folder))
    # fp16 file; the schedule buffers LDM stores (computed as LDM does, in float64), logvar,
    # position_ids, and CLIP keys without `text_model.` (old exports): all accepted
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    old = "cond_stage_model.transformer."
    extras = {"betas": betas, "alphas_cumprod": torch.cumprod(1 - betas, 0), "logvar": torch.zeros(1000),
              old + "embeddings.position_ids": torch.arange(77)[None]}
    half = {k.replace(old + "text_model.", old): v.half() for k, v in tensors.items()}
    save_file(dict(half, **extras), str(folder / "b.safetensors"))
    sd = minti.load(folder / "b.safetensors", config=ref.folder)
    for component in W.COMPONENTS:
        ours = getattr(sd, component).state_dict()
        for key, value in reference_state(ref, component).items():
            assert ours[key].dtype == torch.float32 and torch.equal(ours[key], value.half().float()), key
    # another schedule is refused
    save_file(dict(tensors, alphas_cumprod=torch.cumprod(1 - betas * 2, 0)), str(folder / "c.safetensors"))
    with pytest.raises(WeightsError, match="noise schedule"):
        minti.load(folder / "c.safetensors", config=ref.folder)


def test_single_file_ema(ref, ldm_file, capsys):
    tensors = ldm_tensors(ldm_file)
    unet = [k for k in tensors if k.startswith("model.diffusion_model.")]
    ema = {W.ema_key(k): tensors[k] * 2 for k in unet}
    bookkeeping = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(5)}
    save_file(dict(tensors, **ema, **bookkeeping), str(ldm_file.parent / "ema.safetensors"))
    sd = minti.load(ldm_file.parent / "ema.safetensors", config=ref.folder)  # default: the non-EMA weights
    assert_weights_equal(ref, sd)
    assert "non-EMA" in capsys.readouterr().out and "non-EMA" in sd.source
    sd = minti.load(ldm_file.parent / "ema.safetensors", config=ref.folder, ema=True)
    for key, value in reference_state(ref, "unet").items():
        assert torch.equal(sd.unet.state_dict()[key], value * 2), key
    assert torch.equal(sd.vae.encoder.conv_in.weight, ref.pipe.vae.encoder.conv_in.weight)
    with pytest.raises(WeightsError, match="no EMA weights"):
        minti.load(ldm_file, config=ref.folder, ema=True)


def test_single_file_tokenizer_choices(ref, ldm_file, capsys, clip_bpe_path):
    tok = minti.load(ref.folder).tokenizer
    sd = minti.load(ldm_file, config=ref.folder, tokenizer=tok)
    assert sd.tokenizer is tok and "the tokenizer passed in" in capsys.readouterr().out
    sd = minti.load(ldm_file, config=ref.folder, tokenizer=ref.vocab)
    assert torch.equal(sd.tokenizer(PROMPTS), tok(PROMPTS))
    # a tokenizer/ folder beside the file is found (no config folder to take one from)
    lone = ref.root / "lone"
    lone.mkdir()
    shutil.copy(ldm_file, lone / "m.safetensors")
    shutil.copytree(ref.vocab, lone / "tokenizer")
    found, said = W._single_file_tokenizer(None, lone / "m.safetensors", None)
    assert str(lone / "tokenizer") in said and torch.equal(found(PROMPTS), tok(PROMPTS))
    # and nothing beside it: CLIP's standard vocabulary (49,408 tokens), said so
    (lone / "tokenizer" / "vocab.json").unlink()
    found, said = W._single_file_tokenizer(None, lone / "m.safetensors", None)
    assert len(found) == 49408 and "CLIP's standard vocabulary" in said


# ---------------------------------------------------------------------------------------------------
# (3) A clear error for each wrong input


def fake_file(ldm_file, name, change):
    tensors = ldm_tensors(ldm_file)
    change(tensors)
    path = ldm_file.parent / name
    save_file(tensors, str(path))
    return path


def test_other_families_are_refused_by_name(ref, ldm_file):
    p = "model.diffusion_model."
    to_k = next(k for k in ldm_tensors(ldm_file) if k.endswith("attn2.to_k.weight"))
    cases = {
        "SD 2.x": lambda t: t.update({"cond_stage_model.model.token_embedding.weight": torch.zeros(8, 1024)}),
        "SD 2.x checkpoint": lambda t: t.update({to_k: torch.zeros(t[to_k].shape[0], 1024)}),
        "SDXL": lambda t: t.update({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight":
                                    torch.zeros(768)}),
        "SDXL-style": lambda t: t.update({p + "label_emb.0.0.weight": torch.zeros(4, 4)}),
        "inpainting": lambda t: t.update({p + "input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)}),
    }
    for i, (name, change) in enumerate(cases.items()):
        with pytest.raises(WeightsError, match=f"This is an? {name}"):
            minti.load(fake_file(ldm_file, f"family{i}.safetensors", change), config=ref.folder)
    lora = ldm_file.parent / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.lora_up.weight": torch.zeros(4, 4)}, str(lora))
    with pytest.raises(WeightsError, match="LoRA"):
        minti.load(lora)


def test_other_folder_families_are_refused(ref):
    def edited(name, path, **changes):
        folder = ref.root / name
        if not folder.exists():
            shutil.copytree(ref.folder, folder, ignore=shutil.ignore_patterns("*.safetensors"))
        config = json.loads((folder / path).read_text())
        config.update(changes)
        (folder / path).write_text(json.dumps(config))
        return folder
    with pytest.raises(WeightsError, match="SDXL"):
        minti.load(edited("xl", "model_index.json", _class_name="StableDiffusionXLPipeline"))
    with pytest.raises(WeightsError, match="KandinskyPipeline"):
        minti.load(edited("kandinsky", "model_index.json", _class_name="KandinskyPipeline"))
    with pytest.raises(WeightsError, match="SD 2.x"):
        minti.load(edited("sd2", "unet/config.json", cross_attention_dim=1024))
    with pytest.raises(WeightsError, match="SD 2.x"):
        minti.load(edited("sd2v", "scheduler/scheduler_config.json", prediction_type="v_prediction"))
    with pytest.raises(WeightsError, match="inpainting"):
        minti.load(edited("inpaint", "unet/config.json", in_channels=9))


def test_damaged_files_and_missing_paths(ref, ldm_file, tmp_path, monkeypatch):
    data = ldm_file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        minti.load(tmp_path / "cut.safetensors")
    torch.save({"state_dict": ldm_tensors(ldm_file)}, tmp_path / "cut.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "cut.ckpt").read_bytes()[:1000])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        minti.load(tmp_path / "cut.ckpt")
    # a pickled object that would run code when unpickled: refused, and the code never runs
    marker = tmp_path / "ran"
    torch.save({"state_dict": {}, "callback": Evil(str(marker))}, tmp_path / "evil.ckpt")
    with pytest.raises(WeightsError, match=r"weights_only=True.*(\n|.)*safetensors") as e:
        minti.load(tmp_path / "evil.ckpt")
    assert "pickled Python objects" in str(e.value) and not marker.exists()
    with pytest.raises(FileNotFoundError, match="No model at"):
        minti.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        minti.load(tmp_path)  # a folder, but not a diffusers one
    monkeypatch.setattr(W, "TOY_FOLDER", tmp_path / "toy")
    with pytest.raises(FileNotFoundError, match="toy model is not built/committed yet"):
        minti.load("toy")


class Evil:
    """Unpickling this would create a file (standing in for arbitrary code)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_key_mismatch_report(ref, ldm_file):
    p = "model.diffusion_model."

    def change(t):
        del t[p + "out.2.bias"]
        t["first_stage_model.extra.weight"] = torch.zeros(1)
        t[p + "time_embed.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(WeightsError) as e:
        minti.load(fake_file(ldm_file, "mismatch.safetensors", change), config=ref.folder)
    message = str(e.value)
    assert "1 missing" in message
    assert "unet.conv_out.bias (file key model.diffusion_model.out.2.bias)" in message
    assert "1 unexpected" in message and "first_stage_model.extra.weight" in message
    assert "1 wrong shape" in message and "time_embed.0.weight: file [3, 3]" in message
    # a diffusers folder is checked the same way
    folder = copy_folder(ref, "mismatch")
    rewrite(folder / "unet" / "diffusion_pytorch_model.safetensors",
            lambda sd: {("junk." + k if i < 12 else k): v for i, (k, v) in enumerate(sd.items())})
    with pytest.raises(WeightsError, match=r"12 missing(\n|.)*and 2 more(\n|.)*12 unexpected"):
        minti.load(folder)


def test_single_file_sizes_and_config_checks(ref, ldm_file):
    with pytest.raises(WeightsError, match=r"not SD 1.x-sized(\n|.)*unet.block_out_channels(\n|.)*config="):
        minti.load(ldm_file)
    folder = ref.root / "wrong-config"
    shutil.copytree(ref.folder, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps(dict(config, layers_per_block=2)))
    with pytest.raises(WeightsError, match="unet.layers_per_block: the file has 1, the config says 2"):
        minti.load(ldm_file, config=folder)


# ---------------------------------------------------------------------------------------------------
# (4) Writing a diffusers folder


def test_save_diffusers_folder_round_trip(ref, loaded, tmp_path):
    out = tmp_path / "saved"
    W.save_diffusers_folder(loaded, out)
    W.save_diffusers_folder(loaded, out)  # replacing an earlier save works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # no temporary folders left
    again = minti.load(out)
    assert_weights_equal(ref, again)
    assert_outputs_equal(ref, again)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    for component in W.COMPONENTS:
        theirs = getattr(pipe, component).state_dict()
        for key, value in reference_state(ref, component).items():
            key = key if key in theirs else key[len("text_model."):]
            assert torch.equal(theirs[key], value), f"{component}.{key}"
    assert pipe.vae.config.scaling_factor == 0.25 and pipe.tokenizer.model_max_length == 77
    expected = ref.pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    assert pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids == expected
    assert torch.equal(pipe.scheduler.alphas_cumprod, ref.pipe.scheduler.alphas_cumprod)
    # diffusers samples with it (two steps; a smoke test that the folder is a working pipeline)
    image = pipe("a photo of the cat", num_inference_steps=2, height=16, width=16, output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()
    # a save that fails half-way leaves the earlier folder as it was, and no temporary folder behind

    class FailingTokenizer:
        @property
        def vocab(self):  # the first thing write_tokenizer_folder writes
            raise OSError("disk full")
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(OSError, match="disk full"):
        W.save_diffusers_folder(dataclasses.replace(loaded, tokenizer=FailingTokenizer()), out)
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a diffusers model folder"):
        W.save_diffusers_folder(loaded, tmp_path / "other")
