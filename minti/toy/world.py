"""The toy world: synthetic one-object scenes with exact labels, their captions, and the concepts.

Real SD 1.x weights are a multi-GB download; the toy world lets every part of minti run on a CPU
and makes textual inversion measurable (`oracle.py` reads images back into these labels). A scene
is one object on a plain background, described by five attributes: shape, colour, background,
pattern and size (plus a small position jitter). Shapes are drawn from signed distance functions
(after Inigo Quilez's 2D distance functions), in pure numpy and vectorised over a whole batch.

Concepts and held-out combinations (the design, and why):
- A concept is a shape + colour + pattern (e.g. a striped orange star) that one learned word must
  carry whole: "a photo of S*" should show all three, while "a photo of a star" gets the colour
  right 1 time in 8 and the pattern 1 time in 3 (about 4% for both) by chance.
- Images of *every* combination stay in the model's training data. A *held-out* concept is a
  combination that the captions never name together: a caption of its image that would name its
  shape, colour and pattern all at once drops one of the three (chosen at random). So the model has
  drawn it (it is ordinary to draw, under partial captions such as "a striped star"), but no text
  ever asked for the whole of it. Dropping the images instead would measure the model's
  compositional generalisation, not inversion; and a thing no caption names at all becomes what the
  model draws when nothing is named (a prototype's never-named ring: 17% with S*, 15% without).
- The default concept is *not* held out: the captions can name it (rarely: 1 image in 144 has it,
  and a caption names all three attributes about 40% of the time), so a good word for it exists.
- Concept images (`write_concept_images`) are like a user's 3-5 photos: the same object, always
  large (small ones blur in the VAE), at varied positions, on varied *neutral* backgrounds (white,
  gray, black) so that the word does not absorb a background; blue and green backgrounds and the
  small size are left for the editability test ("S* on a blue background", "a small S*").
"""
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGE_SIZE = 32  # pixels; 32x32 trains ~4x faster than 64x64 on 2 CPU cores (measured on a prototype)

# Named colours (sRGB). Chosen far apart (any two object colours differ by >= 80 in some channel;
# orange/yellow are the closest; an object and its background by >= 68, purple on gray) so that
# blur, noise and a small colour jitter never move one into another.
PALETTE = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 70),
    "cyan": (40, 200, 220),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (245, 130, 190),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")  # distinct silhouettes at 8x8 latents
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")  # object colours
BACKGROUNDS = ("white", "gray", "black", "blue", "green")  # an object never has its background's colour
PATTERNS = ("plain", "striped", "outlined")  # filled; border + diagonal stripes; border only
SIZES = ("small", "large")
# The attributes the oracle reads, in a fixed order (its heads, the label arrays).
ATTRIBUTES = {"shape": SHAPES, "colour": COLOURS, "background": BACKGROUNDS, "pattern": PATTERNS,
              "size": SIZES}

# Geometry, as fractions of the image size so that IMAGE_SIZE can change.
SIZE_RADIUS = {"small": 0.27, "large": 0.37}  # 8.6 and 11.8 px at 32: a small star is still a star
EXTENT = 1.1        # every shape reaches at most 1.1 radii along x or y (triangle corners)
MARGIN = 1.0        # pixels of background kept between the object and the image border
OUTLINE = 0.075     # border width: 2.4 px at 32, wide enough to survive a downsample-4 VAE
STRIPE_PERIOD = 0.1875  # 6 px at 32, measured across the diagonal stripes; half ink, half gap


# ----------------------------------------------------------------------------------------------
# Shapes as signed distance functions: negative inside, in units of the object's radius, y up.

def _polygon_sdf(x, y, vertices):
    """Exact signed distance to a simple polygon (after Quilez's sdPolygon); x, y are arrays."""
    v = np.asarray(vertices, dtype=np.float32)
    d2 = np.full(x.shape, np.inf, dtype=np.float32)
    inside = np.zeros(x.shape, dtype=bool)
    for i in range(len(v)):
        (xi, yi), (xj, yj) = v[i], v[i - 1]
        ex, ey = xj - xi, yj - yi
        wx, wy = x - xi, y - yi
        h = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        bx, by = wx - ex * h, wy - ey * h
        d2 = np.minimum(d2, bx * bx + by * by)
        # Even-odd crossing test: does a ray from (x, y) to the right cross this edge?
        crosses = (y >= yi) != (y >= yj)
        xcross = xi + (y - yi) * ex / (ey if ey != 0 else 1.0)
        inside ^= crosses & (x < xcross)
    return np.where(inside, -1.0, 1.0).astype(np.float32) * np.sqrt(d2)


