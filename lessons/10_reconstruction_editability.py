# %% [markdown]
# # Lesson 10 · Reconstruction against editability
#
# A learned word is judged on two axes (Gal et al. 2022, section 5): **reconstruction**, does "a
# photo of $S_*$" show the concept, and **editability**, does "$S_*$ on a blue background" show the
# concept *and* the change asked for. The paper's Fig. 10 puts its variants on these two axes and
# finds a trade-off: words that fit the training images harder (more vectors per word, a higher
# learning rate) reconstruct better and edit worse; they drift far from the words the model was
# trained on, and the rest of the prompt stops working around them. The paper keeps one vector at
# its base learning rate as the default: less faithful than the variants with more capacity, but
# easier to edit.
#
# Here we measure the same thing on the toy model, with the oracle instead of CLIP (lesson 08): a
# grid of learning rates x vectors per word, the same steps, batch and seed for each, every learned
# word judged by `minti.toy.evaluate.evaluate_concept`:
# - reconstruction: "a photo of a $S_*$" (and the other toy templates) shows the right shape AND
#   colour AND pattern;
# - editability: "... $S_*$ on a blue background", "... on a green background", "a photo of a small
#   $S_*$" (what the training images never had) shows the asked change AND the concept intact;
# - asked change alone: the edit was made, concept or not. This is nearer to the paper's text
#   similarity, which compared the image with the prompt *without* $S_*$.
#
# The full grid takes half an hour on one CPU thread (9 words, about 65 s to learn and 100 s to
# evaluate each), so its numbers are committed in `lessons/results/10_tradeoff.csv` (with the
# picture beside it): `python lessons/10_reconstruction_editability.py --full` recomputes them (and
# resumes a grid that was interrupted). The default run prints the committed table, draws the
# picture, and learns one grid point again to check it against the committed numbers.
#
# Run: `python lessons/10_reconstruction_editability.py` (about 2 minutes on one CPU thread, 3.5 on
# a busy one; `MINTI_FAST=1`: 16 samples per condition in the rerun, about 1.5 minutes). Needs the
# toy model in `weights/toy/`.

# %%
import argparse
import csv
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
                         "file with the same settings are kept)")
args, _ = parser.parse_known_args()


import minti
from minti.toy import TEMPLATES as TOY_TEMPLATES, world as toyworld
from minti.io.concepts import Concept
from minti.toy.oracle import Oracle
from minti import learn
from minti.toy.evaluate import Share, concept_sampler, evaluate_concept

FAST = os.environ.get("MINTI_FAST") == "1"
# The paper's base lr; train.py's toy default (near the paper's effective 0.04 = 0.005 x batch 4 x 2 GPUs);
# and higher.
LRS = (5e-3, 5e-2, 2e-1)
VECTORS = (1, 2, 4)  # vectors per word: the paper's "1-word", "2-word", ...
STEPS, BATCH, SEED = 200, 16, 0  # the same for every grid point
N = 64  # samples per condition in the grid (editability pools 3 edits: 192 samples)

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
      f"DDIM {DDIM_STEPS} steps, guidance {CFG}; share [95% Wilson interval]")
