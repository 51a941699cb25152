"""Lesson 15's experiment: the map of a word, measured causally with the oracle.

1. Words. Textual inversion (one vector, init = the shape's name, lr 0.05, batch 16, the toy templates,
   400 steps, seed 0) of two concepts whose attributes lesson 13 found decided in different ranges of t:
   striped_orange_star (colour, stripes) and outlined_pink_heart (outline). A NeTI word of the star
   (lesson 14's settings, 200 steps), to draw its vector over (t, layer). Saved as
   lessons/results/15_word_<concept>.safetensors (diffusers' format) and 15_neti_<concept>.safetensors.
2. The knock-out grid (15_knockout.csv): each word sampled with "a photo of a S*" (the four toy
   templates in turn), n samples from one seed, DDIM 25 steps, guidance 4. In one cell, one time range
   x one group of cross-attention layers gets another context instead of the word's prompt:
   - init: the same prompt with the init word ("a photo of a star"): what learning added is gone;
   - silenced: the empty prompt, the context that guidance's unconditional half sees (the toy model
     learned it from its 10% of empty captions): the layer hears no text at all.
   Everything else is the same: the noise, the prompts, every other layer and step. Cells: 4 ranges of
   250 timesteps (and all of time, and "outside R": every step but R's, the word kept in R alone) x the
   fine (8x8) and coarse (4x4, 2x2) layers (and all). One row per cell, with the oracle's verdict per
   sample as a string of 0/1 (paired with the baseline row, "none": the word everywhere).
3. The predicted clean image per step (15_x0.csv): the same n samples with the word and with the init
   word, x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) decoded at every DDIM step and read by
   the oracle: when does each attribute appear, and when does it agree with the final image?
4. The figure, 15_map.png, from the CSVs and the NeTI word.

Resumable: each file is rewritten (atomically) after every cell, and cells already there are skipped.
Run from the repository root: nice python lessons/experiments/15_map.py (one CPU thread).
"""
import argparse
import copy
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import minti  # noqa: E402
from minti import learn  # noqa: E402
from minti.io.concepts import Concept, load_concepts, save_diffusers  # noqa: E402
from minti.io.files import write_csv  # noqa: E402
from minti.io.spacetime_files import from_word, save_spacetime  # noqa: E402
from minti.sampling import decode, encode_prompts, initial_latents, make_scheduler, to_uint8  # noqa: E402
from minti.textual_inversion import new_word  # noqa: E402
from minti.toy import TEMPLATES, world as toyworld  # noqa: E402
from minti.toy.evaluate import (CONCEPTS_FOLDER, PREFIXES, ImageSampler, cycle, prompt, read_attributes,  # noqa: E402
                                wilson_interval)
from minti.toy.oracle import Oracle  # noqa: E402
from minti.unet import cross_attention_layers  # noqa: E402

RESULTS = ROOT / "lessons" / "results"
CONCEPTS = STAR_, HEART_ = ("striped_orange_star", "outlined_pink_heart")
NETI_CONCEPT = "striped_orange_star"
STEPS, LR, BATCH, SEED = 400, 5e-2, 16, 0  # lesson 13's uniform runs (its word reached ~80% on the star)
NETI_STEPS = 200  # only drawn, not knocked out: half the steps (a NeTI step costs ~2x a TI step)
N, DDIM_STEPS, CFG, SAMPLE_SEED = 64, 25, 4.0, 0  # 64: a cell costs ~12 s of CPU
TOKEN = "<c>"
RANGES = {"750-999": (750, 1000), "500-749": (500, 750), "250-499": (250, 500), "0-249": (0, 250)}
# DDIM 25 steps: t = 961, 921, ..., 1: 6, 6, 6 and 7 steps per range. "outside R": every step but R's.
TIMES = {**RANGES, "all": (0, 1000), **{f"outside {r}": span for r, span in RANGES.items()}}
REPLACEMENTS = ("init", "silenced")
ATTRIBUTES = ("shape", "colour", "pattern")
KNOCKOUT_CSV, X0_CSV = RESULTS / "15_knockout.csv", RESULTS / "15_x0.csv"
KNOCKOUT_COLUMNS = ["concept", "replace", "times", "layers", "n", "intact", *ATTRIBUTES,
                    *(f"{a}_bits" for a in ("intact", *ATTRIBUTES)), "seconds"]
