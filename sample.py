"""Generate images from text with Stable Diffusion 1.x or minti's toy model, with learned concepts.

    python sample.py                                        # the toy model, default prompt, samples.png
    python sample.py --model path/to/sd15 --prompt "a photo of a cat" --n 4 --out cats/
    python sample.py --model sd15.safetensors --embeds cat.safetensors --prompt "a <cat> in a bucket"
    python sample.py --embeds runs/concept/concept-multires.safetensors --prompt "a photo of a <concept(0.5)>"

The same --seed gives the same picture as diffusers' StableDiffusionPipeline with a DDIMScheduler of
the same configuration (see tests/test_sampling.py). The loop itself lives in minti/sampling.py.
"""
import argparse
import math
import os
import re
import sys

from minti.run import cli
from minti.run.cli import UsageError
from minti.io.files import atomic_write
from minti.run.devices import PRECISIONS, choose_cuda_backends, pick_device

DEFAULT_PROMPT = "a photo of a red star on a blue background"  # a toy-world caption; fine for SD too
OLD_DTYPES = {"auto": "auto", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}  # --dtype's values


class DeprecatedDtype(argparse.Action):
    """--dtype float16, the old spelling of --precision fp16: still accepted, with a note."""

    def __call__(self, parser, namespace, value, option_string=None):
        print(f"note: --dtype is deprecated; use --precision {OLD_DTYPES[value]}", file=sys.stderr)
        namespace.precision = OLD_DTYPES[value]


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
        help="learned concept files (diffusers, A1111, multiresolution, ...) whose words the prompts use; "
             "with the toy model and no --prompt: the last concept train.py wrote under runs/ (default: none)")
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
        help="the weights' precision; 'auto': fp16 on cuda, else fp32 (default: %(default)s)")
    add("--dtype", choices=list(OLD_DTYPES), action=DeprecatedDtype, help=argparse.SUPPRESS)
    add("--no-progress", action="store_true", help="hide the progress bar (default: shown)")
    return p.parse_args(argv)


def last_learned_concept(runs="runs"):
    """The concept file train.py wrote most recently under runs/ (plain or multiresolution), or None."""
    import glob

    found = glob.glob(os.path.join(runs, "*", "learned_embeds.safetensors"))
    found += glob.glob(os.path.join(runs, "*", "*-multires.safetensors"))
    return max(found, key=os.path.getmtime) if found else None


def load_words(sd, concepts):
    """The learned words of the concept files, ready for prompts (see minti/multires.py).

    Plain words are written as their token ("a photo of <cat>"); a multiresolution word with the
    time syntax: <cat|0.5|> (fixed), <cat(0.5)> (semi), <cat[0.5]> (fully) or <cat> (the current step's).
    """
    from minti.io.concepts import check_width
    from minti.multires import PromptWords

    width = sd.text_encoder.config.hidden_size
    for c in concepts:
        check_width(c, width)
    if concepts:
        print("concepts: " + ", ".join(
            f"{c.token} ({c.num_vectors} vector(s)" + (f" x {c.num_buckets} resolutions)" if c.is_multires
                                                        else ")") for c in concepts))
    return PromptWords(concepts, sd.tokenizer, sd.text_encoder, sd.scheduler.num_train_timesteps)


def save_png(image, path):
    """Write a uint8 image [H, W, 3] as a PNG, atomically (minti.io.files.atomic_write)."""
    from PIL import Image

    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


# ----------------------------------------------------------------------------------------------
# The boundary: what is checked before the model is loaded, and what the loaded tokenizer tells

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def check_args(args):
    """Refuse, before anything slow, the flags that would fail later or silently mean something else."""
    if not math.isfinite(args.guidance):
        raise UsageError(f"--guidance (--cfg) must be a finite number, got {args.guidance}; e.g. 7.5 (1: none).")
    if not (math.isfinite(args.eta) and args.eta >= 0):
        raise UsageError(f"--eta must be a number >= 0 (0: deterministic DDIM, 1: DDPM-like), got {args.eta}.")
    for flag, value in (("--steps", args.steps), ("--n", args.n)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}.")
    if args.steps > 999:
        raise UsageError(f"--steps {args.steps}: SD 1.x has 1000 timesteps, so at most 999 steps; 25-50 are usual.")
    cli.check_device(args.device)
    for flag, value in (("--width", args.width), ("--height", args.height)):
        if value is not None and (value < 8 or value % 8):
            raise UsageError(f"{flag} is in pixels, a positive multiple of 8 (the VAE's factor), got {value}; "
                             f"e.g. {max(8, round(value / 8) * 8)}, or leave it out for the model's own size.")
    if not -2 ** 63 <= args.seed < 2 ** 64:
        raise UsageError(f"--seed must lie in [-2^63, 2^64) (torch's seeds), got {args.seed}.")
    suffix = os.path.splitext(args.out)[1].lower()
    if suffix in IMAGE_SUFFIXES:
        raise UsageError(f"--out {args.out}: sample.py writes PNG files; give a .png path (one grid) or a "
                         f"folder (a PNG per image).")
    if suffix == ".png":
        if os.path.isdir(args.out):
            raise UsageError(f"--out {args.out} is a folder; give a .png path that is not one, or the folder "
                             f"without .png to write a PNG per image.")
        cli.check_writable_folder(os.path.dirname(os.path.abspath(args.out)), f"--out {args.out}: its folder")
    else:
        cli.check_writable_folder(args.out, "--out")
    if args.model != "toy" and not os.path.exists(args.model):
        raise UsageError(f"--model {args.model}: no such file or folder. Give 'toy', a diffusers folder, or one "
                         f".safetensors/.ckpt file.")


