"""train.py end to end on a tiny random SD 1.x model saved as a diffusers folder, and minti/data.py.

Images in every awkward form (CMYK JPEG, RGBA PNG, EXIF-rotated JPEG, 16-bit PNG), captions, the
files a run writes, --help, resume (after --steps and after Ctrl-C) bit-identical to an uninterrupted
run, the NaN stop, warm start with --from, the refusals, and a trained concept read back by diffusers'
load_textual_inversion into the same prompt embeddings as minti's.
"""
import contextlib
import csv
import importlib.util
import io
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from minti.io.tokenizer_files import read_clip_bpe
from minti import data, toy
from minti.clip import CLIPTextConfig, CLIPTextModel
from minti.io.concepts import load_concepts
from minti.schedulers import DDPM
from minti.unet import UNet, UNetConfig
from minti.vae import VAE, VAEConfig
from minti.io.weights import StableDiffusion, save_diffusers_folder

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest)

ROOT = Path(__file__).resolve().parent.parent


def load_train_module():
    spec = importlib.util.spec_from_file_location("minti_train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = load_train_module()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, clip_bpe_path):
    """A tiny random SD 1.x (CLIP's real vocabulary, 16 px images, 8x8 latents), as a diffusers folder."""
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4))
    unet = UNet(UNetConfig(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                           attention_head_dim=2, norm_num_groups=8))
    vae = VAE(VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=16))
    folder = tmp_path_factory.mktemp("model") / "tiny-sd"
    save_diffusers_folder(StableDiffusion(read_clip_bpe(clip_bpe_path), text, unet, vae, DDPM()), folder)
    return folder


def gradient(w, h, seed):
    """An RGB test picture that is not symmetric: its orientation can be told."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w)[None, :, None] * np.array([1.0, 0.2, 0.6])
    y = np.linspace(0, 255, h)[:, None, None] * np.array([0.1, 1.0, 0.3])
    return np.clip((x + y) / 2 + rng.normal(0, 5, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """3 images: a CMYK JPEG, an RGBA PNG with a transparent corner, an EXIF-rotated JPEG; one caption."""
    folder = tmp_path_factory.mktemp("images")
    Image.fromarray(gradient(28, 20, 0)).convert("CMYK").save(folder / "a_cmyk.jpg", quality=95)
    rgba = np.dstack([gradient(30, 22, 1), np.full((22, 30), 255, np.uint8)])
    rgba[:10, :12, 3] = 0
    Image.fromarray(rgba, "RGBA").save(folder / "b_rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; viewers rotate it 90 degrees clockwise
    Image.fromarray(gradient(24, 18, 2)).save(folder / "c_rotated.jpg", exif=exif, quality=95)
    (folder / "b_rgba.txt").write_text("a photo of {} on a table\n")
    (folder / "notes.md").write_text("not an image, ignored")
    return folder


def run(*argv):
    """train.py's main in this process: its exit code, or the "error: ..." message it printed on failing."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train.main([str(a) for a in argv])
    message = err.getvalue()
    return message[message.index("error:"):].strip() if code and "error:" in message else code


def base_args(model_dir, images, out, **extra):
    args = {"--model": model_dir, "--images": images, "--token": "<tiny>", "--init": "cat", "--batch": 2,
            "--out": out, "--save-every": 0, "--preview-every": 0, **extra}
    return [x for k, v in args.items() for x in ([k] if v is True else [k, v])]


