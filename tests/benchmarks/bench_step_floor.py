"""A textual-inversion step against its floor: train.py's loop step vs the bare text encoder + UNet.

The floor is the least any TI step can cost on the same inputs: the text encoder's forward on the
prompts' token vectors, the UNet's forward on the noised latents, the MSE, and the backward to the token
vectors, nothing else. train.py's step (textual_inversion.train_loop, as train.py and minti.learn run
it) adds the draws of the batch (images, prompts, timesteps, noise), the splice, AdamW, the finiteness
check and the one read of the loss. Both run on the same model, batch size and precision, interleaved
(floor, step, floor, step, ...) in one process with one thread; the best of the rounds is reported.

    python tests/benchmarks/bench_step_floor.py                 # the toy model, batch 16
    python tests/benchmarks/bench_step_floor.py --model PATH --batch 1 --steps 3   # SD 1.x, if you have it
"""
import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import minti  # noqa: E402
from minti import textual_inversion as ti  # noqa: E402
from minti.data import load_concept_data  # noqa: E402
from minti.sampling import default_size  # noqa: E402
from minti.timesteps import UniformTimesteps  # noqa: E402
from minti.toy import TEMPLATES, concept_folder  # noqa: E402


def setup(model, images, batch):
    sd = minti.load(model)
    ti.freeze(sd)
    tokenizer, table = copy.deepcopy(sd.tokenizer), ti.token_table(sd.text_encoder)
    start, _ = ti.init_vectors(tokenizer, table, "star", 2)
    word = ti.new_word(tokenizer, "<c>", start)
    data, _ = load_concept_data(images, default_size(sd)[0], "<c>", "<c> <c>_1", TEMPLATES,
                                lambda p: tokenizer(p, length=77), sd.vae, sd.latent_scale)
    fixed = ti.draw_batches(data, UniformTimesteps(), batch, 1, torch.Generator().manual_seed(1), "cpu")[0]
    return sd, word, data, fixed


def floor(sd, word, batch, steps):
    """The bare forward + backward to the token vectors, on one pre-drawn batch."""
    ids, latents, t, noise = batch
    embeds = F.embedding(ids.clamp(max=len(ti.token_table(sd.text_encoder)) - 1), ti.token_table(sd.text_encoder))
    start = time.perf_counter()
    for _ in range(steps):
        x = embeds.detach().requires_grad_(True)
        eps = sd.unet(sd.scheduler.add_noise(latents, noise, t), t, sd.text_encoder(ids, inputs_embeds=x))
        F.mse_loss(eps, noise).backward()
    return (time.perf_counter() - start) / steps


def loop(sd, word, data, batch_size, steps):
    """train_loop's steps: draws, splice, loss, backward, AdamW, the checks and the read of the loss."""
    optimizer, generator = ti.adamw(word, 5e-2), torch.Generator().manual_seed(0)
    start = time.perf_counter()
    ti.train_loop(sd, word, data, optimizer, UniformTimesteps(), generator, steps=steps, lr=5e-2, batch=batch_size)
    return (time.perf_counter() - start) / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy")
    p.add_argument("--images", default=concept_folder())
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="steps per round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sd, word, data, fixed = setup(args.model, args.images, args.batch)
    floor(sd, word, fixed, 2), loop(sd, word, data, args.batch, 2)  # warm-up
    floors, steps = [], []
    for _ in range(args.rounds):
        floors.append(floor(sd, word, fixed, args.steps))
        steps.append(loop(sd, word, data, args.batch, args.steps))
    print(f"{args.model}, batch {args.batch}, one thread, best of {args.rounds} rounds of {args.steps} steps:")
    print(f"  floor (text encoder + UNet forward and backward): {1000 * min(floors):.1f} ms")
    print(f"  train.py's step (train_loop):                     {1000 * min(steps):.1f} ms")
    print(f"  ratio step / floor: {min(steps) / min(floors):.3f}")


if __name__ == "__main__":
    main()
