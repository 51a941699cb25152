"""A training run's folder and settings, for train.py: the checks made before anything loads, the
checkpoint, the word's files, the log and its plot.

train.py reads as the run itself (settings, load, data, the loop, saving); what it writes and how it
refuses a setting that would fail later live here. Every refusal is a RunError: one line saying what is
wrong and what to do (exit code 2, minti/run/cli.py).
"""
import json
import math
import os
import re
import warnings
from dataclasses import fields

import torch

from . import cli
from ..io.concepts import ConceptError, check_width, export_resolution, save_a1111, save_diffusers, save_multires
from ..data import ImageError, find_images
from ..io.files import atomic_write, unreadable_torch_file, write_csv
from ..io.spacetime_files import (SpaceTimeConcept, export_layer_average, is_spacetime_file, load_spacetime, make_word,
                                  save_spacetime)
from ..schedulers import NUM_TRAIN_TIMESTEPS
from ..timesteps import make_timestep_sampler
from ..unet import cross_attention_layers

PROMPT_TOKENS = 77  # SD 1.x's text encoder reads 77 tokens: the start token, 75, the end token
MULTIRES_EXPORTS = (0.1, 0.5, 0.9)  # diffusion times exported as ordinary words, for tools without time
STATE_KEYS = ("step", "vectors", "optimizer", "generator", "torch_rng", "sampler", "config", "log")
RUN_FILES = ("config.json", "log.csv", "loss.png", "learned_embeds.safetensors")  # what a run writes on top


class RunError(cli.UsageError):
    """Something about the run's settings that the user must change; the message says what (exit code 2)."""


def word_kind(cfg):
    """"ti" (textual inversion, multiresolution with --multires), "per-layer" (P+) or "neti"."""
    return "per-layer" if cfg.per_layer else "neti" if cfg.neti else "ti"


# ----------------------------------------------------------------------------------------------
# Checks before anything is loaded

def check_settings(cfg):
    """Refuse, before anything is loaded, the settings that would fail later or silently mean something else."""
    for key in ("steps", "batch", "grad_accum", "vectors", "multires"):
        cli.check_at_least(f"--{key.replace('_', '-')}", getattr(cfg, key))
    for key in ("save_every", "preview_every", "lr_warmup", "threads"):
        cli.check_at_least(f"--{key.replace('_', '-')}", getattr(cfg, key), 0,
                           "torch's default" if key == "threads" else "none")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        why = " (nothing would train)" if cfg.lr == 0 else ""
        raise RunError(f"--lr must be a positive number, got {cfg.lr:g}{why}; e.g. --lr 5e-3.")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise RunError(f"--weight-decay must be 0 or a positive number, got {cfg.weight_decay:g}.")
    if not 0.0 <= cfg.flip <= 1.0:
        raise RunError(f"--flip is a probability in [0, 1], got {cfg.flip}.")
    cli.check_seed(cfg.seed)
    cli.check_side("--resolution", cfg.resolution, "a side in pixels")
    if cfg.vectors > PROMPT_TOKENS - 2:
        raise RunError(f"--vectors {cfg.vectors}: a prompt holds {PROMPT_TOKENS - 2} tokens between its start and "
                       f"end tokens, so vectors past that would never train; use a few (1-8).")
    cli.check_device(cfg.device)
    if cfg.multires > NUM_TRAIN_TIMESTEPS:
        raise RunError(f"--multires {cfg.multires}: more time buckets than SD 1.x's {NUM_TRAIN_TIMESTEPS} timesteps "
                       f"would leave buckets that never train; use a few (e.g. 10).")
    try:
        sampler = make_timestep_sampler(cfg.timesteps)  # a bad spec fails now, not after the model is loaded
    except ValueError as e:
        raise RunError(str(e)) from None
    if cfg.per_layer and cfg.neti:
        raise RunError("--per-layer and --neti are two kinds of word: choose one.")
    if (cfg.per_layer or cfg.neti) and (cfg.start != "input" or cfg.norm != "free"):
        raise RunError("--start output and --norm apply to ordinary and multiresolution words; a P+ or NeTI word "
                       "starts at the init word's embedding (NeTI's mapper already scales its output to the init "
                       "word's norm). Drop them, or train without --per-layer / --neti.")
    cli.check_at_least("--stop-every", cfg.stop_every)
    if not (cfg.stop_window >= 2 and 0.0 < cfg.stop_threshold < 1.0 and math.isfinite(cfg.pull) and cfg.pull >= 0):
        raise RunError(f"--stop-window must be 2 or more (got {cfg.stop_window}), --stop-threshold lie in (0, 1) "
                       f"(got {cfg.stop_threshold:g}) and --pull be 0 or more (got {cfg.pull:g}).")
    if (cfg.per_layer or cfg.neti) and getattr(sampler, "wants_grad_norms", False):
        raise RunError(f"--timesteps {cfg.timesteps} reads the gradient of one context, but a space-time word "
                       f"gives each UNet layer its own; use uniform or a fixed interval.")


