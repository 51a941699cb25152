"""Generate images from text with Stable Diffusion 1.x or minti's toy model, with learned concepts.

    python sample.py                                        # the toy model, default prompt, samples.png
    python sample.py --model path/to/sd15 --prompt "a photo of a cat" --n 4 --out cats/
    python sample.py --model sd15.safetensors --embeds cat.safetensors --prompt "a <cat> in a bucket"

The same --seed gives the same picture as diffusers' StableDiffusionPipeline with a DDIMScheduler of
the same configuration (see tests/test_sampling.py). The loop itself lives in minti/sampling.py.
"""
import argparse
import os
import sys

import torch

DEFAULT_PROMPT = "a photo of a red star on a blue background"  # a toy-world caption; fine for SD too
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--model", default="toy",
        help="'toy', a diffusers folder, or one .safetensors/.ckpt file (default: %(default)s)")
    add("--prompt", action="append", default=None,
        help=f"text prompt; repeat the flag for several (default: {DEFAULT_PROMPT!r})")
    add("--negative", default="", help="negative prompt: the 'unconditional' side of guidance (default: '')")
    add("--steps", type=int, default=50, help="sampling steps (default: %(default)s)")
    add("--scheduler", choices=["ddim", "ddpm"], default="ddim", help="sampler (default: %(default)s)")
    add("--eta", type=float, default=0.0,
        help="DDIM only: 0 deterministic, 1 DDPM-like noise (default: %(default)s)")
    add("--cfg", type=float, default=7.5,
        help="classifier-free guidance scale; 1: no guidance (default: %(default)s)")
    add("--seed", type=int, default=0, help="seed of the initial noise (default: %(default)s)")
    add("--n", type=int, default=1, help="images per prompt (default: %(default)s)")
    add("--width", type=int, default=None,
        help="width in pixels, a multiple of 8 (default: the model's, 512 for SD 1.x)")
    add("--height", type=int, default=None,
        help="height in pixels, a multiple of 8 (default: the model's, 512 for SD 1.x)")
    add("--embeds", nargs="+", default=[], metavar="FILE",
        help="learned concept files (textual inversion embeddings) for the prompts (default: none)")
    add("--out", default="samples.png",
        help="a .png path (one grid, a row per prompt) or a folder (a PNG per image) (default: %(default)s)")
    add("--device", default="auto",
        help="'cpu', 'cuda', 'cuda:1', ... or 'auto': cuda if available (default: %(default)s)")
    add("--dtype", choices=["auto", *DTYPES], default="auto",
        help="weights' precision; 'auto': float16 on cuda, float32 on cpu (default: %(default)s)")
    add("--no-progress", action="store_true", help="hide the progress bar (default: shown)")
    return p.parse_args(argv)


def load_concepts(sd, files):
    """Add the words of the concept files to sd's tokenizer.

    Returns (concepts, embed_fn): embed_fn(ids) gives the token vectors with the learned vectors
    spliced in where the words' placeholder tokens stand (see minti/concepts.py).
    """
    if not files:
        return [], None
    from minti.concepts import add_concepts, embed_ids, load_concepts as read, placeholder_table

    width = sd.text_encoder.config.hidden_size
    concepts = [c for path in files for c in read(path, expected_width=width)]
    if any(c.is_multires for c in concepts):
        # TODO(multiresolution issue): parse <S|t|>, <S(t)>, <S[t]> and pass a per-step context_fn.
        sys.exit("error: multiresolution concepts are not supported by sample.py yet; export one "
                 "resolution with minti.concepts.export_resolution and pass that file.")
    new_ids, vectors = placeholder_table(concepts, add_concepts(sd.tokenizer, concepts))
    table = sd.text_encoder.text_model.embeddings.token_embedding.weight
    vectors = vectors.to(table.device, table.dtype)

    def embed_fn(ids):
        return embed_ids(ids, table, new_ids.to(ids.device), vectors)

    print(f"concepts: {', '.join(f'{c.token} ({c.num_vectors} vector(s))' for c in concepts)}")
    return concepts, embed_fn


def main(argv=None):
    args = parse_args(argv)
    import minti
    from minti.sampling import image_grid, text_to_image, to_pil

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype
    if dtype_name == "auto":
        dtype_name = "float16" if device.startswith("cuda") else "float32"
    try:
        sd = minti.load(args.model, device=device, dtype=DTYPES[dtype_name])
    except (FileNotFoundError, ValueError) as e:  # no model there, or not an SD 1.x model
        sys.exit(f"error: {e}")
    print(f"model: {getattr(sd, 'source', args.model)} ({device}, {dtype_name})")
    prompts, negative = args.prompt or [DEFAULT_PROMPT], args.negative
    try:
        concepts, embed_fn = load_concepts(sd, args.embeds)
    except ValueError as e:  # a file of another model family, a clashing trigger word, ...
        sys.exit(f"error: {e}")
    if concepts:  # a word of n vectors is written out as its n placeholder tokens
        from minti.concepts import expand_prompt

        prompts, negative = expand_prompt(prompts, concepts), expand_prompt(negative, concepts)

    try:
        images = text_to_image(
            sd, prompts, negative=negative, num_steps=args.steps, scheduler=args.scheduler, eta=args.eta,
            guidance_scale=args.cfg, seed=args.seed, n=args.n, width=args.width, height=args.height,
            embed_fn=embed_fn, progress=not args.no_progress, output="np")
    except ValueError as e:  # bad sizes, step counts, ...: say what to change, without a traceback
        sys.exit(f"error: {e}")

    count = f"{len(images)} image{'s' * (len(images) > 1)} ({len(prompts)} prompt(s) x {args.n})"
    size = f"{images.shape[2]}x{images.shape[1]}"
    if args.out.lower().endswith(".png"):
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        to_pil(image_grid(images, rows=len(prompts))[None])[0].save(args.out)
        print(f"wrote {count} of {size} as a {len(prompts)}x{args.n} grid to {args.out}")
    else:
        os.makedirs(args.out, exist_ok=True)
        paths = []
        for i, image in enumerate(to_pil(images)):
            name = f"p{i // args.n:02d}_{i % args.n:02d}_seed{args.seed}.png"  # prompt, image, seed
            paths.append(os.path.join(args.out, name))
            image.save(paths[-1])
        print(f"wrote {count} of {size} as PNGs to {args.out}/ ({os.path.basename(paths[0])} ...)")
    return images


if __name__ == "__main__":
    main()
