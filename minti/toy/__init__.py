"""The toy world: a renderer of simple scenes with exact labels (world), the classifier that reads images
back into those labels (oracle), the tiny SD-architecture model trained on it (model), and the evaluation
of learned words with the oracle (evaluate). It imports the core of minti; the core never imports it.

Here: what training a word on the toy model takes that SD 1.x does not, in one place (train.py reads it).
"""
import os

from .world import CONCEPTS, DEFAULT_CONCEPT, PROMPT_PREFIXES

# The toy model only knows the words of its own captions ("a photo of a red star"): the paper's
# "cropped", "dirty", "illustration" (minti/data.py's templates) would be strings of letters to it.
TEMPLATES = [f"{prefix} a {{}}".strip() for prefix in PROMPT_PREFIXES]

# train.py's settings on the toy model, where they differ from its SD 1.x defaults. Measured on the default
# concept (lessons/results/10_tradeoff.csv, 200 steps, lr 5e-2): one vector reconstructs 73% (its stripes
# come and go), two vectors 89% with editability 80%. lr: Adam moves each number by about lr per step
# whatever the gradient, and the toy's words are long (median norm ~8, train.py --norm-log); the paper's
# base lr 5e-3 reconstructed 34% (one vector) and 75% (two) in the same grid.
TRAIN_DEFAULTS = {"vectors": 2, "steps": 300, "lr": 5e-2, "templates": TEMPLATES}


def is_toy_model(model):
    """Is `model` (a --model value) the toy model: "toy", or the path of its folder?"""
    from ..io.weights import TOY_FOLDER

    return model == "toy" or os.path.realpath(model) == os.path.realpath(TOY_FOLDER)


def concept_folder(name=DEFAULT_CONCEPT):
    """Where a toy concept's 5 images are shipped: weights/toy/concepts/<name>/."""
    from ..io.weights import TOY_FOLDER

    return os.path.join(str(TOY_FOLDER), "concepts", name)


def concept_name(folder):
    """The toy concept that a folder of images holds (weights/toy/concepts/<name>/), or None."""
    parent, name = os.path.split(os.path.abspath(folder).rstrip(os.sep))
    return name if name in CONCEPTS and parent == os.path.dirname(concept_folder(name)) else None
