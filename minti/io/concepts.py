"""Concept files: the learned words of textual inversion, in every format people exchange them in.

A concept is a trigger word and its vectors: [n, D] for an ordinary word (Gal et al. 2022), or
[T, n, D] for a multiresolution word, one set per slice of diffusion time (Daras & Dimakis 2022).
This file reads and writes the formats of diffusers, AUTOMATIC1111, kohya's sd-scripts and the
paper's own code (always with `weights_only=True`) and minti's multiresolution file, and exports one
resolution of a multiresolution word for tools without time. Nothing here touches a model: the words
meet the tokenizer and the token table in textual_inversion.py (training) and multires.py (prompts).
"""
import os
import pickle
import re
from dataclasses import dataclass, field

import safetensors
import safetensors.torch
import torch

from .files import atomic_write
from ..multires import timestep_of
from ..textual_inversion import placeholder_tokens, time_bucket

# Token-embedding widths of the Stable Diffusion families, to say which family a file belongs to.
FAMILIES = {
    768: "SD 1.x (CLIP ViT-L/14)",
    1024: "SD 2.x (OpenCLIP ViT-H/14)",
    1280: "SDXL (the clip_g half: OpenCLIP ViT-bigG/14)",
    2048: "SDXL (clip_l 768 + clip_g 1280, concatenated)",
}
# AUTOMATIC1111 writes `string_to_token: {"*": 265}`, a dummy it never reads: 265 is CLIP's id of "*".
A1111_DUMMY_TOKEN_ID = 265
MULTIRES_FORMAT = "minti-multires"  # the "format" metadata of minti's multiresolution file
SPACETIME_FORMAT = "minti-spacetime"  # ... and of a space-time word's file (spacetime_files.py)
SIZE_KEYS = {"T": "resolutions", "n": "vectors", "D": "width"}  # the metadata keys of a stored tensor's sizes


class ConceptError(ValueError):
    """A concept file or concept that minti cannot use; the message says why and what to do."""


@dataclass
class Concept:
    """A learned word: `token` (the trigger, e.g. "<cat-toy>") and its vectors.

    vectors: [n, D] for an ordinary word of n vectors, or [T, n, D] for a multiresolution word of
    T time buckets (num_buckets), bucket k holding the word for diffusion times t in [k/T, (k+1)/T)
    (t = timestep / 1000, bucket 0 = least noise, as in the multiresolution paper's public code).
    step: the training step it was saved at, if known. meta: free-form (model name and hash, where
    it was read from, the file's own metadata, ...).
    """

    token: str
    vectors: torch.Tensor
    step: int | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.token, str) or not self.token or re.search(r"\s", self.token):
            raise ConceptError(
                f"A trigger word must be a non-empty string without spaces, got {self.token!r}; "
                "choose another one (load_concepts(path, token='<name>') renames a file's word).")
        v = self.vectors
        if not torch.is_tensor(v) or v.dim() not in (2, 3):
            shape = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
            raise ConceptError(f"The vectors of {self.token!r} must be a tensor [n, D] (or [T, n, D] for a "
                               f"multiresolution word), got {shape}; a single vector [D] is v[None].")
        if v.numel() == 0:
            raise ConceptError(f"The vectors of {self.token!r} are empty (shape {tuple(v.shape)}).")
        if not v.is_floating_point():
            raise ConceptError(f"The vectors of {self.token!r} must be floating point, got {v.dtype}.")

    @property
    def is_multires(self) -> bool:
        return self.vectors.dim() == 3

    @property
    def num_vectors(self) -> int:
        return self.vectors.shape[-2]

    @property
    def width(self) -> int:
        return self.vectors.shape[-1]

    @property
    def num_buckets(self) -> int | None:
        """T, the number of time buckets of a multiresolution word; None for an ordinary word."""
        return self.vectors.shape[0] if self.is_multires else None

    @property
    def placeholder_tokens(self) -> list[str]:
        """The tokenizer entries of the word: `<tok>`, `<tok>_1`, `<tok>_2`, ... as diffusers names them."""
        return placeholder_tokens(self.token, self.num_vectors)


