"""Evaluate a learned toy concept, and the toy model itself, with the oracle as an exact judge.

Textual inversion's evaluation (Gal et al. 2022, section 5) has two axes: *reconstruction* ("a photo
of S*" should show the concept) and *editability* ("S* on a blue background" should change what was
asked and keep the concept), each set beside "image only" (the training images themselves) and
"prompt only" (the prompts without S*). The paper judged with CLIP similarity; in the toy world the
oracle (`oracle.py`) reads every sample back into its attributes, so each number is a plain share
of samples, shown with a 95% Wilson interval. `python -m minti.toy.evaluate --help` for the commands.
"""
import argparse
import copy
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from . import world as toyworld
from .oracle import Oracle
from ..data import find_images
from ..io.concepts import Concept, ConceptError, check_width, load_concepts
from ..io.files import write_json
from ..io.weights import TOY_FOLDER, load
from ..sampling import decode, default_size, denoise, encode_prompts, initial_latents, latent_size
from ..sampling import make_scheduler, to_uint8
from ..textual_inversion import add_words, new_word, placeholder_tokens, sampling_conditioning, token_table

CONCEPTS_FOLDER = os.path.join(TOY_FOLDER, "concepts")  # <name>/*.png: each concept's images
# Samples per condition. 48 could not separate close results (a prototype's experience); at 128 the
# 95% interval is at most +-8.5 points wide (at 50%) and +-6 near 85%.
DEFAULT_N = 128
DEFAULT_PROMPTS = 512  # prompt following: +-2 points near 95%
DEFAULT_STEPS = 50  # DDIM steps: LDM's usual default
DEFAULT_CFG = 4.0  # guidance: what the toy model's prototype sampled well with
BATCH_SIZE = 128  # images per UNet call (x2 with guidance); the toy UNet runs 8x8 latents
Z95 = 1.959964  # the normal distribution's 97.5% quantile: a two-sided 95% interval
# The neutral prompts of "a photo of S*", after the toy captions' prefixes (toyworld.PROMPT_PREFIXES),
# with the article the captions put before an object ("a photo of a striped orange star").
PREFIXES = toyworld.PROMPT_PREFIXES
CONCEPT_ATTRIBUTES = ("shape", "colour", "pattern")  # what a learned word must carry (toyworld.ToyConcept)


# ----------------------------------------------------------------------------------------------
# Shares with a binomial interval.

def wilson_interval(hits, n, z=Z95):
    """The Wilson score interval (Wilson 1927) of a share hits/n: (low, high).

    Unlike the normal approximation p +- z*sqrt(p(1-p)/n), it stays inside [0, 1] and is not zero
    wide at 0/n or n/n, which matters here: reconstruction is often near 100%, prompt-only near 0%."""
    if n <= 0:
        raise ValueError(f"a share needs at least one sample, got n={n}")
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At 0/n and n/n one end is exactly 0 or 1; say so rather than leave 0.9999999999999999.
    return (0.0 if hits == 0 else centre - half), (1.0 if hits == n else centre + half)


@dataclass(frozen=True)
class Share:
    """hits out of n samples, e.g. 122 of 128 "a photo of S*" samples that show the concept.

    independent: how many of the n samples are independent draws, when fewer (0: all). Editability pools
    the edits of one set of noises (3 edits x 64 samples from the same 64 starts), so its 192 samples
    carry the information of 64 at most: its interval is that of the same share over 64 samples."""
    hits: int
    n: int
    independent: int = 0

    @classmethod
    def of(cls, mask):
        mask = np.asarray(mask, dtype=bool)
        return cls(int(mask.sum()), int(mask.size))

    @property
    def value(self):
        return self.hits / self.n

    @property
    def interval(self):
        k = self.independent or self.n
        return wilson_interval(self.hits * k / self.n, k)

    def __str__(self):
        low, high = self.interval
        return f"{100 * self.value:5.1f}% [{100 * low:5.1f}, {100 * high:5.1f}]"

    def to_dict(self):
        low, high = self.interval
        return {"share": round(self.value, 4), "hits": self.hits, "n": self.n,
                **({"independent": self.independent} if self.independent else {}),
                "ci95": [round(low, 4), round(high, 4)]}


# ----------------------------------------------------------------------------------------------
# Judging: the oracle's reading against what was asked.

