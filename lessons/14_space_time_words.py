# %% [markdown]
# # Lesson 14 · Space-time words: a vector per UNet layer (P+) and a network of (t, layer) (NeTI)
#
# Multiresolution textual inversion (lesson 12) gave the word one vector per slice of *time*. The UNet
# has a second axis: its cross-attention layers, at several resolutions. Every one of them attends to
# the same text c(y) in plain SD; **P+** (Voynov, Chu, Cohen-Or, Aberman, "P+: Extended Textual
# Conditioning in Text-to-Image Generation", arXiv:2303.09522) gives layer $l$ its own prompt, hence
# its own word vector $v_l$ (the paper calls learning it Extended Textual Inversion, XTI):
#
# $$\mathcal L = \mathbb E\, \big\| \varepsilon - \varepsilon_\theta\big(z_t, t, \{c(y; v_l)\}_{l=1}^{16}\big) \big\|^2 ,$$
#
# 16 text-encoder passes per prompt in SD 1.x (7 in the toy model), batched into one call here.
# **NeTI** (Alaluf, Richardson, Metzer, Cohen-Or, "A Neural Space-Time Representation for
# Text-to-Image Personalization", arXiv:2305.15391) makes the vector a function, $v = M(t, l)$:
# random Fourier features of $(t, l)$, a small MLP, an output rescaled to a real word's norm; a
# second output, the *textual bypass*, is added to the text encoder's result at the word; *nested
# dropout* truncates the MLP's hidden vector during training so that at sampling time a truncated
# vector still works.
#
# What the papers claim. P+'s abstract: XTI "is more expressive and precise, and converges faster
# than the original Textual Inversion (TI) space", and "does not involve any noticeable trade-off
# between reconstruction and editability"; its per-layer prompting experiment finds the coarse inner
# layers of the UNet deciding the shape, the outer, fine layers the style and appearance. NeTI's
# abstract: the bypass can "significantly improve the convergence and visual fidelity", and the
# ordering (nested dropout) gives "control over the reconstruction and editability of the learned
# concept using a single trained model"; its experiments compare NeTI, one token, with TI and XTI
# (among others) and report it ahead of both, though XTI's word has 16 vectors.
# Step 5 holds these claims against the toy world.
#
# Steps:
# 1. the cross-attention layers: names (diffusers' module paths) and resolutions
# 2. P+ by hand: each layer's context built on its own = `PerLayerWord.context` (one batched call),
#    and what the UNet's layers attend to (a spy) = that
# 3. NeTI by hand: Fourier features, MLP, truncation, bypass = `NeTIMapper` / `NeTIWord.context`
# 4. style mixing: coarse layers from one P+ word, fine layers from another, read by the oracle
# 5. the committed measurement (`results/14_spacetime.csv`): TI, multires, P+, NeTI side by side,
#    compared run by run; NeTI's truncation with the edit split into its two parts
#
# Run: `python lessons/14_space_time_words.py` (64 samples per mixing condition; `MINTI_FAST=1`:
# 16). `--full` learns the two P+ words (150 steps each) and writes `results/14_pplus_*.safetensors`,
# `results/14_style_mixing.csv` and `.png`. The grid is `python -m minti.toy.spacetime_eval`
# (60 runs, resumable: 3.4 hours of one CPU thread on a 2-core machine running other jobs, as two
# processes side by side, `--seeds 0` and `--seeds 1`; `--plot` draws `results/14_spacetime.png`);
# the truncation rerun is `python lessons/experiments/14_truncation_edits.py`.

# %%
import argparse
import copy
import csv
import math
import os
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser(description="Lesson 14: space-time words (P+, NeTI).",
                                 epilog="MINTI_FAST=1: 16 samples per mixing condition (default 64).")
parser.add_argument("--full", action="store_true",
                    help="learn the two P+ words (150 steps), write lessons/results/14_pplus_* and 14_style_mixing.*")
args, _ = parser.parse_known_args()  # known: a notebook kernel passes its own arguments
FAST = os.environ.get("MINTI_FAST") == "1" and not args.full

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
sys.path.insert(0, str(HERE.parent))
OUT, RESULTS = HERE / "out", HERE / "results"
OUT.mkdir(exist_ok=True)

import minti
from minti import learn
from minti.io.spacetime_files import from_word, load_spacetime, make_word, save_spacetime
from minti.sampling import text_to_image
from minti.spacetime import BYPASS_ALPHA, mix_layers, new_spacetime_word
from minti.textual_inversion import sampling_conditioning, splice, token_table
from minti.toy import TEMPLATES, world as toyworld
from minti.toy.evaluate import CONCEPTS_FOLDER, Share, read_attributes
from minti.toy.oracle import Oracle
from minti.toy.spacetime_eval import summarise, truncation_csv
from minti.unet import cross_attention_layers

