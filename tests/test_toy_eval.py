"""The toy evaluation's mechanics: known answers from fake samplers (renders of exactly the scene a
prompt asks for, or of the wrong one) judged by a fake oracle that knows every render's labels; the
Wilson interval against published values; the table, JSON and grid; the batched sampling loop on a
tiny random-weight model; errors. The shipped oracle (tracked in git: missing, a failure) judges the fake
renders too."""
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from minti.toy.bpe import train_bpe
from minti.toy import world as tw
from minti.toy import evaluate as toy_eval
from minti.io.concepts import Concept, ConceptError, save_diffusers
from minti.toy.oracle import DEFAULT_FOLDER, Oracle
from minti.schedulers import DDPM
from minti.toy.evaluate import Share, evaluate_concept, evaluate_prompt_following, wilson_interval

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest)

TOKEN = "<my-star>"
TRUTH = tw.CONCEPTS["striped_orange_star"]
NEUTRAL = ("white", "gray", "black")


# ---------------------------------------------------------------------------------------------
# A fake world: samplers that render scenes and remember their labels; an oracle that reads them back.

class FakeWorld:
    """Renders scenes for prompts and reads them back exactly (the oracle's interface: predict)."""

    def __init__(self, seed=0, honour_edits=True, truth=TRUTH):
        self.rng = np.random.default_rng(seed)
        self.honour_edits, self.truth = honour_edits, truth
        self.labels = {}  # image bytes -> labels {attr: index}
        self.drawn = []  # (prompt, Scene) of every sample, in order

    def render(self, scene):
        image = tw.render(scene)
        known = self.labels.setdefault(image.tobytes(), scene.labels())
        assert known == scene.labels(), "two scenes rendered to the same pixels"
        return image

    def scene_for(self, prompt):
        """The scene a perfect model draws: the concept for S*, the named attributes, the rest random."""
        words = prompt.split(" on ")[0].split()
        background = re.search(r" on an? (\w+) background", prompt)
        background = background.group(1) if background and self.honour_edits else None
        size = "small" if "small" in words and self.honour_edits else "large" if TOKEN in prompt else None
        if TOKEN in prompt:
            shape, colour, pattern = self.truth.shape, self.truth.colour, self.truth.pattern
        else:
            shape = next((w for w in words if w in tw.SHAPES), None)
            colour = next((w for w in words if w in tw.COLOURS), None)
            pattern = next((w for w in words if w in tw.PATTERNS), None)
            size = next((w for w in words if w in tw.SIZES), size)
        shape = shape or tw.SHAPES[self.rng.integers(len(tw.SHAPES))]
        pattern = pattern or tw.PATTERNS[self.rng.integers(len(tw.PATTERNS))]
        size = size or tw.SIZES[self.rng.integers(len(tw.SIZES))]
        if background is None:  # an unasked background: one of the neutral ones, never the object's
            options = [b for b in NEUTRAL if b != colour]
            background = options[self.rng.integers(len(options))]
        if colour is None:
            options = [c for c in tw.COLOURS if c != background]
            colour = options[self.rng.integers(len(options))]
        limit = tw.max_offset(size)
        x, y = self.rng.uniform(-limit, limit, 2)
        return tw.Scene(shape, colour, background, pattern, size, float(x), float(y))

    def sampler(self, prompts, seed):
        scenes = [self.scene_for(p) for p in prompts]
        self.drawn += list(zip(prompts, scenes))
        return np.stack([self.render(s) for s in scenes])

    def predict(self, images):
        keys = [np.ascontiguousarray(image).tobytes() for image in images]
        assert all(k in self.labels for k in keys), "the fake oracle can only read the fake world's renders"
        rows = [self.labels[k] for k in keys]
        return {a: torch.tensor([r[a] for r in rows]) for a in tw.ATTRIBUTES}


def training_images(world, n=5):
    return np.stack([world.render(s) for s in tw.concept_scenes("striped_orange_star", n)])


def concept(width=64, vectors=1, seed=0):
    return Concept(TOKEN, torch.randn(vectors, width, generator=torch.Generator().manual_seed(seed)))