def check_paths(cfg):
    """Refuse, before the model is loaded: a missing model, a missing or empty --images folder, and an --out
    that is a file, under a file, read-only, or a folder of other files that a run would overwrite."""
    cli.check_model(cfg.model)
    if cfg.images is not None:
        try:
            find_images(cfg.images)
        except ImageError as e:
            raise RunError(str(e)) from None
        nested = sorted(n for n in os.listdir(cfg.images) if os.path.isdir(os.path.join(cfg.images, n))
                        and not n.startswith("."))
        if nested:
            print(f"note: the subfolders of --images ({', '.join(n + '/' for n in nested[:5])}) are not read: only "
                  f"the images directly in {cfg.images} are.")
    out = cfg.out or "runs"
    cli.check_writable_folder(out, "--out" if cfg.out else "the default output folder")
    if cfg.out and cfg.resume is None and os.path.isdir(cfg.out):
        if os.path.isfile(os.path.join(cfg.out, "checkpoint", "state.pt")):
            raise RunError(f"--out {cfg.out} already holds a run; continue it with --resume {cfg.out}, or "
                           f"choose another --out.")
        taken = [n for n in RUN_FILES if os.path.exists(os.path.join(cfg.out, n))]
        if taken and not is_run_config(os.path.join(cfg.out, "config.json")):
            raise RunError(f"--out {cfg.out} holds files that are not a train.py run's ({', '.join(taken)}) and "
                           f"that a run would overwrite; choose another --out (or an empty folder).")


def is_run_config(path):
    """Is this the config.json of a train.py run (one that stopped before its first checkpoint)?"""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        return isinstance(config, dict) and "status" in config and isinstance(config.get("config"), dict)
    except (OSError, ValueError):
        return False


def check_fits(cfg, sd, resolution, data):
    """What only the loaded model can tell: its UNet's size steps, its prompt length."""
    factor = sd.vae.config.downsample_factor * 2 ** (len(sd.unet.config.block_out_channels) - 1)
    if resolution % factor:
        raise RunError(f"--resolution {resolution}: this model needs a multiple of {factor} (VAE and UNet "
                       f"downsampling); e.g. {max(factor, round(resolution / factor) * factor)}.")
    length = sd.text_encoder.config.max_position_embeddings
    for path, prompts in zip(data.paths, data.prompts):
        for prompt in dict.fromkeys(prompts):
            n = len(sd.tokenizer.encode(prompt))
            if n > length:
                raise RunError(f"The training prompt {prompt!r} (for {path}) is {n} tokens with the word's "
                               f"{cfg.vectors} vector(s), but the text encoder reads {length}: its end would be "
                               f"cut off. Shorten the caption, or use fewer --vectors.")


# ----------------------------------------------------------------------------------------------
# Warm starts: --from a word file

def settings_from_file(cfg):
    """--from FILE (or FILE:NAME), read before the model is loaded: its one word decides --token, --vectors and
    --multires where they were not given (None), and must agree with those given. A space-time file (P+ /
    NeTI) continues a word of its own kind; an ordinary word starts every time bucket of --multires."""
    if is_spacetime_file(cfg.from_file):
        if word_kind(cfg) == "ti":
            raise RunError(f"--from {cfg.from_file} is a space-time word (P+ / NeTI): continue it with --per-layer "
                           f"or --neti, or start from an ordinary word (e.g. its learned_embeds-layer-avg file).")
        try:
            c = load_spacetime(cfg.from_file)
        except ConceptError as e:
            raise RunError(f"--from: {e}") from None
        if c.kind != word_kind(cfg):
            raise RunError(f"--from {cfg.from_file} is a {c.kind} word, but this run learns a "
                           f"{word_kind(cfg)} word; give a file of the same kind (or an ordinary word's file).")
        sizes = (c.vectors.shape[2], c.vectors.shape[0]) if c.kind == "per-layer" else (1, 1)  # [T, layers, n, D]
    else:
        concepts = cli.read_concepts(cfg.from_file, "--from")
        if len(concepts) != 1:
            raise RunError(f"--from {cfg.from_file} holds {len(concepts)} words ({[c.token for c in concepts]}); "
                           f"a warm start needs a file with one.")
        c = concepts[0]
        sizes = (c.num_vectors, c.num_buckets or cfg.multires)
    for key, size, what in (("vectors", sizes[0], "vector(s)"), ("multires", sizes[1], "time bucket(s)")):
        if getattr(cfg, key) not in (None, size):
            raise RunError(f"--from {cfg.from_file} has {size} {what}, but --{key} is {getattr(cfg, key)}.")
        setattr(cfg, key, size)
    cfg.token = cfg.token or c.token


