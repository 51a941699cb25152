"""What textual inversion trains on: the concept's images, their prompts, and their cached latents.

Images: every .jpg/.jpeg/.png/.webp of a folder, of any size, mode or orientation, turned upright by
their EXIF tag, centre-cropped to a square and resized (bicubic, as the paper's code). Prompts: the
paper's neutral templates ("a photo of a {}", rinongal/textual_inversion ldm/data/personalized*.py),
or a caption from a .txt file beside an image. Latents: each image and its mirror image are encoded
once; every step draws a fresh latent from the cached Gaussian (mean + std * noise), which is exactly
what encoding again would give, without the VAE in every step (diffusers' example encodes at every step;
tests/benchmarks/bench_train_step.py times the two steps side by side).
"""
import os

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .vae import images_per_call

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# In a caption file, where the new word goes. "{}" as in Python templates, "[name]" as AUTOMATIC1111's
# template files, "S*" as the paper writes it; the token itself also works.
CAPTION_MARKERS = ("{}", "[name]", "S*")

# The paper's object templates, as its code lists them (81 entries: 27 "photo" prompts, then the
# same with "illustration" and with "depiction"; duplicates included, so they weigh more).
OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
    "an illustration of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "an illustration of a clean {}", "an illustration of a dirty {}", "a dark photo of the {}",
    "an illustration of my {}", "an illustration of the cool {}", "a close-up photo of a {}",
    "a bright photo of the {}", "a cropped photo of a {}", "an illustration of the {}",
    "a good photo of the {}", "an illustration of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "an illustration of the clean {}", "a rendition of a {}",
    "an illustration of a nice {}", "a good photo of a {}", "an illustration of the nice {}",
    "an illustration of the small {}", "an illustration of the weird {}",
    "an illustration of the large {}", "an illustration of a cool {}", "an illustration of a small {}",
    "a depiction of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a depiction of a clean {}", "a depiction of a dirty {}", "a dark photo of the {}",
    "a depiction of my {}", "a depiction of the cool {}", "a close-up photo of a {}",
    "a bright photo of the {}", "a cropped photo of a {}", "a depiction of the {}",
    "a good photo of the {}", "a depiction of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a depiction of the clean {}", "a rendition of a {}",
    "a depiction of a nice {}", "a good photo of a {}", "a depiction of the nice {}",
    "a depiction of the small {}", "a depiction of the weird {}", "a depiction of the large {}",
    "a depiction of a cool {}", "a depiction of a small {}",
]
# The paper's style templates (personalized_style.py), 19 entries.
STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}",
    "a cropped painting in the style of {}", "the painting in the style of {}",
    "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}",
    "a cool painting in the style of {}", "a close-up painting in the style of {}",
    "a bright painting in the style of {}", "a cropped painting in the style of {}",
    "a good painting in the style of {}", "a close-up painting in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
]
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}  # the toy model's own: minti/toy/


class ImageError(ValueError):
    """An image folder or file that cannot be used; the message names it and says what to do."""


# ----------------------------------------------------------------------------------------------
# Images

def find_images(folder):
    """The image files of a folder, sorted by name; a clear error if there are none. Not read: macOS's
    "._x.png" resource files and what is not a regular file (a named pipe would hang the run)."""
    if not os.path.isdir(folder):
        raise ImageError(f"--images {folder}: no such folder. Put the concept's 3-5 images in a folder "
                         f"and pass its path.")
    names = sorted(os.listdir(folder))
    paths = [os.path.join(folder, n) for n in names
             if n.lower().endswith(IMAGE_EXTENSIONS) and not skipped(folder, n)]
    if not paths:
        others = [n for n in names if not n.startswith(".")][:5]
        found = f"; it has {others}" if others else ", it is empty"
        raise ImageError(f"--images {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}){found}. Add the "
                         f"concept's images.")
    return paths


def skipped(folder, name):
    """Why an entry of the image folder is not read as an image, or None."""
    path = os.path.join(folder, name)
    if os.path.isdir(path):
        return "a folder"
    if name.startswith("._"):
        return "a macOS resource file (AppleDouble), not an image"
    return None if os.path.isfile(path) else "not a regular file (a named pipe, a device)"


