"""The oracle: a small CNN that reads a toy-world image back into its attributes.

It is the exact judge of the toy world (see `toyworld.py`): sample "a photo of S*", ask the oracle
for shape, colour, pattern, background and size, and count matches, where the paper had to use
CLIP similarity. One convolutional trunk, one linear head per attribute. It is trained on fresh
renders that are blurred, downsampled, noised, shifted and colour-jittered, because generated
images are never as crisp as renders: a prototype's oracle trained on clean renders alone judged
VAE-passed shapes at 46%, and 99%+ once trained on degraded ones. Train it: `python -m minti.toy.oracle`.
"""
import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..io.files import write_json
from ..io.weights import TOY_FOLDER
from . import world as toyworld

DEFAULT_FOLDER = os.path.join(TOY_FOLDER, "oracle")


@dataclass
class OracleConfig:
    image_size: int = toyworld.IMAGE_SIZE
    widths: tuple = (32, 48, 64, 96)  # conv stages; ~100k parameters, < 0.5 MB in fp32
    # attribute -> its value names, in label order (the heads and their classes)
    attributes: dict = field(default_factory=lambda: {a: list(v) for a, v in toyworld.ATTRIBUTES.items()})


@dataclass
class TrainConfig:
    steps: int = 1500  # 100% on fresh and degraded renders; ~4.5 min on 2 idle cores
    batch_size: int = 64  # small: the oracle trains on 2 shared CPU cores
    lr: float = 2e-3  # AdamW, cosine decay after a short warm-up (a plain, robust choice)
    warmup: int = 100
    weight_decay: float = 1e-4
    seed: int = 0


def _conv_block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Oracle(nn.Module):
    """A CNN classifier: image -> one set of logits per toy-world attribute."""

    def __init__(self, config=None):
        super().__init__()
        self.config = config or OracleConfig()
        w = self.config.widths
        # One convolution at full resolution (stripes and borders are 2-3 px wide), then halve the
        # resolution before each wider stage: 32 -> 16 -> 8 -> 4.
        layers = [_conv_block(3, w[0])]
        for cin, cout in zip(w[:-1], w[1:]):
            layers += [nn.MaxPool2d(2), _conv_block(cin, cout)]
        self.features = nn.Sequential(*layers)
        # Average and max pooling: "how much of the image is object" and "is there any of it".
        self.heads = nn.ModuleDict({attr: nn.Linear(2 * w[-1], len(values))
                                    for attr, values in self.config.attributes.items()})

    def forward(self, x):
        """x: float [N, 3, H, W] in [-1, 1] -> {attribute: logits [N, n_values]}."""
        h = self.features(x)
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return {a: head(h) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images, batch_size=512):
        """Read images into attributes: {attribute: LongTensor [N]} (indices into ATTRIBUTES).

        images: uint8 [N, H, W, 3] (numpy or torch; one [H, W, 3] image is fine too), or a float
        tensor [N, 3, H, W] in [-1, 1] (what the VAE decodes to)."""
        x = to_model_input(images, self.config.image_size)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = {a: [] for a in self.heads}
        for chunk in x.split(batch_size):
            for a, logits in self(chunk.to(device=device, dtype=torch.float32)).items():
                out[a].append(logits.argmax(dim=1).cpu())
        self.train(was_training)
        return {a: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for a, v in out.items()}

    def accuracy(self, images, targets):
        """Share of images whose predicted attributes equal targets, per attribute and "all".

        targets: {attribute: value name, index, or an array of indices [N]}; attributes left out
        are not judged. "all" counts images where every given attribute matches."""
        pred = self.predict(images)
        n = len(next(iter(pred.values())))
        hits = torch.ones(n, dtype=torch.bool)
        result = {}
        for a, t in targets.items():
            if a not in pred:
                raise KeyError(f"the oracle reads {list(pred)}; it cannot judge {a!r}")
            if isinstance(t, str):
                t = self.config.attributes[a].index(t)
            match = pred[a] == torch.as_tensor(np.asarray(t), dtype=torch.long)
            result[a] = match.float().mean().item()
            hits &= match
        result["all"] = hits.float().mean().item()
        return result

    def save(self, folder=DEFAULT_FOLDER, extra=None):
        """Write model.safetensors and config.json (plus `extra`, e.g. measured accuracies)."""
        os.makedirs(folder, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  os.path.join(folder, "model.safetensors"))
        write_json(os.path.join(folder, "config.json"), {**asdict(self.config), **(extra or {})})

    @classmethod
    def load(cls, folder=DEFAULT_FOLDER, device="cpu"):
        """Load a saved oracle (the shipped one by default) in eval mode."""
        path = os.path.join(folder, "model.safetensors")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no oracle at {folder}: train one with `python -m minti.toy.oracle`")
        with open(os.path.join(folder, "config.json")) as f:
            saved = json.load(f)
        config = OracleConfig(image_size=saved["image_size"], widths=tuple(saved["widths"]),
                              attributes=saved["attributes"])
        oracle = cls(config)
        oracle.load_state_dict(load_file(path), strict=True)
        return oracle.to(device).eval()


