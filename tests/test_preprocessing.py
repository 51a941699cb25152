"""What textual inversion trains on, against diffusers' examples/textual_inversion recipe.

The recipe's preprocessing (TextualInversionDataset with --center_crop, and its training loop) is
written out below from its documented steps, not imported or copied: the image converted to RGB, the
centre square cropped, resized to the resolution with PIL's bicubic filter, flipped (the recipe's
RandomHorizontalFlip), scaled to [-1, 1] by `image / 127.5 - 1.0`; then
`vae.encode(x).latent_dist.sample() * vae.config.scaling_factor` (0.18215 for SD 1.x) with diffusers'
AutoencoderKL. minti's side is minti.data: load_image (one image to pixels) and Latents (a fresh draw
from the encoded Gaussian at each step, cached or not).
"""
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image


from minti.io.configs import to_diffusers_config
from minti.data import Latents, load_image
from minti.vae import VAE, VAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest)

RESOLUTION = 32
# Wide, tall, smaller than the resolution (upscaled), odd sides (the crop offset rounds down), grey.
SIZES = [(70, 50, "RGB"), (45, 64, "RGB"), (20, 27, "RGB"), (33, 33, "L")]
# A 4-level VAE (latents 1/8 of the image, as SD's), no mid-block attention: minti is then
# bit-identical to diffusers (tests/test_vae.py), so any difference here is the preprocessing's.
VAE_CONFIG = VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                       mid_block_add_attention=False, sample_size=RESOLUTION)


def recipe_pixels(path, size, flip):
    """diffusers' examples/textual_inversion TextualInversionDataset.__getitem__, --center_crop."""
    image = Image.open(path)
    if not image.mode == "RGB":
        image = image.convert("RGB")
    img = np.array(image).astype(np.uint8)
    crop = min(img.shape[0], img.shape[1])
    h, w = img.shape[0], img.shape[1]
    img = img[(h - crop) // 2:(h + crop) // 2, (w - crop) // 2:(w + crop) // 2]
    image = Image.fromarray(img)
    image = image.resize((size, size), resample=Image.Resampling.BICUBIC)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = np.array(image).astype(np.uint8)
    image = (image / 127.5 - 1.0).astype(np.float32)
    return torch.from_numpy(image).permute(2, 0, 1)


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h, mode) in enumerate(SIZES):
        # smooth gradients plus noise: a crop or filter off by one pixel changes the result
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
        pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
        path = folder / f"{i}.png"
        (image.convert("L") if mode == "L" else image).save(path)
        paths.append(path)
    return paths


def test_load_image_equals_the_recipe(image_paths):
    for path in image_paths:
        expected = recipe_pixels(path, RESOLUTION, flip=False)
        got = load_image(str(path), RESOLUTION)
        assert got.shape == expected.shape == (3, RESOLUTION, RESOLUTION) and got.dtype == torch.float32
        # the same 8-bit pixels (crop, filter and size), exactly
        levels = ((got.double() + 1) * 127.5).round()
        assert torch.equal(levels, ((expected.double() + 1) * 127.5).round()), path.name
        # and the same scaling to [-1, 1], up to the rounding of float32 (the recipe divides in float64)
        assert (got - expected).abs().max() <= 2 ** -23, path.name
        assert got.min() >= -1 and got.max() <= 1


@pytest.mark.parametrize("cache", [True, False])
def test_latents_equal_the_recipe_posterior_sample(image_paths, cache):
    """z_0 = latent_dist.sample() * 0.18215 of the (flipped or not) image, with the same noise."""
    torch.manual_seed(0)
    ref = AutoencoderKL(**to_diffusers_config(VAE_CONFIG)).eval()
    with torch.no_grad():  # a random output conv: without it a fresh VAE's latents are near zero
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = VAE(VAE_CONFIG).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    scale = VAE_CONFIG.scaling_factor
    assert scale == 0.18215 == ref.config.scaling_factor  # SD 1.x's

    pixels = torch.stack([load_image(str(p), RESOLUTION) for p in image_paths])
    latents = Latents(ours, pixels, scale, cache=cache)
    index = torch.tensor([0, 1, 1, 3, 2])
    flip = torch.tensor([False, False, True, True, False])
    got = latents.sample(index, flip, torch.Generator().manual_seed(7))

    x = torch.stack([recipe_pixels(image_paths[i], RESOLUTION, f) for i, f in zip(index.tolist(), flip.tolist())])
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        expected = dist.sample(generator=torch.Generator().manual_seed(7)) * ref.config.scaling_factor
    assert got.shape == expected.shape == (5, 4, RESOLUTION // 8, RESOLUTION // 8)
    assert (dist.std > 1e-3).all() and (got - dist.mean * scale).abs().max() > 1e-3  # a sample, not the mean
    # measured 2e-7 of 1.5: the pixels differ by float32's last bit (see test_load_image_equals_the_recipe)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * expected.abs().max().item())
