"""Generate images from text with Stable Diffusion 1.x or minti's toy model, with learned concepts.

    python sample.py                                        # the toy model, default prompt, samples.png
    python sample.py --model path/to/sd15 --prompt "a photo of a cat" --n 4 --out cats/
    python sample.py --model sd15.safetensors --embeds cat.safetensors --prompt "a <cat> in a bucket"
    python sample.py --embeds runs/concept/concept-multires.safetensors --prompt "a photo of a <concept(0.5)>"
    python sample.py --embeds runs/concept/concept-neti.safetensors --prompt "a <concept:16> on the beach"

The same --seed gives the same picture as diffusers' StableDiffusionPipeline with a DDIMScheduler of
the same configuration (see tests/test_sampling.py). The loop itself lives in minti/sampling.py, the
prompt syntax of learned words in minti/io/prompt_syntax.py; the flags are checked before the model
loads (minti/run/cli.py).
"""
import argparse
import copy
import glob
import os
import re
import sys

import torch
from PIL import Image

import minti
from minti.io.concepts import bare_name
from minti.io.files import atomic_write, image_grid
from minti.io.prompt_syntax import PromptWords
from minti.io.spacetime_files import is_spacetime_file, load_spacetime, make_word
from minti.run import cli
from minti.run.cli import UsageError
from minti.run.devices import PRECISIONS, auto_precision, choose_cuda_backends, pick_device
from minti.sampling import encode_prompts, text_to_image, to_uint8
from minti.textual_inversion import placeholder_tokens, sampling_conditioning
from minti.unet import cross_attention_layers

DEFAULT_PROMPT = "a photo of a red star on a blue background"  # a toy-world caption; fine for SD too


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--model", default="toy",
        help="'toy', a diffusers folder, or one .safetensors/.ckpt file (default: %(default)s)")
    add("--prompt", action="append", default=None,
        help=f"text prompt; repeat the flag for several (default: {DEFAULT_PROMPT!r})")
    add("--negative", default="", help="negative prompt: the 'unconditional' side of guidance (default: '')")
    add("--steps", type=int, default=50, help="sampling steps (default: %(default)s)")
    add("--scheduler", choices=["ddim", "ddpm"], default="ddim",
        help="DDIM or DDPM (ancestral) steps (default: %(default)s)")
    add("--eta", type=float, default=0.0,
        help="DDIM only: 0 deterministic, 1 DDPM-like noise (default: %(default)s)")
    add("--guidance", "--cfg", type=float, default=7.5, dest="guidance",
        help="classifier-free guidance scale (--cfg is another name for it); 1: no guidance "
             "(default: %(default)s)")
    add("--seed", type=int, default=0, help="seed of the initial noise (default: %(default)s)")
    add("--n", type=int, default=1, help="images per prompt (default: %(default)s)")
    add("--width", type=int, default=None,
        help="width in pixels, a multiple of 8 (default: the model's, 512 for SD 1.x)")
    add("--height", type=int, default=None,
        help="height in pixels, a multiple of 8 (default: the model's, 512 for SD 1.x)")
    add("--embeds", nargs="+", default=[], metavar="FILE",
        help="learned concept files (diffusers, A1111, multiresolution, a P+ / NeTI file alone, ...) whose "
             "words the prompts use; with the toy model and no --prompt: the last concept train.py wrote "
             "under runs/ (default: none)")
    add("--truncation", type=int, default=None, metavar="K",
        help="a NeTI word (--embeds of a minti-spacetime file): keep the first K of its mapper's hidden "
             "dimensions (nested dropout: smaller K, more editable; default: all); a prompt may set its own "
             "with <name:K>, e.g. \"a <cat:16> on the beach\"")
    add("--drop", choices=["remove", "zero"], default="remove",
        help="multiresolution <name(t)> below t: 'remove' the word from the prompt, or 'zero' its vectors as "
             "the paper's code does (default: %(default)s)")
    add("--out", default="samples.png",
        help="a .png path (one grid, a row per prompt) or a folder (a PNG per image) (default: %(default)s)")
    add("--device", default="auto",
        help="'cpu', 'cuda', 'cuda:1', 'mps', ... or 'auto': cuda, else mps, else cpu (default: %(default)s)")
    add("--precision", choices=["auto", *PRECISIONS], default="auto",
        help="the weights' precision; 'auto': bf16 on a GPU that has it, else fp16 on a GPU, fp32 on the CPU "
             "(default: %(default)s)")
    add("--no-progress", action="store_true", help="hide the progress bar (default: shown)")
    return p.parse_args(argv)


def last_learned_concept(runs="runs"):
    """The concept file train.py wrote most recently under runs/ (plain or multiresolution), or None."""
    found = glob.glob(os.path.join(runs, "*", "learned_embeds.safetensors"))
    found += glob.glob(os.path.join(runs, "*", "*-multires.safetensors"))
    return max(found, key=os.path.getmtime) if found else None


