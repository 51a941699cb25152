"""Solutions to lesson 14's exercises (run: python lessons/solutions/14_space_time_words.py).

1. Run by run at 100 steps: NeTI against P+ in reconstruction, counted from results/14_spacetime.csv and
   decided with lesson 08's sign test. `--check AHEAD BEHIND LEVEL` checks your own counts against it.
2. Which coarse layers carry the shape: the star's P+ word at the 4x4 layers only, then at the 2x2 layer
   only (the square's word everywhere else), read by the oracle.
"""
import argparse
import copy
import csv
import math
import os
import sys
from pathlib import Path

parser = argparse.ArgumentParser(description="Lesson 14's exercises, solved (MINTI_FAST=1: 16 samples).")
parser.add_argument("--check", nargs=3, type=int, metavar=("AHEAD", "BEHIND", "LEVEL"),
                    help="exercise 1: your counts of the runs where NeTI is ahead of, behind and level with P+")
args, _ = parser.parse_known_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import minti  # noqa: E402
from minti.io.spacetime_files import load_spacetime, make_word  # noqa: E402
from minti.sampling import text_to_image  # noqa: E402
from minti.spacetime import mix_layers  # noqa: E402
from minti.textual_inversion import sampling_conditioning  # noqa: E402
from minti.toy import world as toyworld  # noqa: E402
from minti.toy.evaluate import Share, read_attributes  # noqa: E402
from minti.toy.oracle import Oracle  # noqa: E402
from minti.toy.spacetime_eval import summarise  # noqa: E402
from minti.unet import cross_attention_layers  # noqa: E402

RESULTS = ROOT / "lessons" / "results"
FAST = os.environ.get("MINTI_FAST") == "1"
torch.set_num_threads(1)


def sign_test(ahead, behind):
    """Two-sided: the chance of a split at least this uneven if each differing pair were a coin's toss."""
    n = ahead + behind
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(ahead, behind) + 1)) / 2 ** n) if n else 1.0


# 1. One row per (method, concept, seed, step); a run is (concept, seed), judged for every method on the
#    same prompts from the same noise, so the comparison is within each run.
with open(RESULTS / "14_spacetime.csv") as f:
    rows = [r for r in csv.DictReader(f) if r["step"] == "100"]
neti, pplus = ({(r["concept"], r["seed"]): float(r["reconstruction"]) for r in rows if r["method"] == m}
               for m in ("NeTI", "P+"))
ahead = sum(neti[k] > pplus[k] for k in neti)
behind = sum(neti[k] < pplus[k] for k in neti)
level = len(neti) - ahead - behind
p = sign_test(ahead, behind)
print(f"1. at 100 steps NeTI against P+: ahead in {ahead} runs, behind in {behind}, level in {level}; sign "
      f"test\n   p = {p:.2g}: {'the data decide' if p < 0.05 else 'the data cannot decide'} "
      f"(means {100 * np.mean(list(neti.values())):.1f}% and {100 * np.mean(list(pplus.values())):.1f}%)")
assert neti.keys() == pplus.keys() and len(neti) == 10, "5 concepts x 2 seeds, both methods"
grid = summarise(RESULTS / "14_spacetime.csv")[1]  # the lesson's table: these runs' means, the same rows
assert abs(np.mean(list(neti.values())) - grid["NeTI", 100][0]) < 1e-9
assert abs(np.mean(list(pplus.values())) - grid["P+", 100][0]) < 1e-9


def check(answer):
    """Exercise 1: your (ahead, behind, level) against the solution's."""
    assert tuple(answer) == (ahead, behind, level), f"{tuple(answer)}: the CSV says {(ahead, behind, level)}"
    print(f"   your counts {tuple(answer)} are right")


if args.check:
    check(args.check)

# 2. The layers and their sides (a spy on each layer's query length, as in the lesson's step 1).
sd, oracle = minti.load("toy"), Oracle.load()
names = cross_attention_layers(sd.unet)
sides, handles = {}, []
for name in names:
    attn2 = sd.unet.get_submodule(name).transformer_blocks[0].attn2
    handles.append(attn2.register_forward_pre_hook(
        (lambda n: lambda m, a: sides.__setitem__(n, int(a[0].shape[1] ** 0.5)))(name)))
with torch.no_grad():
    sd.unet(torch.zeros(1, 4, 8, 8), 500, torch.zeros(1, 77, sd.text_encoder.config.hidden_size))
for h in handles:
    h.remove()
coarse = [sides[n] < max(sides.values()) for n in names]
at_4x4, at_2x2 = [sides[n] == 4 for n in names], [sides[n] == 2 for n in names]
assert [a or b for a, b in zip(at_4x4, at_2x2)] == coarse and not any(a and b for a, b in zip(at_4x4, at_2x2)), \
    "the 4x4 and 2x2 layers split the coarse ones"

# The two committed P+ words, their contexts for "a photo of a S", and the mixes.
A, B, N = "striped_orange_star", "striped_purple_square", 16 if FAST else 32
tok, contexts = copy.deepcopy(sd.tokenizer), {}
for name, token in ((A, "<pa>"), (B, "<pb>")):
    word = make_word(load_spacetime(RESULTS / f"14_pplus_{name}.safetensors", names,
                                    sd.text_encoder.config.hidden_size), tok)
    contexts[name] = sampling_conditioning(word, sd.text_encoder, tok([f"a photo of a {token}"], length=77), n=N)
mixes = {"star at every coarse layer": coarse, "star at the 4x4 layers only": at_4x4,
         "star at the 2x2 layer only": at_2x2}
star_shape = {}
for label, mask in mixes.items():
    cond = mix_layers(contexts[B], contexts[A], mask)
    assert all(torch.equal(c, contexts[A][i] if mask[i] else contexts[B][i]) for i, c in enumerate(cond))
    images = text_to_image(sd, ["mix"], cond=cond, num_steps=25, guidance_scale=4.0, seed=0, n=N)
    star_shape[label] = read_attributes(oracle, images)["shape"] == toyworld.CONCEPTS[A].shape
    print(f"2. {label:28s}: the star's shape in {Share.of(star_shape[label])}")

# The same noise in every condition: compare the two partial mixes sample by sample.
only_4x4 = star_shape["star at the 4x4 layers only"] & ~star_shape["star at the 2x2 layer only"]
only_2x2 = star_shape["star at the 2x2 layer only"] & ~star_shape["star at the 4x4 layers only"]
p = sign_test(int(only_4x4.sum()), int(only_2x2.sum()))
winner = ("the 4x4 layers" if only_4x4.sum() > only_2x2.sum() else "the 2x2 layer") if p < 0.05 else None
print(f"   samples with the star from the 4x4 layers only: {int(only_4x4.sum())}, from the 2x2 only: "
      f"{int(only_2x2.sum())}, sign test p = {p:.2g}:\n   "
      f"{'the shape is carried more by ' + winner if winner else 'the data cannot decide'}")
control = Share.of(star_shape["star at every coarse layer"])
assert control.interval[0] > 0.5, f"the lesson's mix no longer gives the star's shape: {control}"
print("solved")