class Watch:
    """What train.py's own run does inside its training steps, seen from outside: train.setup is wrapped
    (monkeypatch) and hooks are put on the models it loads. Only calls with gradients on are recorded: the
    step's forward and checkpointing's recomputation in backward (previews and evaluations run without).
    watch.last, per run: the Run; `start`, the vectors it starts from; `stage_forwards`, the forwards of the
    UNet's first down stage (one of the stages checkpointing wraps); the dtypes of the text encoder's output
    (the context) and the UNet's (eps); conv_in's output memory format. `scale`: a loss scale to start the
    next run with (fp16), instead of GradScaler's 2^16."""

    def __init__(self, monkeypatch):
        self.runs, self.scale, real = [], None, train.setup

        def setup(cfg, state):
            run = real(cfg, state)
            self.watch(run)
            return run
        monkeypatch.setattr(train, "setup", setup)

    @property
    def last(self):
        return self.runs[-1]

    def watch(self, run):
        seen = SimpleNamespace(run=run, start=run.word.vectors.detach().clone(), stage_forwards=0, context=set(),
                               eps=set(), conv_in=set())
        self.runs.append(seen)
        if self.scale is not None:
            run.scaler.load_state_dict({**run.scaler.state_dict(), "scale": self.scale, "_growth_tracker": 0})
            self.scale = None
        unet = run.sd.unet

        def hook(record):
            def on_forward(module, args, output):
                if torch.is_grad_enabled():
                    record(output)
            return on_forward

        def count(module, args):  # a pre-hook: checkpointing's recomputation stops once it has what backward
            if torch.is_grad_enabled():  # needs (torch's early stop), before the stage's forward hook would run
                seen.stage_forwards += 1

        def layout(output):
            channels_last = output.is_contiguous(memory_format=torch.channels_last) and not output.is_contiguous()
            seen.conv_in.add("channels_last" if channels_last else "contiguous")

        unet.down_blocks[0].register_forward_pre_hook(count)
        unet.conv_in.register_forward_hook(hook(layout))
        unet.register_forward_hook(hook(lambda eps: seen.eps.add(eps.dtype)))
        run.sd.text_encoder.register_forward_hook(hook(lambda context: seen.context.add(context.dtype)))


def vectors(path):
    if str(path).endswith("-multires.safetensors"):  # minti's own file: the tensor, read directly
        return load_file(path)["vectors"]
    (concept,) = load_concepts(path)
    return concept.vectors


# ----------------------------------------------------------------------------------------------
# data.py

def test_images_of_any_mode_size_and_orientation(images, tmp_path):
    paths = data.find_images(images)
    assert [os.path.basename(p) for p in paths] == ["a_cmyk.jpg", "b_rgba.png", "c_rotated.jpg"]
    for p in paths:
        x = data.load_image(p, 16)
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() <= x.max() <= 1
    # EXIF orientation 6: the stored 24x18 picture is shown (and so trained) turned 90 degrees clockwise
    upright = Image.fromarray(gradient(24, 18, 2)).transpose(Image.Transpose.ROTATE_270)
    upright.save(tmp_path / "upright.png")
    rotated, reference = data.load_image(paths[2], 16), data.load_image(tmp_path / "upright.png", 16)
    assert (rotated - reference).abs().mean() < 0.05  # JPEG's loss only
    assert (data.load_image(tmp_path / "upright.png", 16).flip(-1) - rotated).abs().mean() > 0.1
    # transparent pixels become white
    assert torch.allclose(data.load_image(paths[1], 30)[:, 0, 0], torch.ones(3), atol=0.02)


def test_sixteen_bit_and_palette_images(tmp_path):
    deep = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)  # 0 .. 65520
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    x = data.load_image(tmp_path / "deep.png", 64)
    assert x.min() < -0.99 and x.max() > 0.99  # the full range, not clipped to white
    Image.fromarray(gradient(20, 20, 3)).convert("P").save(tmp_path / "palette.png")
    assert data.load_image(tmp_path / "palette.png", 8).shape == (3, 8, 8)