def main(argv=None):
    args = parse_args(argv)
    cli.check_sample_args(args)  # before anything slow
    embeds = list(args.embeds)
    if not embeds and args.prompt is None and args.model == "toy":  # bare `python sample.py`
        last = last_learned_concept()
        if last is not None:
            embeds = [last]
            print(f"the last learned concept: {last} (pass --embeds to choose another)")
    spacetime = read_spacetime(embeds, args)  # a P+ / NeTI word's file, else None
    concepts = [] if spacetime else cli.read_embeds(embeds)
    token = spacetime.token if spacetime else f"<{concepts[0].token.strip('<>')}>" if concepts else None
    prompts = args.prompt or [f"a photo of a {token}" if token else DEFAULT_PROMPT]
    if not spacetime:
        cli.check_prompts(prompts + [args.negative], concepts)
    cli.check_spacetime_prompts(prompts + [args.negative], spacetime, args.truncation)  # no word silently dropped

    device = pick_device(args.device)
    choose_cuda_backends()  # no TF32: fp32 is fp32 (minti/run/devices.py)
    precision = auto_precision(device) if args.precision == "auto" else args.precision
    sd = minti.load(args.model, device=device, dtype=PRECISIONS[precision])
    print(f"model: {getattr(sd, 'source', args.model)} ({device}, {precision})")
    cli.check_new_words(concepts, sd.tokenizer)  # a word that is already a word of the vocabulary
    words = SpaceTimeWord(sd, embeds[0], args.truncation) if spacetime else load_words(sd, concepts)
    if not spacetime:
        check_lengths(words, prompts + [args.negative], sd.text_encoder.config.max_position_embeddings)
    print("prompts: " + " | ".join(prompts))

    # One conditioning path for every kind of word; the negative prompt may use learned words too
    cond = words.conditioning(prompts, drop=args.drop, n=args.n)
    negatives = [args.negative] * len(prompts)
    uncond = None if args.guidance == 1.0 else words.conditioning(negatives, drop=args.drop, n=args.n)
    images = text_to_image(sd, prompts, num_steps=args.steps, stepper=args.scheduler, eta=args.eta,
                           guidance_scale=args.guidance, seed=args.seed, n=args.n, width=args.width,
                           height=args.height, cond=cond, uncond=uncond, progress=not args.no_progress,
                           output="pt")
    cli.warn_if_not_finite(images, precision, sd, concepts + [spacetime] * bool(spacetime))
    return write_images(args, to_uint8(images), prompts)


def cli_main(argv=None):
    """The command line (minti/run/cli.py): exit codes, "error: ..." without a traceback, SIGTERM as
    Ctrl-C."""
    with cli.Signals():
        return cli.run_main(main, argv)


# ----------------------------------------------------------------------------------------------
# Learned words: their files (read before the model), their prompts, their conditioning

def load_words(sd, concepts):
    """The learned words of the concept files, ready for prompts: io.prompt_syntax.PromptWords, which reads
    a plain word as its token ("a photo of <cat>") and a multiresolution word with the time syntax:
    <cat|0.5|> (fixed), <cat(0.5)> (semi), <cat[0.5]> (fully) or <cat> (the current step's)."""
    if concepts:
        print("concepts: " + ", ".join(
            f"{c.token} ({c.num_vectors} vector(s)" + (f" x {c.num_buckets} resolutions)" if c.is_multires
                                                        else ")") for c in concepts))
    return PromptWords(concepts, sd.tokenizer, sd.text_encoder, sd.scheduler.num_train_timesteps)


def check_lengths(words, prompts, length):
    """SD 1.x reads 77 tokens: a longer prompt is cut (as diffusers does), which is said; a learned word that
    would be cut is an error."""
    for prompt in dict.fromkeys(prompts):
        tokenized, shown = words.tokenize(prompt), f"{prompt[:60]!r}{'...' * (len(prompt) > 60)}"
        size = len(tokenized.text_vectors[0])
        for vectors, text in zip(tokenized.vectors, tokenized.text_vectors[1:]):
            if size + vectors.shape[1] > length - 1:
                raise UsageError(f"The prompt {shown} does not fit its learned words into the {length} "
                                 f"tokens the text encoder reads (with a start and an end token); shorten it, "
                                 f"or put the words earlier.")
            size += vectors.shape[1] + len(text)
        if size > length:
            cli.say(f"note: the prompt {shown} is {size} tokens; the text encoder reads {length}, so its "
                    f"last {size - length} are cut off (as in diffusers).")


def read_spacetime(embeds, args):
    """The space-time word (P+ / NeTI, a minti-spacetime file) of --embeds, read before the model, its
    <name:K> prompts checked; None when the files are ordinary words."""
    if not any(is_spacetime_file(p) for p in embeds):
        return None
    if len(embeds) != 1:
        raise UsageError("a space-time word (P+ / NeTI) samples alone: pass just its file to --embeds.")
    try:
        concept = load_spacetime(embeds[0])
    except ValueError as e:  # a ConceptError: the file cannot be used
        raise UsageError(str(e)) from None
    for prompt in (args.prompt or []) + [args.negative]:
        truncation_in(prompt, concept, args.truncation)
    return concept


