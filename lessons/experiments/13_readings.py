"""Lesson 13's experiment: g(t) read three ways on three measurement sets, and what each suggests, trained.

1. g(t) under every reading (mse, error-norm, jacobian; minti/timesteps.py) on (a) each concept's images
   at the init word, (b) the same with the word learned by uniform training (400 steps, seed 0), (c) the
   toy model's own captioned renders. Each curve suggests a width-100 interval and a single t.
2. Textual inversion with uniform, every distinct suggestion, adaptive under the mse and error-norm
   readings and the paper's 350-450 and 400: the same steps, lr, batch and seeds for all; the oracle's
   reconstruction at 25/50/100/200/400 steps and editability at 100 and 400, 64 samples each.

Resumable: rows are appended to lessons/results/13_convergence.csv as runs finish; runs already there
are skipped. Run from the repository root: python lessons/experiments/13_readings.py (the committed 48
runs and the g curves took 2.8 hours of one CPU thread on a 2-core machine running other jobs beside it,
a run 1.4-6.8 minutes: lessons/results/13_wall_times.csv).
"""
import argparse
import copy
import csv
import os
import sys
import time
from pathlib import Path

argparse.ArgumentParser(description="Lesson 13's experiment: g(t) read three ways, and every suggested "
                        "sampler trained (resumable; SMOKE=folder for a dry run).").parse_args()

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

import minti  # noqa: E402
from minti.data import find_images, load_image  # noqa: E402
from minti.io.files import write_csv  # noqa: E402
from minti.io.concepts import Concept  # noqa: E402
from minti.sampling import encode_prompts  # noqa: E402
from minti.textual_inversion import word_embed_fn  # noqa: E402
from minti import learn  # noqa: E402
from minti.run.measure_g import measure_g, suggest  # noqa: E402
from minti.timesteps import READINGS, AdaptiveTimesteps, make_timestep_sampler  # noqa: E402
from minti.toy import TEMPLATES as TOY_TEMPLATES, world as toyworld  # noqa: E402
from minti.toy.evaluate import (CONCEPTS_FOLDER, PREFIXES, Share, concept_sampler, edits_for, prompt,  # noqa: E402
                                read_attributes, score_concept)
from minti.toy.oracle import Oracle  # noqa: E402

RESULTS = ROOT / "lessons" / "results"
G_CSV, SUGGEST_CSV = RESULTS / "13_g.csv", RESULTS / "13_suggestions.csv"
RUNS_CSV, BINS_CSV, WALL_CSV = RESULTS / "13_convergence.csv", RESULTS / "13_adaptive_bins.csv", RESULTS / "13_wall_times.csv"
WORDS = RESULTS / "13_words.pt"  # the uniform seed-0 words that measurement set (b) uses
CONCEPTS = ("striped_orange_star", "outlined_pink_heart")
SEEDS = (0, 1)
CHECKPOINTS, EDIT_AT = (25, 50, 100, 200, 400), (100, 400)
N, DDIM_STEPS, CFG, EVAL_SEED = 64, 25, 4.0, 0  # oracle samples per point; the same noise for every run
LR, BATCH = 5e-2, 16
# g: 40 timesteps x 20 samples (5 images x 4 noise draws, or 20 renders x 1), 2 projections per sample
G_TIMESTEPS, G_REPEATS, G_PROJECTIONS, G_RENDERS = range(0, 1000, 25), 4, 2, 20
PAPER = ("350-450", "400")  # Wang & Kalogeiton's interval and single t (LDM, LAION-400M)
SETS = {"init": "concept images, init word", "learned": "concept images, learned word (post-optimised)",
        "captions": "captioned renders (the model's own data)"}
TOKEN = "<c>"
if os.environ.get("SMOKE"):  # a seconds-long dry run into another folder, to check the script
    RESULTS = Path(os.environ["SMOKE"])
    G_CSV, SUGGEST_CSV = RESULTS / "13_g.csv", RESULTS / "13_suggestions.csv"
    RUNS_CSV, BINS_CSV, WALL_CSV = (RESULTS / f"12_{n}.csv" for n in ("convergence", "adaptive_bins", "wall_times"))
    WORDS, CHECKPOINTS, EDIT_AT, N, G_TIMESTEPS, G_REPEATS = RESULTS / "w.pt", (2, 4), (4,), 4, range(0, 1000, 250), 1

sd = minti.load("toy")
oracle = Oracle.load()


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def wall(what, seconds):
    new = not WALL_CSV.exists()
    with open(WALL_CSV, "a") as f:
        f.write(("what,seconds\n" if new else "") + f"{what},{seconds:.0f}\n")


def encode_latents(pixels):
    with torch.no_grad():
        return sd.vae.encode(pixels)[0] * sd.latent_scale  # the posterior mean