def read_attributes(oracle, images):
    """The oracle's reading of uint8 images [N, H, W, 3]: {attribute: value names, array [N]}."""
    predicted = oracle.predict(images)
    return {a: np.asarray(toyworld.ATTRIBUTES[a])[np.asarray(idx)] for a, idx in predicted.items()}


# ----------------------------------------------------------------------------------------------
# Prompts.

def prompt(prefix, phrase, background=None):
    """"a photo of" + "small <s*>" + "blue" -> "a photo of a small <s*> on a blue background"."""
    text = f"{prefix} {toyworld.with_article(phrase)}" if prefix else toyworld.with_article(phrase)
    return f"{text} on {toyworld.with_article(background)} background" if background else text


@dataclass(frozen=True)
class Edit:
    """A change that the prompt asks for: one attribute the training images never had."""
    attribute: str  # "background" or "size"
    value: str

    @property
    def name(self):
        return f"{self.attribute}={self.value}"

    def prompt(self, prefix, word):
        if self.attribute == "background":
            return prompt(prefix, word, background=self.value)
        return prompt(prefix, f"{self.value} {word}")  # size: "a photo of a small <s*>"


def edits_for(truth):
    """The editability prompts for a concept: every background its images did not have (and that is
    not the object's own colour: the renderer never draws a red object on red), every other size."""
    backgrounds = [b for b in toyworld.BACKGROUNDS if b not in truth.image_backgrounds and b != truth.colour]
    sizes = [s for s in toyworld.SIZES if s != truth.image_size]
    return [Edit("background", b) for b in backgrounds] + [Edit("size", s) for s in sizes]