def shipped_oracle():
    """The oracle git tracks in weights/toy/oracle/: missing, it is a failure, not a reason to skip."""
    path = os.path.join(DEFAULT_FOLDER, "model.safetensors")
    if not os.path.isfile(path):
        pytest.fail(f"the shipped oracle {path} is missing, though git tracks it: restore it (git checkout -- "
                    f"weights/toy/oracle) or train it again (python -m minti.toy.oracle)")
    return Oracle.load()


# ---------------------------------------------------------------------------------------------
# The binomial interval

def test_wilson_interval_matches_published_values():
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Stat. Med. 17,
    # Table II, method 3 (Wilson score, no continuity correction), to 4 decimals.
    published = {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605), (0, 20): (0.0, 0.1611),
                 (1, 29): (0.0061, 0.1718)}
    for (k, n), expected in published.items():
        assert np.allclose(wilson_interval(k, n), expected, atol=5e-5), (k, n)
    low, high = wilson_interval(29, 29)  # symmetric: k of n mirrors n - k of n
    assert np.isclose(low, 1 - wilson_interval(0, 29)[1]) and high == 1.0
    s = Share(81, 263)
    assert s.value == 81 / 263 and s.to_dict()["ci95"] == [0.2553, 0.3662]
    assert str(s) == " 30.8% [ 25.5,  36.6]"
    with pytest.raises(ValueError, match="at least one sample"):
        wilson_interval(0, 0)
    # Pooled edits share their noise: 164 of 192 over 3 edits of 64 noises is the interval of 54.67 of 64,
    # wider than 164 of 192 would be as 192 independent samples.
    pooled, naive = Share(164, 192, independent=64), Share(164, 192)
    assert pooled.value == naive.value and pooled.interval == wilson_interval(164 / 3, 64)
    assert pooled.interval[0] < naive.interval[0] and pooled.interval[1] > naive.interval[1]
    assert pooled.to_dict()["independent"] == 64 and "independent" not in naive.to_dict()


# ---------------------------------------------------------------------------------------------
# A learned concept, judged with known answers

def test_perfect_sampler_reconstructs_and_edits_prompt_only_at_chance():
    world = FakeWorld()
    n = 60
    report = evaluate_concept(None, concept(), TRUTH, n=n, seed=0, sampler=world.sampler, oracle=world,
                              images=training_images(world))
    s, p, i = report["concept"], report["prompt_only"], report["image_only"]
    for key in ("reconstruction", "shape", "colour", "pattern", "background=blue", "background=green",
                "size=small"):
        assert s[key] == Share(n, n), key
    for key in ("editability", "edit: asked change", "edit: concept intact"):  # 3 edits of n noises pooled
        assert s[key] == Share(3 * n, 3 * n, independent=n), key
    # The edits are the backgrounds the training images lacked (not orange: not a background) + small.
    assert report.settings["edits"] == ["background=blue", "background=green", "size=small"]

    # Prompt only: "a photo of a star" draws a star, colour and pattern at random. The expected count
    # comes from what the fake sampler drew, not from the evaluation.
    recon = [sc for prompt, sc in world.drawn if TOKEN not in prompt and " on " not in prompt
             and "small" not in prompt]
    assert len(recon) == n and all(sc.shape == "star" for sc in recon)
    lucky = sum(sc.colour == "orange" and sc.pattern == "striped" for sc in recon)
    assert p["reconstruction"] == Share(lucky, n) and p["shape"] == Share(n, n)
    assert p["colour"].hits == sum(sc.colour == "orange" for sc in recon)
    assert lucky < 0.2 * n  # chance: 1/7 x 1/3 here (the orange object avoids no neutral background)
    assert p["edit: asked change"] == Share(3 * n, 3 * n, n)  # the prompt's edit is honoured ...
    assert p["editability"].hits < 0.2 * 3 * n  # ... but the concept is there only by chance

    # Image only: the training images show the concept, never on blue / green, never small.
    assert i["reconstruction"] == Share(5, 5)
    assert i["editability"] == Share(0, 15, 5) and i["edit: concept intact"] == Share(15, 15, 5)
    # Same templates for S* and prompt only, S* replaced by the shape name.
    assert report.prompts["concept"]["reconstruction"][0] == f"a photo of a {TOKEN}"
    assert report.prompts["prompt_only"]["reconstruction"][0] == "a photo of a star"
    assert report.prompts["prompt_only"]["background=blue"][1] == "a rendering of a star on a blue background"
    assert report.prompts["concept"]["size=small"][3] == f"a small {TOKEN}"