# ------------------------------------------------------------------------------------------ names

def bare_name(token: str) -> str:
    """The name inside a trigger word's angle brackets, as prompts write it: "<cat-toy>" -> "cat-toy".
    A token without brackets ("cat", "*") is its own name."""
    return token[1:-1] if len(token) > 2 and token.startswith("<") and token.endswith(">") else token


def derived_token(token: str, suffix: str) -> str:
    """The name of a word exported from another, the suffix inside its brackets: ("<cat>", "r0.3") ->
    "<cat-r0.3>", ("cat", "layer-avg") -> "cat-layer-avg"."""
    name = bare_name(token)
    return f"{token}-{suffix}" if name == token else f"<{name}-{suffix}>"


# ----------------------------------------------------------------------------------------- checks

def family_of(width: int) -> str:
    """Which Stable Diffusion family uses token vectors of this width."""
    return FAMILIES.get(width, f"an unknown model family (width {width})")


def check_width(concept: Concept, expected: int = 768) -> None:
    """Refuse a concept made for another model; `expected` is the model's token-embedding width."""
    if concept.width != expected:
        raise ConceptError(
            f"{concept.token!r} has vectors of width {concept.width}: this is an {family_of(concept.width)} "
            f"embedding, but the model expects width {expected} ({family_of(expected)}). An embedding only "
            "works with the model family it was trained for; use one made for this model.")


def check_finite(vectors: torch.Tensor, token: str, where: str) -> None:
    """Refuse a word whose vectors hold NaN or Inf (read from a file, or about to be written)."""
    bad = (~torch.isfinite(vectors)).sum().item()
    if bad:
        raise ConceptError(
            f"{where}: the vectors of {token!r} hold {bad} NaN/Inf values of {vectors.numel()}, so the word "
            "is unusable (its training diverged). Use an earlier snapshot or train again with a lower lr.")


# ------------------------------------------------------- word files (here and in spacetime_files.py)

def file_kind(path: str) -> str:
    """What kind of file this is, from its first bytes: "safetensors" or "torch" (else an error)."""
    size = os.path.getsize(path)
    if size == 0:
        raise ConceptError(f"{path} is empty (0 bytes): it was not written completely; get the file again.")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"\x89PNG" or head[:3] == b"\xff\xd8\xff" or head[:4] == b"RIFF":
        raise ConceptError(
            f"{path} is an image. AUTOMATIC1111 can hide an embedding inside a PNG/WebP; minti reads "
            "only embedding files (.safetensors, .pt, .bin): re-save it from A1111 as a .pt.")
    # safetensors: an 8-byte little-endian header length, then a JSON header starting with "{".
    if size >= 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 8 + header_len > size:
            raise ConceptError(
                f"{path} is truncated: its safetensors header announces {header_len} bytes but the file "
                f"has only {size}. It was cut off during download or writing; get the file again.")
        return "safetensors"
    # torch.save writes a zip archive ("PK\3\4") since torch 1.6, a bare pickle (protocol 2) before.
    # Checked after safetensors: a safetensors header length may begin with the byte 0x80 (e.g. 384).
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    raise ConceptError(f"{path} is not an embedding file: it is neither safetensors nor a torch.save file "
                       f"(it starts with {head[:8]!r}).")