def cycle(templates, n):
    """n prompts that go round the templates in turn (sample i gets template i mod len)."""
    return [templates[i % len(templates)] for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Sampling from the model, with or without a learned word: one batched, guided loop per chunk of prompts.

class ImageSampler:
    """sampler(prompts, seed) -> uint8 [len(prompts), H, W, 3], one image per prompt.

    Image i starts from the i-th slice of one noise tensor drawn from `seed`, whatever the chunking,
    so two conditions, or two words, sampled with one seed share their starting noise image by image
    (common random numbers: a difference between them is then the prompts' or the words', not the
    noise's). Each chunk of `batch_size` prompts is one UNet call per step on [unconditional, conditional].

    word: any learned word, written `token` in the prompts (it stands for all of its placeholders): a
    textual_inversion.LearnedWord (multiresolution: each step the time bucket its timestep trained), a
    spacetime.PerLayerWord (P+) or a spacetime.NeTIWord (at its .truncation). `tokenizer` holds its
    placeholders; by default a copy of sd's is given them, at the ids learn() gave them in its own copy.
    """

    def __init__(self, sd, word=None, token=None, tokenizer=None, *, steps=DEFAULT_STEPS, cfg=DEFAULT_CFG,
                 batch_size=BATCH_SIZE):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sd, self.word, self.token = sd, word, token
        self.steps, self.cfg, self.batch_size = steps, cfg, batch_size
        if word is not None and tokenizer is None:
            tokenizer = copy.deepcopy(sd.tokenizer)
            ids = add_words(tokenizer, {token: len(word.token_ids)})[token]
            assert ids == word.token_ids.tolist(), f"pass the tokenizer that holds {token} at {word.token_ids}"
        self.tokenizer = tokenizer or sd.tokenizer

    def conditioning(self, prompts):
        """What the UNet attends to for these prompts: a context [B, L, D] (P+, NeTI: one per UNet layer),
        or a function of the timestep for a word that changes with time."""
        text_encoder = self.sd.text_encoder
        if self.word is None:
            return encode_prompts(self.tokenizer, text_encoder, prompts)
        placeholders = " ".join(placeholder_tokens(self.token, len(self.word.token_ids)))
        prompts = [p.replace(self.token, placeholders) for p in prompts]
        ids = self.tokenizer(prompts, length=text_encoder.config.max_position_embeddings)
        return sampling_conditioning(self.word, text_encoder, ids.to(token_table(text_encoder).device))

    @torch.no_grad()
    def __call__(self, prompts, seed):
        sd, prompts = self.sd, list(prompts)
        h, w = latent_size(sd, *default_size(sd))
        noise, _ = initial_latents(len(prompts), sd.unet.config.in_channels, h, w, seed,
                                   device=sd.unet.device, dtype=sd.unet.dtype)
        ddim = make_scheduler(sd.scheduler, "ddim", self.steps)
        uncond = None if self.cfg == 1.0 else encode_prompts(self.tokenizer, sd.text_encoder, [""])
        vae_dtype = next(sd.vae.parameters()).dtype
        out = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            u = None if uncond is None else uncond.expand(len(chunk), -1, -1)
            cond = self.conditioning(chunk)
            latents = denoise(sd.unet, ddim, noise[start:start + len(chunk)], cond, u, self.cfg)
            out.append(to_uint8(decode(sd.vae, latents.to(vae_dtype), sd.latent_scale)))
        return np.concatenate(out)


def read_concept(concept, width=None, token=None):
    """One ordinary learned word from a concept file (path) or a concepts.Concept."""
    if isinstance(concept, Concept):
        words = [Concept(token, concept.vectors, concept.step, concept.meta) if token else concept]
    elif isinstance(concept, (str, os.PathLike)):
        words = load_concepts(concept, token=token, expected_width=width)
    else:
        raise TypeError(f"a concept is a file path or a minti.io.concepts.Concept, got {type(concept).__name__}")
    if len(words) != 1:
        raise ConceptError(f"the evaluation needs exactly one learned word, got {len(words)} "
                           f"({[w.token for w in words]}); evaluate them one at a time.")
    word = words[0]
    if width is not None:
        check_width(word, width)
    if word.is_multires:
        raise ConceptError(f"{word.token!r} is a multiresolution word; evaluate one resolution of it "
                           "(minti.io.concepts.export_resolution(concept, t)).")
    return word


def concept_sampler(sd, concept, **settings):
    """An ImageSampler with a finished word (a minti.io.concepts.Concept) as a learned word of one time
    bucket; sd's own tokenizer is left as it was (the word goes into a copy)."""
    tokenizer = copy.deepcopy(sd.tokenizer)
    word = new_word(tokenizer, concept.token, concept.vectors).to(token_table(sd.text_encoder).device)
    return ImageSampler(sd, word, concept.token, tokenizer, **settings)


# ----------------------------------------------------------------------------------------------
# Reports: shares in rows and columns, a table, a JSON, a grid.

@dataclass
class Report:
    """The result of an evaluation. shares[column][row] is a Share; `rows` gives the table order
    as (row key, label) and `columns` the headings. grid: uint8 [H, W, 3] sample grid (or None)."""
    title: str
    columns: dict
    rows: list
    shares: dict
    settings: dict = field(default_factory=dict)
    prompts: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    grid: np.ndarray | None = None

    def __getitem__(self, column):
        return self.shares[column]

    def table(self):
        """The numbers as plain text: a row per measure, a column per method, "share [95% interval]"."""
        width = max(len(label) for _, label in self.rows) + 2
        cell = max(24, *(len(h) + 2 for h in self.columns.values()))
        lines = [self.title, "".ljust(width) + "".join(h.ljust(cell) for h in self.columns.values())]
        for key, label in self.rows:
            cells = [str(self.shares[c][key]) if key in self.shares[c] else "-" for c in self.columns]
            lines.append(label.ljust(width) + "".join(s.ljust(cell) for s in cells).rstrip())
        lines += [f"({note})" for note in self.notes]
        return "\n".join(lines)

    def to_dict(self):
        return {"title": self.title, "settings": self.settings, "columns": self.columns,
                "shares": {c: {key: self.shares[c][key].to_dict() for key, _ in self.rows
                               if key in self.shares[c]} for c in self.columns},
                "prompts": self.prompts, "notes": self.notes}

    def save(self, out, stem):
        """Write the JSON and the grid: `out` is a folder (stem.json, stem.png) or a .png path (the
        JSON goes beside it). Returns the paths written."""
        if out.lower().endswith(".png"):
            png, js = out, out[:-4] + ".json"
        else:
            png, js = os.path.join(out, stem + ".png"), os.path.join(out, stem + ".json")
        write_json(js, self.to_dict())  # makes the folder
        paths = [js]
        if self.grid is not None:
            Image.fromarray(self.grid).save(png)
            paths.append(png)
        return paths


def label_font():
    """Pillow's bitmap font: its spaces are as wide as a letter. (Pillow >= 10.1's default, a small vector
    font, draws a space 2 pixels wide at its default size: "a photo of a" read as "a photoofa".)"""
    bitmap = getattr(ImageFont, "load_default_imagefont", None)  # Pillow >= 10.1
    return bitmap() if bitmap is not None else ImageFont.load_default()


def labelled_grid(rows, columns=10, scale=2, label_width=300):
    """rows: list of (label, uint8 [k, H, W, 3]) -> one uint8 image, a row of images per label.

    Images are scaled up (nearest) so that 32-pixel samples can be seen; short rows are padded."""
    h, w = rows[0][1].shape[1:3]
    cell_h, cell_w, gap = h * scale, w * scale, 2
    canvas = Image.new("RGB", (label_width + columns * (cell_w + gap), len(rows) * (cell_h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    font = label_font()
    for r, (label, images) in enumerate(rows):
        top = r * (cell_h + gap)
        draw.text((4, top + cell_h // 2 - 6), label[:48], fill=(0, 0, 0), font=font)
        for k, image in enumerate(images[:columns]):
            tile = Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (label_width + k * (cell_w + gap), top))
    return np.asarray(canvas)


# ----------------------------------------------------------------------------------------------
# A learned concept: reconstruction and editability, beside prompt only and image only.

def resolve_truth(truth):
    """A toy concept by name (e.g. "striped_orange_star") or as a toyworld.ToyConcept -> (name, ToyConcept);
    the name is None for a ToyConcept that is not one of toyworld.CONCEPTS."""
    if isinstance(truth, toyworld.ToyConcept):
        names = [k for k, c in toyworld.CONCEPTS.items() if c == truth]
        return (names[0] if names else None), truth
    if isinstance(truth, str):
        if truth not in toyworld.CONCEPTS:
            raise ValueError(f"unknown toy concept {truth!r}; known: {', '.join(sorted(toyworld.CONCEPTS))}")
        return truth, toyworld.CONCEPTS[truth]
    raise TypeError(f"truth is a toy concept name or a toyworld.ToyConcept, got {type(truth).__name__}")


def read_images(source, image_size=toyworld.IMAGE_SIZE):
    """Training images as uint8 [N, H, W, 3]: from a folder of images, a list of paths, or an array."""
    if isinstance(source, np.ndarray):
        return source if source.ndim == 4 else source[None]
    images = []
    for path in find_images(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else source:
        image = Image.open(path).convert("RGB")
        if image.size != (image_size, image_size):  # the oracle reads the toy world's size only
            image = image.resize((image_size, image_size), Image.LANCZOS)
        images.append(np.asarray(image))
    return np.stack(images)


def default_concept_images(name, truth, n=5, seed=0):
    """The concept's training images: its folder in weights/toy/concepts/ if shipped, else renders
    made as toyworld.write_concept_images makes them (neutral backgrounds, random positions)."""
    folder = os.path.join(CONCEPTS_FOLDER, name) if name else None
    if folder and os.path.isdir(folder) and any(f.endswith(".png") for f in os.listdir(folder)):
        return read_images(folder), folder
    return np.stack([toyworld.render(s) for s in truth.scenes(n, seed)]), f"{n} fresh renders (seed {seed})"


def score_concept(read, truth, edit=None):
    """bool masks for one condition's readings: "intact" (shape, colour and pattern all right), each
    concept attribute, and with an edit "changed" (the asked value) and "both"."""
    masks = {a: read[a] == getattr(truth, a) for a in CONCEPT_ATTRIBUTES}
    masks["intact"] = np.logical_and.reduce(list(masks.values()))
    if edit is not None:
        masks["changed"] = read[edit.attribute] == edit.value
        masks["both"] = masks["changed"] & masks["intact"]
    return masks


def concept_shares(recon, edited, edits):
    """Shares from the masks of the reconstruction condition and of each edit condition."""
    shares = {"reconstruction": Share.of(recon["intact"])}
    shares.update({a: Share.of(recon[a]) for a in CONCEPT_ATTRIBUTES})
    pooled = {"editability": "both", "edit: asked change": "changed", "edit: concept intact": "intact"}
    for measure, mask in pooled.items():  # over every edit's samples, which share their noise
        every = np.concatenate([edited[e.name][mask] for e in edits])
        shares[measure] = Share(int(every.sum()), every.size, independent=every.size // len(edits))
    shares.update({e.name: Share.of(edited[e.name]["both"]) for e in edits})
    return shares


def judge_word(sampler, oracle, truth, phrase, n, seed=0):
    """One column of the evaluation: n samples of "a photo of a <phrase>" (the neutral templates in turn)
    and n of each edit of `truth`, all from `seed`, read by the oracle and judged against `truth`.
    Returns ({measure: Share}, {condition: its prompts}, {condition: its samples})."""
    edits = edits_for(truth)
    conditions = {"reconstruction": [prompt(p, phrase) for p in PREFIXES]}
    conditions.update({e.name: [e.prompt(p, phrase) for p in PREFIXES] for e in edits})
    samples = {k: sampler(cycle(templates, n), seed) for k, templates in conditions.items()}
    recon = score_concept(read_attributes(oracle, samples["reconstruction"]), truth)
    edited = {e.name: score_concept(read_attributes(oracle, samples[e.name]), truth, e) for e in edits}
    return concept_shares(recon, edited, edits), conditions, samples


def judge_images(oracle, truth, images):
    """The "image only" column: the training images judged as samples of every condition would be."""
    read, edits = read_attributes(oracle, images), edits_for(truth)
    edited = {e.name: score_concept(read, truth, e) for e in edits}
    return concept_shares(score_concept(read, truth), edited, edits)


def evaluate_concept(sd, concept, truth=toyworld.DEFAULT_CONCEPT, n=DEFAULT_N, seed=0, steps=DEFAULT_STEPS,
                     cfg=DEFAULT_CFG, *, images=None, reference_word=None, oracle=None, sampler=None,
                     batch_size=BATCH_SIZE, token=None, grid_columns=10):
    """Reconstruction and editability of a learned word, beside "prompt only" and "image only".

    sd: a loaded model (minti.load); concept: a concept file or a minti.io.concepts.Concept; truth: the
    concept's true attributes (a toyworld.ToyConcept or a toy concept name). n samples per condition,
    DDIM `steps`, guidance `cfg`, all conditions from the same noise (`seed`).
    - reconstruction: "a photo of a S*" (4 neutral templates in turn): shape, colour, pattern right;
    - editability: each Edit of `edits_for(truth)` ("... S* on a blue background", "a small S*"): the
      asked change made AND the concept intact;
    - prompt only: the same prompts with S* replaced by `reference_word`, by default the concept's
      init word, its shape name ("a photo of a star"): what the coarse word the user would otherwise
      type gives; that fixes the shape and leaves colour and pattern to chance (~4%). Pass
      toyworld.SHAPE_NOUN ("shape") for a prompt that names nothing;
    - image only: the oracle on the training images (`images`: a folder, paths or a uint8 array;
      default: the concept's shipped folder, else renders like it) judged against the same targets.
    oracle (default: the shipped one) needs `.predict(uint8 images)`; sampler (default: the model,
    see ImageSampler) is any callable (prompts, seed) -> uint8 [len(prompts), H, W, 3].
    Returns a Report (columns "concept", "prompt_only", "image_only").
    """
    name, truth = resolve_truth(truth)
    if n < 1:
        raise ValueError(f"n (samples per condition) must be >= 1, got {n}")
    word = read_concept(concept, None if sd is None else sd.text_encoder.config.hidden_size, token)
    if sampler is None:
        if sd is None:
            raise ValueError("give a model (sd) or a sampler")
        sampler = concept_sampler(sd, word, steps=steps, cfg=cfg, batch_size=batch_size)
    oracle = Oracle.load() if oracle is None else oracle
    if images is None:
        images, images_from = default_concept_images(name, truth)
    else:
        images, images_from = read_images(images), "given images"
    reference_word = truth.init_word if reference_word is None else reference_word

    shares, prompts, grid_rows = {}, {}, []
    for column, phrase in (("concept", word.token), ("prompt_only", reference_word)):
        shares[column], prompts[column], samples = judge_word(sampler, oracle, truth, phrase, n, seed)
        grid_rows += [(prompts[column][k][0], samples[k]) for k in samples]
    shares["image_only"], prompts["image_only"] = judge_images(oracle, truth, images), images_from
    grid_rows.append((f"training images ({len(images)})", images))
    columns = {"concept": f"S* ({word.token})", "prompt_only": f'prompt only ("{reference_word}")',
               "image_only": f"image only ({len(images)} images)"}
    settings = {"truth": {"name": name, "shape": truth.shape, "colour": truth.colour,
                          "pattern": truth.pattern, "held_out": truth.held_out},
                "token": word.token, "vectors": word.num_vectors, "reference_word": reference_word,
                "n": n, "seed": seed, "steps": steps, "cfg": cfg, "images": images_from,
                "edits": [e.name for e in edits_for(truth)]}
    return concept_report(columns, shares, settings, prompts, labelled_grid(grid_rows, grid_columns))


def concept_report(columns, shares, settings, prompts, grid):
    """evaluate_concept's Report: its rows in order, a title that says what was judged, and notes."""
    edits, truth, s = settings["edits"], settings["truth"], settings
    rows = [("reconstruction", "reconstruction"), *((a, f"  {a}") for a in CONCEPT_ATTRIBUTES),
            ("editability", "editability"), ("edit: asked change", "  asked change"),
            ("edit: concept intact", "  concept intact"), *((e, f"  {e.replace('=', ' ')}") for e in edits)]
    attributes = f"{truth['pattern']} {truth['colour']} {truth['shape']}"
    held = "held out (never named whole)" if truth["held_out"] else "nameable by the captions"
    title = (f"Concept {s['token']} vs truth {truth['name'] or attributes} ({attributes}, {held}); {s['n']} "
             f"samples per condition, DDIM {s['steps']} steps, guidance {s['cfg']}, seed {s['seed']}")
    notes = ["share of samples [95% Wilson interval]; the oracle judges shape, colour, pattern and the edit",
             f"editability pools the edits {', '.join(edits)}: asked change AND concept intact; they share "
             f"their noise, so its interval counts the samples of one edit"]
    return Report(title, columns, rows, shares, settings, prompts, notes, grid)


# ----------------------------------------------------------------------------------------------
# The model itself: does it draw what full captions ask for?

def seen_captions(n, seed=0):
    """n captions of random scenes that name shape, colour and background always, and pattern and
    size as often as the training captions do (toyworld.NAME_P), never naming a held-out concept
    whole (its pattern is left out, as in training). Returns (captions, asked: list of {attr: value})."""
    rng = np.random.default_rng(seed)
    scenes = toyworld.scenes_from_labels(toyworld.random_labels(n, rng))
    texts, asked = [], []
    for scene in scenes:
        named = {a: getattr(scene, a) for a in ("shape", "colour", "background")}
        for a in ("pattern", "size"):
            if rng.random() < toyworld.NAME_P[a]:
                named[a] = getattr(scene, a)
        if "pattern" in named and (scene.shape, scene.colour, scene.pattern) in toyworld.HELD_OUT:
            del named["pattern"]
        adjectives = [named[a] for a in ("size", "pattern", "colour") if a in named]
        prefix = PREFIXES[rng.integers(len(PREFIXES))]
        texts.append(prompt(prefix, " ".join(adjectives + [scene.shape]), background=scene.background))
        asked.append(named)
    return texts, asked


def evaluate_prompt_following(sd, n_prompts=DEFAULT_PROMPTS, seed=0, steps=DEFAULT_STEPS, cfg=DEFAULT_CFG, *,
                              oracle=None, sampler=None, batch_size=BATCH_SIZE, grid_columns=16):
    """The toy model's check: on captions of seen combinations (see seen_captions), the share of
    samples whose asked shape, colour and background are right by the oracle (the model is
    meant to reach >= 90%), and of those with every named attribute (pattern and size too when named) right.
    Returns a Report with one column, "model"."""
    if n_prompts < 1:
        raise ValueError(f"n_prompts must be >= 1, got {n_prompts}")
    if sampler is None:
        sampler = ImageSampler(sd, steps=steps, cfg=cfg, batch_size=batch_size)
    oracle = Oracle.load() if oracle is None else oracle
    texts, asked = seen_captions(n_prompts, seed)
    samples = sampler(texts, seed)
    read = read_attributes(oracle, samples)
    right = {a: np.array([read[a][i] == q[a] if a in q else False for i, q in enumerate(asked)])
             for a in toyworld.ATTRIBUTES}
    named = {a: np.array([a in q for q in asked]) for a in toyworld.ATTRIBUTES}
    core = right["shape"] & right["colour"] & right["background"]
    every = np.array([all(right[a][i] for a in q) for i, q in enumerate(asked)])
    shares = {"shape+colour+background": Share.of(core), "all named": Share.of(every)}
    for a in toyworld.ATTRIBUTES:
        if named[a].any():
            shares[a] = Share.of(right[a][named[a]])
    rows = [("shape+colour+background", "shape, colour and background right"),
            ("all named", "every named attribute right"),
            *((a, f"  {a}" + ("" if named[a].all() else " (when named)")) for a in toyworld.ATTRIBUTES
              if a in shares)]
    title = (f"Prompt following: {n_prompts} captions of seen combinations, one sample each, "
             f"DDIM {steps} steps, guidance {cfg}, seed {seed}")
    notes = ["share of samples [95% Wilson interval], judged by the oracle"]
    rows_of_grid = [(f"samples {i}-{i + grid_columns - 1}", samples[i:i + grid_columns])
                    for i in range(0, min(len(samples), 4 * grid_columns), grid_columns)]
    return Report(title, {"model": "toy model"}, rows, {"model": shares},
                  {"n_prompts": n_prompts, "seed": seed, "steps": steps, "cfg": cfg},
                  {"model": [{"caption": t, "asked": q, "read": {a: str(read[a][i]) for a in read}}
                             for i, (t, q) in enumerate(zip(texts, asked))]},
                  notes, labelled_grid(rows_of_grid, grid_columns, label_width=110))


# ----------------------------------------------------------------------------------------------
# Command line.

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Evaluate a learned toy concept (--concept FILE) or the toy model (--prompt-following) "
                    "with the oracle; prints a table, --out writes the sample grid and a JSON.")
    add = p.add_argument
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--concept", metavar="FILE", help="the learned concept (embedding) file to evaluate")
    what.add_argument("--prompt-following", action="store_true",
                      help="the model check: do samples of full captions have the asked attributes?")
    add("--truth", default=toyworld.DEFAULT_CONCEPT, choices=sorted(toyworld.CONCEPTS),
        help="the toy concept the file learned (its true attributes) (default: %(default)s)")
    add("--images", default=None, metavar="FOLDER",
        help="the concept's training images, for the image-only reference (default: weights/toy/concepts/"
             "<truth>/ if there, else renders of the concept)")
    add("--token", default=None, help="rename the file's word (if it clashes with the tokenizer)")
    add("--reference-word", default=None,
        help="the word in place of S* for the prompt-only reference (default: the concept's shape name)")
    add("--model", default="toy",
        help="'toy' or a diffusers folder of a toy-world model (default: %(default)s)")
    add("--oracle", default=None, metavar="FOLDER", help="oracle folder (default: weights/toy/oracle)")
    add("--n", type=int, default=None,
        help=f"samples per condition with --concept (default {DEFAULT_N}); prompts with --prompt-following "
             f"(default {DEFAULT_PROMPTS})")
    add("--steps", type=int, default=DEFAULT_STEPS, help="DDIM steps (default: %(default)s)")
    add("--cfg", type=float, default=DEFAULT_CFG,
        help="classifier-free guidance scale (default: %(default)s)")
    add("--seed", type=int, default=0, help="seed of the noise and of the captions (default: %(default)s)")
    add("--batch-size", type=int, default=BATCH_SIZE, help="images per UNet call (default: %(default)s)")
    add("--out", default=None,
        help="a folder (writes <kind>.png and <kind>.json) or a .png path (JSON beside it) (default: none)")
    add("--device", default="cpu", help="'cpu', 'cuda', ... (default: %(default)s)")
    add("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        oracle = Oracle.load(args.oracle, args.device) if args.oracle else Oracle.load(device=args.device)
        sd = load(args.model, device=args.device)
        settings = dict(seed=args.seed, steps=args.steps, cfg=args.cfg, oracle=oracle,
                        batch_size=args.batch_size)
        if args.prompt_following:
            report = evaluate_prompt_following(sd, args.n or DEFAULT_PROMPTS, **settings)
            stem = "prompt_following"
        else:
            report = evaluate_concept(sd, args.concept, args.truth, args.n or DEFAULT_N, images=args.images,
                                      reference_word=args.reference_word, token=args.token, **settings)
            stem = "concept_eval"
    except (ValueError, FileNotFoundError) as e:  # ConceptError is a ValueError
        sys.exit(f"error: {e}")
    print(report.table())
    if args.out:
        print("wrote " + ", ".join(report.save(args.out, stem)))


if __name__ == "__main__":
    from ..run.cli import Signals, run_main

    Signals().install()
    sys.exit(run_main(main))