X0_COLUMNS = ["concept", "word", "step", "t", "n", *ATTRIBUTES, *(f"{a}_final" for a in ATTRIBUTES)]


def word_path(concept):
    return RESULTS / f"15_word_{concept}.safetensors"


def neti_path(concept):
    return RESULTS / f"15_neti_{concept}.safetensors"


def layer_groups(unet):
    """{"fine": [layer indices at the latent's own resolution (8x8)], "coarse": [4x4 and 2x2], "all"}."""
    names, sides, handles = cross_attention_layers(unet), {}, []
    for i, name in enumerate(names):
        attn2 = unet.get_submodule(name).transformer_blocks[0].attn2
        handles.append(attn2.register_forward_pre_hook(
            (lambda i: lambda m, a: sides.__setitem__(i, int(a[0].shape[1] ** 0.5)))(i)))
    with torch.no_grad():
        unet(torch.zeros(1, 4, 8, 8), 500, torch.zeros(1, 77, unet.config.cross_attention_dim))
    for h in handles:
        h.remove()
    top = max(sides.values())
    return {"fine": [i for i in sides if sides[i] == top], "coarse": [i for i in sides if sides[i] < top],
            "all": list(range(len(names)))}


class KnockOut(ImageSampler):
    """An ImageSampler of a learned word whose context is replaced in one time range x layer group."""

    def __init__(self, sd, word, token, tokenizer, replace, times, layers, init_word, **settings):
        super().__init__(sd, word, token, tokenizer, **settings)
        self.replace, self.times, self.layers, self.init_word = replace, TIMES[times], set(layers), init_word
        self.outside = times.startswith("outside")  # knocked out everywhere but the range

    def conditioning(self, prompts):
        learned = super().conditioning(prompts)  # the word's context [B, 77, 64]
        te, count = self.sd.text_encoder, len(cross_attention_layers(self.sd.unet))
        if self.replace == "init":
            other = encode_prompts(self.tokenizer, te, [p.replace(self.token, self.init_word) for p in prompts])
        else:  # silenced: the unconditional context, as guidance's other half
            other = encode_prompts(self.tokenizer, te, [""]).expand(len(prompts), -1, -1)
        (low, high), outside = self.times, self.outside

        def at(t):
            inside = (low <= int(t) < high) != outside
            return [other if inside and layer in self.layers else learned for layer in range(count)]
        return at


def learn_words(sd, log):
    for concept in CONCEPTS:
        if not word_path(concept).exists():
            t0 = time.time()
            word, _ = learn(sd, os.path.join(CONCEPTS_FOLDER, concept), TOKEN, toyworld.CONCEPTS[concept].init_word,
                            steps=STEPS, batch=BATCH, lr=LR, seed=SEED, templates=TEMPLATES)
            save_diffusers(word_path(concept), Concept(TOKEN, word.vectors.detach()[0]))
            log(f"learned {concept} in {time.time() - t0:.0f} s")


def learn_neti(sd, log):
    if not neti_path(NETI_CONCEPT).exists():
        t0 = time.time()
        word, _ = learn(sd, os.path.join(CONCEPTS_FOLDER, NETI_CONCEPT), TOKEN,
                        toyworld.CONCEPTS[NETI_CONCEPT].init_word, steps=NETI_STEPS, batch=BATCH, lr=LR,
                        seed=SEED, templates=TEMPLATES, kind="neti", bypass=True)
        save_spacetime(neti_path(NETI_CONCEPT), from_word(word.eval(), TOKEN, step=NETI_STEPS))
        log(f"learned NeTI {NETI_CONCEPT} in {time.time() - t0:.0f} s")


def read_rows(path):
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def bits(mask):
    return "".join("1" if m else "0" for m in mask)


def judged(oracle, images, truth):
    read = read_attributes(oracle, images)
    masks = {a: read[a] == getattr(truth, a) for a in ATTRIBUTES}
    masks["intact"] = np.logical_and.reduce([masks[a] for a in ATTRIBUTES])
    return masks