for columns, extra in ((("reconstruction", "editability"), ("drift", "|v-v_star|")),
                       (("asked_change", "concept_intact"), ("learn_s", "learn s"))):
    print(f"\n{'word':30s}" + "".join(f"{c.replace('_', ' '):24s}" for c in columns) + f"{extra[1]:>11s}")
    for r in grid + references:
        cells = "".join(str(share_of(r, c)).strip().ljust(24) for c in columns)
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
            y, x = share_of(r, "reconstruction"), share_of(r, x_column)
            if r is prompt_only:
                style = dict(color="gray", marker="*", ms=11)
                ax.annotate(r["word"], (x.value, y.value), fontsize=7, xytext=(-70, 6),
                            textcoords="offset points")
            else:
                style = point_style(r, colours, markers)
            ax.errorbar(x.value, y.value, xerr=[[x.value - x.interval[0]], [x.interval[1] - x.value]],
                        yerr=[[y.value - y.interval[0]], [y.interval[1] - y.value]], elinewidth=0.6,
                        capsize=2, ls="none", **style)
        # The training images cannot be edited: they are only the ceiling of reconstruction.
        ax.axhline(share_of(image_only, "reconstruction").value, color="black", lw=0.8, ls="--")
        ax.text(0.02, 0.975, f"image only: the {image_only['reconstruction_n']} training images", fontsize=7,
                transform=ax.get_yaxis_transform(), va="top")
        ax.set_xlabel(x_label)
        ax.set_ylim(-0.03, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_xlim(-0.03, 1.03)
    low = min(share_of(r, "asked_change").interval[0] for r in rows + [prompt_only])
    axes[1].set_xlim(max(0.0, low - 0.05), 1.01)  # zoomed: the asked change is made almost always
    axes[0].set_ylabel("reconstruction: shape AND colour AND pattern")
    axes[1].legend(handles=legend_handles(colours, markers), fontsize=8, loc="lower left")
    fig.suptitle(f"{NAME}: {STEPS} steps, batch {BATCH}; {N} samples per condition, 95% Wilson intervals "
                 "(the paper's Fig. 10 with the oracle as judge)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# %%
if args.full:
    print("->", plot(grid, references, RESULTS / "10_tradeoff.png").relative_to(HERE.parent))
print("->", plot(grid, references, OUT / "10_tradeoff.png").relative_to(HERE.parent))

# %% [markdown]
# What the committed numbers show (the shipped toy model, one concept, one seed, 200 steps; the
# whole grid took 30 minutes on one CPU thread shared with other jobs, about 65 s to learn a word
# and 100 s to evaluate it):
# - **more vectors reconstruct better**, at every learning rate: 1 -> 2 -> 4 vectors give 34 -> 75 ->
#   86% at lr 0.005, 73 -> 89 -> 92% at lr 0.05, 72 -> 88 -> 98% at lr 0.2 ("star": 8%);
# - **a higher learning rate** helps a one-vector word only up to 0.05 (34%, 73%, 72%): in 200 steps
#   lr 0.005 moves the word 4.8 away from "star", lr 0.05 11.2 and lr 0.2 18.3, and the two larger
#   moves do equally well;
# - **editing hardly suffers**. The toy model makes the asked change (blue or green background,
#   small size) in every sample for 7 of the 9 words, as it does for "star". So editability
#   (change AND concept) mostly rises *with* reconstruction, from 34% to 87%, never above it: the
#   concept is intact as often or less often on a new background or at a new size.
# - the trade-off shows only at **4 vectors**: the asked change drops to 82.8% [76.8, 87.5] at lr
#   0.05 and 97.9% [94.8, 99.2] at lr 0.2. At lr 0.05 the 4-vector word edits worse than the
#   2-vector word (69.8% [63.0, 75.8] against 80.2% [74.0, 85.2]) while it reconstructs better.
#
# So on the toy model the paper's trade-off appears only at its end: extra capacity bought
# reconstruction almost for free up to 2 vectors, and the first failures to edit come with 4. The
# paper trained ~5000 steps on a large text-to-image model and judged editing by CLIP on prompts
# far from the training images (new scenes, new styles); our edits are small, the run short, and
# there is one concept and one seed, so this is one data point, not a refutation. The check below
# keeps this paragraph honest: it fails if the committed table stops saying so.

# %%
by_point = {(float(r["lr"]), int(r["vectors"])): r for r in grid}
recon = {p: share_of(r, "reconstruction").value for p, r in by_point.items()}
rises = all(recon[lr, 1] < recon[lr, 2] < recon[lr, 4] for lr in LRS)
always_edited = [p for p in by_point if share_of(by_point[p], "asked_change").value == 1.0]
worst_edit = min(by_point, key=lambda p: share_of(by_point[p], "asked_change").value)
print(f"reconstruction rises with the number of vectors at every lr: {rises};\n  the asked change is made "
      f"in every sample for {len(always_edited)} of {len(by_point)} words;\n  least often for lr "
      f"{worst_edit[0]:g} x{worst_edit[1]}: {share_of(by_point[worst_edit], 'asked_change')}")

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
    new, old, big = share_of(row, column), share_of(twin, column), share_of(grid_row, column)
    inside = (all(a.interval[0] <= b.value <= a.interval[1] for a, b in ((old, new), (new, old)))
              and new.interval[0] <= big.interval[1] and big.interval[0] <= new.interval[1])
    agree.append(inside)
    equal.append((old.hits, old.n) == (new.hits, new.n))
    print(f"{column:15s} rerun {new} ({new.hits:3d}/{new.n})  committed {old} ({old.hits:3d}/{old.n})\n"
          f"{'':15s} grid  {big} ({big.hits:3d}/{big.n})  "
          f"{'equal' if equal[-1] else 'within' if inside else 'DISAGREE'}")
same_vector = row["drift"] == float(twin["drift"])
print(f"learned word: |v - v_star| = {row['drift']} (committed {twin['drift']}); learn {row['learn_s']} s, "
      f"evaluate {row['eval_s']} s")

# %% [markdown]
# ## Check

# %%
assert all(agree), "the rerun disagrees with the committed numbers beyond their 95% intervals"
assert rises and len(always_edited) == 7 and worst_edit[1] == 4, \
    "the committed numbers no longer say what the text above says: update the text"
how = ("identical hits and the same |v - v_star|: deterministic here" if all(equal) and same_vector
       else f"{sum(equal)} of 4 measures with identical hits, |v - v_star| "
            f"{'equal' if same_vector else 'differs'}")
print(f"check passed: the committed grid has {len(grid)} words of {STEPS} steps and says what the text "
      f"says;\n"
      f"  lr {lr:g} x{vectors} learned again agrees with its committed twin (n = {N_RERUN}) within the 95% "
      f"Wilson intervals,\n  and its intervals overlap the grid's (n = {N}), on reconstruction, editability,\n"
      f"  asked change and concept intact ({how})")

# %% [markdown]
# ## Exercises
#
# 1. Add the paper's regulariser, a penalty $\lambda \|v - v_\text{star}\|^2$. A short way without
#    writing the loop: after each step (`learn`'s callback), apply its proximal step
#    $v \leftarrow v_\text{star} + (v - v_\text{star}) / (1 + 2\,\mathrm{lr}\,\lambda)$. How far from
#    "star" does the word land for $\lambda = 0$, 0.5 and 2?
# 2. The slow learner: lr 0.005 for 3x the steps. Does its distance from "star" grow steadily, and
#    how close does it get to lr 0.05's 11.2 after 200 steps?
# 3. Which edit does the 4-vector word at lr 0.05 fail? Learn it (the grid's settings) and ask the
#    oracle what "on a green background" samples show instead. When this lesson was written:
#    32 of 64 samples kept a black background, one that the training images had (blue backgrounds
#    64 of 64, small 63 of 64). The word had learned the backgrounds of its images, which is the
#    paper's trade-off in one picture.