def vectors_from_file(cfg, width):
    """--from an ordinary word's file: its vectors [T, n, D] (settings_from_file has matched the sizes) and a
    sentence saying so."""
    (c,) = cli.read_concepts(cfg.from_file, "--from", note=False)
    check_width(c, width)
    if c.is_multires:
        return c.vectors.clone(), f"init: {c.num_vectors} vector(s) x {cfg.multires} resolutions from {cfg.from_file}"
    T, message = cfg.multires, f"init: {c.num_vectors} vector(s) from {cfg.from_file}"
    return c.vectors[None].repeat(T, 1, 1), message + (f", for all {T} resolutions" * (T > 1))


def spacetime_from_file(cfg, sd):
    """--from a minti-spacetime file: the P+ / NeTI word it holds, called cfg.token, its placeholders registered
    in sd.tokenizer, and a sentence saying so."""
    try:
        concept = load_spacetime(cfg.from_file, cross_attention_layers(sd.unet), sd.text_encoder.config.hidden_size)
    except ConceptError as e:
        raise RunError(f"--from: {e}") from None
    concept.token = cfg.token
    try:
        word = make_word(concept, sd.tokenizer).train()
    except ValueError as e:  # its token is already a word
        raise RunError(f"--token: {e}") from None
    return word, f"init: the {concept.kind} word of {cfg.from_file}"


# ----------------------------------------------------------------------------------------------
# Resuming: the checkpoint and the settings it keeps

def find_state(folder):
    """The checkpoint of the run in `folder` (or the state.pt given itself)."""
    path = next((p for p in (os.path.join(folder, "checkpoint", "state.pt"), os.path.join(folder, "state.pt"),
                             folder) if os.path.isfile(p)), None)
    if path is None:
        raise RunError(f"--resume {folder}: no checkpoint there (no "
                       f"{os.path.join(folder, 'checkpoint', 'state.pt')}); give the folder of a run "
                       f"that train.py wrote.")
    return path


def load_state(path, known_settings):
    """A run's checkpoint/state.pt, read safely (weights_only) and checked, or a RunError saying what is wrong."""
    try:
        with warnings.catch_warnings():  # torch's note on a pickle protocol it does not expect
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign object (refused), a damaged file, a file that is not torch's at all
        raise RunError(f"--resume: {unreadable_torch_file(path, e)}; it is not a checkpoint train.py can "
                       f"continue. Start a new run (--from FILE warm-starts it from a concept file).") from None
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing or not isinstance(state["config"], dict):
        lacks = ", ".join(missing) or "a config"
        raise RunError(f"--resume: {path} is not a checkpoint train.py wrote (it lacks {lacks}); give the folder "
                       f"of a run that train.py wrote.")
    unknown = set(state["config"]) - set(known_settings)
    if unknown:
        raise RunError(f"--resume: {path} has settings this train.py does not know ({', '.join(sorted(unknown))}):"
                       f" it was written by another version of minti.")
    return state


def merge_resumed_config(saved, given, changeable):
    """The resumed run's settings: `saved`, but for those of `given` (the command line's, None where not given)
    that may change (`changeable`); another given setting must equal the saved one."""
    for f in fields(given):
        key, value = f.name, getattr(given, f.name)
        if value is None or key in changeable:
            setattr(saved, key, getattr(saved, key) if value is None else value)
        elif value != getattr(saved, key):
            raise RunError(f"--{key.replace('_', '-')} {value!r} differs from the run being resumed "
                           f"({getattr(saved, key)!r}); a resumed run keeps its settings (only "
                           f"{', '.join(sorted(changeable - {'resume'}))} may change). Start a new "
                           f"run with --from to change the others.")
    return saved


# ----------------------------------------------------------------------------------------------
# What a run writes: its folder, the word's files, the log and its plot

def choose_out(cfg):
    """--out; by default runs/<name>, or runs/<name>-2, ... when that is taken."""
    if cfg.out:
        if cfg.resume is None and os.path.isfile(os.path.join(cfg.out, "checkpoint", "state.pt")):
            raise RunError(f"--out {cfg.out} already holds a run; continue it with --resume {cfg.out}, or "
                           f"choose another --out.")
        return cfg.out
    out, k = os.path.join("runs", file_name(cfg.token)), 1
    while os.path.exists(out) and os.listdir(out):
        k += 1
        out = os.path.join("runs", f"{file_name(cfg.token)}-{k}")
    return out