def read_safetensors(path: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, or a ConceptError saying it is damaged."""
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except safetensors.SafetensorError as e:
        raise ConceptError(
            f"{path} is a damaged safetensors file (truncated or corrupt: {e}); get the file again."
        ) from None


def saved_step(metadata: dict) -> int | None:
    """The training step a file's metadata names (str(None) when it was not known)."""
    return int(metadata["step"]) if metadata.get("step") not in (None, "", "None") else None


def stored_vectors(tensors: dict, metadata: dict, dims: str, where: str) -> torch.Tensor:
    """The tensor 'vectors' of a minti file, its dimensions named by `dims` ("T n D"), as float32: refused
    unless non-empty, floating, finite and of the sizes its metadata states (T, n, D: SIZE_KEYS)."""
    v, names = tensors.get("vectors"), dims.split()
    if v is None or v.dim() != len(names) or v.numel() == 0 or not v.is_floating_point():
        raise ConceptError(f"{where}: a {metadata.get('format')} file holds a non-empty float tensor "
                           f"'vectors' [{', '.join(names)}], got {None if v is None else tuple(v.shape)}.")
    for key, size in zip(map(SIZE_KEYS.get, names), v.shape):
        if key in metadata and int(metadata[key]) != size:
            raise ConceptError(
                f"{where}: the metadata says {key}={metadata[key]} but the tensor 'vectors' has shape "
                f"{tuple(v.shape)}; the file is inconsistent (damaged or edited by hand).")
    check_finite(v, metadata.get("token", ""), where)
    return v.float().contiguous()


def file_tensor(tensor: torch.Tensor, token: str, where: str) -> torch.Tensor:
    """A word's tensor as it goes into a file: detached, float32, CPU, finite, in a storage of its own.

    clone(): torch.save writes a view's whole underlying storage (a slice of a bigger table would drag
    the table along), and safetensors refuses tensors that share memory.
    """
    v = tensor.detach().to("cpu", torch.float32).contiguous().clone()
    check_finite(v, token, f"Refusing to write {where}")
    return v


def file_metadata(meta: dict, **entries) -> dict:
    """safetensors metadata (strings only): the meta entries that are plain values (but where the word was
    read from, and its format there), then `entries`."""
    plain = {k: v for k, v in meta.items()
             if isinstance(v, (str, int, float, bool)) and k not in ("path", "format")}
    return {k: str(v) for k, v in {**plain, **entries}.items()}


def write_safetensors(path, tensors: dict, metadata: dict) -> None:
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))


def extension(path) -> str:
    return os.path.splitext(os.fspath(path))[1].lower()


# ---------------------------------------------------------------------------------------- reading

def _read_torch(path):
    # The paper's code saved its vectors in an nn.ParameterDict, which weights_only=True refuses.
    # Allowing that one class is safe: the restricted unpickler then only calls ParameterDict.__new__
    # (no __init__) and Module.__setstate__, which copies a dict of already-unpickled values into the
    # object's __dict__; those values can themselves only be tensors, Parameters and plain containers
    # (the default allow-list), so no code of the file's choosing can run. We never call the module:
    # its tensors are taken out of `_parameters` and the object is dropped. Everything else it needs
    # (Parameter, _rebuild_parameter, OrderedDict, set) is allowed by default (checked in the tests).
    try:
        with torch.serialization.safe_globals([torch.nn.ParameterDict]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e)) or re.search(r"unrecognized function (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise ConceptError(
            f"Refusing to load {path}: besides tensors it holds Python objects{what} that only a full "
            "unpickle could build, and unpickling a file can run any code its author put in it. "
            "Embedding files hold only tensors, strings and numbers; if you trust its author, re-save "
            "just the vectors (safetensors preferred).") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ConceptError(f"{path} could not be read as a torch.save file: it is truncated or corrupt "
                           f"({e}). Get the file again.") from None


def _as_vectors(value, token: str, where: str) -> torch.Tensor:
    """One word's tensor as float32 [n, D] on the CPU; an old single vector [D] becomes [1, D]."""
    if not torch.is_tensor(value):
        raise ConceptError(f"{where}: the entry of {token!r} is a {type(value).__name__}, not a tensor.")
    v = value.detach()
    if v.dim() == 1:
        v = v[None]
    if v.dim() != 2:
        raise ConceptError(
            f"{where}: the tensor {token!r} has shape {tuple(v.shape)}, but an embedding is [n, D] or [D]. "
            "Is this a model, LoRA or other file rather than an embedding?")
    if not v.is_floating_point():
        raise ConceptError(f"{where}: the tensor of {token!r} holds {v.dtype}, not floating point numbers.")
    check_finite(v, token, where)
    return v.to(torch.float32).contiguous()  # kohya writes fp16; minti keeps vectors in fp32