# %%
torch.manual_seed(0)
torch.set_num_threads(1)
start_time = time.time()
sd = minti.load("toy")
te, table = sd.text_encoder, token_table(sd.text_encoder)
A, B = "striped_orange_star", "striped_purple_square"
N = 16 if FAST else 64  # samples per mixing condition
DDIM_STEPS, CFG, SEED = 25, 4.0, 0
print(f"{'full' if args.full else 'fast' if FAST else 'default'} run; concepts {A} and {B}")

# %% [markdown]
# ## Step 1: the layers
#
# `cross_attention_layers(unet)` lists the spatial transformers in forward order, by their diffusers
# module path (SD 1.5: 6 down, 1 mid, 9 up = 16). A spy on each layer's query length gives its side.

# %%
names = cross_attention_layers(sd.unet)
sides, handles = {}, []
for name in names:
    attn2 = sd.unet.get_submodule(name).transformer_blocks[0].attn2
    handles.append(attn2.register_forward_pre_hook(
        (lambda n: lambda m, a: sides.__setitem__(n, int(a[0].shape[1] ** 0.5)))(name)))
with torch.no_grad():
    sd.unet(torch.zeros(1, 4, 8, 8), 500, torch.zeros(1, 77, te.config.hidden_size))
for h in handles:
    h.remove()
COARSE = [sides[n] < max(sides.values()) for n in names]  # below the latent's own resolution
for name, coarse in zip(names, COARSE):
    print(f"  {name:28s} {sides[name]}x{sides[name]}  {'coarse' if coarse else 'fine'}")

# %% [markdown]
# ## Step 2: P+ by hand
#
# A P+ word holds vectors [layers, n, D]. Layer $l$'s context is the text encoder run on the prompt
# with $v_l$ spliced in. By hand: one call per layer. The library stacks the layers into the batch
# (one call of layers x B rows) and hands the UNet a list, one context per layer.

# %%
tokenizer = copy.deepcopy(sd.tokenizer)
init = table[tokenizer.encode("star")[1:-1]].detach()
word = new_spacetime_word("per-layer", sd, tokenizer, "<pp>", init)
with torch.no_grad():
    word.vectors.add_(0.3 * torch.randn_like(word.vectors))  # every layer its own vector
ids = tokenizer(["a photo of a <pp>", "<pp> on a blue background"], length=77)
by_hand = [te(ids, inputs_embeds=splice(ids, table, word.token_ids, word.vectors[0, l])) for l in range(len(names))]
with torch.no_grad():
    library = word.context(te, ids, torch.tensor([10, 990]))
err_context = max((a - b).abs().max().item() for a, b in zip(by_hand, library))
seen, handles = {}, []
for name in names:
    attn2 = sd.unet.get_submodule(name).transformer_blocks[0].attn2
    handles.append(attn2.register_forward_pre_hook((lambda n: lambda m, a: seen.__setitem__(n, a[1]))(name)))
with torch.no_grad():
    sd.unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 990]), library)
for h in handles:
    h.remove()
err_spy = max((seen[n] - by_hand[l]).abs().max().item() for l, n in enumerate(names))
print(f"P+ contexts: by hand vs library {err_context:.1e}; what each UNet layer attends to vs by hand {err_spy:.1e}")

# %% [markdown]
# ## Step 3: NeTI by hand
#
# $M(t, l)$: the features $[\sin(W x), \cos(W x)] / \|\cdot\|$ of $x = (t, l)$, $W$ [1024, 2] drawn
# from $\mathcal N(0, \mathrm{diag}(0.03^2, 2^2))$ (slow in $t$ over 0..999, fast across layers); a
# first linear layer that starts at the features of 10 time anchors x the layers; two
# Linear-LayerNorm-LeakyReLU layers of width 128 (the paper's, kept for the toy); a linear output of
# 2D (word, bypass). Truncation at $k$ zeroes hidden dimensions $k$ onward. The word half is rescaled
# to the init word's norm. The bypass is added, at the word's position, to the text encoder's last
# hidden state *before* its final LayerNorm, rescaled to that state's norm x 0.2.

# %%
neti = new_spacetime_word("neti", sd, tokenizer, "<nt>", init).eval()
mapper = neti.mapper
nids = tokenizer(["a photo of a <nt>"], length=77)
tm = te.text_model


def mapper_by_hand(t, l, keep=None):
    x = torch.tensor([float(t), float(l)])
    phase = mapper.encode.w @ x
    f = torch.cat([torch.sin(phase), torch.cos(phase)])
    h = f / f.norm()
    for layer in mapper.net:
        h = layer(h[None])[0]
    if keep is not None:
        h = torch.where(torch.arange(len(h)) < keep, h, torch.zeros(()))
    out = mapper.output(h[None])[0]
    v = out[:mapper.width]
    return v / v.norm() * mapper.norm, out[mapper.width:]