def test_sampler_that_ignores_edits_has_zero_editability():
    world = FakeWorld(honour_edits=False)
    n = 24
    report = evaluate_concept(None, concept(), TRUTH, n=n, sampler=world.sampler, oracle=world,
                              images=training_images(world))
    s = report["concept"]
    assert s["reconstruction"] == Share(n, n)
    assert s["editability"] == Share(0, 3 * n, n) and s["edit: asked change"] == Share(0, 3 * n, n)
    assert s["edit: concept intact"] == Share(3 * n, 3 * n, n)
    assert all(s[e] == Share(0, n) for e in ("background=blue", "background=green", "size=small"))


def test_reference_word_and_other_truth(monkeypatch, tmp_path):
    truth = tw.CONCEPTS["outlined_pink_heart"]
    world = FakeWorld(truth=truth)
    monkeypatch.setattr(toy_eval, "CONCEPTS_FOLDER", str(tmp_path))  # no shipped images: renders
    for scene in tw.concept_scenes("outlined_pink_heart", 5):  # what the default images must be
        world.render(scene)
    report = evaluate_concept(None, concept(), "outlined_pink_heart", n=6, sampler=world.sampler,
                              oracle=world,
                              reference_word=tw.SHAPE_NOUN)
    assert report.prompts["prompt_only"]["reconstruction"][0] == "a photo of a shape"
    assert report.settings["truth"]["shape"] == "heart" and report["concept"]["reconstruction"] == Share(6, 6)
    # Pink is not a background, so the edits are again blue, green and small; default training
    # images are renders of the concept (no concept folder is needed).
    assert report.settings["edits"] == ["background=blue", "background=green", "size=small"]
    assert report["image_only"]["reconstruction"] == Share(5, 5)


def test_shipped_oracle_judges_the_fake_renders():
    oracle = shipped_oracle()
    world = FakeWorld(seed=1)
    report = evaluate_concept(None, concept(), TRUTH, n=64, sampler=world.sampler, oracle=oracle,
                              images=training_images(world))
    # Clean renders of exactly the asked scene: the oracle (>= 99% per attribute) misses only a few.
    assert report["concept"]["reconstruction"].value >= 0.9
    assert report["concept"]["editability"].value >= 0.9
    assert report["prompt_only"]["reconstruction"].value <= 0.2
    assert report["image_only"]["reconstruction"].value == 1.0


# ---------------------------------------------------------------------------------------------
# Prompt following

def test_seen_captions_name_what_they_ask():
    texts, asked = toy_eval.seen_captions(300, seed=3)
    assert texts == toy_eval.seen_captions(300, seed=3)[0]
    for text, q in zip(texts, asked):
        assert {"shape", "colour", "background"} <= set(q)
        article = "an" if q["background"][0] in "aeiou" else "a"
        assert text.endswith(f" on {article} {q['background']} background")
        assert all(q[a] in text.split() for a in q)
        assert not ("pattern" in q and (q["shape"], q["colour"], q["pattern"]) in tw.HELD_OUT)
    for a in ("pattern", "size"):
        share = np.mean([a in q for q in asked])
        assert 0.4 < share < 0.8, a  # named as often as in training (60%)


def test_prompt_following_known_answers():
    world = FakeWorld(seed=2)
    report = evaluate_prompt_following(None, 64, sampler=world.sampler, oracle=world)
    shares = report["model"]
    assert shares["shape+colour+background"] == Share(64, 64) and shares["all named"] == Share(64, 64)
    assert shares["pattern"].n == sum("pattern" in q["asked"] for q in report.prompts["model"]) < 64

    class WrongColour(FakeWorld):
        def scene_for(self, prompt):
            scene = super().scene_for(prompt)
            colour = next(c for c in tw.COLOURS if c not in (scene.colour, scene.background))
            return tw.Scene(scene.shape, colour, scene.background, scene.pattern, scene.size,
                            scene.x, scene.y)

    world = WrongColour(seed=2)
    shares = evaluate_prompt_following(None, 64, sampler=world.sampler, oracle=world)["model"]
    assert shares["colour"] == Share(0, 64) and shares["shape+colour+background"] == Share(0, 64)
    assert shares["shape"] == Share(64, 64) and shares["background"] == Share(64, 64)