def _plain(value):
    """A 0-d tensor or Python number as a Python value (A1111 writes `step` as an int)."""
    return value.item() if torch.is_tensor(value) and value.numel() == 1 else value


def _multires_concept(tensors: dict, metadata: dict, where: str, token: str | None) -> Concept:
    """The word in minti's multiresolution file (named `token` if given, else as its metadata says)."""
    v = stored_vectors(tensors, metadata, "T n D", where)
    edges = tensors.get("time_edges")
    uniform = torch.linspace(0, 1, v.shape[0] + 1)
    if edges is not None and (edges.shape != uniform.shape or not torch.allclose(edges.float(), uniform)):
        raise ConceptError(
            f"{where}: only equal time buckets are supported, got time_edges {edges.tolist()}.")
    meta = {**{k: val for k, val in metadata.items() if k not in ("token", "step")}, "path": where}
    return Concept(token or metadata.get("token", ""), v, step=saved_step(metadata), meta=meta)


def _concepts_from_payload(payload, metadata: dict, path: str, token: str | None) -> list[Concept]:
    """Recognise the format from what the file holds (its keys), not from its name."""
    if metadata.get("format") == SPACETIME_FORMAT:
        raise ConceptError(
            f"{path} is a space-time word ({metadata.get('kind')}: one vector per UNet layer, or a network): "
            "read it with minti.io.spacetime_files.load_spacetime, or export an ordinary word from it with "
            "export_layer_average.")
    if metadata.get("format") == MULTIRES_FORMAT:
        return [_multires_concept(payload, metadata, path, token)]
    if torch.is_tensor(payload):  # a bare torch.save(tensor): diffusers accepts it given `token=`
        if token is None:
            raise ConceptError(f"{path} holds a bare tensor with no word name: pass token='<name>'.")
        return [Concept(token, _as_vectors(payload, token, path), meta={"path": path, "format": "tensor"})]
    if not isinstance(payload, dict) or not payload:
        raise ConceptError(
            f"{path} is not an embedding file: it holds a {type(payload).__name__} ({payload!r:.80}).")
    names, tensors, step, meta = _words_of(payload, metadata, path)
    if token is not None:
        if len(names) != 1:
            raise ConceptError(
                f"{path} holds {len(names)} words {names}; token= can rename only a lone word.")
        names = [token]
    concepts = [Concept(name, _as_vectors(tensor, name, path), step=step, meta=dict(meta))
                for name, tensor in zip(names, tensors)]
    widths = {c.width for c in concepts}
    if len(widths) > 1:
        raise ConceptError(
            f"{path} holds tensors of widths {sorted(widths)}; the words of one embedding file share one "
            "width. Is this a model or LoRA file rather than an embedding?")
    return concepts