def cells(groups, concepts, replace, part="main"):
    """The grid's cells for `replace`: "main", the word out everywhere, in one time range at every
    layer, in one layer group at every time; "outside", everywhere but one time range (the word kept
    there alone); "split", one range x one group."""
    ranges, parts = list(RANGES), [g for g in groups if g != "all"]
    order = {"main": [("all", "all")] + [(t, "all") for t in ranges] + [("all", g) for g in parts],
             "outside": [(f"outside {t}", "all") for t in ranges],
             "split": [(t, g) for t in ranges for g in parts]}[part]
    return [(c, replace, t, g) for t, g in order for c in concepts]


def knockout_grid(sd, oracle, groups, todo, log):
    """The cells `todo` [(concept, replace, times, layers)], each one row of 15_knockout.csv (skipped if
    already there); replace "none" is the word everywhere, the baseline each cell is paired with."""
    rows = read_rows(KNOCKOUT_CSV)
    done = {(r["concept"], r["replace"], r["times"], r["layers"]) for r in rows}
    for concept, replace, times, layers in todo:
        if (concept, replace, times, layers) in done:
            continue
        truth, t0 = toyworld.CONCEPTS[concept], time.time()
        tokenizer = copy.deepcopy(sd.tokenizer)
        word = new_word(tokenizer, TOKEN, load_concepts(word_path(concept))[0].vectors)
        settings = dict(steps=DDIM_STEPS, cfg=CFG)
        if replace == "none":
            sampler = ImageSampler(sd, word, TOKEN, tokenizer, **settings)
        else:
            sampler = KnockOut(sd, word, TOKEN, tokenizer, replace, times, groups[layers], truth.init_word,
                               **settings)
        prompts = cycle([prompt(p, TOKEN) for p in PREFIXES], N)
        masks = judged(oracle, sampler(prompts, SAMPLE_SEED), truth)
        rows.append({"concept": concept, "replace": replace, "times": times, "layers": layers, "n": N,
                     **{a: int(masks[a].sum()) for a in ("intact", *ATTRIBUTES)},
                     **{f"{a}_bits": bits(masks[a]) for a in ("intact", *ATTRIBUTES)},
                     "seconds": round(time.time() - t0, 1)})
        write_csv(KNOCKOUT_CSV, KNOCKOUT_COLUMNS, [[r[c] for c in KNOCKOUT_COLUMNS] for r in rows])
        log(f"{concept} {replace} t {times} layers {layers}: intact {masks['intact'].sum()}/{N}, "
            + ", ".join(f"{a} {masks[a].sum()}" for a in ATTRIBUTES) + f" ({rows[-1]['seconds']} s)")


@torch.no_grad()
def predicted_images(sd, word, tokenizer, prompts, replace_with=None, seed=SAMPLE_SEED):
    """The sampling loop of ImageSampler written out (same noise, one batched guided call per step),
    keeping the predicted clean image x0_hat at every step. With replace_with, the prompts say that
    word instead of TOKEN. Returns (timesteps, uint8 [steps, B, H, W, 3] of x0_hat, uint8 final images)."""
    te, ddim = sd.text_encoder, make_scheduler(sd.scheduler, "ddim", DDIM_STEPS)
    if replace_with is None:
        cond = ImageSampler(sd, word, TOKEN, tokenizer).conditioning(prompts)
    else:
        cond = encode_prompts(tokenizer, te, [p.replace(TOKEN, replace_with) for p in prompts])
    context = torch.cat([encode_prompts(tokenizer, te, [""]).expand(len(prompts), -1, -1), cond])
    x, _ = initial_latents(len(prompts), 4, 8, 8, seed)
    shown = []
    for t in ddim.timesteps:
        eps_uncond, eps_cond = sd.unet(torch.cat([x, x]), t, context).chunk(2)
        eps = eps_uncond + CFG * (eps_cond - eps_uncond)
        abar = ddim.alphas_cumprod[int(t)]
        x0_hat = (x - (1 - abar) ** 0.5 * eps) / abar ** 0.5  # DDIM eq. 12's "predicted x0"
        shown.append(to_uint8(decode(sd.vae, x0_hat, sd.latent_scale)))
        x = ddim.step(eps, t, x)
    return [int(t) for t in ddim.timesteps], np.stack(shown), to_uint8(decode(sd.vae, x, sd.latent_scale))