def test_dark_sixteen_bit_images_stay_dark_and_every_mode_reads(tmp_path):
    """A 16-bit PNG is divided by 65535 whatever its values (a dark one was brightened 257x); palette with
    transparency, grey with alpha, CMYK and 1-bit images read as RGB, transparent pixels white."""
    dark = np.full((16, 16), 200, np.uint16)  # 200 / 65535: black to the eye
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    assert Image.open(tmp_path / "dark16.png").mode.startswith("I")
    assert data.load_image(tmp_path / "dark16.png", 8).max() < -0.99
    rgb = gradient(16, 16, 4)
    palette = Image.fromarray(rgb).convert("P")
    palette.info["transparency"] = palette.getpixel((0, 0))
    palette.save(tmp_path / "palette_alpha.png", transparency=palette.getpixel((0, 0)))
    Image.fromarray(rgb).convert("LA").save(tmp_path / "grey_alpha.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    Image.fromarray(rgb).convert("1").save(tmp_path / "bits.png")
    for name in ("palette_alpha.png", "grey_alpha.png", "cmyk.jpg", "bits.png"):
        x = data.load_image(tmp_path / name, 8)
        assert x.shape == (3, 8, 8) and -1 <= x.min() <= x.max() <= 1, name
    cmyk, reference = data.load_image(tmp_path / "cmyk.jpg", 8), torch.from_numpy(rgb).permute(2, 0, 1)
    assert (cmyk - (reference.float() / 127.5 - 1)[:, ::2, ::2]).abs().mean() < 0.1  # not inverted


def test_captions_with_a_byte_order_mark_and_special_files(tmp_path, monkeypatch):
    """A byte-order mark is not caption text (UTF-8's and UTF-16's); macOS "._x.png" files and named pipes are
    not read, with a note; an image that cannot be opened or is too large is refused by name."""
    Image.fromarray(gradient(8, 8, 5)).save(tmp_path / "a.png")
    for encoding in ("utf-8-sig", "utf-16"):
        (tmp_path / "a.txt").write_bytes("a photo of {} café".encode(encoding))
        assert data.read_caption(str(tmp_path / "a.png"), "<t>") == ("a photo of <t> café", True)
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "more").mkdir()
    assert data.find_images(tmp_path) == [str(tmp_path / "a.png")]
    notes = "\n".join(data.check_images(tmp_path))
    assert "._a.png is a macOS resource file" in notes and "pipe.png is not a regular file" in notes
    assert "subfolders of --images (more/)" in notes

    def unreadable(path, *args):  # what chmod 000 does to anyone but root
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(data.Image, "open", unreadable)
    with pytest.raises(data.ImageError, match="a.png cannot be read .permission denied.: fix its permissions"):
        data.check_images(tmp_path)


def test_captions_and_templates(images):
    caption = data.read_caption(str(images / "b_rgba.png"), "<tiny>")
    assert caption == ("a photo of <tiny> on a table", True)
    assert data.read_caption(str(images / "a_cmyk.jpg"), "<tiny>") is None
    prompts = data.prompts_for_image(caption, data.OBJECT_TEMPLATES, "<tiny>")
    assert prompts == ["a photo of <tiny> on a table"]
    no_marker = data.prompts_for_image(("on a table", False), ["a photo of a {}"], "<tiny>")
    assert no_marker == ["a photo of a <tiny>, on a table"]
    assert len(data.OBJECT_TEMPLATES) == 81 and len(set(data.OBJECT_TEMPLATES)) == 57
    assert len(data.STYLE_TEMPLATES) == 19 and toy.TEMPLATES[0] == "a photo of a {}"
    assert set(data.TEMPLATES) == {"object", "style"}  # the toy model's own live in minti/toy/


def test_cached_latents_equal_encoding_every_step(images):
    torch.manual_seed(0)
    vae = VAE(VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)).eval()
    pixels = torch.stack([data.load_image(p, 16) for p in data.find_images(images)])
    cached, fresh = data.Latents(vae, pixels, 0.5, cache=True), data.Latents(vae, pixels, 0.5, cache=False)
    index, flip = torch.tensor([2, 0, 2, 1]), torch.tensor([True, False, False, True])
    a = cached.sample(index, flip, torch.Generator().manual_seed(1))
    b = fresh.sample(index, flip, torch.Generator().manual_seed(1))
    assert torch.allclose(a, b, atol=1e-5)
    c = cached.sample(index, flip, torch.Generator().manual_seed(2))
    assert not torch.allclose(a, c)  # a fresh latent each draw


def test_bad_image_folders_are_refused_by_name(tmp_path):
    with pytest.raises(data.ImageError, match="no such folder"):
        data.find_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.ImageError, match="holds no images"):
        data.find_images(tmp_path / "empty")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(data.ImageError, match="bad.jpg is not a readable image"):
        data.load_image(tmp_path / "bad.jpg", 16)


# ----------------------------------------------------------------------------------------------
# train.py