def _words_of(payload: dict, metadata: dict, path: str) -> tuple[list, list, int | None, dict]:
    """(names, tensors, step, meta) of the words in an embedding dict, its format told by its keys."""
    stem = os.path.splitext(os.path.basename(path))[0]
    if "clip_g" in payload or "clip_l" in payload:
        raise ConceptError(
            f"{path} is an SDXL embedding (clip_l 768 + clip_g 1280 vectors); minti runs SD 1.x models, "
            "whose text encoder it was not trained with. Use an embedding made for SD 1.x.")
    if "string_to_param" in payload:
        params = getattr(payload["string_to_param"], "_parameters", payload["string_to_param"])
        if "name" not in payload:  # the paper's code: {placeholder: Parameter}, ids in string_to_token
            ids = {k: _plain(v) for k, v in payload.get("string_to_token", {}).items()}
            return list(params), list(params.values()), None, {
                "path": path, "format": "textual_inversion_paper", "placeholder_ids": ids}
        # AUTOMATIC1111: one word under the dummy key "*". The trigger word: diffusers' rule (the `name`
        # stored in the file), falling back to the file name, which is A1111's own rule; token= picks either.
        names = [payload["name"] or stem] if len(params) == 1 else list(params)
        meta = {"path": path, "format": "a1111", "name": payload["name"],
                **{key: payload.get(key) for key in ("sd_checkpoint", "sd_checkpoint_name")}}
        return names, list(params.values()), _plain(payload.get("step")), meta
    if "emb_params" in payload:  # kohya's sd-scripts: the trigger is the file name, as in A1111
        meta = {**metadata, "path": path, "format": "kohya"}  # the file's own metadata, e.g. modelspec.*
        return [stem], [payload["emb_params"]], _plain(payload.get("step")), meta
    if all(torch.is_tensor(v) for v in payload.values()):  # diffusers: {token: [n, D]}, maybe several
        if "state_dict" in payload or len(payload) > 64:
            raise ConceptError(
                f"{path} holds {len(payload)} tensors: it looks like a model, not an embedding.")
        return list(payload), list(payload.values()), None, {**metadata, "path": path, "format": "diffusers"}
    keys = ", ".join(repr(k) for k in list(payload)[:8])
    raise ConceptError(
        f"{path} is not an embedding file minti knows: its keys are {keys}. Known formats: diffusers "
        "{token: [n, D]}, AUTOMATIC1111 / the paper's code (string_to_param), kohya (emb_params), "
        f"and minti's {MULTIRES_FORMAT}.")


def load_concepts(path, token: str | None = None, expected_width: int | None = None) -> list[Concept]:
    """Read every word in an embedding file of any supported format (or a diffusers folder).

    The format is recognised from the content, not the extension. The trigger word of each format:
    diffusers, its key(s); AUTOMATIC1111, the `name` inside as diffusers reads it (A1111 itself uses
    the file name; a file without a name gets it); kohya, the file name as in A1111; the paper's
    `embeddings.pt`, its placeholder (often "*", already a CLIP word: rename it); minti's multires
    file, the token in its metadata. `token` renames the word of a one-word file. `expected_width`
    (the model's token width, 768 for SD 1.x) refuses embeddings of another model family.
    """
    path = os.fspath(path)
    if os.path.isdir(path):  # a diffusers concept folder
        names = ("learned_embeds.safetensors", "learned_embeds.bin")
        found = [os.path.join(path, n) for n in names if os.path.exists(os.path.join(path, n))]
        if not found:
            raise ConceptError(f"{path} is a folder without {' or '.join(names)}; pass the embedding file.")
        path = found[0]
    if not os.path.exists(path):
        raise ConceptError(f"No such embedding file: {path}")
    if file_kind(path) == "safetensors":
        payload, metadata = read_safetensors(path)
    else:
        payload, metadata = _read_torch(path), {}
    concepts = _concepts_from_payload(payload, metadata, path, token)
    if expected_width is not None:
        for concept in concepts:
            check_width(concept, expected_width)
    return concepts


# ---------------------------------------------------------------------------------------- writing

def _ordinary(concept: Concept, what: str) -> None:
    if concept.is_multires:
        raise ConceptError(
            f"{concept.token!r} is a multiresolution word ({concept.num_buckets} time buckets) and the "
            f"{what} format has no notion of time: save it with save_multires, or save one resolution "
            "with export_resolution(concept, time) first.")


def save_diffusers(path, concept: Concept) -> None:
    """Write diffusers' `learned_embeds.safetensors` ({token: [n, D]}), or a torch `.bin` / `.pt`."""
    _ordinary(concept, "diffusers")
    tensors = {concept.token: file_tensor(concept.vectors, concept.token, os.fspath(path))}
    if extension(path) == ".safetensors":
        # {"format": "pt"} is what diffusers writes (and transformers checks) in safetensors metadata.
        write_safetensors(path, tensors, {"format": "pt"})
    elif extension(path) in (".bin", ".pt"):
        atomic_write(path, lambda tmp: torch.save(tensors, tmp))
    else:
        raise ConceptError(f"{path}: a diffusers embedding is a .safetensors (preferred) or .bin file.")