def x0_table(sd, oracle, log):
    rows = read_rows(X0_CSV)
    done = {(r["concept"], r["word"]) for r in rows}
    for concept in CONCEPTS:
        truth = toyworld.CONCEPTS[concept]
        for which in ("learned", "init"):
            if (concept, which) in done:
                continue
            t0, tokenizer = time.time(), copy.deepcopy(sd.tokenizer)
            word = new_word(tokenizer, TOKEN, load_concepts(word_path(concept))[0].vectors)
            prompts = cycle([prompt(p, TOKEN) for p in PREFIXES], N)
            ts, shown, final = predicted_images(sd, word, tokenizer, prompts,
                                                None if which == "learned" else truth.init_word)
            last = read_attributes(oracle, final)
            for step, (t, images) in enumerate(zip(ts, shown)):
                read = read_attributes(oracle, images)
                rows.append({"concept": concept, "word": which, "step": step, "t": t, "n": N,
                             **{a: int((read[a] == getattr(truth, a)).sum()) for a in ATTRIBUTES},
                             **{f"{a}_final": int((read[a] == last[a]).sum()) for a in ATTRIBUTES}})
            write_csv(X0_CSV, X0_COLUMNS, [[r[c] for c in X0_COLUMNS] for r in rows])
            log(f"x0_hat {concept} {which}: {time.time() - t0:.0f} s")


def paired_loss(base, cell):
    """share(base) - share(cell) of paired samples (bool arrays), Newcombe's (1998) method 10 interval."""
    n = len(base)
    a, b, c = int((base & cell).sum()), int((base & ~cell).sum()), int((~base & cell).sum())
    d = n - a - b - c
    p1, p2 = (a + b) / n, (a + c) / n
    (l1, _), (_, u2) = wilson_interval(a + b, n), wilson_interval(a + c, n)
    den = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / den ** 0.5 if den else 0.0
    low = p1 - p2 - max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2) ** 0.5
    return p1 - p2, low


