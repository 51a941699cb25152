# %% [markdown]
# # Lesson 10 · Reconstruction against editability
#
# A learned word is judged on two axes (Gal et al. 2022, arXiv 2208.01618, section 5, "Quantitative
# analysis"): **reconstruction**, does "a photo of $S_*$" show the concept, and **editability**,
# does "$S_*$ on a blue background" show the change asked for. The paper measures both with CLIP:
# reconstruction as the CLIP similarity between samples of "A photo of $S_*$" and the training
# images, editability as the CLIP similarity between samples and the text of their prompt with
# $S_*$ left out. minti's measures (lesson 08) are shares of samples read by the oracle, defined
# below; the paper's editability is closest to minti's "asked change".
#
# The paper's Fig. 10 puts its variants on these two axes and finds a trade-off: words that fit the
# training images harder (more vectors per word, a higher learning rate) reconstruct better and
# edit worse; they drift far from the words the model was trained on, and the rest of the prompt
# stops working around them. The paper keeps one vector at its base learning rate as the default:
# less faithful than the variants with more capacity, but easier to edit.
#
# Here we measure the same thing on the toy model, with the oracle instead of CLIP (lesson 08): a
# grid of learning rates x vectors per word, the same steps, batch and seed for each, every learned
# word judged by `minti.toy.evaluate.evaluate_concept`:
# - reconstruction: "a photo of a $S_*$" (and the other toy templates) shows the right shape AND
#   colour AND pattern;
# - editability: "... $S_*$ on a blue background", "... on a green background", "a photo of a small
#   $S_*$" (what the training images never had) shows the asked change AND the concept intact;
# - asked change alone: the edit was made, concept or not (the paper's text similarity does not
#   look for the concept either).
#
# The full grid takes tens of minutes on one CPU thread (9 words; the CSV's `learn_s` and `eval_s`
# columns hold each word's seconds), so its numbers are committed in
# `lessons/results/10_tradeoff.csv` (with the picture beside it): `python
# lessons/10_reconstruction_editability.py --full` recomputes them (and resumes a grid that was
# interrupted). The default run prints the committed table, draws the picture, and learns one grid
# point again to check it against the committed numbers. The last section reads a second committed
# measurement, `lessons/results/24_levers.csv`: two published changes to the method, judged by the
# same two measures step by step.
#
# Run: `python lessons/10_reconstruction_editability.py` (`MINTI_FAST=1`: 16 samples per condition
# in the rerun instead of 32). Needs the toy model in `weights/toy/`.

# %%
import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()  # script or notebook
sys.path.insert(0, str(HERE.parent))  # so that `import minti` finds the repository's minti/
OUT = HERE / "out"
OUT.mkdir(exist_ok=True)
RESULTS = HERE / "results"  # committed: the full grid's numbers and picture
CSV_PATH = RESULTS / "10_tradeoff.csv"
parser = argparse.ArgumentParser(description="Lesson 10: the reconstruction-editability trade-off.")
parser.add_argument("--full", action="store_true",
                    help="learn and evaluate the whole grid and write "
                         f"{CSV_PATH.relative_to(HERE.parent)} and its PNG (resumes: points already in the "
                         "file with the same settings are kept); also redraws results/10_levers.png")
args, _ = parser.parse_known_args()


import minti
from minti.toy import TEMPLATES as TOY_TEMPLATES, world as toyworld
from minti.io.concepts import Concept
from minti.toy.oracle import Oracle
from minti import learn
from minti.toy.evaluate import Share, concept_sampler, edits_for, evaluate_concept, wilson_interval

FAST = os.environ.get("MINTI_FAST") == "1"
# The paper's base lr; train.py's toy default (near the paper's effective 0.04 = 0.005 x batch 4 x 2 GPUs);
# and higher.
LRS = (5e-3, 5e-2, 2e-1)
VECTORS = (1, 2, 4)  # vectors per word: the paper's "1-word", "2-word", ...
STEPS, BATCH, SEED = 200, 16, 0  # the same for every grid point
N = 64  # samples per condition in the grid; editability pools 3 edits of the same 64 noises (see below)