err_neti = 0.0
with torch.no_grad():
    for keep in (None, 16):
        neti.truncation = keep
        for t in (0, 500, 999):
            got = neti.context(te, nids, torch.tensor([t]))
            for l in range(len(names)):
                v, bypass = mapper_by_hand(t, l, keep)
                h = tm.encoder(tm.embeddings(splice(nids, table, neti.token_ids, v[None])))
                at = nids == neti.token_ids[0]
                h[at] = h[at] + BYPASS_ALPHA * bypass / bypass.norm() * h[at].norm(dim=-1, keepdim=True)
                err_neti = max(err_neti, (tm.final_layer_norm(h) - got[l]).abs().max().item())
    neti.truncation = None
    v_full, _ = mapper_by_hand(500, 3)
    v_cut, _ = mapper_by_hand(500, 3, 4)
print(f"NeTI contexts (t in 0, 500, 999; truncation none and 16; bypass): by hand vs library {err_neti:.1e}")
print(f"the vector at (t=500, layer 3) keeping 4 of 128 hidden dims is at cosine "
      f"{torch.cosine_similarity(v_full, v_cut, 0):.2f} from the full one")

# %% [markdown]
# ## Step 4: style mixing
#
# P+'s per-layer finding, on the toy: two P+ words, one of the striped orange star and one of the
# striped purple square; "a photo of a S" with the coarse layers' contexts from one word and the fine
# layers' from the other. The oracle reads shape, colour and pattern, and we count which concept each
# attribute comes from (both are striped: pattern says only "intact"). All four conditions start from
# the same noise.

# %%
words = {}
tok = copy.deepcopy(sd.tokenizer)
for name, token in ((A, "<pa>"), (B, "<pb>")):
    path = RESULTS / f"14_pplus_{name}.safetensors"
    if args.full or not path.exists():
        steps = 150 if args.full else 20
        w, _ = learn(sd, os.path.join(CONCEPTS_FOLDER, name), token, toyworld.CONCEPTS[name].init_word, steps=steps,
                     batch=16, lr=5e-2, seed=0, templates=TEMPLATES, kind="per-layer")
        concept = from_word(w, token, step=steps, meta={"truth": name})
        if args.full:
            save_spacetime(path, concept)
        print(f"learned the P+ word of {name}: {steps} steps")
    else:
        concept = load_spacetime(path, names, te.config.hidden_size)
        print(f"the committed P+ word of {name} ({concept.step} steps)")
    words[name] = make_word(concept, tok)

# %%
oracle = Oracle.load()
contexts = {name: sampling_conditioning(w, te, tok([f"a photo of a {w_token}"], length=77), n=N)
            for (name, w), w_token in zip(words.items(), ("<pa>", "<pb>"))}
conditions = {f"all {A}": contexts[A], f"all {B}": contexts[B],
              f"coarse {A} + fine {B}": mix_layers(contexts[B], contexts[A], COARSE),
              f"coarse {B} + fine {A}": mix_layers(contexts[A], contexts[B], COARSE)}
mix_rows, grids, live = [], [], {}
for label, cond in conditions.items():
    images = text_to_image(sd, ["mix"], cond=cond, num_steps=DDIM_STEPS, guidance_scale=CFG, seed=SEED, n=N)
    read = read_attributes(oracle, images)
    row = {"condition": label, "n": N}
    for attr in ("shape", "colour", "pattern"):
        for src in (A, B):
            row[f"{attr} = {src}"] = round(float(np.mean(read[attr] == getattr(toyworld.CONCEPTS[src], attr))), 4)
    live[label] = read
    mix_rows.append(row)
    grids.append(np.concatenate(list(images[:8]), axis=1))
    short = " ".join(w.split("_")[-1] if "_" in w else w for w in label.split())  # "coarse star + fine square"
    print(f"  {short:26s} shape {A.split('_')[-1]} {100 * row[f'shape = {A}']:3.0f}% / "
          f"{B.split('_')[-1]} {100 * row[f'shape = {B}']:3.0f}%   colour orange {100 * row[f'colour = {A}']:3.0f}% / "
          f"purple {100 * row[f'colour = {B}']:3.0f}%")
MIXED = {f"coarse {A} + fine {B}": (A, B), f"coarse {B} + fine {A}": (B, A)}  # label: (coarse, fine) word
shape_follows_coarse = {label: Share.of(live[label]["shape"] == toyworld.CONCEPTS[coarse].shape)
                        for label, (coarse, fine) in MIXED.items()}

# %%
fig, ax = plt.subplots(figsize=(8, 4.6))
ax.imshow(np.concatenate(grids, axis=0))
ax.set_yticks([16 + 32 * i for i in range(len(conditions))], list(conditions), fontsize=7)
ax.set_xticks([])
ax.set_title(f"P+ style mixing on the toy model: coarse = {sum(COARSE)} layers below 8x8, fine = the "
             f"{len(COARSE) - sum(COARSE)} at 8x8", fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "14_style_mixing.png", dpi=110)