def save_a1111(path, concept: Concept, sd_checkpoint: str | None = None,
               sd_checkpoint_name: str | None = None) -> None:
    """Write an AUTOMATIC1111 `.pt` exactly as A1111 does.

    A1111 calls the word by the file name; diffusers by the `name` inside, which is `concept.token`.
    sd_checkpoint is A1111's short hash of the model (the first 10 hex digits of its sha256) and
    sd_checkpoint_name its name; both default to the concept's meta, else None.
    """
    _ordinary(concept, "AUTOMATIC1111")
    if extension(path) not in (".pt", ".bin"):
        raise ConceptError(f"{path}: an AUTOMATIC1111 embedding is a torch pickle; name it .pt.")
    data = {
        "string_to_token": {"*": A1111_DUMMY_TOKEN_ID},
        "string_to_param": {"*": file_tensor(concept.vectors, concept.token, os.fspath(path))},
        "name": concept.token,
        "step": concept.step,
        "sd_checkpoint": sd_checkpoint if sd_checkpoint is not None else concept.meta.get("sd_checkpoint"),
        "sd_checkpoint_name": (sd_checkpoint_name if sd_checkpoint_name is not None
                               else concept.meta.get("sd_checkpoint_name")),
    }
    atomic_write(path, lambda tmp: torch.save(data, tmp))


def save_multires(path, concept: Concept) -> None:
    """Write minti's multiresolution file: one safetensors file with all T time buckets of a word.

    Tensors: "vectors" [T, n, D] and "time_edges" [T+1] (bucket k covers t in [edges[k], edges[k+1]),
    t = timestep / num_train_timesteps, 0 = least noise). Holding two tensors also makes diffusers and
    A1111 refuse the file instead of silently misreading T buckets as T vectors. Metadata: format,
    token, resolutions (T), vectors, width, step, and the concept's meta entries that are plain values.
    """
    if not concept.is_multires:
        raise ConceptError(
            f"{concept.token!r} is an ordinary word: save it with save_diffusers or save_a1111.")
    if extension(path) != ".safetensors":
        raise ConceptError(f"{path}: a multiresolution file is a .safetensors file.")
    vectors = file_tensor(concept.vectors, concept.token, os.fspath(path))
    metadata = file_metadata(
        concept.meta, format=MULTIRES_FORMAT, token=concept.token, resolutions=concept.num_buckets,
        vectors=concept.num_vectors, width=concept.width, step=concept.step,
        time="t = timestep / num_train_timesteps; bucket k covers [k/T, (k+1)/T); bucket 0 = least noise")
    tensors = {"vectors": vectors, "time_edges": torch.linspace(0, 1, concept.num_buckets + 1)}
    write_safetensors(path, tensors, metadata)


def export_resolution(concept: Concept, time: float, token: str | None = None) -> Concept:
    """The ordinary word a multiresolution word is at diffusion time `time` in [0, 1] (timestep / 1000).

    It is the time bucket of timestep round(1000 * time) (multires.timestep_of): time 0 is the least
    noisy bucket (fine detail), time 1 the noisiest (coarse layout). The word is named "<token-r0.3>"
    (time 0.3) unless `token` is given, so that the word at several times can be loaded side by side,
    e.g. into A1111 from `<name>-r0.3.pt`.
    """
    if not concept.is_multires:
        raise ConceptError(f"{concept.token!r} is an ordinary word; it has no resolutions to export.")
    try:
        k = time_bucket(timestep_of(time), concept.num_buckets)
    except ValueError as e:
        raise ConceptError(str(e)) from None
    meta = {**concept.meta, "source_token": concept.token, "time": time, "bucket": k,
            "num_buckets": concept.num_buckets}
    name = token or derived_token(concept.token, f"r{time:g}")
    return Concept(name, concept.vectors[k], step=concept.step, meta=meta)