def encode(prompts, vectors=None):
    """Contexts [B, L, D] for prompts; with vectors [1, D], TOKEN in them is the learned word."""
    tokenizer, embed_fn = sd.tokenizer, None
    if vectors is not None:
        tokenizer = copy.deepcopy(sd.tokenizer)
        embed_fn = word_embed_fn(tokenizer, sd.text_encoder, {TOKEN: vectors})
    with torch.no_grad():
        return encode_prompts(tokenizer, sd.text_encoder, prompts, embed_fn)


def measurement_set(name, concept=None, vectors=None):
    """(latents [N, 4, h, w], contexts [N, L, D]) of a measurement set; image n takes template n mod 4."""
    if name == "captions":
        images, captions = toyworld.captioned_renders(G_RENDERS, seed=123)
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return encode_latents(pixels), encode(captions)
    truth = toyworld.CONCEPTS[concept]
    paths = find_images(os.path.join(CONCEPTS_FOLDER, concept))
    pixels = torch.stack([load_image(p, toyworld.IMAGE_SIZE) for p in paths])
    word = truth.init_word if name == "init" else TOKEN
    prompts = [prompt(PREFIXES[n % len(PREFIXES)], word) for n in range(len(paths))]
    return encode_latents(pixels), encode(prompts, vectors)


# ----------------------------------------------------------------------------------------------
# Evaluation and one run