MIX_CSV = RESULTS / "14_style_mixing.csv"
if args.full:
    fig.savefig(RESULTS / "14_style_mixing.png", dpi=110)
    tmp = MIX_CSV.with_suffix(".csv.tmp")  # written whole, then renamed: never half a file
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(mix_rows[0]))
        writer.writeheader()
        writer.writerows(mix_rows)
    os.replace(tmp, MIX_CSV)
    print("wrote", MIX_CSV)
with open(MIX_CSV) as f:
    committed = {r["condition"]: r for r in csv.DictReader(f)}


def share(row, column):
    """A committed share as hits of n (the CSV keeps the share, rounded to 4 decimals, and n)."""
    return Share(round(float(row[column]) * int(row["n"])), int(row["n"]))


mix = {label: {f"{attr} from the {part} word": share(committed[label], f"{attr} = {src}")
               for attr in ("shape", "colour") for part, src in (("coarse", coarse), ("fine", fine))}
       for label, (coarse, fine) in MIXED.items()}
own_orange = share(committed[f"all {A}"], f"colour = {A}")
print(f"committed ({MIX_CSV.name}, n = {own_orange.n} per condition), 95% Wilson intervals:")
for label, shares in mix.items():
    print(f"  {label.replace('striped_', '')}:")
    print("".join(f"    {k:28s} {v}\n" for k, v in shares.items()), end="")
print(f"  the star's own word, orange: {own_orange}")
moved = max(abs(row[k] - float(committed[row["condition"]][k])) for row in mix_rows for k in row
            if k not in ("condition", "n"))  # another CPU may round differently: allow 2 samples of 64
same_as_committed = N == own_orange.n and moved <= 2 / N + 1e-9
print(f"this run ({N} samples per condition) against the committed shares: at most {100 * moved:.1f} points apart")

# %% [markdown]
# What the committed run says (64 samples per condition, P+ words of 150 steps): in both mixed
# conditions the shape and the colour come from the coarse layers' word. Coarse star + fine square:
# the star's shape in 100% [94, 100] of the samples and its orange in 94% [85, 98]; coarse square +
# fine star: the square in 100% and purple in 100%; the fine layers' word gave its shape or its colour
# in 0 of 64 samples, either way. The star's own word shows orange in 84% [74, 91]; against the
# mix's 94% the intervals overlap, so the data cannot say whether the square's fine layers change the
# orange. On this small model the three 8x8 layers move nothing the oracle reads: P+'s finding holds
# for the shape, and the colour goes with the shape, not with the fine layers. (The run above, with
# its own samples, is checked at the end to give the coarse word's shape in most of its samples.)

# %% [markdown]
# ## Step 5: the measurement
#
# `python -m minti.toy.spacetime_eval` learned every method on the five shipped concepts (three the
# captions can name, two held out), seeds 0 and 1, with the same images, prompts, batch 16 and lr
# 0.05, and judged each word at 25, 50, 100, 200 and 400 steps with the oracle (reconstruction: "a
# photo of a S" with shape, colour and pattern right; editability: the edits of `evaluate_concept`,
# asked change AND concept intact; 16 samples per condition and run). NeTI's words were judged again
# at 400 steps with their hidden vector cut to 4 ... 64 of its 128 dimensions. s/step comes from
# `results/14_step_time.csv` (the methods' steps interleaved, one thread), so the seconds to 80% are
# steps x s/step, not the grid's own clock, which ran beside other jobs.
#
# One learning rate for all, and it was chosen for one method: 0.05 is lesson 09's rate for a
# one-vector word on the toy, one of the three lesson 10 compared for that word. Nobody tuned it for
# P+ or NeTI. A P+ word is seven vectors, each trained only through its own layer; a NeTI word is the
# weights of a small network, and AdamW moves every parameter by about lr per step (lesson 09), a
# large step for a network's weights: NeTI's public code trains with AdamW at a base lr of 0.001,
# scaled by its batch 2 x 4 accumulation steps to 0.008 on one GPU (`input_configs/train.yaml`,
# scaled in `training/coach.py`). So the grid compares the methods at one-vector TI's setting; a lr
# tuned for each could move P+ and NeTI either way.

# %%
GRID, STEP_TIMES = RESULTS / "14_spacetime.csv", RESULTS / "14_step_time.csv"
text, grid, reach = summarise(GRID, step_times=STEP_TIMES)
print(text)
with open(GRID) as f:
    ROWS = list(csv.DictReader(f))
METHODS = list(dict.fromkeys(r["method"] for r in ROWS))
SHORT = {"TI 1 vector": "TI 1", "TI 2 vectors": "TI 2", "multires T=10": "multires", "P+": "P+", "NeTI": "NeTI",
         "NeTI no bypass": "no bypass"}


