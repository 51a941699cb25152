"""The shipped toy model (weights/toy): an ordinary SD 1.x diffusers folder, and a model on which
textual inversion measurably works.

- diffusers' StableDiffusionPipeline loads the folder and, with the same seed, prompt, negative prompt
  and guidance, draws the same images as minti (uint8, at most 1 level apart);
- transformers' CLIPTokenizer reads its BPE files and gives minti's ids;
- a short textual inversion of the default toy concept, judged by the oracle, reconstructs the concept
  far more often than the prompt-only reference (the coarse word, "a photo of a star").
"""
import os

import numpy as np
import pytest
import torch

import minti
from minti.toy import world as toyworld
from minti.concepts import Concept
from minti.sampling import text_to_image
from minti.textual_inversion import learn
from minti.toy.evaluate import CONCEPTS_FOLDER, evaluate_concept
from minti.weights import TOY_FOLDER

torch.set_num_threads(1)  # small tensors: more threads only wait for each other on shared CI cores

PROMPTS = ["a photo of a large striped red star on a blue background", "a rendering of a small green circle"]


@pytest.fixture(scope="module")
def toy():
    assert os.path.isfile(os.path.join(TOY_FOLDER, "model_index.json")), \
        "weights/toy is missing: train it with `python -m minti.toy.model`"
    return minti.load("toy")


def test_diffusers_pipeline_loads_the_toy_model_and_draws_what_minti_draws(toy):
    import diffusers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(TOY_FOLDER), safety_checker=None,
                                                             requires_safety_checker=False)
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPTS, negative_prompt=["", "black background"], num_inference_steps=20, guidance_scale=4.0,
               width=32, height=32, generator=torch.Generator("cpu").manual_seed(3), output_type="np")
    expected = np.round(out.images * 255).astype(np.uint8)  # diffusers' numpy_to_pil conversion
    ours = text_to_image(toy, PROMPTS, negative=["", "black background"], num_steps=20, guidance_scale=4.0,
                         seed=3, width=32, height=32)
    diff = np.abs(ours.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, f"max difference {diff.max()} levels"


def test_transformers_reads_the_toy_tokenizer(toy):
    import transformers
    reference = transformers.CLIPTokenizer.from_pretrained(os.path.join(TOY_FOLDER, "tokenizer"))
    captions = toyworld.caption_corpus(300, seed=7) + PROMPTS + ["", "A STRIPED  orange-star!", "a 3d star 🌟"]
    for text in captions:
        assert toy.tokenizer.encode(text) == reference(text)["input_ids"], text


def test_short_textual_inversion_learns_the_toy_concept(toy):
    """The method end to end: 150 steps of textual inversion (2 vectors, as train.py's toy default)
    from the init word "star" on the five shipped images of a striped orange star. Before: the init word alone (prompt only) gets colour and
    pattern right by chance. After: the learned word carries them (oracle, 64 samples each)."""
    name = toyworld.DEFAULT_CONCEPT
    truth = toyworld.CONCEPTS[name]
    word, losses = learn(toy, os.path.join(CONCEPTS_FOLDER, name), "<concept>", truth.init_word, vectors=2,
                         steps=150, batch=16, lr=5e-2, seed=0)
    report = evaluate_concept(toy, Concept("<concept>", word.vectors.detach()[0]), truth=name, n=64, steps=25)
    learned = report["concept"]["reconstruction"].value
    prompt_only = report["prompt_only"]["reconstruction"].value
    assert prompt_only <= 0.2, report.table()
    assert learned >= prompt_only + 0.5, report.table()