def to_model_input(images, image_size):
    """uint8 [N, H, W, 3] or float [N, 3, H, W] in [-1, 1] -> float [N, 3, H, W] in [-1, 1]."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"uint8 images must be [N, H, W, 3]; got shape {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    elif x.is_floating_point():
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"float images must be [N, 3, H, W] in [-1, 1]; got shape {tuple(x.shape)}")
    else:
        raise ValueError(f"images must be uint8 [N, H, W, 3] or float [N, 3, H, W]; got {x.dtype}")
    if tuple(x.shape[2:]) != (image_size, image_size):
        raise ValueError(f"the oracle reads {image_size}x{image_size} images; got {tuple(x.shape[2:])}. "
                         "Resize them first (or train an oracle for that size).")
    return x


# ----------------------------------------------------------------------------------------------
# Degradations: what generated images suffer that renders do not.

def blur(x, sigma):
    """Gaussian blur with one sigma per image (sigma: float tensor [N]; 0 leaves an image as is).

    Written as two small matrix products, rows then columns (the kernel is separable), with the
    border pixel repeated beyond the edge: cheaper on a CPU than a grouped convolution."""
    n, c, h, w = x.shape
    r = 3  # kernel radius: covers 2 sigma at the largest sigma we use (1.5)
    t = torch.arange(-r, r + 1)
    k = torch.exp(-t[None].to(x.dtype) ** 2 / (2 * sigma.to(x.dtype).clamp(min=1e-3)[:, None] ** 2))
    k = k / k.sum(dim=1, keepdim=True)  # [N, 2r+1]

    def matrix(size):  # [N, size, size]: output pixel i takes k[t] of pixel clamp(i + t)
        src = (torch.arange(size)[:, None] + t[None]).clamp(0, size - 1)  # [size, 2r+1]
        m = torch.zeros(n, size, size, dtype=x.dtype)
        return m.scatter_add(2, src.expand(n, -1, -1), k[:, None, :].expand(-1, size, -1))

    return matrix(h)[:, None] @ x @ matrix(w)[:, None].transpose(-1, -2)


def down_up(x, factor=2):
    """Average-pool by factor and upsample back (bilinear): detail lost in a lower resolution."""
    return F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="bilinear", align_corners=False)


def stand_in_recon(x, gen):
    """A stand-in for a VAE round trip (the oracle was trained before the toy VAE): halve the resolution,
    then blur. Its error (MSE ~0.013-0.02 on [-1, 1]) brackets a prototype VAE's 0.015 on such renders."""
    return blur(down_up(x), torch.rand(len(x), generator=gen) * 0.8)


def shift(x, gen, max_px):
    """Translate each image by up to max_px pixels (sub-pixel), repeating the border."""
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = (torch.rand(n, 2, generator=gen) * 2 - 1) * max_px * 2 / torch.tensor([w, h])
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment(x, gen):
    """Random degradations of a batch in [-1, 1]: a shift; then per image one of nothing, blur or the
    stand-in reconstruction; then a small colour jitter and noise. Magnitudes never change a label."""
    n = len(x)
    x = shift(x, gen, max_px=1.5)  # the renderer keeps >= 1 px of background at the border
    kind = torch.randint(3, (n,), generator=gen)  # 0: as is, 1: blur, 2: reconstruction
    sigma = 0.3 + torch.rand(n, generator=gen) * 1.2  # blur sigma 0.3-1.5 px
    x = x.clone()
    b, r = kind == 1, kind == 2
    if b.any():
        x[b] = blur(x[b], sigma[b])
    if r.any():
        x[r] = stand_in_recon(x[r], gen)
    # Colour: per-channel gain +-7% and offset +-0.06 (8/255); object colours are >= 80/255 apart.
    gain = 1 + (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1) * 0.07
    offset = (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1) * 0.06
    x = x * gain + offset
    sigma = torch.rand(n, 1, 1, 1, generator=gen) * 0.1  # noise up to 0.1 (13/255)
    x = x + sigma * torch.randn(x.shape, generator=gen)
    return x.clamp(-1, 1)