def read_embeds(specs):
    """The concepts of --embeds FILE[:NAME] ..., read before the model (minti.run.cli.read_concepts); two words
    of one name are refused with the command line's way out."""
    from minti.io.prompt_syntax import prompt_name

    concepts, seen = [], {}
    for spec in specs:
        for c in cli.read_concepts(spec, "--embeds"):
            name = prompt_name(c.token).lower()
            if name in seen:
                raise UsageError(f"--embeds: {spec} and {seen[name]} both hold a word called {c.token!r}; name "
                                 f"one of them with FILE:NAME, e.g. --embeds {spec}:other-name.")
            seen[name] = spec
            concepts.append(c)
    return concepts


def check_prompts(prompts, concepts):
    """Prompts that cannot be read fail before the model is loaded (minti/io/prompt_syntax.py), and so does the
    time syntax on an ordinary word, which has one set of vectors: <cat|0.5|> or <cat[0.5]> would change
    nothing (<cat(0.5)>, silent below 0.5, does)."""
    from minti.io.prompt_syntax import PromptError, names_in_prompts, parse_prompt, refuse_bare_multires_words

    named = names_in_prompts(concepts)
    for prompt in prompts:
        try:
            pieces = parse_prompt(prompt, named)
            refuse_bare_multires_words(prompt, pieces, named.values())
            for word in pieces[1::2]:
                timed = word.end - word.start > len(word.name) + 2  # not a bare <name>
                if timed and word.mode != "semi" and not named[word.name.lower()].is_multires:
                    raise PromptError(prompt, word.start, word.end, f"<{word.name}> is an ordinary word (one "
                                      f"set of vectors, not a multiresolution one): a resolution changes nothing",
                                      f"Write <{word.name}>, or <{word.name}(t)> to silence it below t.")
        except PromptError as e:
            raise UsageError(str(e)) from None


def check_lengths(words, prompts, length):
    """SD 1.x reads 77 tokens: a longer prompt is cut (as diffusers does), which is said; a learned word that
    would be cut is an error."""
    for prompt in dict.fromkeys(prompts):
        tokenized = words.tokenize(prompt)
        sizes = [len(tokenized.text[0])]
        for vectors, text in zip(tokenized.vectors, tokenized.text[1:]):
            if sizes[-1] + vectors.shape[1] > length - 1:
                raise UsageError(f"The prompt {prompt[:60]!r}{'...' * (len(prompt) > 60)} does not fit its learned "
                                 f"words into the {length} tokens the text encoder reads (with a start and an end "
                                 f"token); shorten it, or put the words earlier.")
            sizes.append(sizes[-1] + vectors.shape[1] + len(text))
        if sizes[-1] > length:
            cli.say(f"note: the prompt {prompt[:60]!r}{'...' * (len(prompt) > 60)} is {sizes[-1]} tokens; the "
                    f"text encoder reads {length}, so its last {sizes[-1] - length} are cut off (as in diffusers).")