def _star_vertices(points=5, outer=1.1, inner=0.5, dy=-0.1):
    # inner/outer 0.5 rather than the regular star's 0.38: chunkier points survive blurring.
    angles = np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, outer * inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles) + dy], axis=1)


_POLYGONS = {
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    # Equilateral (height = side * sqrt(3)/2), centred on its bounding box.
    "triangle": [(0.0, 0.95), (-1.1, -0.955), (1.1, -0.955)],
    "star": _star_vertices(),
    # A plus sign with thick arms (0.8 radii): a thin cross blurs into a blob (prototype), and an
    # outlined one needs room for a hollow.
    "cross": [(-0.4, 1.0), (0.4, 1.0), (0.4, 0.4), (1.0, 0.4), (1.0, -0.4), (0.4, -0.4),
              (0.4, -1.0), (-0.4, -1.0), (-0.4, -0.4), (-1.0, -0.4), (-1.0, 0.4), (-0.4, 0.4)],
}


def _heart_sdf(x, y):
    """Quilez's exact heart (tip at (0, 0), 1.21 wide, 1.10 tall), scaled to ~2 radii and centred."""
    s = 1.74  # 1.05 / 0.604: half-width 1.05 radii
    x, y = np.abs(x) / s, y / s + 0.552  # 0.552: half the heart's height, so it sits centred
    lobe = np.sqrt((x - 0.25) ** 2 + (y - 0.75) ** 2) - np.sqrt(2.0) / 4
    m = 0.5 * np.maximum(x + y, 0.0)
    tip = np.sqrt(np.minimum(x ** 2 + (y - 1.0) ** 2, (x - m) ** 2 + (y - m) ** 2)) * np.sign(x - y)
    return np.where(x + y > 1.0, lobe, tip) * s


def shape_sdf(shape, x, y):
    """Signed distance (radii, negative inside) of `shape` at points x, y (radii, y up)."""
    if shape == "circle":
        return np.sqrt(x * x + y * y) - 1.0
    if shape == "heart":
        return _heart_sdf(x, y)
    return _polygon_sdf(x, y, _POLYGONS[shape])


# ----------------------------------------------------------------------------------------------
# Scenes and rendering.

@dataclass(frozen=True)
class Scene:
    """One toy image's labels. x, y: the object's centre offset from the image centre in pixels
    (right and down), kept small enough that the object stays inside the image."""
    shape: str
    colour: str
    background: str
    pattern: str
    size: str
    x: float = 0.0
    y: float = 0.0

    def __post_init__(self):
        for attr, values in ATTRIBUTES.items():
            if getattr(self, attr) not in values:
                raise ValueError(f"Scene {attr}={getattr(self, attr)!r} is not one of {values}")
        if self.colour == self.background:
            raise ValueError(f"a {self.colour} object on a {self.background} background is invisible: "
                             f"choose a background other than {self.colour!r}")

    def labels(self):
        """The scene as integer labels {attr: index} (indices into ATTRIBUTES[attr])."""
        return {attr: values.index(getattr(self, attr)) for attr, values in ATTRIBUTES.items()}


def max_offset(size, image_size=IMAGE_SIZE):
    """Largest centre offset (pixels, per axis) that keeps an object of this size MARGIN inside."""
    return image_size / 2 - EXTENT * SIZE_RADIUS[size] * image_size - MARGIN


# Which background each object colour may have: any but its own.
_BACKGROUND_OK = np.array([[c != b for b in BACKGROUNDS] for c in COLOURS])