def runs(method, step, column, rows=None):
    """{(concept, seed): the run's share} for one method at one step."""
    return {(r["concept"], r["seed"]): float(r[column]) for r in rows or ROWS
            if r["method"] == method and int(r["step"]) == step}


def sign_test(ahead, behind):
    """Lesson 08's sign test: the two-sided chance of a split at least this uneven if each run that
    differs were a fair coin's toss."""
    n = ahead + behind
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(ahead, behind) + 1)) / 2 ** n) if n else 1.0


def paired(a, b, step, column="reconstruction", rows=None):
    """Run by run: (runs where a is ahead, behind, level; the sign test's p; the verdict: the method
    ahead where p < 0.05, else None: the data cannot decide)."""
    x, y = runs(a, step, column, rows), runs(b, step, column, rows)
    assert x.keys() == y.keys() and x, (a, b, step)
    ahead, behind = sum(x[k] > y[k] for k in x), sum(x[k] < y[k] for k in x)
    p = sign_test(ahead, behind)
    return ahead, behind, len(x) - ahead - behind, p, (a if ahead > behind else b) if p < 0.05 else None


def pv(a, b, step, column="reconstruction", rows=None):
    """paired() without p: (ahead, behind, level, verdict)."""
    ahead, behind, level, _, who = paired(a, b, step, column, rows)
    return ahead, behind, level, who


BOTH = ("reconstruction", "editability")

# %% [markdown]
# ### Two methods, compared run by run
#
# The means above pool 10 runs (5 concepts x 2 seeds), 160 samples per cell, but those are not 160
# independent draws: a run's 16 samples share one learned word, and every method is judged on the
# same prompts from the same noise. So compare two methods *within* each run and count the runs where
# A is ahead, behind or level. If A were no better than B, each run that differs would be a fair
# coin's toss: lesson 08's sign test gives the chance of a split at least this uneven, and below 5%
# the data decide; otherwise they cannot. With 10 runs that all differ, 9 to 1 decides and 8 to 2
# does not. Below: each cell is "ahead-behind" for the row's method against the column's, `*` where the
# data decide.

# %%
def matrix(step, column):
    print(f"{column} at {step} steps, run by run (row ahead-behind column; * = the data decide)")
    print(" " * 11 + "".join(f"{SHORT[m]:>10s}" for m in METHODS))
    for a in METHODS:
        cells = [paired(a, b, step, column) if a != b else None for b in METHODS]
        print(f"{SHORT[a]:>11s}" + "".join(f"{'.':>10s}" if c is None else
                                            f"{c[0]}-{c[1]}{'*' if c[-1] else ' '}".rjust(10) for c in cells))


for column in ("reconstruction", "editability"):
    matrix(400, column)
print("P+ at 25 steps, reconstruction, run by run:")
for m in METHODS:
    if m != "P+":
        ahead, behind, level, p, who = paired("P+", m, 25)
        print(f"  against {m:15s} {ahead:2d}-{behind} ({level} level), sign test p = {p:.2g}: "
              f"{'P+ ahead' if who == 'P+' else 'the data cannot decide' if who is None else m + ' ahead'}")
asked = paired("P+", "TI 1 vector", 400, "asked_change")
print(f"asked change at 400 steps, P+ against one-vector TI: {asked[0]}-{asked[1]} ({asked[2]} level)")

# %% [markdown]
# What the committed grid says (`results/14_spacetime.png` draws it; the check at the end holds the
# text to the CSVs):
#
# - **At 400 steps the words fall into two groups.** Two-vector TI and NeTI (reconstruction /
#   editability 98 / 92% and 97 / 95%) are each ahead of P+ (78 / 66%), multires (69 / 71%) and
#   one-vector TI (60 / 56%), run by run, in both measures. Inside each group the data mostly
#   cannot decide: NeTI against two-vector TI is 2-4 in reconstruction (4 runs level) and 5-2 in
#   editability; P+ against one-vector TI 6-3 and 6-4. The one exception: multires edits better than
#   one-vector TI (9-1), with its reconstruction undecided (7-2). NeTI without the bypass (94 / 92%)
#   against NeTI: 1-2, 7 runs level.
# - **What the one-vector words miss is the pattern** (stripes or outline): right in 63% of one-vector
#   TI's samples, 71% of multires', 81% of P+'s, 98% of NeTI's and two-vector TI's (means over the 10
#   runs); the shape is right in 100% of every method's samples and the colour in 96-100%.
# - **P+ makes the asked change less often**: in 90% of its edit samples against 100% for one-vector
#   TI, fewer in 9 of the 10 runs (one level). A vector per layer may fit the training images at every
#   resolution, including the background that an edit asks to change.
# - **"Converges faster"**: at 25 steps P+ has the highest mean (32%; two-vector TI 28%), but run by
#   run it is ahead only of one-vector TI (8-1) and multires (10-0); against two-vector TI, NeTI and
#   NeTI without bypass the data cannot decide (7-3, 7-3, 6-2). At 400 steps P+ against one-vector TI
#   is 6-3: P+'s "converges faster" holds here at the start, against one vector, and the data cannot
#   say that P+ ends better.
# - **Time to 80% reconstruction** (median over the runs that get there, at the interleaved s/step):
#   two-vector TI in 10 of 10 runs, 100 steps; NeTI 10 of 10, 200 steps at 2.1x the step cost, so
#   about 4x the seconds; P+ 6 of 10 at 400; multires 4 and one-vector TI 3 of 10. P+ and NeTI pay for
#   their per-layer contexts: 7 text-encoder rows per prompt here, 16 in SD 1.x.
#
# Against the papers: NeTI's claim to beat TI and XTI with one token holds here against one-vector TI
# and P+, and the data cannot separate it from two-vector TI; P+'s "more expressive and precise" than
# TI is undecided at 400 steps; the bypass's gain is undecided. All at lr 0.05, chosen for one-vector TI, on a 32-pixel toy with 7
# layers, where the space-time words have little room to show more.