def _noisy(x, std, gen):
    return x + std * torch.randn(x.shape, generator=gen)


def _sigma(x, value):
    return torch.full((len(x),), value)


# Fixed degradations to measure the oracle under: name -> f(x, generator).
DEGRADATIONS = {
    "clean": lambda x, gen: x,
    "blur1": lambda x, gen: blur(x, _sigma(x, 1.0)),
    "blur1+noise0.05": lambda x, gen: _noisy(blur(x, _sigma(x, 1.0)), 0.05, gen),
    "downup2+noise0.05": lambda x, gen: _noisy(down_up(x), 0.05, gen),
    # Harsher than its training (and than a working VAE): where its reading starts to fail.
    "blur1.5+noise0.1": lambda x, gen: _noisy(blur(x, _sigma(x, 1.5)), 0.1, gen),
    "downup4": lambda x, gen: down_up(x, 4),  # only an 8x8 grid of colours is left
}


def evaluate(oracle, n=2000, seed=12345, degradation="clean"):
    """The oracle's accuracy on n fresh renders (rendered from `seed`), after a named degradation."""
    images, labels = toyworld.render_batch(n, seed, oracle.config.image_size)
    x = to_model_input(images, oracle.config.image_size)
    x = DEGRADATIONS[degradation](x, torch.Generator().manual_seed(seed)).clamp(-1, 1)
    return oracle.accuracy(x, labels)


# ----------------------------------------------------------------------------------------------
# Training.

def train_oracle(config=None, train=None, log_every=250):
    """Train an oracle on freshly rendered, augmented batches; returns it in eval mode."""
    config, train = config or OracleConfig(), train or TrainConfig()
    torch.manual_seed(train.seed)
    rng = np.random.default_rng(train.seed)  # scenes: a stream no evaluation seed shares
    gen = torch.Generator().manual_seed(train.seed)  # augmentations
    oracle = Oracle(config)
    opt = torch.optim.AdamW(oracle.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    schedule = lambda s: min(1.0, (s + 1) / train.warmup) * 0.5 * (1 + math.cos(math.pi * s / train.steps))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    oracle.train()
    start, running = time.time(), 0.0
    for step in range(train.steps):
        images, labels = toyworld.render_batch(train.batch_size, rng, config.image_size)
        x = to_model_input(images, config.image_size)
        with torch.no_grad():
            x = augment(x, gen)
        logits = oracle(x)
        loss = sum(F.cross_entropy(logits[a], torch.from_numpy(labels[a])) for a in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        running += loss.item()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{train.steps}  loss {running / log_every:.4f}  "
                  f"{time.time() - start:.0f}s", flush=True)
            running = 0.0
    return oracle.eval()


def report(oracle, n=2000):
    """Print and return the oracle's accuracy under every named degradation."""
    accuracy = {}
    for name in DEGRADATIONS:
        accuracy[name] = {a: round(v, 4) for a, v in evaluate(oracle, n, degradation=name).items()}
        print(f"{name:>18}: " + "  ".join(f"{a} {v:.4f}" for a, v in accuracy[name].items()))
    return accuracy


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the toy world's oracle and save it.")
    parser.add_argument("--out", default=DEFAULT_FOLDER, help="folder for model.safetensors + config.json")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--eval-n", type=int, default=2000, help="fresh renders per accuracy measured")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    start = time.time()
    oracle = train_oracle(train=train)
    minutes = (time.time() - start) / 60
    oracle.save(args.out, extra={"train": asdict(train), "train_minutes": round(minutes, 1),
                                 f"accuracy_on_{args.eval_n}_fresh_renders": report(oracle, args.eval_n)})
    print(f"saved to {args.out} ({minutes:.1f} min)")


if __name__ == "__main__":
    main()