def random_labels(n, rng, image_size=IMAGE_SIZE):
    """n random scenes as arrays: {attr: int64 [n]} plus "x", "y": float32 [n] offsets (pixels).

    Every attribute is uniform, except that the background is uniform over those allowed for the
    object's colour."""
    labels = {attr: rng.integers(len(values), size=n) for attr, values in ATTRIBUTES.items()
              if attr != "background"}
    # Inverse-CDF draw from each colour's allowed backgrounds.
    allowed = _BACKGROUND_OK[labels["colour"]]
    cdf = np.cumsum(allowed, axis=1) / allowed.sum(axis=1, keepdims=True)
    labels["background"] = (rng.random(n)[:, None] >= cdf).sum(axis=1)
    labels = {attr: labels[attr].astype(np.int64) for attr in ATTRIBUTES}
    limit = np.array([max_offset(s, image_size) for s in SIZES])[labels["size"]]
    labels["x"] = (rng.uniform(-1, 1, n) * limit).astype(np.float32)
    labels["y"] = (rng.uniform(-1, 1, n) * limit).astype(np.float32)
    return labels


def scenes_from_labels(labels):
    """Label arrays (as from `random_labels`) -> list of Scene."""
    n = len(labels["shape"])
    xs = labels.get("x", np.zeros(n))
    ys = labels.get("y", np.zeros(n))
    return [Scene(**{attr: values[int(labels[attr][i])] for attr, values in ATTRIBUTES.items()},
                  x=float(xs[i]), y=float(ys[i])) for i in range(n)]


def _coverage(d):
    """Share of a pixel inside an edge at signed distance d (pixels): a 1-pixel linear ramp."""
    return np.clip(0.5 - d, 0.0, 1.0)


def render_labels(labels, image_size=IMAGE_SIZE):
    """Render label arrays (from `random_labels`) into uint8 images [n, image_size, image_size, 3]."""
    n = len(labels["shape"])
    radius = (np.array([SIZE_RADIUS[s] for s in SIZES], dtype=np.float32) * image_size)[labels["size"]]
    radius = radius[:, None, None]
    centre = image_size / 2
    grid = np.arange(image_size, dtype=np.float32) + 0.5  # pixel centres
    dx = grid[None, None, :] - (centre + np.asarray(labels["x"], np.float32)[:, None, None])  # [n,1,W]
    dy = grid[None, :, None] - (centre + np.asarray(labels["y"], np.float32)[:, None, None])  # [n,H,1]
    dx, dy = np.broadcast_arrays(dx, dy)

    # Signed distance in pixels, one shape at a time over the images that have it.
    d = np.empty((n, image_size, image_size), dtype=np.float32)
    for k, shape in enumerate(SHAPES):
        idx = np.flatnonzero(labels["shape"] == k)
        if len(idx):
            r = radius[idx]
            d[idx] = shape_sdf(shape, dx[idx] / r, -dy[idx] / r) * r  # rows grow downward: flip y

    # Ink (0..1): how much of each pixel takes the object's colour; the rest is background.
    fill = _coverage(d)
    interior = _coverage(d + OUTLINE * image_size)  # the shape shrunk by the border width
    period = STRIPE_PERIOD * image_size
    across = (dx + dy) / np.sqrt(2.0) / period  # stripes run diagonally, fixed to the object
    # Pixels from the nearest stripe's centre line; one stripe runs through the object's centre, so
    # even a small object's hollow shows one.
    from_centre = np.abs(across + 0.5 - np.floor(across + 0.5) - 0.5) * period
    stripes = np.clip(period / 4 - from_centre + 0.5, 0.0, 1.0)
    pattern = np.asarray(labels["pattern"])[:, None, None]
    ink = np.where(pattern == PATTERNS.index("plain"), fill,
                   np.where(pattern == PATTERNS.index("outlined"), fill - interior,
                            fill - interior * (1.0 - stripes)))

    colours = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)[labels["colour"]]
    backs = np.array([PALETTE[b] for b in BACKGROUNDS], dtype=np.float32)[labels["background"]]
    image = backs[:, None, None, :] + ink[..., None] * (colours - backs)[:, None, None, :]
    return np.rint(image).astype(np.uint8)