# %%
DDIM_STEPS, CFG = 25, 4.0  # sampling (lesson 08: the toy model follows captions best at guidance 4)
RERUN = (5e-2, 1)  # the grid point that the default run learns again (lesson 09's word)
# The rerun evaluates fewer samples than the grid; --full evaluates that word at these n too, so that
# the rerun has a committed twin with the same n to equal.
N_CHECKS = (16, 32)
N_RERUN = N_CHECKS[0] if FAST else N_CHECKS[1]

# %%
NAME = toyworld.DEFAULT_CONCEPT
TRUTH = toyworld.CONCEPTS[NAME]
FOLDER = HERE.parent / "weights" / "toy" / "concepts" / NAME
TOKEN = "<s*>"
SETTINGS = {"steps": STEPS, "batch": BATCH, "seed": SEED, "ddim_steps": DDIM_STEPS, "cfg": CFG}
# The measures kept per word: the name in evaluate_concept's report -> the CSV column.
MEASURES = {"reconstruction": "reconstruction", "shape": "shape", "colour": "colour", "pattern": "pattern",
            "editability": "editability", "edit: asked change": "asked_change",
            "edit: concept intact": "concept_intact"}

sd = minti.load("toy")
oracle = Oracle.load()

# %% [markdown]
# ## One grid point
#
# Learn the word (lesson 09's `learn`; only lr and the number of vectors change), then judge it.
# Every word of $k$ vectors starts with all $k$ at "star". The prompt-only reference ("a photo of a
# star", ...) is the same for every grid point: the same model, prompts and noise give the same
# images, so the sampler below draws those once and hands the same images to every evaluation.

# %%
reference_images = {}  # (prompts, seed) -> images, for prompts without the learned word


def sampler_for(concept):
    with_word = concept_sampler(sd, concept, steps=DDIM_STEPS, cfg=CFG)

    def sample(prompts, seed):
        if any(concept.token in p for p in prompts):
            return with_word(prompts, seed)
        key = (tuple(prompts), seed)
        if key not in reference_images:
            reference_images[key] = with_word(prompts, seed)
        return reference_images[key]

    return sample


def point_name(lr, vectors, n):
    return f"S* lr={lr:g} x{vectors}" + ("" if n == N else f" n={n}")


def shares_row(word, lr, vectors, n, shares, **extra):
    """One CSV row: hits, n, share and 95% interval of every measure."""
    row = {"word": word, "lr": lr, "vectors": vectors, "n": n, **SETTINGS, **extra}
    for name, column in MEASURES.items():
        share = shares[name]
        low, high = share.interval
        row.update({f"{column}_hits": share.hits, f"{column}_n": share.n, column: round(share.value, 4),
                    f"{column}_low": round(low, 4), f"{column}_high": round(high, 4)})
    return row


# %% [markdown]
# `run_point` learns one word and evaluates it; every number of the grid comes from it.

# %%
def run_point(lr, vectors, ns):
    """Learn one word and evaluate it with n samples per condition for each n in ns: (a CSV row per
    n, the reference rows of the first evaluation)."""
    start = time.perf_counter()
    word, losses = learn(sd, str(FOLDER), TOKEN, TRUTH.init_word, num_vectors=vectors, steps=STEPS, batch=BATCH,
                         lr=lr, seed=SEED, templates=TOY_TEMPLATES)
    learn_s = time.perf_counter() - start
    learned = word.vectors.detach()[0]  # [vectors, 64]
    table = sd.text_encoder.text_model.embeddings.token_embedding.weight
    star = table[sd.tokenizer.encode(TRUTH.init_word)[1]]
    concept = Concept(TOKEN, learned)
    rows, references = [], None
    for n in ns:
        start = time.perf_counter()
        report = evaluate_concept(sd, concept, truth=NAME, n=n, steps=DDIM_STEPS, cfg=CFG, oracle=oracle,
                                  sampler=sampler_for(concept))
        eval_s = time.perf_counter() - start
        extra = dict(drift=round((learned - star).norm(dim=-1).mean().item(), 4),  # mean |v_k - v_star|
                     norm=round(learned.norm(dim=-1).mean().item(), 4),  # mean |v_k|
                     loss_last50=round(float(np.mean(losses[-50:])), 5), learn_s=round(learn_s),
                     eval_s=round(eval_s))
        rows.append(shares_row(point_name(lr, vectors, n), lr, vectors, n, report["concept"], **extra))
        if references is None:  # the references at the first n (the grid's)
            references = [shares_row(f'prompt only "{TRUTH.init_word}"', "", "", n, report["prompt_only"]),
                          shares_row("image only (training images)", "", "", "", report["image_only"])]
    return rows, references