def test_help_lists_every_flag_with_its_default(capsys):
    assert run("--help") == 0
    text = capsys.readouterr().out
    options = [o for a in train.build_parser()._actions for o in a.option_strings if o.startswith("--")]
    assert len(options) > 30
    for option in options:
        assert option in text, option
    flags = [a for a in train.build_parser()._actions if a.option_strings and a.dest != "help"]
    assert all("(default:" in a.help for a in flags), [a.dest for a in flags if "(default:" not in a.help]
    for flag in ["--model", "--images", "--token", "--init", "--vectors", "--what", "--steps", "--batch",
                 "--grad-accum", "--lr", "--scale-lr", "--lr-warmup", "--lr-schedule", "--flip", "--seed",
                 "--precision", "--checkpointing", "--cache-latents", "--no-cache-latents", "--save-every",
                 "--preview-every", "--resume", "--from", "--out", "--device", "--multires", "--timesteps",
                 "--norm-log"]:
        assert flag in text, flag


def test_end_to_end_files(model_dir, images, tmp_path, capsys):
    out = tmp_path / "run"
    settings = {"--steps": 4, "--vectors": 2, "--save-every": 2, "--preview-every": 4, "--norm-log": True,
                "--scale-lr": True}
    code = run(*base_args(model_dir, images, out, **settings))
    assert code == 0
    printed = capsys.readouterr().out
    assert "lr: 0.01 effective = 0.005 x batch 2 x accumulation 1" in printed
    assert "init: 'cat' (1 token(s)) -> 2 vector(s)" in printed
    assert "1 with a caption file" in printed
    for name in ["learned_embeds.safetensors", "tiny.pt", "log.csv", "loss.png", "config.json",
                 "checkpoint/state.pt", "snapshots/step-000002/learned_embeds.safetensors",
                 "snapshots/step-000002/tiny.pt", "snapshots/step-000004/tiny.pt",
                 "previews/step-000004.png"]:
        assert (out / name).is_file(), name
        assert name in printed or name.split("/")[0] in printed
    diffusers_file, a1111 = load_concepts(out / "learned_embeds.safetensors"), load_concepts(out / "tiny.pt")
    assert diffusers_file[0].token == a1111[0].token == "<tiny>"
    assert diffusers_file[0].vectors.shape == (2, 32)
    assert torch.equal(diffusers_file[0].vectors, a1111[0].vectors)
    raw = torch.load(out / "tiny.pt", weights_only=True)
    assert raw["step"] == 4 and raw["name"] == "<tiny>" and raw["sd_checkpoint_name"] == "tiny-sd"
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,vector_norm,typical_norm,seconds" and len(rows) == 5
    config = json.loads((out / "config.json").read_text())
    assert config["status"] == "finished" and config["config"]["steps"] == 4
    assert config["effective_lr"] == 0.01 and config["placeholder_tokens"] == ["<tiny>", "<tiny>_1"]
    assert Image.open(out / "loss.png").format == "PNG"
    assert Image.open(out / "previews/step-000004.png").size == (4 * 16, 16)  # 4 images of one prompt
    assert not [p for p in out.rglob(".*")]  # no temporary files left behind


def test_trained_concept_loads_in_diffusers_with_the_same_prompt_embeddings(model_dir, images, tmp_path):
    import diffusers
    import minti
    from minti.io.prompt_syntax import expand_prompt
    from minti.textual_inversion import add_words, splice, token_table

    out = tmp_path / "run"
    assert run(*base_args(model_dir, images, out, **{"--steps": 2, "--vectors": 2})) == 0
    prompt = "a photo of <tiny> on the beach"
    sd = minti.load(model_dir)
    (concept,) = load_concepts(out / "learned_embeds.safetensors")
    ids = add_words(sd.tokenizer, {"<tiny>": concept.num_vectors})["<tiny>"]
    tokens = sd.tokenizer([expand_prompt(prompt, concept)])
    table = token_table(sd.text_encoder)
    with torch.no_grad():
        ours = sd.text_encoder(tokens, inputs_embeds=splice(tokens, table, ids, concept.vectors))
    for file in ("learned_embeds.safetensors", "tiny.pt"):
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
        pipe.load_textual_inversion(str(out / file))
        theirs, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-5, file