def render(scene, image_size=IMAGE_SIZE):
    """Render one Scene into a uint8 image [image_size, image_size, 3]."""
    labels = {attr: np.array([i]) for attr, i in scene.labels().items()}
    limit = max_offset(scene.size, image_size)
    if abs(scene.x) > limit + 1e-6 or abs(scene.y) > limit + 1e-6:
        raise ValueError(f"a {scene.size} object's offset must be within +-{limit:.2f} px to stay "
                         f"inside a {image_size}px image; got x={scene.x}, y={scene.y}")
    labels["x"], labels["y"] = np.array([scene.x]), np.array([scene.y])
    return render_labels(labels, image_size)[0]


def render_batch(n, seed, image_size=IMAGE_SIZE):
    """n random scenes: (uint8 images [n, H, W, 3], {attr: int64 [n]} labels).

    `seed` is an int (same seed, same pixels) or a numpy Generator (draws continue from it).
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    labels = random_labels(n, rng, image_size)
    images = render_labels(labels, image_size)
    return images, {attr: labels[attr] for attr in ATTRIBUTES}


# ----------------------------------------------------------------------------------------------
# Concepts: attribute combinations kept for textual inversion (see the module docstring).

@dataclass(frozen=True)
class ToyConcept:
    """The ground truth of a toy concept: what a learned word must carry (not the learned word itself,
    which is a minti.io.concepts.Concept). Background and size stay free for the editability test."""
    shape: str
    colour: str
    pattern: str
    held_out: bool = False  # True: no caption ever names shape, colour and pattern together
    image_backgrounds: tuple = ("white", "gray", "black")  # of its training images; the rest: edits
    image_size: str = "large"  # of its training images

    @property
    def init_word(self):
        """The coarse descriptor textual inversion starts from (the paper's "cat", "sculpture")."""
        return self.shape

    def scene(self, background, size=None, x=0.0, y=0.0):
        return Scene(self.shape, self.colour, background, self.pattern, size or self.image_size, x, y)

    def scenes(self, n=5, seed=0, image_size=IMAGE_SIZE):
        """n Scenes like a user's photos of it: its image size, its backgrounds in turn (each used
        before any repeats), random positions."""
        rng = np.random.default_rng(seed)
        backgrounds = [b for b in self.image_backgrounds if b != self.colour]
        order = rng.permutation(len(backgrounds))
        limit = max_offset(self.image_size, image_size)
        scenes = []
        for i in range(n):
            x, y = rng.uniform(-limit, limit, 2)
            scenes.append(self.scene(backgrounds[order[i % len(backgrounds)]], x=float(x), y=float(y)))
        return scenes


CONCEPTS = {
    "striped_orange_star": ToyConcept("star", "orange", "striped"),
    "outlined_pink_heart": ToyConcept("heart", "pink", "outlined"),
    "plain_cyan_triangle": ToyConcept("triangle", "cyan", "plain"),
    # Harder: the captions never put these three words together.
    "striped_purple_square": ToyConcept("square", "purple", "striped", held_out=True),
    "outlined_yellow_circle": ToyConcept("circle", "yellow", "outlined", held_out=True),
}
DEFAULT_CONCEPT = "striped_orange_star"
HELD_OUT = {(c.shape, c.colour, c.pattern) for c in CONCEPTS.values() if c.held_out}


def concept_scenes(name, n=5, seed=0, image_size=IMAGE_SIZE):
    """n Scenes of a shipped concept (ToyConcept.scenes)."""
    if name not in CONCEPTS:
        raise KeyError(f"unknown toy concept {name!r}; known: {sorted(CONCEPTS)}")
    return CONCEPTS[name].scenes(n, seed, image_size)


def write_concept_images(name, folder, n=5, seed=0, image_size=IMAGE_SIZE):
    """Write n PNGs of a concept into folder (like a user's photos); returns their paths.

    The folder holds images only; the concept's true attributes are CONCEPTS[name]."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, scene in enumerate(concept_scenes(name, n, seed, image_size)):
        path = os.path.join(folder, f"{i:02d}.png")
        Image.fromarray(render(scene, image_size)).save(path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# Captions.

PROMPT_PREFIXES = ("a photo of", "a rendering of", "a picture of", "")  # "" : the bare phrase
EMPTY_CAPTION_P = 0.1  # share of empty captions, for classifier-free guidance (SD dropped ~10%)
# How often a non-empty caption names each attribute (chosen: shape and colour nearly always, so
# that prompts are followed; the rest often enough to be learned, and left out to be free).
NAME_P = {"shape": 0.85, "colour": 0.85, "pattern": 0.6, "size": 0.6, "background": 0.6}
CANONICAL_ORDER_P = 0.5  # else the adjectives come in a random order
LONG_BACKGROUND_P = 0.6  # "on a blue background" rather than "on blue"
SHAPE_NOUN = "shape"  # the noun when the shape is left out: "a red shape"
VOCABULARY = frozenset(
    {"a", "an", "of", "on", "background", SHAPE_NOUN}
    | {w for p in PROMPT_PREFIXES for w in p.split()}
    | set(SHAPES) | set(COLOURS) | set(BACKGROUNDS) | set(PATTERNS) | set(SIZES))


def with_article(phrase):
    """ "a star", "an orange star"; a placeholder such as "<s*>" takes "a", as in the paper's prompts."""
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def caption(scene, rng, return_named=False):
    """A random caption of scene, e.g. "a photo of a large striped red star on a blue background".

    With return_named=True, also returns {attr: value} of the attributes the caption names.
    Held-out combinations (HELD_OUT) are never named whole: one of the three is dropped."""
    if rng.random() < EMPTY_CAPTION_P:
        return ("", {}) if return_named else ""
    named = {attr: getattr(scene, attr) for attr, p in NAME_P.items() if rng.random() < p}
    if (all(a in named for a in ("shape", "colour", "pattern"))
            and (scene.shape, scene.colour, scene.pattern) in HELD_OUT):
        del named[("shape", "colour", "pattern")[rng.integers(3)]]

    adjectives = [named[a] for a in ("size", "pattern", "colour") if a in named]
    if rng.random() >= CANONICAL_ORDER_P:
        adjectives = [adjectives[i] for i in rng.permutation(len(adjectives))]
    words = adjectives + [named.get("shape", SHAPE_NOUN)]
    phrase = with_article(" ".join(words))
    if "background" in named:
        b = named["background"]
        phrase += f" on {with_article(b)} background" if rng.random() < LONG_BACKGROUND_P else f" on {b}"
    prefix = PROMPT_PREFIXES[rng.integers(len(PROMPT_PREFIXES))]
    text = f"{prefix} {phrase}" if prefix else phrase
    return (text, named) if return_named else text


def captions(labels, rng):
    """One random caption per scene of a label batch (as from `render_batch`)."""
    return [caption(scene, rng) for scene in scenes_from_labels(labels)]


def caption_corpus(n, seed=0):
    """n captions of random scenes: text to train the toy tokenizer's BPE on."""
    rng = np.random.default_rng(seed)
    return captions(random_labels(n, rng), rng)


def captioned_renders(n, seed=0):
    """n fresh renders (uint8 [n, H, W, 3]) and a caption each, as the toy model was trained on, less the
    10% of captions left empty for guidance."""
    rng = np.random.default_rng(seed)
    images, labels = render_batch(n, rng)
    texts = []
    for scene in scenes_from_labels(labels):
        text = ""
        while not text:
            text = caption(scene, rng)
        texts.append(text)
    return images, texts


def write_captioned_renders(folder, n, seed=0):
    """captioned_renders as files (render-0000.png + render-0000.txt): the measurement set that
    `python -m minti.run.measure_g --set captions --images FOLDER` reads."""
    os.makedirs(folder, exist_ok=True)
    for i, (image, text) in enumerate(zip(*captioned_renders(n, seed))):
        Image.fromarray(image).save(os.path.join(folder, f"render-{i:04d}.png"))
        with open(os.path.join(folder, f"render-{i:04d}.txt"), "w") as f:
            f.write(text)


if __name__ == "__main__":  # python -m minti.toy.world DIR N [SEED]
    import sys

    write_captioned_renders(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)