# %% [markdown]
# ### NeTI's nested dropout: does a cut word edit more?
#
# NeTI's ordering promises a control: cut the hidden vector shorter at sampling time and the word
# should follow the rest of the prompt more and the training images less. Editability here is the
# asked change AND the concept intact, so a vague word cannot gain it: the paper's trade-off would
# show in the asked change alone, a column the grid kept for whole words only.
# `lessons/experiments/14_truncation_edits.py` learned NeTI again with the grid's settings (seed 0;
# four of the five concepts: the outlined pink heart's run was stopped unfinished, for time) and
# judged each cut with the asked change and the concept intact too. These are new words, learned by
# today's minti: the grid's own words were not saved, and a rerun's numbers differ from the grid's
# row for the same run, so the table below gives the grid's 10 runs first and the rerun's beside.

# %%
with open(truncation_csv(str(GRID))) as f:  # the grid's cuts: reconstruction and editability, 10 runs
    grid_cut_rows = [dict(r, method=f"NeTI {r['truncation']}") for r in csv.DictReader(f) if r["method"] == "NeTI"]
with open(RESULTS / "14_truncation_edits.csv") as f:  # the rerun's: the edit split in two
    cut_rows = [dict(r, method=f"NeTI {r['truncation']}") for r in csv.DictReader(f)]
LEVELS = sorted({int(r["truncation"]) for r in cut_rows})
FULL, CUT_RUNS = f"NeTI {max(LEVELS)}", sorted({(r["concept"], r["seed"]) for r in cut_rows})


def cut_mean(k, column, rows):
    return round(100 * np.mean(list(runs(f"NeTI {k}", 400, column, rows).values())))


print(f"NeTI at 400 steps, its hidden vector cut to k of {max(LEVELS)} dimensions (%). The grid's 10 runs, and")
print(f"run by run against k = {max(LEVELS)} (* = the data decide); the rerun's {len(CUT_RUNS)} runs, the edit split")
print(f"{'k':>4s} {'rec.':>5s} {'edit.':>5s} {'rec. vs whole':>14s} {'edit. vs whole':>15s}   rerun: {'rec.':>4s} "
      f"{'asked':>5s} {'intact':>6s} {'edit.':>5s}")
for k in LEVELS:
    vs = ["(itself)"] * 2 if k == max(LEVELS) else [
        "{}-{} ({} level){}".format(*pv(f"NeTI {k}", FULL, 400, c, grid_cut_rows)[:3],
                                    "*" if pv(f"NeTI {k}", FULL, 400, c, grid_cut_rows)[-1] else " ") for c in BOTH]
    print(f"{k:4d} {cut_mean(k, 'reconstruction', grid_cut_rows):5d} {cut_mean(k, 'editability', grid_cut_rows):5d} "
          f"{vs[0]:>14s} {vs[1]:>15s}          " + " ".join(f"{cut_mean(k, c, cut_rows):{w}d}" for c, w in (
              ("reconstruction", 4), ("asked_change", 5), ("concept_intact", 6), ("editability", 5))))

# %% [markdown]
# **NeTI's cut: a cost, and nothing to gain here.** In the grid's 10 runs, cutting the hidden vector
# to 4 of 128 dimensions loses reconstruction (59% against 97% whole, behind in 9 runs of 10) and
# editability (56% against 95%, behind in all 10); cut to 8, editability still falls (66%, behind in
# all 10); from 16 up the data cannot tell a cut word from the whole one. The rerun splits the edit
# in two: in its 4 runs the whole word makes the asked change in 100% of the edit samples (as in
# every one of the grid's 10 runs), and the cut words in 96-100%; in no run and at no cut is it
# higher than the whole word's (at k = 4: lower in one run, level in three). So on this toy the
# control NeTI's paper describes has nothing to buy: the whole word already makes every asked change,
# and a cut loses the concept. (4 runs alone are too few for the sign test to decide anything: 4 to
# 0 gives 0.125.)