def truncation_in(prompt, concept, default):
    """(the prompt with `<name:K>` written as the word's token, K or `default`): a NeTI word's truncation."""
    name, neti = bare_name(concept.token), concept.kind == "neti"
    found = re.findall(rf"<{re.escape(name)}:(\d+)>", prompt)
    if found and not neti:
        raise UsageError(f"{prompt!r}: <{name}:K> sets a NeTI word's truncation, but {concept.token} is a "
                         f"{concept.kind} word.")
    if len(set(found)) > 1:
        raise UsageError(f"{prompt!r} gives the word two truncations ({', '.join(found)}); give one per "
                         f"prompt.")
    k = int(found[0]) if found else default if neti else None  # (--truncation: NeTI only)
    if k is not None and not 1 <= k <= int(concept.meta["hidden"]):
        raise UsageError(f"truncation {k}: a NeTI word keeps 1 to {concept.meta['hidden']} of its mapper's "
                         f"hidden dimensions.")
    return re.sub(rf"<{re.escape(name)}:\d+>", concept.token, prompt), k


class SpaceTimeWord:
    """A P+ or NeTI word (minti/spacetime.py) in prompts, with PromptWords' conditioning(): each UNet layer
    gets its own context (textual_inversion.sampling_conditioning). A NeTI word's truncation is a setting
    of each prompt, <name:K>, else --truncation: each prompt conditions on a copy of the word cut to its
    own."""

    def __init__(self, sd, path, truncation):
        self.sd, self.truncation = sd, truncation
        try:  # read again, now against the model's layers and width
            c = self.concept = load_spacetime(path, cross_attention_layers(sd.unet),
                                              sd.text_encoder.config.hidden_size)
            self.word = make_word(c, sd.tokenizer).to(sd.unet.device)
        except ValueError as e:  # a ConceptError, or a placeholder the tokenizer already has
            raise UsageError(str(e)) from None
        cut = f", truncation {truncation or 'none'} where a prompt has no <name:K>" * (c.kind == "neti")
        print(f"concept: {c.token} ({c.kind}, {len(c.layer_names)} layers{cut})")

    def conditioning(self, prompts, drop=None, n=1):
        """The prompts' per-layer contexts, prompt by prompt (n rows each), or a function of the timestep
        that gives them; prompts without the word (a negative prompt) are plain text, one context
        [P * n, L, D]."""
        sd, c, word = self.sd, self.concept, self.word
        texts, cuts = zip(*(truncation_in(p, c, self.truncation) for p in prompts))
        placeholders = " ".join(placeholder_tokens(c.token, len(word.token_ids)))
        ids = sd.tokenizer([t.replace(c.token, placeholders) for t in texts],
                           length=sd.text_encoder.config.max_position_embeddings).to(sd.unet.device)
        if not torch.isin(ids, word.token_ids).any():
            return encode_prompts(sd.tokenizer, sd.text_encoder, texts).repeat_interleave(n, dim=0)
        conds = [sampling_conditioning(truncated(word, k) if k else word, sd.text_encoder, row[None], n)
                 for row, k in zip(ids, cuts)]

        def stacked(t):  # each prompt's per-layer contexts, joined layer by layer
            parts = [cond(t) if callable(cond) else cond for cond in conds]
            return [torch.cat(layer) for layer in zip(*parts)]
        return stacked if any(callable(cond) for cond in conds) else stacked(None)


def truncated(word, k):
    """A NeTI word that keeps the first k hidden dimensions of its mapper: a copy (the mapper shared), so
    that a prompt's setting is its own and nothing changes under another prompt's conditioning."""
    word = copy.copy(word)
    word.truncation = k
    return word


# ----------------------------------------------------------------------------------------------
# The images

def write_images(args, images, prompts):
    count = f"{len(images)} image{'s' * (len(images) > 1)} ({len(prompts)} prompt(s) x {args.n})"
    size = f"{images.shape[2]}x{images.shape[1]}"
    if args.out.lower().endswith(".png"):
        save_png(image_grid(images, rows=len(prompts)), args.out)
        print(f"wrote {count} of {size} as a {len(prompts)}x{args.n} grid to {args.out}")
    else:
        paths = []
        for i, image in enumerate(images):
            name = f"p{i // args.n:02d}_{i % args.n:02d}_seed{args.seed}.png"  # prompt, image, seed
            paths.append(os.path.join(args.out, name))
            save_png(image, paths[-1])
        print(f"wrote {count} of {size} as PNGs to {args.out}/ ({os.path.basename(paths[0])} ...)")
    return images


def save_png(image, path):
    """Write a uint8 image [H, W, 3] as a PNG, atomically (minti.io.files.atomic_write)."""
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


if __name__ == "__main__":
    sys.exit(cli_main())