def test_resume_after_steps_and_after_ctrl_c_is_bit_identical(model_dir, images, tmp_path, monkeypatch):
    # multires, 2 vectors, accumulation and the adaptive sampler: every piece of state must come back
    settings = {"--multires": 3, "--vectors": 2, "--grad-accum": 2, "--timesteps": "adaptive", "--seed": 7}
    whole = tmp_path / "whole"
    assert run(*base_args(model_dir, images, whole, **settings, **{"--steps": 4})) == 0
    expected = vectors(whole / "tiny-multires.safetensors")

    stopped = tmp_path / "stopped"
    assert run(*base_args(model_dir, images, stopped, **settings, **{"--steps": 2})) == 0
    assert not torch.equal(vectors(stopped / "tiny-multires.safetensors"), expected)
    assert run("--resume", stopped, "--steps", 4) == 0
    assert torch.equal(vectors(stopped / "tiny-multires.safetensors"), expected)
    assert len((stopped / "log.csv").read_text().splitlines()) == 5
    assert (stopped / "learned_embeds-r0.5.safetensors").is_file() and (stopped / "tiny-r0.5.pt").is_file()

    import minti.textual_inversion as ti

    real_step, calls = ti.train_step, []

    def interrupted_step(*args, **kwargs):  # Ctrl-C in the middle of the third step
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(ti, "train_step", interrupted_step)
    interrupted = tmp_path / "interrupted"
    assert run(*base_args(model_dir, images, interrupted, **settings, **{"--steps": 4})) == 130
    state = torch.load(interrupted / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 2
    monkeypatch.setattr(ti, "train_step", real_step)
    assert run("--resume", interrupted) == 0
    assert torch.equal(vectors(interrupted / "tiny-multires.safetensors"), expected)


def test_nan_stops_the_run_and_keeps_the_last_good_snapshot(model_dir, images, tmp_path, monkeypatch):
    import minti.textual_inversion as ti

    real_loss, calls = ti.diffusion_loss, []

    def diverging_loss(*args, **kwargs):
        calls.append(1)
        loss, *rest = real_loss(*args, **kwargs)  # (loss, context[, each sample's error])
        return ((loss * float("nan") if len(calls) == 3 else loss), *rest)

    monkeypatch.setattr(ti, "diffusion_loss", diverging_loss)
    out = tmp_path / "run"
    code = run(*base_args(model_dir, images, out, **{"--steps": 5, "--save-every": 1, "--lr": 0.02}))
    assert "training diverged at step 3" in code and "lr 0.02" in code
    assert "the loss is not finite" in code and "after step 1 (the last to give a finite loss)" in code
    assert str(out / "last-good" / "learned_embeds.safetensors") in code
    assert "(step 2; --resume" in code and "lower --lr" in code
    good = vectors(out / "last-good" / "learned_embeds.safetensors")
    assert torch.isfinite(good).all()
    assert torch.equal(good, vectors(out / "snapshots" / "step-000001" / "learned_embeds.safetensors"))
    assert torch.equal(good, vectors(out / "last-good" / "tiny.pt"))
    assert len((out / "log.csv").read_text().splitlines()) == 3  # header + the two good steps


def test_warm_start_from_a_file(model_dir, images, tmp_path, capsys):
    first = tmp_path / "first"
    assert run(*base_args(model_dir, images, first, **{"--steps": 2, "--vectors": 2})) == 0
    # lr 1e-30 and no weight decay: AdamW's first step (~lr) is far below the vectors' float32 resolution
    args = ["--model", model_dir, "--images", images, "--from", first / "tiny.pt", "--steps", 1, "--lr", 1e-30,
            "--weight-decay", 0,
            "--out", tmp_path / "second", "--batch", 1]
    assert run(*args) == 0
    assert f"init: 2 vector(s) from {first / 'tiny.pt'}" in capsys.readouterr().out
    assert torch.equal(vectors(tmp_path / "second" / "learned_embeds.safetensors"),
                       vectors(first / "tiny.pt"))


@pytest.mark.parametrize("change, message", [
    ({"--token": "cat"}, "'cat' is already a word of the vocabulary"),
    ({"--init": "qxjz"}, "unknown to this vocabulary"),
    ({"--vectors": 0}, "--vectors must be at least 1"),
    ({"--timesteps": "sometimes"}, "is not a timestep spec"),
])
def test_bad_settings_are_refused(model_dir, images, tmp_path, change, message):
    code = run(*base_args(model_dir, images, tmp_path / "run", **{"--steps": 1, **change}))
    assert isinstance(code, str) and code.startswith("error:") and message in code


def test_bad_image_folders_are_refused(model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    code = run(*base_args(model_dir, tmp_path / "empty", tmp_path / "run", **{"--steps": 1}))
    assert "holds no images" in code
    (tmp_path / "corrupt").mkdir()
    Image.fromarray(gradient(16, 16, 0)).save(tmp_path / "corrupt" / "fine.png")
    (tmp_path / "corrupt" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code = run(*base_args(model_dir, tmp_path / "corrupt", tmp_path / "run", **{"--steps": 1}))
    assert "broken.png is not a readable image" in code


def test_resume_refuses_changed_settings_and_new_runs_refuse_an_old_folder(model_dir, images, tmp_path):
    out = tmp_path / "run"
    assert run(*base_args(model_dir, images, out, **{"--steps": 1})) == 0
    code = run("--resume", out, "--lr", 1.0, "--steps", 2)
    assert "--lr 1.0 differs from the run being resumed (0.005)" in code
    code = run(*base_args(model_dir, images, out, **{"--steps": 1}))
    assert "already holds a run; continue it with --resume" in code


def test_bf16_without_cache_with_checkpointing_and_schedule(model_dir, images, tmp_path, monkeypatch):
    """--precision bf16, --checkpointing and --channels-last take effect in train.py's own steps (Watch): the
    frozen weights, the context and the UNet's output in bf16, the vectors fp32; each step runs the UNet's
    first stage twice with gradients on (its forward, and its recomputation in backward; once without
    checkpointing: test_fp16_...); the UNet's convolution weights and conv_in's output channels-last.
    Also: the VAE at every step (no cache), warm-up then cosine, a preview."""
    watch, steps = Watch(monkeypatch), 3
    settings = {"--steps": steps, "--precision": "bf16", "--no-cache-latents": True, "--checkpointing": True,
                "--channels-last": True, "--lr-schedule": "cosine", "--lr-warmup": 1, "--preview-every": 3}
    assert run(*base_args(model_dir, images, tmp_path / "run", **settings)) == 0
    seen, bf16 = watch.last, torch.bfloat16
    unet, text_encoder = seen.run.sd.unet, seen.run.sd.text_encoder
    assert {p.dtype for p in unet.parameters()} == {p.dtype for p in text_encoder.parameters()} == {bf16}
    assert seen.context == seen.eps == {bf16} and seen.run.word.vectors.dtype == torch.float32
    assert seen.stage_forwards == 2 * steps  # forward + recomputation, one micro-batch a step
    convs = [m.weight for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert len(convs) > 10 and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                                   for w in convs)
    assert seen.conv_in == {"channels_last"}
    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=True)
    assert state["vectors"].dtype == torch.float32 and torch.isfinite(state["vectors"]).all()
    lrs = [float(line.split(",")[2]) for line in (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]]
    assert lrs == pytest.approx([0.005, 0.005, 0.0025])  # warm-up step, then cosine over the other two
    assert (tmp_path / "run" / "previews" / "step-000003.png").is_file()


def test_fp16_runs_with_a_loss_scale_and_resumes_it(model_dir, images, tmp_path, monkeypatch):
    """The README's GPU command uses --precision fp16; on CPU it takes the same path (GradScaler("cpu")): fp16
    weights, context and UNet output, fp32 vectors; the scale's growth counter counts the steps without an
    overflow, saved and resumed; a scale so large that fp16's gradients overflow (2^40 x a loss of ~1: about
    10^12 / 512 elements at the UNet's output, beyond fp16's 65504) skips each step, leaving the vectors where
    they started, and halves the scale each time (GradScaler's backoff 0.5, the counter back to 0)."""
    watch, out = Watch(monkeypatch), tmp_path / "run"
    assert run(*base_args(model_dir, images, out, **{"--steps": 2, "--precision": "fp16"})) == 0
    seen = watch.last
    assert {p.dtype for p in seen.run.sd.unet.parameters()} == {torch.float16}
    assert seen.context == seen.eps == {torch.float16} and seen.stage_forwards == 2  # no checkpointing: once
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["vectors"].dtype == torch.float32 and torch.isfinite(state["vectors"]).all()
    assert not torch.equal(state["vectors"], seen.start)  # the steps were taken
    assert (state["scaler"]["scale"], state["scaler"]["_growth_tracker"]) == (2.0 ** 16, 2)  # saved for --resume
    start = vectors(out / "learned_embeds.safetensors")
    assert run("--resume", out, "--steps", 3) == 0
    assert not torch.equal(vectors(out / "learned_embeds.safetensors"), start)
    scaler = torch.load(out / "checkpoint" / "state.pt", weights_only=True)["scaler"]
    assert (scaler["scale"], scaler["_growth_tracker"]) == (2.0 ** 16, 3)  # counted on from the resumed 2

    watch.scale, overflow = 2.0 ** 40, tmp_path / "overflow"
    assert run(*base_args(model_dir, images, overflow, **{"--steps": 2, "--precision": "fp16"})) == 0
    state = torch.load(overflow / "checkpoint" / "state.pt", weights_only=True)
    assert (state["scaler"]["scale"], state["scaler"]["_growth_tracker"]) == (2.0 ** 38, 0)
    assert torch.equal(state["vectors"], watch.last.start)  # both steps skipped
    losses = [float(r.split(",")[1]) for r in (overflow / "log.csv").read_text().splitlines()[1:]]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)  # the loss itself never overflowed


def test_lr_schedule():
    from minti.textual_inversion import lr_factor

    assert [lr_factor(s, 4, 10, "constant") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = [lr_factor(s, 0, 4, "cosine") for s in range(4)]
    assert cosine == pytest.approx([1.0, (1 + 2 ** -0.5) / 2, 0.5, (1 - 2 ** -0.5) / 2])


def test_parse_args_knows_what_was_given():
    """A setting not given parses as None (train.py fills it: the toy model's default, a --from file's, ...)."""
    def given(cfg):
        return {k for k, v in vars(cfg).items() if v is not None}

    cfg = train.parse_args(["--multires", "--no-cache-latents", "--lr", "0.01"])
    assert cfg.multires == 10 and cfg.cache_latents is False and cfg.lr == 0.01
    assert given(cfg) == {"multires", "cache_latents", "lr"}
    cfg = train.parse_args(["--multires", "4", "--from", "x.pt"])
    assert (cfg.multires, cfg.from_file, given(cfg)) == (4, "x.pt", {"multires", "from_file"})
    train.fill_defaults(cfg := train.parse_args(["--multires", "4"]))
    assert (cfg.multires, cfg.batch, cfg.vectors, cfg.steps) == (4, train.TrainConfig.batch, 2, 300)  # the toy's


def test_learn_has_train_py_defaults():
    """learn() (lessons, experiments) and train.py share their settings' names and defaults (SD 1.x's:
    the toy model's own are minti.toy.TRAIN_DEFAULTS, which train.py applies)."""
    import inspect

    from minti import learn

    learn_defaults = {k: p.default for k, p in inspect.signature(learn).parameters.items()
                      if p.default is not inspect.Parameter.empty
                      and k not in ("init", "templates", "callback", "kind")}  # kind: --per-layer / --neti
    flag = {"num_vectors": "vectors", "num_buckets": "multires", "image_size": "resolution"}  # learn's names
    config = train.TrainConfig()
    assert {k: getattr(config, flag.get(k, k)) for k in learn_defaults} == learn_defaults
    assert set(toy.TRAIN_DEFAULTS) - {"templates"} <= {flag.get(k, k) for k in learn_defaults}


@pytest.mark.parametrize("extra", [{}, {"--vectors": 2, "--multires": 3, "--timesteps": "adaptive"},
                                   {"--vectors": 2, "--start": "output", "--pull": 0.5, "--norm": "init"},
                                   {"--norm": "fixed", "--stop": "auto", "--stop-window": 2, "--stop-threshold": 0.9}])
def test_learn_equals_train_py(model_dir, images, tmp_path, extra):
    """minti.textual_inversion.learn (the method in one function, for lessons) and train.py draw the
    same batches, timesteps and noise: equal settings give bit-identical vectors."""
    import minti
    from minti.data import TEMPLATES
    from minti import learn

    out = tmp_path / "run"
    settings = {"--steps": 3, "--lr": 0.01, "--seed": 5, **extra}
    assert run(*base_args(model_dir, images, out, **settings)) == 0
    name = "tiny-multires.safetensors" if "--multires" in extra else "learned_embeds.safetensors"
    expected = vectors(out / name)
    word, losses = learn(minti.load(str(model_dir)), str(images), "<tiny>", "cat", steps=3, batch=2, lr=0.01,
                         seed=5, templates=TEMPLATES["object"], num_vectors=extra.get("--vectors", 1),
                         num_buckets=extra.get("--multires", 1), timesteps=extra.get("--timesteps", "uniform"),
                         **{k[2:].replace("-", "_"): v for k, v in extra.items()
                            if k.split("-")[2] in ("start", "pull", "norm", "stop")})
    got = word.vectors.detach()
    assert torch.equal(got if "--multires" in extra else got[0], expected)
    stopped = json.loads((out / "config.json").read_text()).get("stopped")
    assert len(losses) == (stopped["step"] if stopped else 3) and all(math.isfinite(x) for x in losses)
    assert (stopped is None) == ("--stop" not in extra) and (not stopped or word.stop.step == stopped["step"])


def test_stop_auto_ends_early_says_why_and_a_resumed_run_stops_at_the_same_step(model_dir, images, tmp_path, capsys):
    """--stop auto (DVAR): the run ends before --steps, says at which step and why, logs the fixed batch's loss;
    the same run cut short by --steps and resumed with the full --steps stops at the same step, same log."""
    stop = {"--stop": "auto", "--stop-window": 5, "--stop-threshold": 0.5, "--lr": 0.05}
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run(*base_args(model_dir, images, whole, **{"--steps": 60, **stop})) == 0
    said = capsys.readouterr().out
    stopped = json.loads((whole / "config.json").read_text())["stopped"]
    assert 5 < stopped["step"] < 60 and f"Stopped automatically at step {stopped['step']} of --steps 60" in said
    assert stopped["ratio"] < 0.5
    assert run(*base_args(model_dir, images, part, **{"--steps": stopped["step"] - 3, **stop})) == 0
    assert run("--resume", part, "--steps", 60) == 0
    assert json.loads((part / "config.json").read_text())["stopped"]["step"] == stopped["step"]
    logs = [list(csv.reader(open(folder / "log.csv"))) for folder in (whole, part)]
    assert logs[0][0][4] == "fixed_batch_loss" and len(logs[0]) == stopped["step"] + 1
    assert [r[:5] for r in logs[0]] == [r[:5] for r in logs[1]]
    assert torch.equal(vectors(whole / "learned_embeds.safetensors"), vectors(part / "learned_embeds.safetensors"))


def test_diffusers_and_kohya_spellings_are_aliases_listed_in_help():
    canonical = ["--model", "m", "--images", "i", "--token", "<t>", "--init", "cat", "--vectors", "2", "--steps", "5",
                 "--batch", "2", "--grad-accum", "3", "--lr", "0.1", "--precision", "bf16", "--checkpointing"]
    aliased = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "i", "--placeholder_token", "<t>",
               "--initializer_token", "cat", "--num_vectors", "2", "--max_train_steps", "5", "--train_batch_size", "2",
               "--gradient_accumulation_steps", "3", "--learning_rate", "0.1", "--mixed_precision", "bf16",
               "--gradient_checkpointing"]
    assert train.parse_args(aliased) == train.parse_args(canonical)
    assert train.parse_args(["--gradient-checkpointing"]).checkpointing is True
    usage = train.build_parser().format_help()
    assert all(alias in usage for alias in aliased[::2])


def test_precision_auto_is_the_default_and_says_its_choice(model_dir, images, tmp_path, capsys):
    """On this CPU (the suite hides GPUs) --precision auto is fp32, said at the start and kept in config.json;
    diffusers' --mixed_precision no is fp32 too."""
    assert train.TrainConfig().precision == "auto"
    assert run(*base_args(model_dir, images, tmp_path / "a", **{"--steps": 1})) == 0
    assert "precision fp32 (--precision auto)" in capsys.readouterr().out
    assert json.loads((tmp_path / "a" / "config.json").read_text())["config"]["precision"] == "fp32"
    assert run(*base_args(model_dir, images, tmp_path / "b", **{"--steps": 1, "--mixed_precision": "no"})) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["config"]["precision"] == "fp32"
