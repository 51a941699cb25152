"""Pictures at the boundary: the model's picture size, the latent of a size, a grid of pictures.

What the sampling loop and the scripts need around the method: the training resolution a model
defaults to, the latent size of a picture size (refusing sizes the VAE cannot make), and the one
grid that train.py's previews and sample.py's --grid lay out.
"""
import numpy as np


def default_size(sd):
    """The model's training resolution in pixels: the UNet's sample_size times the VAE factor."""
    side = (sd.unet.config.sample_size or 64) * sd.vae.config.downsample_factor  # 64 x 8 = 512 for SD 1.x
    return side, side


def latent_size(sd, width, height):
    """(latent height, latent width) for an image size; sizes must be multiples of the VAE factor."""
    f = sd.vae.config.downsample_factor  # 8 for SD 1.x: three 2x downsamplings
    if width % f or height % f or width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive multiples of {f} (the VAE downsamples by {f}); "
                         f"got {width}x{height}. Try {max(f, round(width / f) * f)}x"
                         f"{max(f, round(height / f) * f)}.")
    return height // f, width // f


def image_grid(images, rows):
    """uint8 numpy [B, H, W, 3] -> one uint8 image [rows * H, cols * W, 3], filled row by row."""
    b, h, w, c = images.shape
    cols = -(-b // rows)  # ceil
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, k = divmod(i, cols)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = image
    return grid