# %% [markdown]
# The CSV: read, written atomically, kept in the grid's order; `share_of` turns a row's columns back
# into a `Share` (hits of n, with its Wilson interval).

# %%
def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(rows, path):
    path.parent.mkdir(exist_ok=True)
    columns = list(rows[0])
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def same_settings(row):
    return all(str(row[k]) == str(v) for k, v in SETTINGS.items())


def ordered(rows):
    """The CSV's order: the grid by lr and vectors, the rerun's twins, then the references."""
    order = [point_name(lr, v, N) for lr in LRS for v in VECTORS] + [point_name(*RERUN, n) for n in N_CHECKS]
    return [rows[w] for w in sorted(rows, key=lambda w: order.index(w) if w in order else len(order))]


def is_grid(row):
    return row["word"].startswith("S*") and str(row["n"]) == str(N)


def share_of(row, column):
    return Share(int(row[f"{column}_hits"]), int(row[f"{column}_n"]))


# %% [markdown]
# **Counting the edits.** Editability pools the three edits (blue, green, small): 3 x 64 = 192
# samples. But sample $i$ of each edit starts from the same noise (the $i$-th slice drawn from the
# seed), so the three outcomes of one noise are not independent: a noise that gives a badly drawn
# star tends to give it in all three. The 192 are worth fewer than 192 independent samples; at
# worst, if the three always agreed, they would be worth 64. So the pooled edit measures get the
# Wilson interval of 64 samples at the pooled share: wider than the naive one, and safe however
# strongly the three agree. Reconstruction's 64 samples each have their own noise: plain Wilson.

# %%
EDITS = len(edits_for(TRUTH))  # 3: blue, green, small; edit i of each shares noise i
POOLED = ("editability", "asked_change", "concept_intact")