def check_images(folder):
    """Before anything loads: every image of the folder opens (its header), else an ImageError names it.
    Returns notes on what is not read: "._" files, pipes, subfolders (whose images are not read either)."""
    for path in find_images(folder):
        open_image(path).close()
    notes = [f"note: {os.path.join(folder, n)} is {why}: not read." for n in sorted(os.listdir(folder))
             if (why := skipped(folder, n)) and why != "a folder" and n.lower().endswith(IMAGE_EXTENSIONS)]
    nested = sorted(n + "/" for n in os.listdir(folder) if skipped(folder, n) == "a folder" and n[0] != ".")
    if nested:
        notes.append(f"note: the subfolders of --images ({', '.join(nested[:5])}{', ...' * (len(nested) > 5)}) "
                     f"are not read: only the images directly in {folder} are.")
    return notes


def open_image(path):
    """PIL's lazy open (the header only), or an ImageError that names the file and says what to do."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path} is too large to open safely ({e}); resize it (a side of 512-1024 pixels is "
                         f"plenty: it is cropped and resized to --resolution anyway).") from None
    except PermissionError:
        raise ImageError(f"{path} cannot be read (permission denied): fix its permissions, or move it out of "
                         f"the folder.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path} is not a readable image ({type(e).__name__}: {e}). Remove it from the "
                         f"folder or save it again as PNG/JPEG.") from None


def to_rgb(image, sixteen_bit=False):
    """Any PIL mode -> RGB. Transparent pixels become white; a 16-bit image (sixteen_bit: a 16-bit PNG, dark or
    not) is divided by 65535; other integer and float images are rescaled by their range."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(image, dtype=np.float32)
        deep = sixteen_bit or image.mode.startswith("I;16") or a.max() > 255
        top = 1.0 if image.mode == "F" and a.max() <= 1.0 else (65535.0 if deep else 255.0)
        image = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" or (image.mode != "RGBA" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(path, image_size):
    """One image as a float tensor [3, image_size, image_size] in [-1, 1]: upright, centre square."""
    with open_image(path) as image:
        try:
            image.load()  # decode now, so that a truncated file fails here, with its name
            sixteen_bit = image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG")
            image = to_rgb(ImageOps.exif_transpose(image), sixteen_bit)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{path} is not a readable image ({type(e).__name__}: {e}). Remove it from the "
                             f"folder or save it again as PNG/JPEG.") from None
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((image_size, image_size), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return pixels.float() / 127.5 - 1.0


def read_caption(image_path, token):
    """The caption in a .txt beside the image ("dog.jpg" -> "dog.txt"), with the new word put in.

    A marker ({}, [name], S*, or the token itself) says where the word goes. A caption without one
    describes the rest of the picture and is appended to a template: "a photo of a S*, <caption>".
    Returns (text, has_marker), or None when there is no caption file.
    """
    path = os.path.splitext(image_path)[0] + ".txt"
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        raw = f.read()
    try:  # a byte-order mark (Windows' Notepad writes one) is not text: UTF-8's dropped, UTF-16's read as such
        text = " ".join(raw.decode("utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig").split())
    except UnicodeDecodeError as e:
        raise ImageError(f"The caption file {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it "
                         f"again as UTF-8.") from None
    if not text:
        return None
    has_marker = any(m in text for m in CAPTION_MARKERS + (token,))
    for marker in CAPTION_MARKERS:
        text = text.replace(marker, token)
    return text, has_marker


def prompts_for_image(caption, templates, token):
    """Every prompt an image may be trained with: its caption, or the templates (with the caption)."""
    if caption is not None and caption[1]:
        return [caption[0]]
    suffix = f", {caption[0]}" if caption is not None else ""
    return [t.format(token) + suffix for t in templates]


# ----------------------------------------------------------------------------------------------
# Latents

class Latents:
    """Draws z_0 = (mean + std * noise) * latent_scale for image i, flipped or not.

    cache=True: encode every image and its mirror image once, keep the Gaussian's mean and std.
    cache=False: encode the chosen images at every step (what diffusers' example does). Both draw the
    same noise from the same generator, so they give the same latents up to float rounding.
    """

    def __init__(self, vae, pixels, latent_scale, cache=True, device="cpu"):
        self.vae, self.scale, self.device = vae, latent_scale, device
        self.pixels = pixels  # [N, 3, R, R] in [-1, 1], on the CPU
        self.mean = self.std = None
        if cache:
            both = torch.stack([pixels, pixels.flip(-1)], dim=1)  # [N, 2, 3, R, R]: image, mirror image
            mean, std = self._encode(both.flatten(0, 1))
            self.mean = mean.unflatten(0, (len(pixels), 2))
            self.std = std.unflatten(0, (len(pixels), 2))

    @torch.no_grad()  # the VAE is not on the path to the vectors
    def _encode(self, x):
        vae_dtype = next(self.vae.parameters()).dtype
        means, stds = [], []
        for chunk in x.split(images_per_call(*x.shape[-2:])):  # one at a time at 512 px (vae.py)
            mean, logvar = self.vae.encode(chunk.to(self.device, vae_dtype))
            means.append(mean.float())
            stds.append((0.5 * logvar.float()).exp())
        return torch.cat(means), torch.cat(stds)

    def sample(self, index, flip, generator):
        """z_0 [B, C, h, w] for images index [B] (flip [B] bool: mirrored); noise from `generator`."""
        if self.mean is not None:
            side = flip.long()
            mean, std = self.mean[index, side], self.std[index, side]
        else:
            pixels = torch.where(flip[:, None, None, None], self.pixels[index].flip(-1), self.pixels[index])
            mean, std = self._encode(pixels)
        noise = torch.randn(mean.shape, generator=generator).to(mean.device)
        return (mean + std * noise) * self.scale


# ----------------------------------------------------------------------------------------------
# The training set

class ConceptData:
    """The concept's images, their prompts as token ids, and their latents: `batch` draws a batch.

    prompts_ids[i]: LongTensor [P_i, L], every prompt image i may be trained with.
    Randomness comes only from the generator passed to `batch`, so that a resumed run draws the same.
    """

    def __init__(self, paths, prompts, prompt_ids, latents, flip_p):
        self.paths, self.prompts, self.prompt_ids = paths, prompts, prompt_ids
        self.latents, self.flip_p = latents, flip_p

    def __len__(self):
        return len(self.paths)

    def batch(self, batch_size, generator):
        """(ids [B, L], z_0 [B, C, h, w]): random images, each flipped with probability flip_p."""
        index = torch.randint(len(self.paths), (batch_size,), generator=generator)
        flip = torch.rand(batch_size, generator=generator) < self.flip_p
        pick = torch.rand(batch_size, generator=generator)  # which of the image's prompts
        ids = torch.stack([self.prompt_ids[i][int(u * len(self.prompt_ids[i]))]
                           for i, u in zip(index.tolist(), pick.tolist())])
        return ids, self.latents.sample(index, flip, generator)


def load_concept_data(folder, image_size, token, prompt_token, templates, tokenize, vae, latent_scale,
                      cache_latents=True, flip_p=0.5, device="cpu"):
    """Read a folder of images (and captions) into a ConceptData.

    token: the word as the user writes it (caption markers are replaced by it); prompt_token: what
    goes into the prompt (for a word of n vectors, its n placeholder tokens); tokenize(list of str) ->
    ids [P, L]. Returns the ConceptData and a one-line summary of the prompts used.
    """
    paths = find_images(folder)
    pixels = torch.stack([load_image(p, image_size) for p in paths])
    prompts, n_captions = [], 0
    for path in paths:
        caption = read_caption(path, token)
        n_captions += caption is not None
        prompts.append([p.replace(token, prompt_token) for p in prompts_for_image(caption, templates, token)])
    prompt_ids = [tokenize(p) for p in prompts]
    latents = Latents(vae, pixels, latent_scale, cache=cache_latents, device=device)
    summary = (f"{len(paths)} images at {image_size} px; {n_captions} with a caption file, "
               f"{len(paths) - n_captions} with the {len(templates)} templates "
               f"(e.g. {templates[0].format(token)!r})")
    return ConceptData(paths, prompts, prompt_ids, latents, flip_p), summary