# %%
at400 = {m: tuple(round(100 * x) for x in grid[m, 400][:2]) for m in METHODS}


def mean(method, column, step=400):
    return round(100 * np.mean(list(runs(method, step, column).values())))


CLAIMS = {
    "at 400: TI 2 98/92, NeTI 97/95, no bypass 94/92, P+ 78/66, multires 69/71, TI 1 60/56": at400 == {
        "TI 2 vectors": (98, 92), "NeTI": (97, 95), "NeTI no bypass": (94, 92), "P+": (78, 66),
        "multires T=10": (69, 71), "TI 1 vector": (60, 56)},
    "two groups: TI 2 and NeTI each ahead of P+, multires and TI 1, in both measures": all(
        pv(a, b, 400, c)[-1] == a for a in ("TI 2 vectors", "NeTI")
        for b in ("P+", "multires T=10", "TI 1 vector") for c in BOTH),
    "NeTI vs TI 2: 2-4 (4 level) and 5-2, undecided": [pv("NeTI", "TI 2 vectors", 400, c) for c in BOTH] == [
        (2, 4, 4, None), (5, 2, 3, None)],
    "P+ vs TI 1: 6-3 and 6-4, undecided": [pv("P+", "TI 1 vector", 400, c) for c in BOTH] == [
        (6, 3, 1, None), (6, 4, 0, None)],
    "multires vs TI 1: reconstruction 7-2 undecided, editability 9-1 decided": [
        pv("multires T=10", "TI 1 vector", 400, c) for c in BOTH] == [(7, 2, 1, None), (9, 1, 0, "multires T=10")],
    "NeTI no bypass vs NeTI: 1-2, 7 level, undecided": pv("NeTI no bypass", "NeTI", 400) == (1, 2, 7, None),
    "pattern at 400: TI 1 63, multires 71, P+ 81, NeTI 98, TI 2 98": [mean(m, "pattern") for m in (
        "TI 1 vector", "multires T=10", "P+", "NeTI", "TI 2 vectors")] == [63, 71, 81, 98, 98],
    "shape 100 for all, colour 96-100": all(mean(m, "shape") == 100 and 96 <= mean(m, "colour") <= 100
                                            for m in METHODS),
    "asked change: P+ 90, TI 1 100; P+ behind in 9 runs, 1 level, decided": (
        mean("P+", "asked_change"), mean("TI 1 vector", "asked_change")) == (90, 100)
    and pv("P+", "TI 1 vector", 400, "asked_change") == (0, 9, 1, "TI 1 vector"),
}

# %%
CLAIMS.update({
    "25 steps: P+ highest, 32; TI 2 28": max(METHODS, key=lambda m: grid[m, 25][0]) == "P+"
    and (round(100 * grid["P+", 25][0]), round(100 * grid["TI 2 vectors", 25][0])) == (32, 28),
    "25 steps: P+ ahead of TI 1 (8-1), multires (10-0); undecided against TI 2 (7-3), NeTI (7-3), "
    "no bypass (6-2)": {m: pv("P+", m, 25) for m in METHODS if m != "P+"} == {
        "TI 1 vector": (8, 1, 1, "P+"), "multires T=10": (10, 0, 0, "P+"), "TI 2 vectors": (7, 3, 0, None),
        "NeTI": (7, 3, 0, None), "NeTI no bypass": (6, 2, 2, None)},
    "9 to 1 decides, 8 to 2 does not": sign_test(9, 1) < 0.05 < sign_test(8, 2),
    "80%: TI 2 10/10 at 100, NeTI 10/10 at 200, P+ 6/10 at 400, multires 4, TI 1 3": [
        reach[m][:3] for m in ("TI 2 vectors", "NeTI", "P+")] == [(10, 10, 100), (10, 10, 200), (6, 10, 400)]
    and (reach["multires T=10"][0], reach["TI 1 vector"][0]) == (4, 3),
    "NeTI's step 2.1x TI's": round(reach["NeTI"][3] / reach["TI 1 vector"][3], 1) == 2.1,
    "NeTI's seconds to 80% about 4x TI 2's": round(
        reach["NeTI"][2] * reach["NeTI"][3] / (reach["TI 2 vectors"][2] * reach["TI 2 vectors"][3])) == 4,
})