def warn_if_not_finite(images, precision):
    """NaN/Inf pixels (fp16 overflowing in the UNet or the VAE) would be saved as black: say so, and what to
    do, on stderr; the images are still written."""
    import torch

    bad = [i for i, image in enumerate(images) if not torch.isfinite(image).all()]
    if bad:
        print(f"warning: image(s) {bad} of {len(images)} hold NaN/Inf values (written as black pixels): the "
              f"{precision} weights overflowed, most often in the VAE's decoder. Run again with --precision "
              f"fp32 (or bf16).", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    embeds = list(args.embeds)
    if not embeds and args.prompt is None and args.model == "toy":  # bare `python sample.py`
        last = last_learned_concept()
        if last is not None:
            embeds = [last]
            print(f"the last learned concept: {last} (pass --embeds to choose another)")
    from minti.io.spacetime_files import is_spacetime_file
    spacetime = any(is_spacetime_file(p) for p in embeds)  # P+ / NeTI: read once the model is loaded
    concepts = [] if spacetime else read_embeds(embeds)
    prompts = args.prompt
    if prompts is None:
        prompts = [f"a photo of a <{concepts[0].token.strip('<>')}>" if concepts else DEFAULT_PROMPT]
    if not spacetime:
        check_prompts(prompts + [args.negative], concepts)

    import minti
    from minti.sampling import text_to_image, to_uint8

    device = pick_device(args.device)
    choose_cuda_backends()  # no TF32: fp32 is fp32 (minti/io/files.py)
    precision = args.precision
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    sd = minti.load(args.model, device=device, dtype=PRECISIONS[precision])
    print(f"model: {getattr(sd, 'source', args.model)} ({device}, {precision})")
    if spacetime:
        return sample_spacetime(sd, args, embeds)
    words = load_words(sd, concepts)
    check_lengths(words, prompts + [args.negative], sd.text_encoder.config.max_position_embeddings)
    print("prompts: " + " | ".join(prompts))

    cond = words.conditioning(prompts, drop=args.drop, n=args.n)
    uncond = None  # the negative prompt may use learned words too, with the same syntax
    if args.guidance != 1.0:
        uncond = words.conditioning([args.negative] * len(prompts), drop=args.drop, n=args.n)
    images = text_to_image(
        sd, prompts, negative=args.negative, num_steps=args.steps, scheduler=args.scheduler, eta=args.eta,
        guidance_scale=args.guidance, seed=args.seed, n=args.n, width=args.width, height=args.height,
        embed_fn=words.embed_fn, cond=cond, uncond=uncond,
        progress=not args.no_progress, output="pt")
    warn_if_not_finite(images, precision)
    images = to_uint8(images)

    return write_images(args, images, prompts)


def write_images(args, images, prompts):
    from minti.io.files import image_grid

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


def cli_main(argv=None):
    """The command line (minti/run/cli.py): exit codes, "error: ..." without a traceback, SIGTERM as Ctrl-C."""
    cli.Signals().install()
    return cli.run_main(main, argv)


def sample_spacetime(sd, args, embeds):
    """One space-time word (P+ or NeTI, minti/spacetime.py): each UNet layer gets its own conditioning."""
    import torch

    from minti.io.concepts import ConceptError
    from minti.sampling import text_to_image
    from minti.spacetime import sampling_conditioning
    from minti.io.spacetime_files import load_spacetime, make_word
    from minti.textual_inversion import placeholder_tokens
    from minti.unet import cross_attention_layers

    if len(embeds) != 1:
        raise UsageError("a space-time word (P+ / NeTI) samples alone: pass just its file to --embeds.")
    try:
        concept = load_spacetime(embeds[0], cross_attention_layers(sd.unet), sd.text_encoder.config.hidden_size)
        word = make_word(concept, sd.tokenizer).to(sd.unet.device)
    except (ConceptError, ValueError) as e:
        raise UsageError(str(e)) from None
    prompts = args.prompt or [f"a photo of a {concept.token}"]
    prompts, truncations = zip(*(truncation_in(p, concept, args.truncation) for p in prompts))
    print(f"concept: {concept.token} ({concept.kind}, {len(concept.layer_names)} layers"
          + (f", truncation {', '.join(str(k or 'none') for k in dict.fromkeys(truncations))})"
             if concept.kind == "neti" else ")"))
    n_vectors = concept.vectors.shape[2] if concept.kind == "per-layer" else 1
    expanded = [p.replace(concept.token, " ".join(placeholder_tokens(concept.token, n_vectors))) for p in prompts]
    print("prompts: " + " | ".join(prompts))
    length = sd.text_encoder.config.max_position_embeddings
    conds = [(k, sampling_conditioning(word, sd.text_encoder, sd.tokenizer([text], length=length)
                                       .to(sd.unet.device), n=args.n)) for text, k in zip(expanded, truncations)]

    def cond(t):  # the prompts' per-layer contexts, each prompt at its own truncation, stacked prompt by prompt
        per_prompt = []
        for k, c in conds:
            word.truncation = k
            per_prompt.append(c(t) if callable(c) else c)
        return [torch.cat(layer) for layer in zip(*per_prompt)]
    images = text_to_image(sd, prompts, negative=args.negative, num_steps=args.steps, scheduler=args.scheduler,
                           eta=args.eta, guidance_scale=args.guidance, seed=args.seed, n=args.n, width=args.width,
                           height=args.height, cond=cond, progress=not args.no_progress, output="np")
    return write_images(args, images, prompts)


def truncation_in(prompt, concept, default):
    """(the prompt with `<name:K>` written as the word's token, K or `default`): a NeTI word's truncation."""
    name = concept.token[1:-1] if concept.token.startswith("<") and concept.token.endswith(">") else concept.token
    found = re.findall(rf"<{re.escape(name)}:(\d+)>", prompt)
    if found and concept.kind != "neti":
        raise UsageError(f"{prompt!r}: <{name}:K> sets a NeTI word's truncation, but {concept.token} is a "
                         f"{concept.kind} word.")
    if len(set(found)) > 1:
        raise UsageError(f"{prompt!r} gives the word two truncations ({', '.join(found)}); give one per prompt.")
    k = int(found[0]) if found else default if concept.kind == "neti" else None  # (--truncation: NeTI only)
    if k is not None and not 1 <= k <= int(concept.meta["hidden"]):
        raise UsageError(f"truncation {k}: a NeTI word keeps 1 to {concept.meta['hidden']} of its mapper's hidden "
                         f"dimensions.")
    return re.sub(rf"<{re.escape(name)}:\d+>", concept.token, prompt), k


if __name__ == "__main__":
    sys.exit(cli_main())
