"""minti: Textual Inversion on Stable Diffusion 1.x, from scratch, in plain PyTorch.

Every model that a learned word flows through is written here (tokenizer.py, clip.py, unet.py,
vae.py, schedulers.py) and loads the public SD 1.x weights (weights.py). Start with
`minti.load("toy")`, or read the lessons in `lessons/`.
"""


def load(source="toy", device="cpu", dtype=None, **kwargs):
    """Load a Stable Diffusion 1.x model: "toy", a diffusers folder, or one checkpoint file.

    See `minti.weights.load` for the arguments and the object it returns.
    """
    from .weights import load as _load  # imported here so `import minti` stays light

    return _load(source, device=device, dtype=dtype, **kwargs)