def interval_of(row, column):
    """The 95% interval of a row's measure: Wilson, at n / EDITS for the pooled edit measures."""
    share, m = share_of(row, column), EDITS if column in POOLED else 1
    return wilson_interval(share.hits / m, share.n // m)


def show(row, column):
    (low, high), share = interval_of(row, column), share_of(row, column)
    return f"{100 * share.value:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def apart(a, b):
    """Do two (low, high) intervals not overlap? -1: a below b, 1: a above b, 0: they overlap."""
    return -1 if a[1] < b[0] else 1 if a[0] > b[1] else 0


# %% [markdown]
# ## The grid (`--full`)

# %%
if args.full:
    done = {}
    if CSV_PATH.exists():
        done = {r["word"]: r for r in read_csv(CSV_PATH) if same_settings(r)}
    grid_start = time.perf_counter()
    for lr in LRS:
        for vectors in VECTORS:
            ns = (N, *N_CHECKS) if (lr, vectors) == RERUN else (N,)
            if all(point_name(lr, vectors, n) in done for n in ns):
                print(f"{point_name(lr, vectors, N)}: kept from {CSV_PATH.name}")
                continue
            rows, references = run_point(lr, vectors, ns)
            for row in rows + references:
                done[row["word"]] = row if row["word"].startswith("S*") else done.get(row["word"], row)
            row = rows[0]
            print(f"{row['word']}: reconstruction {share_of(row, 'reconstruction')}, editability "
                  f"{share_of(row, 'editability')}, asked change {share_of(row, 'asked_change')} "
                  f"(learn {row['learn_s']} s, evaluate {row['eval_s']} s)", flush=True)
            write_csv(ordered(done), CSV_PATH)
    print(f"the grid: {(time.perf_counter() - grid_start) / 60:.1f} min")

if not CSV_PATH.exists():
    sys.exit(f"{CSV_PATH} is missing: run `python lessons/10_reconstruction_editability.py --full` first")
committed = read_csv(CSV_PATH)
grid = [r for r in committed if is_grid(r) and same_settings(r)]
references = [r for r in committed if not r["word"].startswith("S*")]
if len(grid) != len(LRS) * len(VECTORS):
    sys.exit(f"{CSV_PATH} does not hold the grid of this lesson's settings {SETTINGS}, n = {N}: run --full")

# %% [markdown]
# ## The committed numbers

# %%
print(f"{NAME}, {STEPS} steps of batch {BATCH}, seed {SEED}; {N} samples per condition,\n"
      f"DDIM {DDIM_STEPS} steps, guidance {CFG}; share [95% Wilson interval; the edit measures' at n = {N}]")
for columns, extra in ((("reconstruction", "editability"), ("drift", "|v-v_star|")),
                       (("asked_change", "concept_intact"), ("learn_s", "learn s"))):
    print(f"\n{'word':30s}" + "".join(f"{c.replace('_', ' '):24s}" for c in columns) + f"{extra[1]:>11s}")
    for r in grid + references:
        cells = "".join(show(r, c).ljust(24) for c in columns)
        print(f"{r['word'][:29]:30s}{cells}{r.get(extra[0]) or '':>11}")


# %%
def legend_handles(colours, markers):
    handles = [plt.Line2D([], [], color=c, marker="o", ls="none", label=f"lr {lr:g}")
               for lr, c in colours.items()]
    return handles + [plt.Line2D([], [], color="gray", marker=m, ls="none",
                                 label=f"{v} vector{'s' * (v > 1)}") for v, m in markers.items()]


def point_style(r, colours, markers):
    return dict(color=colours[float(r["lr"])], marker=markers[int(r["vectors"])], ms=7)


# %%
def plot(rows, refs, path):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    colours = dict(zip(LRS, ("tab:blue", "tab:orange", "tab:red")))
    markers = dict(zip(VECTORS, ("o", "s", "^")))
    prompt_only = next(r for r in refs if r["word"].startswith("prompt only"))
    image_only = next(r for r in refs if r["word"].startswith("image only"))
    for ax, x_column, x_label in ((axes[0], "editability", "editability: asked change AND concept intact"),
                                  (axes[1], "asked_change", "asked change made (concept or not)")):
        for r in rows + [prompt_only]:
            (y, y_int), (x, x_int) = [(share_of(r, c), interval_of(r, c)) for c in ("reconstruction", x_column)]
            if r is prompt_only:
                style = dict(color="gray", marker="*", ms=11)
                ax.annotate(r["word"], (x.value, y.value), fontsize=7, xytext=(-70, 6),
                            textcoords="offset points")
            else:
                style = point_style(r, colours, markers)
            ax.errorbar(x.value, y.value, xerr=[[x.value - x_int[0]], [x_int[1] - x.value]],
                        yerr=[[y.value - y_int[0]], [y_int[1] - y.value]], elinewidth=0.6,
                        capsize=2, ls="none", **style)
        # The training images cannot be edited: they are only the ceiling of reconstruction.
        ax.axhline(share_of(image_only, "reconstruction").value, color="black", lw=0.8, ls="--")
        ax.text(0.02, 0.975, f"image only: the {image_only['reconstruction_n']} training images", fontsize=7,
                transform=ax.get_yaxis_transform(), va="top")
        ax.set_xlabel(x_label)
        ax.set_ylim(-0.03, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_xlim(-0.03, 1.03)
    low = min(interval_of(r, "asked_change")[0] for r in rows + [prompt_only])
    axes[1].set_xlim(max(0.0, low - 0.05), 1.01)  # zoomed: the asked change is made almost always
    axes[0].set_ylabel("reconstruction: shape AND colour AND pattern")
    axes[1].legend(handles=legend_handles(colours, markers), fontsize=8, loc="lower left")
    fig.suptitle(f"{NAME}: {STEPS} steps, batch {BATCH}; {N} samples per condition, 95% Wilson intervals (the "
                 f"edits' at n = {N}: they share noise)\n(the paper's Fig. 10 with the oracle as judge)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# %%
if args.full:
    print("->", plot(grid, references, RESULTS / "10_tradeoff.png").relative_to(HERE.parent))
print("->", plot(grid, references, OUT / "10_tradeoff.png").relative_to(HERE.parent))

# %%
by_point = {(float(r["lr"]), int(r["vectors"])): r for r in grid}
rec = {p: interval_of(r, "reconstruction") for p, r in by_point.items()}
more_vectors = {lr: {(a, b): apart(rec[lr, b], rec[lr, a]) for a, b in ((1, 2), (2, 4), (1, 4))} for lr in LRS}
for lr in LRS:
    print(f"lr {lr:g}, reconstruction, 1 | 2 | 4 vectors:\n  "
          + " | ".join(show(by_point[lr, v], "reconstruction") for v in VECTORS))
    print("  intervals apart: " + ", ".join(f"{b} above {a}: {'yes' if more_vectors[lr][a, b] == 1 else 'no'}"
                                            for a, b in more_vectors[lr]))
lr_steps = [apart(rec[b, 1], rec[a, 1]) for a, b in zip(LRS, LRS[1:])]  # one vector, lr 0.005 -> 0.05 -> 0.2
drift_1 = [float(by_point[lr, 1]["drift"]) for lr in LRS]
print(f"one vector, lr {' -> '.join(f'{lr:g}' for lr in LRS)}: |v - v_star| "
      f"{' -> '.join(f'{d:.1f}' for d in drift_1)};\n  reconstruction intervals apart at each step up: "
      f"{', '.join('yes' if a == 1 else 'no' for a in lr_steps)}")
always_edited = [p for p in by_point if share_of(by_point[p], "asked_change").value == 1.0]
worst_edit = min(by_point, key=lambda p: share_of(by_point[p], "asked_change").value)
edit_at_most_recon = all(share_of(r, "editability").value <= share_of(r, "reconstruction").value for r in grid)
four_vs_two = {(lr, c): apart(interval_of(by_point[lr, 4], c), interval_of(by_point[lr, 2], c))
               for lr in (0.05, 0.2) for c in ("asked_change", "editability")}
print(f"asked change made in every sample for {len(always_edited)} of {len(by_point)} words; least often for "
      f"lr {worst_edit[0]:g} x{worst_edit[1]}: {show(by_point[worst_edit], 'asked_change')}")
for (lr, c), a in four_vs_two.items():
    print(f"  lr {lr:g}, {c.replace('_', ' ')}: 4 vectors {show(by_point[lr, 4], c)}, 2 vectors "
          f"{show(by_point[lr, 2], c)}: {'4 below 2' if a == -1 else 'overlap' if a == 0 else '4 above 2'}")

# %% [markdown]
# What the committed numbers show (one concept, one training seed, 200 steps; the intervals are
# the judging's sampling noise for these nine learned words, not how much another training run
# would differ):
# - **more vectors reconstruct better, but only 1 against 4 is clear**: with 4 vectors the word
#   reconstructs better than with 1 at every learning rate (intervals apart); 2 against 1 is apart
#   only at lr 0.005, and 2 against 4 overlaps at every lr: the data cannot decide between them;
# - **a higher learning rate** helps a one-vector word from 0.005 to 0.05 (intervals apart); from
#   0.05 to 0.2 the data cannot decide, though the word moves further from "star" at each step up
#   of lr (|v - v_star| printed above; step 2b of lesson 09 said why lr sets the distance);
# - **editing hardly suffers**. The toy model makes the asked change (blue or green background,
#   small size) in every sample for 7 of the 9 words, as it does for "star", so editability
#   (change AND concept) is at or below reconstruction for all 9 words: where an edit fails, it is
#   mostly the concept that is lost;
# - the one sign of the paper's trade-off is at **4 vectors, lr 0.05**: the asked change is made
#   less often than with 2 vectors, intervals apart even counted as 64 samples. At lr 0.2 the same
#   comparison overlaps, and on editability itself (change AND concept) 4 against 2 vectors
#   overlaps at both learning rates: the data cannot say that the 4-vector word edits worse
#   overall.
#
# So on the toy model extra vectors bought reconstruction, and the first failures to make the
# asked edit came with 4 of them. The paper trained ~5000 steps on a large text-to-image model and
# judged editing by CLIP on prompts far from the training images (new scenes, new styles); our
# edits are small, the run short, and there is one concept and one seed, so this is one data
# point, not a refutation. The check below keeps this text honest: it fails if the committed table
# stops saying so.

# %% [markdown]
# ## Rerun one grid point
#
# Learn lesson 09's word again (lr 0.05, one vector) with the grid's settings, and evaluate it
# with fewer samples (32; 16 with `MINTI_FAST=1`). `--full` evaluated that word at those n too, so
# the rerun has a committed twin: the same word, the same prompts, the same noise (sample $i$ starts
# from the $i$-th slice of one tensor drawn from the seed, so these are also the grid's first
# samples). On the same machine and threads the computation is deterministic and the twin's hits
# are equalled exactly; on another CPU or torch version floating-point sums may round differently
# and a few samples may flip, so the check asks for agreement within the 95% intervals: the rerun's
# share inside the twin's interval and the twin's inside the rerun's. Against the grid's own row
# (64 samples) it asks only that the intervals overlap: the first 16 or 32 samples are a smaller,
# noisier estimate of the same share (with 16, 7 hits against 47 of 64).

# %%
lr, vectors = RERUN
grid_row = next(r for r in grid if r["word"] == point_name(lr, vectors, N))
twin = next(r for r in committed if r["word"] == point_name(lr, vectors, N_RERUN) and same_settings(r))
(row,), _ = run_point(lr, vectors, (N_RERUN,))
agree, equal = [], []
for column in ("reconstruction", "editability", "asked_change", "concept_intact"):
    (new, new_i), (old, old_i), (big, big_i) = [(share_of(r, column), interval_of(r, column))
                                                for r in (row, twin, grid_row)]
    inside = (old_i[0] <= new.value <= old_i[1] and new_i[0] <= old.value <= new_i[1]
              and apart(new_i, big_i) == 0)
    agree.append(inside)
    equal.append((old.hits, old.n) == (new.hits, new.n))
    print(f"{column:15s} rerun {show(row, column):20s} ({new.hits:3d}/{new.n})  committed "
          f"{show(twin, column):20s} ({old.hits:3d}/{old.n})\n{'':15s} grid  {show(grid_row, column):20s} "
          f"({big.hits:3d}/{big.n})  {'equal' if equal[-1] else 'within' if inside else 'DISAGREE'}")
same_vector = row["drift"] == float(twin["drift"])
print(f"learned word: |v - v_star| = {row['drift']} (committed {twin['drift']}); learn {row['learn_s']} s, "
      f"evaluate {row['eval_s']} s")

# %% [markdown]
# ## Fewer steps: a different start, a fixed norm
#
# The same two measures can judge changes to the method. Two published levers keep the model
# frozen and change only how the word starts or moves (`minti.learn`'s `start=` and `norm=`; the
# README's "Fewer steps: a start, a norm, a stop"):
# - **CrossInit** (Pang et al. 2024, arXiv 2312.15905), `start="output"`: the vectors start at the
#   text encoder's *output* for the init word instead of its row of the token table;
# - **DTI** (arXiv 2512.13672), `norm="fixed"`: the vectors keep the mean norm of the token table's
#   rows; only their direction learns (lesson 09's far-travelled word cannot get longer).
#
# `tests/benchmarks/bench_levers.py` learned each of the five toy concepts with the default and with
# each lever (train.py's toy settings: 2 vectors, lr 0.05, batch 16, 300 steps, seed 0) and judged
# the word at steps 50, 100, 150, 200 and 300 (the star also at 25 and 75) with 16 samples per
# condition: `lessons/results/24_levers.csv`. Its goal: reconstruction at least 80% and
# editability at least 70%. Each run is one concept and one seed, so lever and default are compared
# concept by concept (the same concept, seed and noise), never pooled over concepts.

# %%
LEVERS_CSV, GOAL = RESULTS / "24_levers.csv", (0.8, 0.7)
LEVERS = {"default": "default", "crossinit": "CrossInit (start=output)", "dti": "DTI (norm=fixed)"}


def read_levers(path):
    """{(config, concept, seed): {step: (reconstruction interval, editability interval, shares)}}; rows
    of other configurations, and an unfinished last row, are skipped."""
    runs = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r.get("config") not in LEVERS or any(v in (None, "") for v in r.values()):
                continue
            n, recon, edit = int(r["n"]), float(r["reconstruction"]), float(r["editability"])
            # editability pools the concept's 3 edits of the same 16 noises: an interval at n = 16
            runs.setdefault((r["config"], r["concept"], int(r["seed"])), {})[int(r["step"])] = (
                wilson_interval(recon * n, n), wilson_interval(edit * n, n), (recon, edit))
    return runs


def first_at_goal(run):
    """The first judged step whose two shares reach the goal (infinity: none within the run)."""
    return min((step for step, (_, _, (r, e)) in run.items() if r >= GOAL[0] and e >= GOAL[1]),
               default=math.inf)


levers = read_levers(LEVERS_CSV)
seed0 = {k: v for k, v in levers.items() if k[2] == 0}
concepts = sorted({k[1] for k in seed0})
to_goal = {c: {k: first_at_goal(seed0[c, k, 0]) for k in concepts} for c in LEVERS}
median_to_goal = {c: float(np.median(list(steps.values()))) for c, steps in to_goal.items()}
print(f"{LEVERS_CSV.name}: seed 0, {len(concepts)} concepts; the first judged step at the goal\n"
      f"(reconstruction >= {GOAL[0]:.0%}, editability >= {GOAL[1]:.0%}; inf: not within the run's 300 steps)")
print(f"{'':26s}" + "".join(f"{k.split('_')[-1]:>9s}" for k in concepts) + "   median")
for c, steps in to_goal.items():
    print(f"{LEVERS[c]:26s}" + "".join(f"{steps[k]:>9}" for k in concepts) + f"{median_to_goal[c]:>9g}")
others = sorted({(k[0], k[2]) for k in levers if k[2] != 0})
for c, seed in others:  # further seeds, where the CSV has them: printed, not part of the text's statements
    steps = {k[1]: first_at_goal(v) for k, v in levers.items() if k[0] == c and k[2] == seed}
    print(f"  seed {seed}, {LEVERS[c]}: " + ", ".join(f"{k.split('_')[-1]} {s}" for k, s in sorted(steps.items())))

# %%
differences = []  # (lever, concept, step, measure, +1 above / -1 below the default), intervals apart
for (c, k, _), run in sorted(seed0.items()):
    for step, intervals in run.items():
        if c == "default" or step not in seed0["default", k, 0]:
            continue
        for m, measure in enumerate(("reconstruction", "editability")):
            side = apart(intervals[m], seed0["default", k, 0][step][m])
            if side:
                differences.append((c, k, step, measure, side))
compared = sum(2 * len(set(run) & set(seed0["default", k, 0])) for (c, k, _), run in seed0.items() if c != "default")
print(f"lever against default, same concept and step: {len(differences)} of {compared} comparisons with the "
      "intervals apart:")
for c, k, step, measure, side in differences:
    print(f"  {LEVERS[c]:26s}{k:24s}step {step:3d}  {measure:15s}{'above' if side > 0 else 'below'}")

# %%
def plot_levers(runs, path):
    """Reconstruction and editability against step, one column per concept, one line per configuration,
    95% intervals shaded (seed 0)."""
    fig, axes = plt.subplots(2, len(concepts), figsize=(3 * len(concepts), 5.4), sharex=True, sharey=True)
    colours = dict(zip(LEVERS, ("black", "tab:orange", "tab:blue")))
    for col, k in enumerate(concepts):
        for c in LEVERS:
            run = runs[c, k, 0]
            steps = sorted(run)
            for row, ax in enumerate(axes[:, col]):
                ax.plot(steps, [100 * run[t][2][row] for t in steps], "o-", ms=3, color=colours[c], label=LEVERS[c])
                ax.fill_between(steps, [100 * run[t][row][0] for t in steps], [100 * run[t][row][1] for t in steps],
                                color=colours[c], alpha=0.12, lw=0)
        for row, ax in enumerate(axes[:, col]):
            ax.axhline(100 * GOAL[row], color="gray", ls=":", lw=0.8)
            ax.grid(alpha=0.3)
        axes[0, col].set_title(k.replace("_", " "), fontsize=9)
        axes[1, col].set_xlabel("step")
    axes[0, 0].set_ylabel("reconstruction (%)")
    axes[1, 0].set_ylabel("editability (%)")
    axes[1, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle("the levers on the toy concepts, seed 0: 16 samples per condition, 95% Wilson intervals "
                 "(editability's at n = 16: its 3 edits share noise); dotted: the goal", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


for folder in (OUT, RESULTS) if args.full else (OUT,):
    print("->", plot_levers(levers, folder / "10_levers.png").relative_to(HERE.parent))

# %% [markdown]
# What the levers' numbers show (seed 0; each statement is checked below):
# - **no lever halves the steps to the goal**: over the five concepts the median first step at the
#   goal is 100 for the default and for DTI, and 150 for CrossInit;
# - concept by concept, almost every difference is inside the noise of 16 samples: of all the
#   lever-against-default comparisons at the same concept and step (printed above), the intervals
#   are apart only where CrossInit is *behind* the default at step 100 (the pink heart and the
#   purple square, on both measures: it reaches them a snapshot later) and where DTI is *ahead* on
#   the cyan triangle's editability (steps 100-200);
# - so the data supports "CrossInit's start is no faster on the toy" and "DTI was faster on one
#   concept of five"; it cannot say that DTI is faster in general. One seed per concept, and
#   first-step-at-goal read off shares of 16 samples, is a small basis; more seeds, paired by
#   concept and seed, are what would decide. Where the CSV already holds further seeds (their
#   lines are printed under the table), compare one concept's first step at the goal across seeds:
#   that is how far a training seed alone moves it.

# %% [markdown]
# ## Check

# %%
assert all(agree), "the rerun disagrees with the committed numbers beyond their 95% intervals"
text = "the committed numbers no longer say what the text above says: update the text"
assert all(more_vectors[lr][1, 4] == 1 and more_vectors[lr][2, 4] == 0 for lr in LRS), text
assert [more_vectors[lr][1, 2] for lr in LRS] == [1, 0, 0], text
assert lr_steps == [1, 0] and drift_1[0] < drift_1[1] < drift_1[2], text
assert len(always_edited) == 7 and edit_at_most_recon and worst_edit == (0.05, 4), text
assert four_vs_two == {(0.05, "asked_change"): -1, (0.05, "editability"): 0,
                       (0.2, "asked_change"): 0, (0.2, "editability"): 0}, text
assert median_to_goal == {"default": 100, "crossinit": 150, "dti": 100}, median_to_goal  # the levers
assert all(median_to_goal[c] > median_to_goal["default"] / 2 for c in ("crossinit", "dti")), median_to_goal
apart_where = {(c, k.split("_")[-1], step, side) for c, k, step, _, side in differences}
assert apart_where == {("crossinit", "heart", 100, -1), ("crossinit", "square", 100, -1),
                       *(("dti", "triangle", step, 1) for step in (100, 150, 200))}, differences
assert all(m == "editability" for c, *_, m, _ in differences if c == "dti"), differences
behind = [k for k in concepts if k.endswith(("heart", "square"))]  # CrossInit: a snapshot later there
assert all((to_goal["default"][k], to_goal["crossinit"][k]) == (100, 150) for k in behind), to_goal
how = ("identical hits and the same |v - v_star|: deterministic here" if all(equal) and same_vector
       else f"{sum(equal)} of 4 measures with identical hits, |v - v_star| "
            f"{'equal' if same_vector else 'differs'}")
print(f"check passed: the committed grid has {len(grid)} words of {STEPS} steps and says what the text "
      f"says;\n"
      f"  lr {lr:g} x{vectors} learned again agrees with its committed twin (n = {N_RERUN}) within the 95% "
      f"Wilson intervals,\n  and its intervals overlap the grid's (n = {N}), on reconstruction, editability,\n"
      f"  asked change and concept intact ({how});\n  the levers (seed 0): median steps to the goal "
      + ", ".join(f"{c} {median_to_goal[c]:g}" for c in LEVERS) + f";\n  {len(differences)} of {compared} "
      "lever-against-default comparisons apart, as the text says")

# %% [markdown]
# ## Exercises
#
# 1. Add the paper's regulariser, a penalty $\lambda \|v - v_\text{star}\|^2$. A short way without
#    writing the loop: after each step (`learn`'s callback), apply its proximal step
#    $v \leftarrow v_\text{star} + (v - v_\text{star}) / (1 + 2\,\mathrm{lr}\,\lambda)$. How far from
#    "star" does the word land for $\lambda = 0$, 0.5 and 2?
# 2. The slow learner: lr 0.005 for 300 steps. Does its distance from "star" grow steadily, and
#    how close does it get to lr 0.05's 11.2 after 200 steps?
# 3. Which edit does the 4-vector word at lr 0.05 fail? Learn it with the grid's settings (200 steps,
#    batch 16, seed 0, the toy templates) and ask the oracle what its "on a green background"
#    samples show instead. Is the background it draws one the training images had? (The solution
#    asserts its answer; `check_background(images)` there checks your own samples.)