def evaluate(truth, vectors, with_edits):
    sampler = concept_sampler(sd, Concept(TOKEN, vectors), steps=DDIM_STEPS, cfg=CFG)
    recon_prompts = [prompt(PREFIXES[i % 4], TOKEN) for i in range(N)]
    read = read_attributes(oracle, sampler(recon_prompts, EVAL_SEED))
    masks = score_concept(read, truth)
    out = {"reconstruction": Share.of(masks["intact"]), "size": Share.of(read["size"] == truth.image_size),
           **{a: Share.of(masks[a]) for a in ("shape", "colour", "pattern")}}
    if with_edits:  # 64 samples pooled over the edits, each edit with the templates in turn
        edits = edits_for(truth)
        chosen = [(edits[i % len(edits)], PREFIXES[(i // len(edits)) % 4]) for i in range(N)]
        read = read_attributes(oracle, sampler([e.prompt(p, TOKEN) for e, p in chosen], EVAL_SEED))
        per = [score_concept({a: v[i:i + 1] for a, v in read.items()}, truth, e) for i, (e, _) in enumerate(chosen)]
        out["editability"] = Share.of([m["both"][0] for m in per])
        out["edit: asked change"] = Share.of([m["changed"][0] for m in per])
        out["edit: concept intact"] = Share.of([m["intact"][0] for m in per])
        for attribute in ("background", "size"):
            hit = [m["both"][0] for m, (e, _) in zip(per, chosen) if e.attribute == attribute]
            if hit:
                out[f"edit {attribute}"] = Share.of(hit)
    return out


def run(concept, seed, label, spec):
    truth = toyworld.CONCEPTS[concept]
    sampler = make_timestep_sampler(spec)
    results = {}

    def callback(step, word, loss):
        if step in CHECKPOINTS:
            results[step] = evaluate(truth, word.vectors[0].detach().clone(), step in EDIT_AT)

    word, _ = learn(sd, os.path.join(CONCEPTS_FOLDER, concept), TOKEN, init=truth.init_word,
                    templates=TOY_TEMPLATES, steps=max(CHECKPOINTS),
                    batch=BATCH, lr=LR, timesteps=sampler, seed=seed, callback=callback)
    rows = [[concept, seed, label, spec, step, measure, s.hits, s.n]
            for step, shares in results.items() for measure, s in shares.items()]
    new = not RUNS_CSV.exists()
    with open(RUNS_CSV, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["concept", "seed", "sampler", "spec", "step", "measure", "hits", "n"])
        w.writerows(rows)
    if isinstance(sampler, AdaptiveTimesteps):
        new = not BINS_CSV.exists()
        with open(BINS_CSV, "a") as f:
            f.write(("concept,seed,spec,bin_start,estimate,count\n" if new else "") + "".join(
                f"{concept},{seed},{spec},{b * sampler.bin_width},{e:.6g},{c}\n"
                for b, (e, c) in enumerate(zip(sampler.bin_estimates().tolist(), sampler.count.tolist()))))
    return word.vectors[0].detach().clone(), results


def done_runs():
    if not RUNS_CSV.exists():
        return set()
    with open(RUNS_CSV) as f:
        return {(r["concept"], int(r["seed"]), r["spec"]) for r in csv.DictReader(f)}


def do_run(concept, seed, label, spec):
    if (concept, seed, spec) in done_runs():
        return
    t0 = time.time()
    vectors, results = run(concept, seed, label, spec)
    wall(f"run {concept} seed {seed} {spec}", time.time() - t0)
    log(f"{concept} seed {seed} {label} ({spec}): reconstruction "
        + " ".join(f"{s}:{100 * r['reconstruction'].value:.0f}%" for s, r in results.items())
        + f" editability {100 * results[max(CHECKPOINTS)]['editability'].value:.0f}% ({time.time() - t0:.0f} s)")
    if spec == "uniform" and seed == 0:
        words = torch.load(WORDS) if WORDS.exists() else {}
        words[concept] = vectors
        torch.save(words, WORDS)


# ----------------------------------------------------------------------------------------------
# 1. the uniform seed-0 words (needed by set b), then the g curves and their suggestions

RESULTS.mkdir(exist_ok=True)
for concept in CONCEPTS:
    do_run(concept, 0, "uniform", "uniform")

if not G_CSV.exists():
    t0 = time.time()
    words = torch.load(WORDS)
    rows = []
    jobs = [("captions", "all")] + [(s, c) for s in ("init", "learned") for c in CONCEPTS]
    for name, concept in jobs:
        latents, contexts = measurement_set(name, None if concept == "all" else concept,
                                            words.get(concept) if name == "learned" else None)
        repeats = G_REPEATS if name != "captions" else max(1, G_REPEATS * 5 // G_RENDERS)  # 20 samples each
        g = measure_g(sd.unet, sd.scheduler, latents, contexts, G_TIMESTEPS, repeats,
                      torch.Generator().manual_seed(0), projections=G_PROJECTIONS)
        for reading, (ts, mean, std) in g.items():
            rows += [[name, concept, reading, t, m, s, len(latents) * repeats]
                     for t, m, s in zip(ts.tolist(), mean.tolist(), std.tolist())]
        log(f"g measured on {name} / {concept} ({time.time() - t0:.0f} s so far)")
    write_csv(G_CSV, ["set", "concept", "reading", "t", "g_mean", "g_std", "n"], rows)
    wall("g curves (5 sets x 3 readings)", time.time() - t0)

with open(G_CSV) as f:
    g_rows = list(csv.DictReader(f))
suggestions = []  # (set, reading, interval spec, single t)
for name in SETS:
    for reading in READINGS:
        rows = [r for r in g_rows if r["set"] == name and r["reading"] == reading]
        ts = sorted({int(r["t"]) for r in rows})
        mean = [np.mean([float(r["g_mean"]) for r in rows if int(r["t"]) == t]) for t in ts]  # over concepts
        (a, b), peak = suggest(ts, mean)
        suggestions.append((name, reading, f"{a}-{b}", str(peak)))
write_csv(SUGGEST_CSV, ["set", "reading", "interval", "single"], suggestions)
log("suggestions:", suggestions)

# ----------------------------------------------------------------------------------------------
# 2. the runs, most telling first (so that a run cut short leaves the answer to the main question):
# at seed 0 on both concepts the paper's method as eq. 4 reads it (adaptive, error-norm), its fixed
# window and adaptive (mse), then the two suggestions most of the nine curves make; seed 1 of uniform and
# the paper's window; 125-225 (between the failing 25-125 and the paper's window); seed 1 of adaptive
# (error-norm); then the other suggestions by how many curves make them, and
# last 0-100 and t = 25, whose neighbours a smaller run had already trained (0-100, 10-110, t = 20:
# all failed; results/13_timesteps.csv), and
# the paper's t = 400 (inside its 350-450); then seed 1 of everything else.

MAIN = {"uniform": "uniform", "adaptive (error-norm)": "adaptive:error-norm", "paper interval": PAPER[0],
        "adaptive (mse)": "adaptive"}
votes = {}
for name, reading, interval, single in suggestions:
    for spec in (interval, single):
        votes[spec] = votes.get(spec, 0) + 1
known = {"0-100", "25"}
SUGGESTED = {f"{'interval' if '-' in spec else 'single'} {spec}": spec
             for spec in sorted(votes, key=lambda s: (s in known, -votes[s], -int(s.split("-")[0])))
             if spec not in MAIN.values()}
SUGGESTED["paper single"] = PAPER[1]
labels = list(MAIN) + list(SUGGESTED)
every = {**MAIN, **SUGGESTED}
order = ([(0, lab) for lab in list(MAIN) + labels[len(MAIN):len(MAIN) + 2]]
         + [(1, "uniform"), (1, "paper interval"), (0, "interval 125-225"), (1, "adaptive (error-norm)")]
         + [(0, lab) for lab in labels[len(MAIN) + 2:]] + [(1, lab) for lab in labels])
log("runs in this order:", order)
for seed, label in order:
    for concept in CONCEPTS:
        do_run(concept, seed, label, every[label])
log("all runs done")