def draw(sd):
    """15_map.png: the knock-out grid (init), the predicted clean image per step, NeTI's cosine map."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F
    from minti.io.spacetime_files import load_spacetime, neti_mapper

    grid = {(r["concept"], r["replace"], r["times"], r["layers"]): r for r in read_rows(KNOCKOUT_CSV)}
    unpack = lambda row, a: np.array([ch == "1" for ch in row[f"{a}_bits"]])  # noqa: E731
    groups = ("fine", "coarse", "all")
    panels = [(STAR_, "colour"), (STAR_, "pattern"), (HEART_, "pattern")]
    fig = plt.figure(figsize=(12, 8.5))
    for k, (concept, a) in enumerate(panels):
        ax, values = fig.add_subplot(3, 3, k + 1), np.full((len(TIMES), 3), np.nan)
        for i, times in enumerate(TIMES):
            for j, g in enumerate(groups):
                if (concept, "init", times, g) in grid:
                    base = unpack(grid[concept, "none", "all", "all"], a)
                    d, low = paired_loss(base, unpack(grid[concept, "init", times, g], a))
                    values[i, j] = 100 * d
                    ax.text(j, i, f"{100 * d:.0f}{'*' if low > 0 else ''}", ha="center", va="center", fontsize=8)
        ax.imshow(values, cmap="Reds", vmin=-20, vmax=100, aspect="auto")
        ax.set_xticks(range(3), groups, fontsize=8)
        ax.set_yticks(range(len(TIMES)), [f"t {t}" for t in TIMES], fontsize=8)
        ax.set_title(f"{concept.split('_')[2]}: {a} lost (points) when S* -> init word", fontsize=8)
    x0 = read_rows(X0_CSV)
    for k, (concept, a) in enumerate([(STAR_, "colour"), (HEART_, "pattern")]):
        ax = fig.add_subplot(3, 3, 4 + k)
        for which, style in (("learned", "o-"), ("init", "s--")):
            rows = [r for r in x0 if r["concept"] == concept and r["word"] == which]
            ax.plot([int(r["t"]) for r in rows], [100 * int(r[a]) / int(r["n"]) for r in rows], style, ms=3,
                    label="S*" if which == "learned" else toyworld.CONCEPTS[concept].init_word)
        ax.invert_xaxis()
        ax.set_xlabel("t (sampling runs right)", fontsize=8)
        ax.set_title(f"{concept.split('_')[2]}: x0_hat with the right {a} (%)", fontsize=8)
        ax.legend(fontsize=7)
    if neti_path(STAR_).exists():
        mapper = neti_mapper(load_spacetime(neti_path(STAR_))).eval()
        layers = len(cross_attention_layers(sd.unet))
        ts = torch.arange(0, 1000, 25)
        with torch.no_grad():
            v, _ = mapper(ts.repeat(layers), torch.arange(layers).repeat_interleave(len(ts)))
        star = sd.text_encoder.text_model.embeddings.token_embedding.weight[sd.tokenizer.encode("star")[1]]
        cos = F.cosine_similarity(v, star[None], dim=-1).reshape(layers, len(ts)).detach().numpy()
        ax = fig.add_subplot(3, 3, 6)
        image = ax.imshow(cos, aspect="auto", extent=(0, 1000, layers - 0.5, -0.5))
        fig.colorbar(image, ax=ax)
        ax.set_xlabel("t", fontsize=8)
        ax.set_ylabel("layer (forward order)", fontsize=8)
        ax.set_title("NeTI word of the star: cosine to 'star'", fontsize=8)
    tokenizer = copy.deepcopy(sd.tokenizer)
    word = new_word(tokenizer, TOKEN, load_concepts(word_path(STAR_))[0].vectors)
    strip = []
    for say in (None, "star"):
        ts, shown, _ = predicted_images(sd, word, tokenizer, [prompt(PREFIXES[0], TOKEN)], say)
        strip.append(np.concatenate([shown[s, 0] for s in range(0, DDIM_STEPS, 3)], axis=1))
    ax = fig.add_subplot(3, 1, 3)
    ax.imshow(np.concatenate(strip, axis=0))
    ax.set_xticks([16 + 32 * i for i in range(len(strip[0][0]) // 32)],
                  [f"t={ts[s]}" for s in range(0, DDIM_STEPS, 3)], fontsize=8)
    ax.set_yticks([16, 48], ["S*", "'star'"], fontsize=8)
    ax.set_title("the predicted clean image x0_hat every third step, same noise", fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "15_map.png", dpi=100)
    print(f"wrote {RESULTS / '15_map.png'}")


def main():
    global RESULTS, KNOCKOUT_CSV, X0_CSV, N, STEPS, NETI_STEPS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figure", action="store_true", help="only redraw results/15_map.png from the files")
    parser.add_argument("--out", default=str(RESULTS), help="folder of the results (default: %(default)s)")
    parser.add_argument("--n", type=int, default=N, help="samples per cell (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps per word (default: %(default)s)")
    args = parser.parse_args()
    RESULTS, N, STEPS = Path(args.out), args.n, args.steps
    NETI_STEPS = min(NETI_STEPS, STEPS)
    KNOCKOUT_CSV, X0_CSV = RESULTS / "15_knockout.csv", RESULTS / "15_x0.csv"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    sd, oracle = minti.load("toy"), Oracle.load()
    if not args.figure:
        start = time.time()

        def log(line):
            print(f"[{time.time() - start:6.0f} s] {line}", flush=True)
        learn_words(sd, log)
        groups = layer_groups(sd.unet)
        log(f"layer groups: {groups}")
        # Most telling first (a cell costs ~12 s of CPU): what is left out at the end can be run later.
        knockout_grid(sd, oracle, groups, [(c, "none", "all", "all") for c in CONCEPTS]
                      + cells(groups, CONCEPTS, "init"), log)
        knockout_grid(sd, oracle, groups, cells(groups, CONCEPTS, "init", "outside"), log)
        x0_table(sd, oracle, log)
        knockout_grid(sd, oracle, groups, cells(groups, CONCEPTS, "silenced"), log)
        learn_neti(sd, log)
        knockout_grid(sd, oracle, groups, cells(groups, CONCEPTS, "silenced", "outside"), log)
        knockout_grid(sd, oracle, groups, cells(groups, CONCEPTS, "init", "split"), log)
        knockout_grid(sd, oracle, groups, cells(groups, CONCEPTS, "silenced", "split"), log)
        log(f"done; CPU time {time.process_time():.0f} s")
    draw(sd)


if __name__ == "__main__":
    main()
