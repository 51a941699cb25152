"""sample.py and minti.sampling against diffusers' StableDiffusionPipeline, end to end.

A tiny random SD 1.x-shaped pipeline (UNet with cross-attention, 4-level KL-VAE so latents are 1/8 of
the image, CLIP text encoder, CLIP's real vocabulary) is built by diffusers and saved with
save_pretrained; minti loads that folder. With the same seed, prompts, negative prompt, guidance and
step count, the PNGs that sample.py writes equal diffusers' images within 1 level per pixel.
"""
import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers

import minti  # noqa: E402
from minti.sampling import encode_prompts, text_to_image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                 prediction_type="epsilon")
PROMPTS = ["a photo of a red star on a blue background", "a painting of a cat, very long prompt " * 12]
NEGATIVE = "blurry, low quality"
WIDTH, HEIGHT = 64, 48  # non-square; latents 8 x 6, odd after one downsampling
STEPS = 5


def load_sample_py():
    spec = importlib.util.spec_from_file_location("sample_script", os.path.join(ROOT, "sample.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory, clip_vocab_folder):
    """A tiny random diffusers StableDiffusionPipeline saved to disk; returns (folder, pipeline)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny_sd")
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_vocab_folder), model_max_length=77)  # not minti's files
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16)
    vae = AutoencoderKL(block_out_channels=(16, 16, 32, 32), layers_per_block=1, latent_channels=4,
                        norm_num_groups=16, sample_size=64,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    # Random init leaves the output convs near zero; larger weights make every pixel depend on the input.
    with torch.no_grad():
        for p in list(unet.conv_out.parameters()) + list(vae.decoder.conv_out.parameters()):
            p.normal_(0, 0.1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(root / "sd"))
    return str(root / "sd"), pipe


def diffusers_images(pipe, scheduler, eta=0.0, guidance=7.5, n=2, seed=3, steps=STEPS):
    from diffusers import DDIMScheduler, DDPMScheduler

    pipe.scheduler = (DDIMScheduler if scheduler == "ddim" else DDPMScheduler).from_config(SCHEDULER)
    kwargs = {"eta": eta} if scheduler == "ddim" else {}
    out = pipe(PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS), num_inference_steps=steps,
               guidance_scale=guidance, num_images_per_prompt=n, width=WIDTH, height=HEIGHT,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="pil", **kwargs)
    return np.stack([np.asarray(image) for image in out.images])


@pytest.mark.parametrize("scheduler, eta, guidance", [
    ("ddim", 0.0, 7.5),   # SD 1.x's usual setting
    ("ddim", 0.5, 3.0),   # stochastic DDIM: the step noise continues the seed's generator
    ("ddpm", 0.0, 7.5),   # ancestral sampling, also drawing from that generator
    ("ddim", 0.0, 1.0),   # no guidance: the unconditional pass is skipped on both sides
])
def test_sample_py_equals_diffusers(pipeline_folder, tmp_path, scheduler, eta, guidance):
    folder, pipe = pipeline_folder
    expected = diffusers_images(pipe, scheduler, eta, guidance)
    args = ["--model", folder, "--negative", NEGATIVE, "--steps", str(STEPS), "--scheduler", scheduler,
            "--guidance", str(guidance), "--seed", "3", "--n", "2", "--width", str(WIDTH), "--height",
            str(HEIGHT), "--out", str(tmp_path / "out"), "--device", "cpu", "--precision", "fp32",
            "--no-progress"]
    if scheduler == "ddim":
        args += ["--eta", str(eta)]
    for p in PROMPTS:
        args += ["--prompt", p]
    load_sample_py().main(args)
    files = sorted(os.listdir(tmp_path / "out"))
    assert len(files) == 4
    ours = np.stack([np.asarray(Image.open(tmp_path / "out" / f)) for f in files])
    assert ours.shape == expected.shape == (4, HEIGHT, WIDTH, 3)
    diff = np.abs(ours.astype(int) - expected.astype(int))
    assert diff.max() <= 1, f"max pixel difference {diff.max()} (mean {diff.mean():.4f})"
    # fp32 noise (~1e-5) can only flip a value that sits on a rounding boundary: nearly all are equal.
    assert (diff > 0).mean() < 0.01, f"{(diff > 0).mean():.2%} of values differ by 1"
    assert expected.std() > 5, "degenerate test: the reference images are flat"
    # The two prompts and the two seeds' draws give four different pictures.
    assert len({image.tobytes() for image in ours}) == 4


def test_sample_py_flags_and_their_old_names(capsys):
    """--guidance (--cfg: the same flag) and --precision (--dtype, its old name, is gone)."""
    parse = load_sample_py().parse_args
    assert parse([]).guidance == 7.5 and parse([]).precision == "auto"
    assert parse(["--guidance", "3"]).guidance == parse(["--cfg", "3"]).guidance == 3.0
    assert parse(["--precision", "bf16"]).precision == "bf16"
    for old in (["--precision", "float16"], ["--dtype", "float16"]):
        with pytest.raises(SystemExit):
            parse(old)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parse(["--help"])
    shown = capsys.readouterr().out
    assert "--guidance GUIDANCE, --cfg GUIDANCE" in shown and "--precision" in shown and "--dtype" not in shown


def test_sample_py_grid(pipeline_folder, tmp_path, capsys):
    folder, pipe = pipeline_folder
    out = tmp_path / "grid.png"
    images = load_sample_py().main(["--model", folder, "--steps", "3", "--n", "3", "--width", str(WIDTH),
                                    "--height", str(HEIGHT), "--out", str(out), "--no-progress",
                                    "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]])
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * HEIGHT, 3 * WIDTH, 3)  # a row per prompt, a column per image
    assert np.array_equal(grid[HEIGHT:, 2 * WIDTH:], images[5])
    assert str(out) in capsys.readouterr().out.strip().splitlines()[-1]


def test_per_step_conditioning_equals_fixed(pipeline_folder):
    folder, _ = pipeline_folder
    sd = minti.load(folder)
    kw = dict(num_steps=4, seed=1, n=2, width=WIDTH, height=HEIGHT, output="pt")
    fixed = text_to_image(sd, PROMPTS, negative=NEGATIVE, **kw)
    # Conditioning given from outside: [P * n, L, D], prompt by prompt, n rows each.
    cond = encode_prompts(sd.tokenizer, sd.text_encoder, PROMPTS).repeat_interleave(2, dim=0)
    uncond = encode_prompts(sd.tokenizer, sd.text_encoder, [NEGATIVE] * 2).repeat_interleave(2, dim=0)
    assert torch.equal(text_to_image(sd, PROMPTS, cond=cond, uncond=uncond, **kw), fixed)
    seen = []

    def cond_fn(t):
        seen.append(int(t))
        return cond

    per_step = text_to_image(sd, PROMPTS, negative=NEGATIVE, cond=cond_fn, **kw)
    assert torch.equal(per_step, fixed)
    reference = diffusers.DDIMScheduler(**SCHEDULER)
    reference.set_timesteps(4)
    assert seen == reference.timesteps.tolist()  # called once per step, with that step's timestep
    assert torch.equal(text_to_image(sd, PROMPTS, cond=cond_fn, uncond=lambda t: uncond, **kw), fixed)
    # A conditioning that really changes with t changes the picture.
    other = encode_prompts(sd.tokenizer, sd.text_encoder, ["a blue circle", "a dog"]).repeat_interleave(2, 0)
    varied = text_to_image(sd, PROMPTS, negative=NEGATIVE, cond=lambda t: cond if t > 500 else other, **kw)
    assert not torch.equal(varied, fixed)


def test_embed_fn_seam(pipeline_folder):
    folder, _ = pipeline_folder
    sd = minti.load(folder)
    ids = sd.tokenizer(PROMPTS, length=77)
    table = sd.text_encoder.text_model.embeddings.token_embedding
    plain = encode_prompts(sd.tokenizer, sd.text_encoder, PROMPTS)
    assert torch.equal(encode_prompts(sd.tokenizer, sd.text_encoder, PROMPTS, embed_fn=table), plain)
    shifted = encode_prompts(sd.tokenizer, sd.text_encoder, PROMPTS, embed_fn=lambda i: table(i) + 1.0)
    assert not torch.allclose(shifted, plain)
    assert ids.shape == (2, 77)


def test_bad_sizes_and_steps_have_clear_errors(pipeline_folder):
    folder, _ = pipeline_folder
    sd = minti.load(folder)
    with pytest.raises(ValueError, match="multiples of 8"):
        text_to_image(sd, "a cat", num_steps=2, width=60, height=48)
    with pytest.raises(ValueError, match="at most 999 steps"):
        text_to_image(sd, "a cat", num_steps=1000, width=64, height=48)
    with pytest.raises(ValueError, match="'ddim' or 'ddpm'"):
        text_to_image(sd, "a cat", num_steps=2, stepper="euler", width=64, height=48)
    with pytest.raises(ValueError, match="negative prompts for 2 prompts"):
        text_to_image(sd, PROMPTS, negative=["a", "b", "c"], num_steps=2, width=64, height=48)


def test_sample_py_with_concept_file_equals_diffusers(pipeline_folder, tmp_path):
    """--embeds with a diffusers-format file (a 2-vector word) against pipe.load_textual_inversion."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file

    folder, _ = pipeline_folder
    torch.manual_seed(7)
    path = str(tmp_path / "learned_embeds.safetensors")
    save_file({"<my-star>": torch.randn(2, 32)}, path)
    prompt, negative = "a photo of <my-star> on a blue background", "<my-star>, blurry"
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(SCHEDULER)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(path)
    out = pipe([prompt], negative_prompt=[negative], num_inference_steps=3, guidance_scale=5.0,
               width=WIDTH, height=HEIGHT, generator=torch.Generator("cpu").manual_seed(11),
               output_type="pil")
    expected = np.asarray(out.images[0])
    load_sample_py().main(["--model", folder, "--embeds", path, "--prompt", prompt, "--negative", negative,
                           "--steps", "3", "--cfg", "5", "--seed", "11", "--width", str(WIDTH), "--height",
                           str(HEIGHT), "--out", str(tmp_path / "out.png"), "--no-progress"])
    ours = np.asarray(Image.open(tmp_path / "out.png"))
    diff = np.abs(ours.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, f"max pixel difference {diff.max()}"
    # The learned word matters: without the file's vectors the picture differs.
    plain = load_sample_py().main(["--model", folder, "--prompt", "a photo of a star on a blue background",
                                   "--negative", "blurry", "--steps", "3", "--cfg", "5", "--seed", "11",
                                   "--width", str(WIDTH), "--height", str(HEIGHT),
                                   "--out", str(tmp_path / "plain.png"), "--no-progress"])
    assert not np.array_equal(plain[0], ours)


def test_sample_py_multires_words_and_syntax(pipeline_folder, tmp_path, capsys):
    """A multiresolution file and the time syntax in sample.py: the image equals the library's loop fed
    with PromptWords' per-step conditioning (tests/test_multires_sampling.py checks that conditioning
    against the three definitions); --drop zero differs from remove; a bad prompt is a clean error."""
    from minti.io.concepts import Concept, save_multires
    from minti.io.prompt_syntax import PromptWords

    folder, _ = pipeline_folder
    torch.manual_seed(3)
    path = str(tmp_path / "star-multires.safetensors")
    save_multires(path, Concept("<star>", torch.randn(4, 2, 32)))  # T = 4 resolutions, 2 vectors each
    prompt, negative = "a photo of <star(0.5)> beside <star|0.2|>", "blurry"
    common = ["--model", folder, "--embeds", path, "--negative", negative, "--steps", "4", "--cfg", "4",
              "--seed", "5", "--width", str(WIDTH), "--height", str(HEIGHT), "--no-progress"]
    ours = load_sample_py().main(common + ["--prompt", prompt, "--out", str(tmp_path / "a.png")])

    sd = minti.load(folder)
    from minti.io.concepts import load_concepts

    words = PromptWords(load_concepts(path), sd.tokenizer, sd.text_encoder)
    cond = words.conditioning([prompt])
    assert callable(cond)  # the word changes with time, so the conditioning does
    expected = text_to_image(sd, [prompt], negative=negative, num_steps=4, guidance_scale=4.0, seed=5,
                             width=WIDTH, height=HEIGHT, cond=cond, uncond=words.conditioning([negative]),
                             embed_fn=words.embed_fn)
    assert np.array_equal(ours, expected)

    zero = load_sample_py().main(common + ["--prompt", prompt, "--drop", "zero", "--out", str(tmp_path / "z.png")])
    assert not np.array_equal(zero, ours)  # below t = 0.5 the word is zero vectors instead of absent

    capsys.readouterr()
    with pytest.raises(ValueError) as e:  # minti.run.cli.UsageError: sample.py exits 2 with the message
        load_sample_py().main(common + ["--prompt", "a photo of <star(1.5)>", "--out", str(tmp_path / "x.png")])
    assert "a photo of <star(1.5)>" in str(e.value) and "[0, 1]" in str(e.value)
    assert not os.path.exists(tmp_path / "x.png")