# ---------------------------------------------------------------------------------------------
# Table, JSON, grid

def test_table_json_and_grid_are_written(tmp_path):
    world = FakeWorld()
    report = evaluate_concept(None, concept(), TRUTH, n=12, sampler=world.sampler, oracle=world,
                              images=training_images(world), grid_columns=6)
    table = report.table()
    for text in (f"S* ({TOKEN})", 'prompt only ("star")', "image only (5 images)", "reconstruction",
                 "editability", "background blue", "size small", "100.0% [ 75.8, 100.0]"):
        assert text in table, text
    paths = report.save(str(tmp_path), "concept_eval")
    assert paths == [str(tmp_path / "concept_eval.json"), str(tmp_path / "concept_eval.png")]
    data = json.loads((tmp_path / "concept_eval.json").read_text())
    assert data["shares"]["concept"]["reconstruction"] == {"share": 1.0, "hits": 12, "n": 12,
                                                           "ci95": [0.7575, 1.0]}
    assert data["settings"]["n"] == 12 and data["settings"]["token"] == TOKEN
    grid = np.asarray(Image.open(tmp_path / "concept_eval.png"))
    rows = 2 * (1 + 3) + 1  # S* and prompt only: reconstruction + 3 edits each; the training images
    assert grid.shape == (rows * (2 * tw.IMAGE_SIZE + 2), 300 + 6 * (2 * tw.IMAGE_SIZE + 2), 3)
    # The first S* image sits in the first row, scaled up 2x.
    first = np.repeat(np.repeat(world.render(world.drawn[0][1]), 2, 0), 2, 1)
    assert np.array_equal(grid[:2 * tw.IMAGE_SIZE, 300:300 + 2 * tw.IMAGE_SIZE], first)
    # A .png path puts the JSON beside it.
    assert report.save(str(tmp_path / "g.png"), "x") == [str(tmp_path / "g.json"), str(tmp_path / "g.png")]


# ---------------------------------------------------------------------------------------------
# The real sampling loop on a tiny random-weight model with the toy architecture

@pytest.fixture(scope="module")
def tiny_sd():
    from minti.toy.model import toy_configs
    from minti.clip import CLIPTextModel
    from minti.unet import UNet
    from minti.vae import VAE
    from minti.io.weights import StableDiffusion

    tok = train_bpe([c for c in tw.caption_corpus(400, seed=0) if c], 560)
    vae_cfg, text_cfg, unet_cfg = toy_configs(len(tok), tok.bos_id, tok.eos_id)
    torch.manual_seed(0)
    return StableDiffusion(tokenizer=tok, text_encoder=CLIPTextModel(text_cfg).eval(),
                           unet=UNet(unet_cfg).eval(), vae=VAE(vae_cfg).eval(), scheduler=DDPM(),
                           latent_scale=0.9)


class ConstantOracle:
    """Reads every image as a small plain red circle on white."""

    def predict(self, images):
        return {a: torch.zeros(len(images), dtype=torch.long) for a in tw.ATTRIBUTES}


def test_image_sampler_batches_without_changing_images(tiny_sd):
    prompts = ["a photo of a red star", "a blue heart on a white background", "a photo of a star"] * 2
    one = toy_eval.ImageSampler(tiny_sd, steps=2, cfg=4.0, batch_size=1)(prompts, seed=5)
    five = toy_eval.ImageSampler(tiny_sd, steps=2, cfg=4.0, batch_size=5)(prompts, seed=5)
    assert one.shape == (6, tw.IMAGE_SIZE, tw.IMAGE_SIZE, 3) and one.dtype == np.uint8
    # Image i starts from noise i whatever the chunking: equal up to float rounding of other batch sizes
    # (at most one uint8 level).
    assert np.abs(one.astype(int) - five.astype(int)).max() <= 1
    assert not np.array_equal(one[0], one[3])  # different noise for the same prompt