# %%
CLAIMS.update({
    "grid, cut to 4: 59/56 against 97/95 whole; behind in 9 of 10 (rec.) and 10 of 10 (edit.), decided": [
        cut_mean(k, c, grid_cut_rows) for k in (4, max(LEVELS)) for c in BOTH] == [59, 56, 97, 95]
    and [pv("NeTI 4", FULL, 400, c, grid_cut_rows) for c in BOTH] == [(1, 9, 0, FULL), (0, 10, 0, FULL)],
    "grid, cut to 8: editability 66, behind in all 10, decided": cut_mean(8, "editability", grid_cut_rows) == 66
    and pv("NeTI 8", FULL, 400, "editability", grid_cut_rows) == (0, 10, 0, FULL),
    "grid, cut to 16 and more: undecided": all(pv(f"NeTI {k}", FULL, 400, c, grid_cut_rows)[-1] is None
                                              for k in LEVELS if 16 <= k < max(LEVELS) for c in BOTH),
    "the whole NeTI word makes the asked change in every edit sample of all 10 grid runs": set(
        runs("NeTI", 400, "asked_change").values()) == {1.0},
    "the rerun: 4 runs; asked change 100 whole, 96-100 cut, never above the whole word's": len(CUT_RUNS) == 4
    and cut_mean(max(LEVELS), "asked_change", cut_rows) == 100
    and all(96 <= cut_mean(k, "asked_change", cut_rows) <= 100 for k in LEVELS)
    and all(pv(f"NeTI {k}", FULL, 400, "asked_change", cut_rows)[0] == 0 for k in LEVELS)
    and pv("NeTI 4", FULL, 400, "asked_change", cut_rows) == (0, 1, 3, None),
    "4 to 0 gives 0.125": sign_test(4, 0) == 0.125,
})
star_mix, square_mix = mix[f"coarse {A} + fine {B}"], mix[f"coarse {B} + fine {A}"]


def pct(share):
    return (round(100 * share.value), *(round(100 * x) for x in share.interval))


CLAIMS.update({
    "mixing: shape and colour from the coarse word (>= 94%), never from the fine word": all(
        round(100 * s[f"{a} from the coarse word"].value) >= 94 and s[f"{a} from the fine word"].hits == 0
        for s in mix.values() for a in ("shape", "colour")),
    "mixing: coarse star 100 [94, 100] / orange 94 [85, 98], coarse square 100 / 100": [
        pct(star_mix[f"{a} from the coarse word"]) for a in ("shape", "colour")] == [(100, 94, 100), (94, 85, 98)]
    and [round(100 * square_mix[f"{a} from the coarse word"].value) for a in ("shape", "colour")] == [100, 100],
    "the star's own orange 84 [74, 91]; its interval overlaps the mix's 94": pct(own_orange) == (84, 74, 91)
    and own_orange.interval[1] > star_mix["colour from the coarse word"].interval[0],
})

# %%
assert err_context < 1e-5 and err_spy < 1e-5, (err_context, err_spy)
assert err_neti < 1e-4, err_neti
assert len(names) == len(COARSE) and 0 < sum(COARSE) < len(COARSE)
assert torch.cosine_similarity(v_full, v_cut, 0) < 0.999, "truncation changes the vector"
for label, s in shape_follows_coarse.items():  # this run's own samples: the shape follows the coarse word
    assert s.interval[0] > 0.5, f"{label}: the coarse word's shape in only {s}"
assert same_as_committed or FAST, f"64 samples of the committed words, seed 0, moved {moved:.3f} from the CSV"
for key, value in CLAIMS.items():
    assert value, f"the committed results no longer say what the text says: {key}"
print(f"check passed: per-layer contexts by hand = PerLayerWord.context = what the UNet's {len(names)} layers"
      f"\n  attend to ({max(err_context, err_spy):.1e}); NeTI mapper + bypass by hand = the library at 3"
      f"\n  timesteps x 2 truncations ({err_neti:.1e}); this run's mixing gives the coarse word's shape"
      f"\n  ({', '.join(str(s).strip() for s in shape_follows_coarse.values())}); {len(CLAIMS)} claims about the"
      f"\n  committed CSVs hold ({time.time() - start_time:.0f} s)")

# %% [markdown]
# ## Exercises
#
# 1. Run by run, at 100 steps: is NeTI ahead of P+ in reconstruction? From `results/14_spacetime.csv`
#    count the runs (concept, seed) where NeTI is ahead, behind and level, and decide with the sign
#    test. Check your answer with
#    `python lessons/solutions/14_space_time_words.py --check AHEAD BEHIND LEVEL`.
# 2. Which coarse layers carry the shape? Step 4's coarse layers are the 4x4 ones and the 2x2 mid
#    block. Mix again with the star's word only at the 4x4 layers (the square's everywhere else), then
#    only at the 2x2 layer, 32 samples each from the same noise, and count the star's shape with its
#    Wilson interval; compare the two sample by sample (the same noise) with the sign test.
#    (`mix_layers(base, other, mask)` takes `other`'s context where `mask` is True.)
