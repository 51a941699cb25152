"""The toy world: deterministic renders whose pixels agree with their labels, captions that never
name a held-out combination, committed concept images, and the shipped oracle's accuracy."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from minti.toy import world as tw
from minti.toy.oracle import DEFAULT_FOLDER, Oracle, augment, blur, evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_SEED = 2024  # the oracle trains on default_rng(0)'s stream; this is a different stream


# ---------------------------------------------------------------------------------------------
# Renderer

def test_same_seed_same_pixels_and_labels():
    a, la = tw.render_batch(64, 7)
    b, lb = tw.render_batch(64, 7)
    c, _ = tw.render_batch(64, 8)
    assert a.dtype == np.uint8 and a.shape == (64, tw.IMAGE_SIZE, tw.IMAGE_SIZE, 3)
    assert np.array_equal(a, b) and all(np.array_equal(la[k], lb[k]) for k in tw.ATTRIBUTES)
    assert not np.array_equal(a, c)
    assert set(la) == set(tw.ATTRIBUTES) and all(v.dtype == np.int64 for v in la.values())


def test_batch_render_equals_one_at_a_time():
    labels = tw.random_labels(24, np.random.default_rng(3))
    batch = tw.render_labels(labels)
    for i, scene in enumerate(tw.scenes_from_labels(labels)):
        assert np.array_equal(batch[i], tw.render(scene))


def test_every_attribute_value_appears_and_colours_never_clash():
    _, labels = tw.render_batch(2000, 11)
    for attr, values in tw.ATTRIBUTES.items():
        counts = np.bincount(labels[attr], minlength=len(values))
        assert len(counts) == len(values) and counts.min() > 0, (attr, counts)
    colour = np.array(tw.COLOURS)[labels["colour"]]
    background = np.array(tw.BACKGROUNDS)[labels["background"]]
    assert not np.any(colour == background)
    assert len(tw.SHAPES) >= 6 and len(tw.COLOURS) >= 8


def test_pixels_are_blends_of_object_and_background_colour():
    images, labels = tw.render_batch(300, 12)
    obj = np.array([tw.PALETTE[c] for c in tw.COLOURS], dtype=float)[labels["colour"]][:, None, None]
    bg = np.array([tw.PALETTE[b] for b in tw.BACKGROUNDS], dtype=float)[labels["background"]][:, None, None]
    img = images.astype(float)
    # The renderer keeps a margin of background: the border rows and columns are the background.
    for edge in (img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]):
        assert np.array_equal(edge, np.broadcast_to(bg[:, 0], edge.shape))
    # Every pixel is bg + a * (obj - bg) for one a in [0, 1], up to rounding to integers.
    a = ((img - bg) * (obj - bg)).sum(-1) / ((obj - bg) ** 2).sum(-1)
    assert a.min() >= -0.01 and a.max() <= 1.01
    assert np.abs(bg + a[..., None] * (obj - bg) - img).max() <= 1.0
    # Some pixels are pure object colour in every image (the object is there).
    assert np.all((np.abs(img - obj).max(-1) == 0).any(axis=(1, 2)))


@pytest.mark.parametrize("shape", tw.SHAPES)
def test_pattern_and_size_show_in_the_pixels(shape):
    centre = tw.IMAGE_SIZE // 2
    ink = {}
    for pattern in tw.PATTERNS:
        for size in tw.SIZES:
            image = tw.render(tw.Scene(shape, "red", "white", pattern, size)).astype(int)
            is_object = np.abs(image - tw.PALETTE["red"]).max(-1) <= 1
            ink[pattern, size] = (image != tw.PALETTE["white"]).any(-1).sum()
            middle = image[centre - 1:centre + 1, centre - 1:centre + 1]  # the 4 pixels at the centre
            if size == "large":
                # plain: filled; striped: a stripe runs through the centre; outlined: hollow
                expected = tw.PALETTE["white"] if pattern == "outlined" else tw.PALETTE["red"]
                assert np.all(middle == expected), (pattern, middle)
            assert is_object.sum() > 20
    # Radii 0.37 vs 0.27 of the image: filled area grows ~1.9x, a border's ~1.4x.
    assert ink["plain", "large"] > 1.6 * ink["plain", "small"]
    for pattern in ("striped", "outlined"):
        assert ink[pattern, "large"] > 1.2 * ink[pattern, "small"]
    for size in tw.SIZES:
        assert ink["plain", size] > ink["striped", size] > ink["outlined", size]


def test_bad_scenes_are_refused_clearly():
    with pytest.raises(ValueError, match="invisible"):
        tw.Scene("star", "blue", "blue", "plain", "large")
    with pytest.raises(ValueError, match="shape='hexagon'"):
        tw.Scene("hexagon", "red", "blue", "plain", "large")
    with pytest.raises(ValueError, match="stay inside"):
        tw.render(tw.Scene("star", "red", "blue", "plain", "large", x=9.0))


# ---------------------------------------------------------------------------------------------
# Captions

def parse(text):
    """Read a caption back into {attr: value}: the background is the colour after "on"."""
    words = text.split()
    named = {}
    if "on" in words:
        i = words.index("on")
        rest = [w for w in words[i + 1:] if w not in ("a", "an", "background")]
        assert len(rest) == 1 and rest[0] in tw.BACKGROUNDS, text
        named["background"] = rest[0]
        words = words[:i]
    for attr, values in (("shape", tw.SHAPES), ("colour", tw.COLOURS), ("pattern", tw.PATTERNS),
                         ("size", tw.SIZES)):
        found = [w for w in words if w in values]
        assert len(found) <= 1, text
        if found:
            named[attr] = found[0]
    return named


def test_captions_are_true_small_vocabulary_and_sometimes_empty():
    rng = np.random.default_rng(0)
    scenes = tw.scenes_from_labels(tw.random_labels(4000, rng))
    n_empty, seen = 0, set()
    for scene in scenes:
        text, named = tw.caption(scene, rng, return_named=True)
        assert set(text.split()) <= tw.VOCABULARY, text
        assert parse(text) == named, text
        assert all(getattr(scene, attr) == value for attr, value in named.items()), (text, scene)
        n_empty += text == ""
        seen.add(text)
        if text:  # the article agrees with the next word
            words = text.split()
            for w, nxt in zip(words, words[1:]):
                if w in ("a", "an"):
                    assert w == ("an" if nxt[0] in "aeiou" else "a"), text
    assert 0.07 < n_empty / len(scenes) < 0.13
    assert len(seen) > 2000  # varied: orders, prefixes, attributes left out
    assert "a photo of a large striped red star on a blue background" in {
        tw.caption(tw.Scene("star", "red", "blue", "striped", "large"), np.random.default_rng(s))
        for s in range(3000)}


def test_captions_never_name_a_held_out_combination():
    assert tw.HELD_OUT and not tw.CONCEPTS[tw.DEFAULT_CONCEPT].held_out
    rng = np.random.default_rng(1)
    for combo in sorted(tw.HELD_OUT):
        shape, colour, pattern = combo
        partly = 0
        for i in range(1500):
            background = [b for b in tw.BACKGROUNDS if b != colour][i % 4]
            scene = tw.Scene(shape, colour, background, pattern, tw.SIZES[i % 2])
            named = parse(tw.caption(scene, rng))
            assert not (named.get("shape") == shape and named.get("colour") == colour
                        and named.get("pattern") == pattern), named
            partly += sum(a in named for a in ("shape", "colour", "pattern")) == 2
        assert partly > 300  # its images still get captions that name two of the three
    # ...while a concept that is not held out is named whole now and then.
    c = tw.CONCEPTS[tw.DEFAULT_CONCEPT]
    texts = [parse(tw.caption(c.scene("white"), rng)) for _ in range(300)]
    assert any(t.get("shape") == c.shape and t.get("colour") == c.colour and t.get("pattern") == c.pattern
               for t in texts)


# ---------------------------------------------------------------------------------------------
# Concepts

def test_committed_concept_images_match_the_renderer(tmp_path):
    for name in tw.CONCEPTS:
        folder = os.path.join(REPO, "weights", "toy", "concepts", name)
        fresh = tw.write_concept_images(name, tmp_path / name)
        committed = sorted(os.listdir(folder))
        assert committed == [os.path.basename(p) for p in fresh], name
        for path in fresh:
            mine = np.array(Image.open(path))
            theirs = np.array(Image.open(os.path.join(folder, os.path.basename(path))))
            assert np.array_equal(mine, theirs), (name, path)


def test_concept_images_show_the_concept_on_varied_backgrounds():
    for name, concept in tw.CONCEPTS.items():
        scenes = tw.concept_scenes(name, n=5)
        assert all((s.shape, s.colour, s.pattern, s.size) ==
                   (concept.shape, concept.colour, concept.pattern, concept.image_size) for s in scenes)
        assert len({s.background for s in scenes}) >= 3
        assert len({(s.x, s.y) for s in scenes}) == 5


# ---------------------------------------------------------------------------------------------
# Oracle

@pytest.fixture(scope="module")
def oracle():
    return Oracle.load(DEFAULT_FOLDER)


def test_blur_equals_a_convolution_with_repeated_borders():
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    sigma = torch.tensor([0.0, 0.5, 1.0, 1.5])
    t = torch.arange(-3, 4, dtype=torch.float32)
    for i in range(4):
        k = torch.exp(-t ** 2 / (2 * max(sigma[i].item(), 1e-3) ** 2))
        k = (k / k.sum()).repeat(3, 1)
        y = F.pad(x[i:i + 1], (3, 3, 3, 3), mode="replicate")
        y = F.conv2d(F.conv2d(y, k[:, None, None, :], groups=3), k[:, None, :, None], groups=3)
        torch.testing.assert_close(blur(x, sigma)[i:i + 1], y, rtol=0, atol=1e-5)


def test_oracle_reads_fresh_renders(oracle):
    acc = evaluate(oracle, n=500, seed=EVAL_SEED)
    print("oracle, clean:", acc)
    for attr in tw.ATTRIBUTES:
        assert acc[attr] >= 0.99, (attr, acc)


def test_oracle_reads_degraded_renders(oracle):
    # Blur sigma 1 px and noise 0.05: about a VAE round trip's error (MSE ~0.013 on [-1, 1]).
    acc = evaluate(oracle, n=500, seed=EVAL_SEED + 1, degradation="blur1+noise0.05")
    print("oracle, blur1+noise0.05:", acc)
    for attr in tw.ATTRIBUTES:
        assert acc[attr] >= 0.97, (attr, acc)
    acc = evaluate(oracle, n=500, seed=EVAL_SEED + 2, degradation="downup2+noise0.05")
    print("oracle, downup2+noise0.05:", acc)
    for attr in tw.ATTRIBUTES:
        assert acc[attr] >= 0.97, (attr, acc)


def test_oracle_inputs_and_concepts(oracle):
    images, labels = tw.render_batch(64, EVAL_SEED + 3)
    as_uint8 = oracle.predict(images)
    as_float = oracle.predict(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert all(torch.equal(as_uint8[a], as_float[a]) for a in tw.ATTRIBUTES)
    assert all(v.dtype == torch.long and v.shape == (64,) for v in as_uint8.values())
    with pytest.raises(ValueError, match="32x32"):
        oracle.predict(np.zeros((2, 64, 64, 3), np.uint8))
    # The augmentations it trained on keep the labels readable.
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert oracle.accuracy(augment(x, torch.Generator().manual_seed(0)), labels)["all"] >= 0.9
    # It reads every concept's images as the concept.
    for name, c in tw.CONCEPTS.items():
        images = np.stack([tw.render(s) for s in tw.concept_scenes(name, n=5)])
        acc = oracle.accuracy(images, {"shape": c.shape, "colour": c.colour, "pattern": c.pattern,
                                       "size": c.image_size})
        assert acc["all"] == 1.0, (name, acc)