def test_learned_word_reaches_the_samples(tiny_sd):
    a = toy_eval.concept_sampler(tiny_sd, concept(seed=1, vectors=2), steps=2, cfg=4.0)
    b = toy_eval.concept_sampler(tiny_sd, concept(seed=2, vectors=2), steps=2, cfg=4.0)
    with_word, without = [f"a photo of a {TOKEN}"] * 2, ["a photo of a star"] * 2
    assert not np.array_equal(a(with_word, 0), b(with_word, 0))
    assert np.array_equal(a(without, 0), b(without, 0))


def test_evaluate_concept_on_the_model(tiny_sd, tmp_path):
    size = len(tiny_sd.tokenizer)
    path = str(tmp_path / "c.safetensors")
    save_diffusers(path, concept(vectors=2))
    truth = tw.ToyConcept("circle", "red", "plain")  # what the constant oracle reads
    for _ in range(2):  # twice: the model's own tokenizer is not changed
        report = evaluate_concept(tiny_sd, path, truth, n=3, steps=1, batch_size=2, oracle=ConstantOracle())
    assert len(tiny_sd.tokenizer) == size
    s = report["concept"]
    assert s["reconstruction"] == Share(3, 3) and s["background=blue"] == Share(0, 3)
    assert s["size=small"] == Share(3, 3) and s["editability"] == Share(3, 9, 3)
    assert report.settings["truth"]["name"] is None and report.settings["vectors"] == 2


def test_errors(tiny_sd, tmp_path):
    world = FakeWorld()
    with pytest.raises(ValueError, match="unknown toy concept 'striped_blue_star'; known: .*striped_orange"):
        evaluate_concept(None, concept(), "striped_blue_star", sampler=world.sampler, oracle=world)
    wide = str(tmp_path / "sd15.safetensors")
    save_diffusers(wide, concept(width=768))
    with pytest.raises(ConceptError, match="width 768.*expects width 64"):
        evaluate_concept(tiny_sd, wide, TRUTH, n=2, oracle=world)
    two = str(tmp_path / "two.safetensors")
    import safetensors.torch
    safetensors.torch.save_file({"<a>": torch.zeros(1, 64), "<b>": torch.zeros(1, 64)}, two)
    with pytest.raises(ConceptError, match="exactly one learned word, got 2"):
        evaluate_concept(tiny_sd, two, TRUTH, n=2, oracle=world)
    with pytest.raises(ValueError, match="must be >= 1"):
        evaluate_concept(None, concept(), TRUTH, n=0, sampler=world.sampler, oracle=world)
    with pytest.raises(ConceptError, match="multiresolution"):
        evaluate_concept(tiny_sd, Concept(TOKEN, torch.zeros(4, 1, 64)), TRUTH, n=2, oracle=world)


def test_cli_writes_table_json_and_grid(tiny_sd, tmp_path, capsys):
    from minti.io.weights import save_diffusers_folder as save_model

    save_model(tiny_sd, str(tmp_path / "model"))
    Oracle().save(str(tmp_path / "oracle"))  # random weights: the wiring, not the numbers
    path = str(tmp_path / "c.safetensors")
    save_diffusers(path, concept())
    common = ["--model", str(tmp_path / "model"), "--oracle", str(tmp_path / "oracle"), "--steps", "1",
              "--n", "2"]
    toy_eval.main(["--concept", path, *common, "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "reconstruction" in out and f"S* ({TOKEN})" in out
    assert json.loads((tmp_path / "out" / "concept_eval.json").read_text())["settings"]["n"] == 2
    toy_eval.main(["--prompt-following", *common, "--out", str(tmp_path / "pf.png")])
    assert "shape, colour and background right" in capsys.readouterr().out
    assert (tmp_path / "pf.png").exists() and (tmp_path / "pf.json").exists()
    save_diffusers(str(tmp_path / "wide.safetensors"), concept(width=768))
    with pytest.raises(SystemExit, match="error: .*width 768.*expects width 64"):
        toy_eval.main(["--concept", str(tmp_path / "wide.safetensors"), *common])