def remove_unfinished_writes(out):
    """The temporary files of atomic_write that a kill -9 left in the run's folder (.name.1a2b3c4d.tmp):
    the files they were to replace are intact, and this run is the folder's only writer."""
    for folder, _, names in os.walk(out):
        for name in names:
            if re.fullmatch(r"\..+\.[0-9a-f]{8}\.tmp", name):
                os.remove(os.path.join(folder, name))


def file_name(token):
    """A file-system-safe name for the word: '<my-cat>' -> 'my-cat' (AUTOMATIC1111 calls it by it)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", token.strip("<>")).strip("-.") or "concept"


def save_concept_files(folder, concept, name):
    """The word's files: diffusers + AUTOMATIC1111 (multires: minti's file + a few resolutions of it as
    ordinary words; P+ / NeTI: minti's space-time file, and for P+ its layer average as a diffusers word)."""
    if isinstance(concept, SpaceTimeConcept):
        paths = [os.path.join(folder, f"{name}-{concept.kind}.safetensors")]
        save_spacetime(paths[0], concept)
        if concept.kind == "per-layer":
            paths.append(os.path.join(folder, "learned_embeds-layer-avg.safetensors"))
            save_diffusers(paths[-1], export_layer_average(concept))
        return paths
    if not concept.is_multires:
        paths = [os.path.join(folder, "learned_embeds.safetensors"), os.path.join(folder, f"{name}.pt")]
        save_diffusers(paths[0], concept)
        save_a1111(paths[1], concept)
        return paths
    paths = [os.path.join(folder, f"{name}-multires.safetensors")]
    save_multires(paths[0], concept)
    for t in MULTIRES_EXPORTS:
        single = export_resolution(concept, t)  # named "<token-r0.5>"
        paths += [os.path.join(folder, f"learned_embeds-r{t:g}.safetensors"),
                  os.path.join(folder, f"{name}-r{t:g}.pt")]
        save_diffusers(paths[-2], single)
        save_a1111(paths[-1], single)
    return paths


def usable_file(concept, name):
    """The file of the word to give sample.py --embeds."""
    if isinstance(concept, SpaceTimeConcept):
        return f"{name}-{concept.kind}.safetensors"
    return "learned_embeds.safetensors" if not concept.is_multires else \
        f"learned_embeds-r{MULTIRES_EXPORTS[1]:g}.safetensors"


def read_log(rows):
    """The log's values still on the device (the vectors' norms), read in one go: numbers from here on."""
    waiting = [(r, i) for r in rows for i, v in enumerate(r) if isinstance(v, torch.Tensor)]
    if waiting:
        for (r, i), value in zip(waiting, torch.stack([r[i] for r, i in waiting]).tolist()):
            r[i] = value


def write_log(out, columns, rows, title):
    """log.csv and loss.png in `out`; returns their paths."""
    read_log(rows)
    csv, png = os.path.join(out, "log.csv"), os.path.join(out, "loss.png")
    write_csv(csv, columns, rows)
    plot_loss(png, columns, rows, title)
    return csv, png


def plot_loss(path, columns, rows, title):
    """The loss per step and its running mean; below it, the vectors' norm (and a typical word's)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    if not rows:
        return
    col = {c: [r[i] for r in rows] for i, c in enumerate(columns)}
    window = max(1, min(50, len(rows) // 10))
    loss = torch.tensor(col["loss"], dtype=torch.float64)
    running = torch.nn.functional.avg_pool1d(loss[None, None], window, stride=1)[0, 0]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=(2, 1))
    ax.plot(col["step"], col["loss"], lw=0.5, alpha=0.4, label="loss")
    ax.plot(col["step"][window - 1:], running.tolist(), lw=1.5, label=f"running mean ({window} steps)")
    if "fixed_batch_loss" in col:  # --stop auto's signal: smooth, since its batch never changes
        fixed = [(s, v) for s, v in zip(col["step"], col["fixed_batch_loss"]) if v != ""]
        ax.plot(*zip(*fixed), lw=1.5, label="the fixed batch's loss (--stop auto)")
    ax.set(ylabel="loss (eq. 2)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax2.plot(col["step"], col["vector_norm"], label="learned vectors")
    if "typical_norm" in col:
        ax2.plot(col["step"], col["typical_norm"], ls="--", label="a typical word (median of the table)")
    ax2.set(xlabel="step", ylabel="norm")
    ax2.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)

